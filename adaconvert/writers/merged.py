"""Write a full model checkpoint shard by shard, each tensor streamed in blocks, plus its index and side files.

Shards are planned from names, dtypes and shapes alone, so every safetensors header is known before any data
exists (``io.safetensors_writer.build_header``); data is then appended block by block as the caller produces it.
The layout matches ``transformers``' ``save_pretrained``: ``model.safetensors`` when one shard suffices, else
``model-0000i-of-0000n.safetensors`` and ``model.safetensors.index.json``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adaconvert.errors import CorruptCheckpointError, InvalidConfigError
from adaconvert.io.checkpoint import CONFIG_NAME, INDEX_NAME, SINGLE_NAME, FileSlice
from adaconvert.io.safetensors_writer import TensorSpec, build_header, tensor_nbytes

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".npz")
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}

# a block of output: tensor data, or a byte range of a base file copied as it is
Block = torch.Tensor | FileSlice


def parse_size(size: int | str) -> int:
    """Bytes in ``size``: an int, or a string such as ``5GB`` (10⁹) or ``500MiB`` (2²⁰), as transformers reads it.

    Raises:
        InvalidConfigError: not a positive size.
    """
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        m = _SIZE_RE.match(str(size))
        if not m:
            raise InvalidConfigError(f"--max-shard-size must look like 5GB, 500MB or 2GiB, got {size!r}")
        value = int(float(m.group(1)) * _UNITS[(m.group(2) or "B").upper()])
    if value <= 0:
        raise InvalidConfigError(f"--max-shard-size must be positive, got {size!r}")
    return value


@dataclass
class Shard:
    """One output file and the tensors it holds, in write order."""

    filename: str
    layout: list[TensorSpec] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(tensor_nbytes(dtype, shape) for _, dtype, shape in self.layout)


def plan_shards(layout: Sequence[TensorSpec], max_shard_size: int) -> list[Shard]:
    """Split ``layout`` in order into shards of at most ``max_shard_size`` bytes of data (a larger tensor gets a
    shard of its own), named the way transformers names them."""
    shards: list[Shard] = []
    current = Shard("")
    size = 0
    for spec in layout:
        nbytes = tensor_nbytes(spec[1], spec[2])
        if current.layout and size + nbytes > max_shard_size:
            shards.append(current)
            current, size = Shard(""), 0
        current.layout.append(spec)
        size += nbytes
    if current.layout or not shards:
        shards.append(current)
    for i, shard in enumerate(shards, 1):
        shard.filename = SINGLE_NAME if len(shards) == 1 else f"model-{i:05d}-of-{len(shards):05d}.safetensors"
    return shards


class StreamingShardWriter:
    """Writes one safetensors file whose header is computed from ``layout``; each tensor's bytes arrive in blocks.

    Unlike ``SafetensorsWriter`` (one whole tensor per call), a tensor may be written as consecutive row blocks,
    so that no tensor ever needs to be in memory at once.
    """

    def __init__(self, path: Path, layout: Sequence[TensorSpec]):
        self.path = path
        self._remaining = {name: tensor_nbytes(dtype, shape) for name, dtype, shape in layout}
        self._order = [name for name, _, _ in layout]
        self._next = 0
        self._file = open(path, "wb", buffering=0)  # noqa: SIM115 - closed in close()
        self._write_all(memoryview(build_header(layout, {"format": "pt"})))

    @property
    def pending(self) -> str | None:
        """The tensor whose bytes come next; None once every tensor is complete."""
        while self._next < len(self._order) and self._remaining[self._order[self._next]] == 0:
            self._next += 1
        return self._order[self._next] if self._next < len(self._order) else None

    def write_block(self, name: str, block: Block) -> int:
        """Append the next bytes of tensor ``name``; returns the bytes written.

        A tensor block is written from memory; a :class:`FileSlice` is copied from its file by the kernel
        (``copy_file_range``), falling back to reads and writes where the filesystem cannot.

        Raises:
            ValueError: ``name`` is not the tensor being written, or more bytes arrive than it holds.
            CorruptCheckpointError: the source of a FileSlice ends early.
        """
        if self.pending != name:
            raise ValueError(f"{self.path}: got data for {name!r} while {self.pending!r} is being written")
        nbytes = block.nbytes if isinstance(block, FileSlice) else block.numel() * block.element_size()
        if nbytes > self._remaining[name]:
            raise ValueError(f"{self.path}: more bytes for {name!r} than its shape holds")
        if isinstance(block, FileSlice):
            self._copy_slice(block)
        else:
            self._write_all(memoryview(block.contiguous().reshape(-1).view(torch.uint8).numpy()))
        self._remaining[name] -= nbytes
        return nbytes

    def _write_all(self, data: memoryview) -> None:
        while data.nbytes:
            data = data[self._file.write(data) :]

    def _copy_slice(self, src: FileSlice) -> None:
        done = 0
        with open(src.path, "rb", buffering=0) as f:
            while done < src.nbytes:
                count = src.nbytes - done
                try:
                    n = os.copy_file_range(f.fileno(), self._file.fileno(), count, src.offset + done)
                except OSError:  # EXDEV, EOPNOTSUPP, ENOSYS...: copy through memory instead
                    n = self._write_through_memory(f.fileno(), src.offset + done, min(count, 2**24))
                if n == 0:
                    raise CorruptCheckpointError("file ended while copying a tensor", path=src.path)
                done += n

    def _write_through_memory(self, fd: int, offset: int, count: int) -> int:
        data = os.pread(fd, count, offset)
        self._write_all(memoryview(data))
        return len(data)

    def __enter__(self) -> StreamingShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._file.close()

    def close(self) -> None:
        """Close the file; raises ValueError when a tensor of the layout is incomplete."""
        self._file.close()
        unfinished = [name for name, left in self._remaining.items() if left]
        if unfinished:
            raise ValueError(f"{self.path}: {len(unfinished)} tensor(s) incomplete, first {unfinished[0]!r}")


def write_shards(directory: Path, shards: Sequence[Shard], blocks: Iterable[tuple[str, Block]]) -> Iterator[int]:
    """Write ``shards`` into ``directory`` from ``blocks``: (tensor name, data) pairs in layout order, each tensor's
    data split into any number of consecutive blocks (none for an empty tensor); then the index when there is
    more than one shard. A generator: yields the bytes written after each block (for progress bars); the files
    are complete once it is exhausted.

    Raises:
        ValueError: the blocks do not match the layout (wrong order, too few or too many bytes).
    """
    blocks = iter(blocks)
    for shard in shards:
        with StreamingShardWriter(directory / shard.filename, shard.layout) as writer:
            while writer.pending:
                item = next(blocks, None)
                if item is None:
                    raise ValueError(f"{writer.path}: data ended before {writer.pending!r} was complete")
                yield writer.write_block(*item)
    if next(blocks, None) is not None:
        raise ValueError("more data than the layout announces")
    if len(shards) > 1:
        write_index(directory, shards)


def write_index(directory: Path, shards: Sequence[Shard]) -> None:
    """``model.safetensors.index.json``: total size and the shard of every tensor, names sorted."""
    weight_map = {name: shard.filename for shard in shards for name, _, _ in shard.layout}
    params = sum(torch.Size(shape).numel() for shard in shards for _, _, shape in shard.layout)
    index = {
        "metadata": {"total_parameters": params, "total_size": sum(s.nbytes for s in shards)},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def copy_side_files(src: Path, dst: Path, *, dtype: torch.dtype | None = None) -> list[str]:
    """Copy every top-level file of ``src`` that is not a weights file or index (config, generation config,
    tokenizer files, chat template, custom code, licence...). With ``dtype``, config.json's ``dtype`` /
    ``torch_dtype`` are set to it. Returns the names copied."""
    copied = []
    for path in sorted(src.iterdir()):
        name = path.name
        if not path.is_file() or name.startswith(".") or name.endswith((*_WEIGHT_SUFFIXES, ".index.json")):
            continue
        if name == CONFIG_NAME and dtype is not None:
            config = json.loads(path.read_text(encoding="utf-8"))
            _set_dtype(config, str(dtype).removeprefix("torch."))
            (dst / name).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        else:
            shutil.copyfile(path, dst / name)
        copied.append(name)
    return copied


def _set_dtype(config: dict, dtype: str) -> None:
    keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]
    for key in keys:
        config[key] = dtype
    for sub in ("text_config",):
        if isinstance(config.get(sub), dict) and any(k in config[sub] for k in ("dtype", "torch_dtype")):
            _set_dtype(config[sub], dtype)
