"""Write a full model checkpoint shard by shard, each tensor streamed in blocks, plus its index and side files.

Shards are planned from names, dtypes and shapes alone, so every safetensors header is known before any data
exists (``io.safetensors_writer.build_header``); data then goes straight to its place in the file, block by block
and in any order, as the caller produces it.
The layout matches ``transformers``' ``save_pretrained``: ``model.safetensors`` when one shard suffices, else
``model-0000i-of-0000n.safetensors`` and ``model.safetensors.index.json``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adaconvert.constants import MODEL_CONFIG_NAME, MODEL_INDEX_NAME, MODEL_WEIGHTS_NAME
from adaconvert.errors import InvalidConfigError
from adaconvert.io.safetensors_writer import TensorSpec, build_header, tensor_nbytes

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".npz")
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


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
        shard.filename = MODEL_WEIGHTS_NAME if len(shards) == 1 else f"model-{i:05d}-of-{len(shards):05d}.safetensors"
    return shards


class ShardFiles:
    """The output files of a shard plan, open for positioned writes: tensor bytes go to (tensor, byte offset) in
    any order.

    Every header is written when the files are opened, so each tensor's place in its file is fixed from the start
    and blocks can be written as soon as they are ready, whatever order they are computed in. ``close`` checks
    that every byte of every tensor arrived, then writes the index when there is more than one shard.

    Example:
        >>> with ShardFiles(directory, plan_shards(layout, 5 * 10**9)) as files:
        ...     files.write("lm_head.weight", 0, memoryview(block_bytes))
    """

    def __init__(self, directory: Path, shards: Sequence[Shard]):
        self.directory = directory
        self.shards = list(shards)
        self._where: dict[str, tuple[int, int, int]] = {}  # tensor → (fd, file offset of its data, nbytes)
        self._written: dict[str, int] = {}
        self._lock = threading.Lock()
        self._fds: list[int] = []
        try:
            for shard in self.shards:
                fd = os.open(directory / shard.filename, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                self._fds.append(fd)
                header = build_header(shard.layout, {"format": "pt"})
                _pwrite_all(fd, memoryview(header), 0)
                offset = len(header)
                for name, dtype, shape in shard.layout:
                    nbytes = tensor_nbytes(dtype, shape)
                    self._where[name] = (fd, offset, nbytes)
                    self._written[name] = 0
                    offset += nbytes
        except BaseException:
            self._close_files()
            raise

    def write(self, name: str, begin: int, data: memoryview) -> int:
        """Write ``data`` at byte ``begin`` of tensor ``name``'s data; returns the bytes written."""
        fd, offset = self._claim(name, begin, data.nbytes)
        _pwrite_all(fd, data, offset)
        return data.nbytes

    def _claim(self, name: str, begin: int, nbytes: int) -> tuple[int, int]:
        """(fd, file offset) for ``nbytes`` at ``begin`` of ``name``; counts them towards the tensor's total."""
        if name not in self._where:
            raise ValueError(f"{self.directory}: tensor {name!r} is not in the shard plan")
        fd, offset, size = self._where[name]
        if begin < 0 or begin + nbytes > size:
            raise ValueError(f"{self.directory}: bytes [{begin}, {begin + nbytes}) fall outside {name!r} ({size} B)")
        with self._lock:
            self._written[name] += nbytes
        return fd, offset + begin

    def close(self) -> None:
        """Close the files; raise ValueError when a tensor did not get exactly its bytes; write the index."""
        self._close_files()
        wrong = [name for name, (_, _, size) in self._where.items() if self._written[name] != size]
        if wrong:
            first, got, size = wrong[0], self._written[wrong[0]], self._where[wrong[0]][2]
            raise ValueError(f"{self.directory}: {len(wrong)} tensor(s) incomplete, first {first!r} ({got}/{size} B)")
        if len(self.shards) > 1:
            write_index(self.directory, self.shards)

    def _close_files(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> ShardFiles:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._close_files()


def _pwrite_all(fd: int, data: memoryview, offset: int) -> int:
    done = 0
    while done < data.nbytes:
        done += os.pwrite(fd, data[done:], offset + done)
    return done


def write_index(directory: Path, shards: Sequence[Shard]) -> None:
    """``model.safetensors.index.json``: total size and the shard of every tensor, names sorted."""
    weight_map = {name: shard.filename for shard in shards for name, _, _ in shard.layout}
    params = sum(torch.Size(shape).numel() for shard in shards for _, _, shape in shard.layout)
    index = {
        "metadata": {"total_parameters": params, "total_size": sum(s.nbytes for s in shards)},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (directory / MODEL_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def copy_side_files(src: Path, dst: Path, *, dtype: torch.dtype | None = None) -> list[str]:
    """Copy every top-level file of ``src`` that is not a weights file or index (config, generation config,
    tokenizer files, chat template, custom code, licence...). With ``dtype``, config.json's ``dtype`` /
    ``torch_dtype`` are set to it. Returns the names copied."""
    copied = []
    for path in sorted(src.iterdir()):
        name = path.name
        if not path.is_file() or name.startswith(".") or name.endswith((*_WEIGHT_SUFFIXES, ".index.json")):
            continue
        if name == MODEL_CONFIG_NAME and dtype is not None:
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
