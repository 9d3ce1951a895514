"""Write a safetensors file tensor by tensor, without holding the file's tensors in memory.

A safetensors file is an 8-byte little-endian header length, a JSON header (name → dtype, shape, byte offsets),
then the raw bytes of every tensor. The header depends only on names, dtypes and shapes, so it can be written
before any data: each tensor is then appended as it is produced and can be dropped straight after.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}

TensorSpec = tuple[str, torch.dtype, Sequence[int]]


def tensor_nbytes(dtype: torch.dtype, shape: Sequence[int]) -> int:
    return math.prod(shape) * dtype.itemsize


def build_header(layout: Sequence[TensorSpec], metadata: Mapping[str, str] | None = None) -> bytes:
    """The header bytes (length prefix included) for tensors laid out in ``layout`` order.

    The JSON is padded with spaces to a multiple of 8 bytes so that tensor data stays aligned, as the reference
    implementation does.
    """
    header: dict = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, dtype, shape in layout:
        if name in header:
            raise ValueError(f"duplicate tensor name {name!r}")
        nbytes = tensor_nbytes(dtype, shape)
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


class SafetensorsWriter:
    """Streams tensors into ``path`` in the order of ``layout``.

    Example:
        >>> with SafetensorsWriter(path, [("w", torch.float32, (2, 3))]) as w:
        ...     w.write("w", torch.zeros(2, 3))
    """

    def __init__(self, path: str | Path, layout: Sequence[TensorSpec], metadata: Mapping[str, str] | None = None):
        self.path = Path(path)
        self._layout = [(n, d, tuple(s)) for n, d, s in layout]
        self._next = 0
        self._file = open(self.path, "wb")  # noqa: SIM115 - closed in close()
        self._file.write(build_header(self._layout, metadata))

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append ``tensor``; it must be the next one of the layout, with the announced dtype and shape."""
        if self._next >= len(self._layout):
            raise ValueError(f"{self.path}: tensor {name!r} was not announced in the header")
        exp_name, exp_dtype, exp_shape = self._layout[self._next]
        if (name, tensor.dtype, tuple(tensor.shape)) != (exp_name, exp_dtype, exp_shape):
            raise ValueError(
                f"{self.path}: expected {exp_name} {exp_dtype} {list(exp_shape)}, "
                f"got {name} {tensor.dtype} {list(tensor.shape)}"
            )
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        self._file.write(memoryview(data.numpy()))
        self._next += 1

    def close(self) -> None:
        self._file.close()
        if self._next != len(self._layout):
            missing = [n for n, _, _ in self._layout[self._next :]]
            raise ValueError(f"{self.path}: {len(missing)} announced tensor(s) never written, first {missing[0]!r}")

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._file.close()


def save_tensors(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None):
    """Write a dict of tensors as one safetensors file, one tensor at a time (no whole-file buffer)."""
    layout = [(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]
    with SafetensorsWriter(path, layout, metadata) as writer:
        for name, t in tensors.items():
            writer.write(name, t)
