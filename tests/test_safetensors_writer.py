"""The streaming safetensors writer: byte-exact header, and files the reference library reads back."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from adaconvert.io.safetensors_writer import SafetensorsWriter, build_header, save_tensors


def test_header_bytes_are_pinned():
    header = build_header([("a", torch.float32, (2, 3)), ("b", torch.bfloat16, (4,))], {"format": "pt"})
    body = b'{"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},' + (
        b'"b":{"dtype":"BF16","shape":[4],"data_offsets":[24,32]}}'
    )
    body += b" " * (-len(body) % 8)
    assert header == struct.pack("<Q", len(body)) + body
    assert len(header) % 8 == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool])
def test_roundtrip_with_the_reference_reader(tmp_path, dtype):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "x.weight": (torch.randn(5, 7, generator=g) * 10).to(dtype),
        "empty": torch.zeros(0, 3, dtype=dtype),
        "scalar": torch.tensor(3, dtype=dtype),
        "t": torch.randn(3, 4, generator=g).to(dtype).T,  # non-contiguous input
    }
    save_tensors(tmp_path / "f.safetensors", tensors, {"format": "pt"})
    back = load_file(tmp_path / "f.safetensors")
    assert back.keys() == tensors.keys()
    for k, v in tensors.items():
        assert back[k].dtype == dtype and torch.equal(back[k], v)
    with safe_open(tmp_path / "f.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_out_of_order_or_wrong_shape_is_refused(tmp_path):
    layout = [("a", torch.float32, (2,)), ("b", torch.float32, (3,))]
    with pytest.raises(ValueError, match="expected a"), SafetensorsWriter(tmp_path / "f", layout) as w:
        w.write("b", torch.zeros(3))
    with (
        pytest.raises(ValueError, match=r"expected a torch.float32 \[2\]"),
        SafetensorsWriter(tmp_path / "g", layout) as w,
    ):
        w.write("a", torch.zeros(3))
    with pytest.raises(ValueError, match="never written"), SafetensorsWriter(tmp_path / "h", layout) as w:
        w.write("a", torch.zeros(2))


def test_header_is_valid_json_padded_with_spaces():
    raw = build_header([("w", torch.float16, (3,))])
    n = struct.unpack("<Q", raw[:8])[0]
    assert json.loads(raw[8 : 8 + n]) == {"w": {"dtype": "F16", "shape": [3], "data_offsets": [0, 6]}}


@pytest.mark.parametrize("slow_disk", [False, True])
def test_write_padded_is_the_padded_tensor(tmp_path, monkeypatch, slow_disk):
    """write_padded streams a cast, zero-padded copy through reused buffers (a few per row width, in turn, each
    written by the writer's thread): the file holds exactly ``zeros(shape)`` with the tensor in its corner, for
    transposed views, row and column padding, several buffer chunks, and a narrower tensor after a wider one, also
    with a tensor of another width in between (whose data columns must not leak into its padding). With a slow
    disk, a buffer refilled before its bytes were written would put the next chunk's bytes in their place."""
    import time

    import adaconvert.io.safetensors_writer as writer_module

    monkeypatch.setattr(writer_module, "_BUFFER_BYTES", 64)  # 8 float32 rows of 2: every tensor takes several chunks
    if slow_disk:
        write = SafetensorsWriter._write_batch
        monkeypatch.setattr(SafetensorsWriter, "_write_batch", lambda *args: (time.sleep(0.002), write(*args)))
        monkeypatch.setattr(writer_module, "_BATCH_BYTES", 40)  # tensors written as they are: some batched, some not
    g = torch.Generator().manual_seed(0)
    cases = [  # (name, tensor, dtype, padded shape)
        ("wide", torch.randn(9, 4, generator=g), torch.float32, (11, 4)),  # rows only: written as it is
        ("three", torch.randn(10, 3, generator=g), torch.float32, (10, 4)),
        ("seven wide", torch.randn(5, 6, generator=g), torch.float32, (5, 7)),
        ("two", torch.randn(6, 2, generator=g), torch.float32, (6, 4)),
        ("narrow", torch.randn(13, 1, generator=g), torch.float32, (13, 4)),
        ("transposed", torch.randn(3, 10, generator=g).T, torch.bfloat16, (12, 4)),
        ("empty", torch.zeros(0, 4), torch.float16, (2, 4)),
        ("same", torch.randn(4, 4, generator=g), torch.float32, (4, 4)),
    ]
    layout = [(name, dtype, shape) for name, _, dtype, shape in cases]
    with SafetensorsWriter(tmp_path / "p.safetensors", layout) as w:
        for name, tensor, dtype, shape in cases:
            w.write_padded(name, tensor, dtype, shape)
    loaded = load_file(tmp_path / "p.safetensors")
    for name, tensor, dtype, shape in cases:
        expected = torch.zeros(shape, dtype=dtype)
        expected[: tensor.shape[0], : tensor.shape[1]] = tensor.to(dtype)
        assert torch.equal(loaded[name], expected), name


def test_padding_rows_read_as_zeros_also_at_the_end(tmp_path):
    """Padding rows are skipped, not written (the file system reads zeros there): they read as zeros, in the
    middle and at the end of the file, whose length is the header's, also when the path held other bytes before."""
    path = tmp_path / "p.safetensors"
    path.write_bytes(b"\xff" * (3 << 20))
    g = torch.Generator().manual_seed(0)
    cases = [
        ("mid", torch.randn(3, 256, generator=g), (600, 256)),
        ("end", torch.randn(2, 256, generator=g), (900, 256)),
    ]
    with SafetensorsWriter(path, [(name, torch.float32, shape) for name, _, shape in cases]) as w:
        for name, tensor, shape in cases:
            w.write_padded(name, tensor, torch.float32, shape)
    header = build_header([(name, torch.float32, shape) for name, _, shape in cases])
    assert path.stat().st_size == len(header) + (600 + 900) * 256 * 4
    loaded = load_file(path)
    for name, tensor, shape in cases:
        expected = torch.zeros(shape)
        expected[: len(tensor)] = tensor
        assert torch.equal(loaded[name], expected), name


@pytest.mark.parametrize("misaligned", [False, True])
def test_load_tensors_matches_the_reference_reader(tmp_path, misaligned):
    """Tensors come as views of one mapping of the file, or (an offset not a multiple of the element size: 3 bytes
    of int8 first) through safetensors' get_tensor: either way the names, order, dtypes and values it reads."""
    from adaconvert.io.source import _mapped_tensors, load_tensors

    g = torch.Generator().manual_seed(0)
    tensors = {  # each offset a multiple of the element size: 0, 8, 148
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "b.weight": torch.randn(5, 7, generator=g),
        "empty": torch.zeros(0, 3),
        "a.bias": torch.randn(3, generator=g).to(torch.bfloat16),
    }
    if misaligned:
        tensors = {"0.odd": torch.arange(3, dtype=torch.int8), **tensors}
    path = tmp_path / "f.safetensors"
    save_tensors(path, tensors)
    assert (_mapped_tensors(path, sorted(tensors)) is None) == misaligned
    back, reference = load_tensors(path), load_file(path)
    with safe_open(path, "pt") as f:
        assert list(back) == list(f.keys())  # the order the readers always had
    for k, v in reference.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape and torch.equal(back[k], v)


def test_a_failed_write_reaches_the_caller():
    """A write that fails (a full disk: Linux's /dev/full) is raised to the caller, never lost in a buffer."""
    layout = [(f"t{i}", torch.float32, (256, 1024)) for i in range(3)]
    with pytest.raises(OSError, match="No space left"), SafetensorsWriter("/dev/full", layout) as w:
        for name, _, shape in layout:
            w.write(name, torch.ones(shape))
