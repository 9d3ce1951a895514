"""Read a Hugging Face base checkpoint lazily: single or sharded safetensors, one tensor (or row block) at a time.

Only the JSON headers are parsed up front: names, dtypes, shapes and byte offsets of every tensor, checked
against the file sizes, so a truncated shard is found before any output is written. Tensor data is then read
with plain positioned reads into a fresh buffer, never through a memory map: pages of a mapped file count towards
the process's resident memory once touched, and a merge touches every byte of the model.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from adaconvert.constants import MODEL_CONFIG_NAME, MODEL_INDEX_NAME, MODEL_WEIGHTS_NAME
from adaconvert.errors import CorruptCheckpointError, InvalidConfigError, SourceNotFoundError, first_line
from adaconvert.io.safetensors_writer import SAFETENSORS_DTYPES, tensor_nbytes
from adaconvert.io.source import describe_path, parse_json, read_json, resolve_source

logger = logging.getLogger(__name__)

DTYPES_BY_CODE = {code: dtype for dtype, code in SAFETENSORS_DTYPES.items()}
# what a merge needs from a Hub repo besides the weights: configs, tokenizer files, chat templates, custom code
_HUB_SIDE_FILES = ["*.json", "*.txt", "*.model", "*.tiktoken", "*.jinja", "*.py", "*.md"]
_MAX_HEADER = 100_000_000  # the safetensors reference implementation's limit


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: ``file`` bytes [offset, offset + nbytes) hold it, row-major."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    offset: int
    nbytes: int

    @property
    def row_nbytes(self) -> int:
        """Bytes of one slice along the first dimension (the whole tensor for 0-d tensors)."""
        return self.nbytes // self.shape[0] if self.shape and self.shape[0] else self.nbytes


@dataclass(frozen=True)
class Checkpoint:
    """A base model directory: its config and the location of every tensor, in storage order.

    Attributes:
        root: the directory (a Hub snapshot for repo ids).
        config: parsed config.json.
        tensors: name → :class:`TensorInfo`, ordered by file then offset (the order reads are sequential in).
        files: the safetensors files, in order.
    """

    root: Path
    config: dict
    tensors: dict[str, TensorInfo]
    files: tuple[Path, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @cached_property
    def tie_word_embeddings(self) -> bool:
        """Whether the output head shares the input embedding matrix (top level or ``text_config``)."""
        text = self.config.get("text_config") or {}
        return bool(self.config.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))


def resolve_checkpoint(src: str | Path) -> Path:
    """A local directory for ``src``: the path itself, or a Hub snapshot holding the config, tokenizer and
    safetensors weights (and nothing else: no ``.bin`` duplicates, no ``original/`` folder).

    Raises:
        SourceNotFoundError: neither a directory nor a repo id the Hub (or its cache) can provide.
    """

    def fetch(repo_id: str) -> Path:
        from huggingface_hub import snapshot_download

        root = Path(snapshot_download(repo_id, allow_patterns=_HUB_SIDE_FILES))
        index = root / MODEL_INDEX_NAME
        weights = sorted(set(_weight_map(index).values())) if index.is_file() else [MODEL_WEIGHTS_NAME]
        return Path(snapshot_download(repo_id, allow_patterns=[*_HUB_SIDE_FILES, *weights]))

    return resolve_source(src, what="a model directory", fetch=fetch)


def open_checkpoint(src: str | Path) -> Checkpoint:
    """Resolve ``src`` and read config.json and every safetensors header (no tensor data).

    Raises:
        SourceNotFoundError: no directory, no config.json, no safetensors weights, or a shard the index names
            is missing.
        InvalidConfigError: config.json or the index cannot be parsed.
        CorruptCheckpointError: a header is malformed, a shard is truncated or has trailing bytes, the index
            names a tensor its shard does not hold, or a tensor appears in two shards.
    """
    root = resolve_checkpoint(src)
    config = read_json(root / MODEL_CONFIG_NAME)
    if not isinstance(config.get("text_config", {}), dict | None):
        raise InvalidConfigError("field 'text_config' must be an object", path=root / MODEL_CONFIG_NAME)
    index_path = root / MODEL_INDEX_NAME
    if os.path.lexists(index_path):
        weight_map = _weight_map(index_path)
        files = tuple(root / name for name in dict.fromkeys(sorted(weight_map.values())))
    elif os.path.lexists(root / MODEL_WEIGHTS_NAME):
        weight_map, files = None, (root / MODEL_WEIGHTS_NAME,)
    else:
        found = sorted(p.name for p in root.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".safetensors"))
        hint = f" (found {', '.join(found)}; convert them to safetensors first)" if found else ""
        raise SourceNotFoundError(f"no {MODEL_WEIGHTS_NAME} or {MODEL_INDEX_NAME}{hint}", path=root)
    tensors: dict[str, TensorInfo] = {}
    for file in files:
        if os.path.lexists(file) and not file.is_file():  # never opened: a FIFO would block
            raise CorruptCheckpointError(f"is {describe_path(file)}, not a weights file", path=file)
        if not file.is_file():
            raise SourceNotFoundError(f"shard named in {MODEL_INDEX_NAME} is missing", path=file)
        for name, info in read_header(file).items():
            if name in tensors:
                raise CorruptCheckpointError(f"tensor {name!r} is also in {tensors[name].file.name}", path=file)
            tensors[name] = info
    for name, shard in (weight_map or {}).items():
        if name not in tensors or tensors[name].file.name != shard:
            raise CorruptCheckpointError(
                f"{MODEL_INDEX_NAME} puts {name!r} in {shard}, which does not hold it", path=root
            )
    logger.debug("%s: %d tensors in %d file(s)", root, len(tensors), len(files))
    return Checkpoint(root=root, config=config, tensors=tensors, files=files)


def match_tensor(module: str, names) -> list[str]:
    """The base tensors that may hold ``module``'s weight: ``<module>.weight`` itself if present; otherwise keys
    that add a prefix (``language_model.<module>.weight``) or lack the first component (``layers.0...`` for a
    checkpoint saved without the ``model.`` wrapper). The caller requires exactly one."""
    exact = f"{module}.weight"
    if exact in names:
        return [exact]
    found = [n for n in names if n.endswith(f".{exact}")]
    _, _, rest = module.partition(".")
    if rest and f"{rest}.weight" in names:
        found.append(f"{rest}.weight")
    return sorted(found)


def _weight_map(index_path: Path) -> dict[str, str]:
    """The ``weight_map`` of a shard index: tensor name → shard file name, both strings, shards plain file names.

    Raises:
        InvalidConfigError: the index cannot be parsed, or its weight_map is not such an object.
    """
    weight_map = read_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise InvalidConfigError("no 'weight_map' object", path=index_path)
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard or Path(shard).name != shard:
            raise InvalidConfigError(f"weight_map[{name!r}] must be a shard file name, got {shard!r}", path=index_path)
    return weight_map


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and check one safetensors header: known dtypes, sizes that match shapes, tensors packed back to back
    from the start of the data section, and a file exactly as long as the header says.

    Returns:
        name → :class:`TensorInfo` with absolute offsets, in offset order.

    Raises:
        CorruptCheckpointError: anything above fails; a short file is reported as truncated.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CorruptCheckpointError("truncated safetensors file (no header)", path=path)
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(_MAX_HEADER, size - 8):
            raise CorruptCheckpointError(
                f"truncated or not a safetensors file (header of {header_len} bytes, file of {size})", path=path
            )
        raw = f.read(header_len)
    header = parse_json(raw, path=path, error=CorruptCheckpointError)
    if not isinstance(header, dict):
        raise CorruptCheckpointError("safetensors header is not a JSON object", path=path)
    header.pop("__metadata__", None)
    data_start = 8 + header_len
    entries = []
    for name, entry in header.items():
        entries.append(_tensor_info(name, entry, path, data_start))
    entries.sort(key=lambda t: t.offset)
    expected = data_start
    for info in entries:
        if info.offset != expected:
            raise CorruptCheckpointError(f"tensor {info.name!r} does not start where the previous ends", path=path)
        expected += info.nbytes
    if size < expected:
        raise CorruptCheckpointError(f"truncated: {size} bytes, header describes {expected}", path=path)
    if size > expected:
        raise CorruptCheckpointError(f"{size - expected} unexpected bytes after the last tensor", path=path)
    return {info.name: info for info in entries}


def _tensor_info(name: str, entry, path: Path, data_start: int) -> TensorInfo:
    dtype = DTYPES_BY_CODE.get(entry.get("dtype")) if isinstance(entry, dict) else None
    if dtype is None:
        raise CorruptCheckpointError(f"bad header entry for {name!r}: {first_line(repr(entry), 120)}", path=path)
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not (_counts(shape) and _counts(offsets) and len(offsets) == 2):
        raise CorruptCheckpointError(
            f"tensor {name!r}: shape and data_offsets must be non-negative integers, got "
            f"{first_line(repr(shape), 60)} and {first_line(repr(offsets), 60)}",
            path=path,
        )
    shape = tuple(shape)
    begin, end = offsets
    nbytes = tensor_nbytes(dtype, shape)
    if end - begin != nbytes:
        raise CorruptCheckpointError(
            f"tensor {name!r}: offsets do not match {entry['dtype']} {list(shape)}", path=path
        )
    return TensorInfo(name=name, dtype=dtype, shape=shape, file=path, offset=data_start + begin, nbytes=nbytes)


def _counts(value) -> bool:
    """A JSON list of non-negative integers: 384.5 is not a size, and true is not 1 (``type`` is exact: not bool)."""
    return type(value) is list and all(type(x) is int and x >= 0 for x in value)


class TensorReader:
    """Reads tensors, or blocks of their rows, of a :class:`Checkpoint` with positioned reads.

    Keeps one open handle per file, shared by every thread (positioned reads need no file position); nothing is
    cached. ``read_rows``/``read_bytes`` return new tensors,
    ``read_into`` fills a buffer the caller reuses.

    Example:
        >>> with TensorReader() as reader:
        ...     w = reader.read_rows(ckpt.tensors["lm_head.weight"], 0, 128)  # (128, hidden)
    """

    def __init__(self):
        self._files: dict[Path, object] = {}
        self._lock = threading.Lock()

    def read_into(self, info: TensorInfo, begin: int, length: int, buffer: torch.Tensor) -> torch.Tensor:
        """Read ``length`` bytes of ``info`` from byte ``begin`` of its data into the start of ``buffer`` (a uint8
        tensor at least that long, reused by the caller); returns that part of ``buffer``.

        Raises:
            CorruptCheckpointError: the file ended early (it changed after its header was checked).
        """
        view = buffer[:length]
        if length == 0:
            return view
        fd = self._fileno(info.file)
        got = os.preadv(fd, [memoryview(view.numpy())], info.offset + begin)
        while 0 < got < length:  # short reads: regular files only give them at the end, but be exact
            more = os.preadv(fd, [memoryview(view[got:].numpy())], info.offset + begin + got)
            if more == 0:
                break
            got += more
        if got != length:
            raise CorruptCheckpointError(f"truncated while reading {info.name!r}", path=info.file)
        return view

    def _fileno(self, path: Path) -> int:
        with self._lock:  # threads share the reader: open each file once
            f = self._files.get(path)
            if f is None:
                f = self._files[path] = open(path, "rb", buffering=0)  # noqa: SIM115 - closed in close()
            return f.fileno()

    def read(self, info: TensorInfo) -> torch.Tensor:
        """The whole tensor, in its dtype and shape (a new tensor)."""
        return self.read_rows(info, 0, info.shape[0] if info.shape else 1)

    def read_rows(self, info: TensorInfo, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of ``info`` (along the first dimension), shape (stop - start, *shape[1:])."""
        if not info.shape:
            return self.read_bytes(info, 0, info.nbytes).view(info.dtype).reshape(())
        data = self.read_bytes(info, start * info.row_nbytes, (stop - start) * info.row_nbytes)
        return data.view(info.dtype).reshape(stop - start, *info.shape[1:])

    def read_bytes(self, info: TensorInfo, begin: int, length: int) -> torch.Tensor:
        """``length`` raw bytes of ``info`` from byte ``begin`` of its data, as a uint8 tensor.

        Raises:
            CorruptCheckpointError: the file ended early (it changed after its header was checked).
        """
        return self.read_into(info, begin, length, torch.empty(length, dtype=torch.uint8))

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
