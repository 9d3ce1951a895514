"""Write a GGUF file (version 3) tensor by tensor, as llama.cpp's ``gguf`` package (``GGUFWriter``) lays it out.

A GGUF file is a header (magic ``GGUF``, version, tensor count, key/value count), typed key/value pairs, one info
record per tensor (name, dimensions listed innermost first, ggml type, data offset), padding to ``ALIGNMENT``, then
each tensor's data, padded to ``ALIGNMENT`` in turn. Like a safetensors header, all of it depends only on names,
types and shapes, so data is appended as it is produced (:class:`~adaconvert.io.safetensors_writer.SafetensorsWriter`
does the streaming). ``tests/test_gguf.py`` asserts the bytes equal ``GGUFWriter``'s for every type we write.

Importing ``gguf`` costs 40 ms (its metadata, YAML and vocabulary modules), a fifth of an 8B-shaped adapter's
export; only q8_0's block quantisation still needs it (:func:`encode_q8_0`).
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from adaconvert.io.safetensors_writer import SafetensorsWriter

GGUF_MAGIC = b"GGUF"
GGUF_VERSION = 3
ALIGNMENT = 32  # GGUF_DEFAULT_ALIGNMENT; a file that sets ``general.alignment`` may choose another

# ggml_type of each output type, and the torch dtype its data is written in (q8_0: bytes, see Q8_0_BLOCK)
GGML_TYPES: dict[str, int] = {"f32": 0, "f16": 1, "q8_0": 8, "bf16": 30}
_TORCH_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16, "q8_0": torch.uint8}
Q8_0_BLOCK = (32, 34)  # (values, bytes) per block: a float16 scale, then 32 int8 values

# gguf_type of a key/value pair, by the Python type of its value
_STRING, _FLOAT32, _UINT32 = 8, 6, 4


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One tensor of the file: ``shape`` (rows, cols) in values, torch's order; GGUF lists it reversed (``ne[0]``
    is the row length)."""

    name: str
    shape: tuple[int, int]
    outtype: str  # a key of GGML_TYPES

    @property
    def stored(self) -> tuple[torch.dtype, tuple[int, int]]:
        """(dtype, shape) of the data as written: the values, or for q8_0 each row's blocks as bytes."""
        rows, cols = self.shape
        if self.outtype == "q8_0":
            return torch.uint8, (rows, cols // Q8_0_BLOCK[0] * Q8_0_BLOCK[1])
        return _TORCH_DTYPES[self.outtype], (rows, cols)


def _string(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _value(value: str | float | int) -> bytes:
    """A typed value: a str is a STRING, a float a FLOAT32, an int a UINT32 (what the adapter keys use)."""
    if isinstance(value, str):
        return struct.pack("<I", _STRING) + _string(value)
    if isinstance(value, float):
        return struct.pack("<I", _FLOAT32) + struct.pack("<f", value)
    if isinstance(value, int) and not isinstance(value, bool):
        return struct.pack("<I", _UINT32) + struct.pack("<I", value)
    raise TypeError(f"unsupported GGUF value {value!r}")


def gguf_header(metadata: Sequence[tuple[str, str | float | int]], tensors: Sequence[GGUFTensorInfo]) -> bytes:
    """Header, key/value pairs (in order) and tensor infos, padded to ``ALIGNMENT``: everything before the data."""
    out = bytearray(GGUF_MAGIC + struct.pack("<IQQ", GGUF_VERSION, len(tensors), len(metadata)))
    for key, value in metadata:
        out += _string(key) + _value(value)
    offset = 0
    for tensor in tensors:
        rows, cols = tensor.shape
        out += _string(tensor.name) + struct.pack("<IQQIQ", 2, cols, rows, GGML_TYPES[tensor.outtype], offset)
        dtype, shape = tensor.stored
        offset += _padded(shape[0] * shape[1] * dtype.itemsize)
    out += bytes(-len(out) % ALIGNMENT)
    return bytes(out)


def _padded(nbytes: int) -> int:
    return nbytes + (-nbytes % ALIGNMENT)


class GGUFWriter(SafetensorsWriter):
    """Streams tensors into a GGUF file at ``path``, in the order of ``tensors``, with ``write`` / ``write_padded``
    as for safetensors (the data in :attr:`GGUFTensorInfo.stored`'s dtype and shape).

    Example:
        >>> with GGUFWriter(path, [GGUFTensorInfo("t", (2, 3), "f16")], [("general.type", "adapter")]) as w:
        ...     w.write_padded("t", torch.zeros(2, 3), torch.float16, (2, 3))
    """

    def __init__(
        self,
        path: str | Path,
        tensors: Sequence[GGUFTensorInfo],
        metadata: Sequence[tuple[str, str | float | int]],
    ):
        self._infos = list(tensors)
        super().__init__(path, [(t.name, *t.stored) for t in self._infos], metadata)

    def _header(self, metadata) -> bytes:
        return gguf_header(metadata, self._infos)

    def _tensor_done(self, nbytes: int) -> None:
        self._skip(-nbytes % ALIGNMENT)


def encode_q8_0(values: torch.Tensor) -> torch.Tensor:
    """(rows, cols) float32 → (rows, cols / 32 · 34) uint8: ggml's q8_0 blocks, by the ``gguf`` package's own
    quantisation (llama.cpp's reference rounding)."""
    gguf = gguf_package()
    data = gguf.quants.quantize(values.float().contiguous().numpy(), gguf.GGMLQuantizationType.Q8_0)
    return torch.from_numpy(data)


def gguf_package():
    """The ``gguf`` package, imported without its Mistral tokenizer support.

    ``gguf/__init__`` imports ``gguf.vocab``, which imports ``mistral_common`` when it is installed (vLLM brings it):
    about 0.4 s of OpenCV and pydantic, for tokenizers an adapter never has. ``gguf.vocab`` takes an ImportError as
    "not installed"; the block lasts for the import only, and only when nothing in the process has imported
    ``mistral_common`` already.
    """
    if "gguf" in sys.modules:
        return sys.modules["gguf"]
    blocked = "mistral_common" not in sys.modules
    if blocked:
        sys.modules["mistral_common"] = None  # an import of it raises ImportError
    try:
        import gguf
    finally:
        if blocked and sys.modules.get("mistral_common", 0) is None:
            del sys.modules["mistral_common"]
    return gguf
