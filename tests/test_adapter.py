"""``LowRankDelta.folding``: the fold a reader defers to the writer gives, bit for bit, what folding at once gives."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from adaconvert.adapter import LowRankDelta
from adaconvert.io.safetensors_writer import SafetensorsWriter


def _eager(A, B, scale, keep):
    """The fold as the readers computed it before it was deferred: selected, then cast, then scaled."""
    if keep is not None:
        scale = scale.index_select(0, keep) if isinstance(scale, torch.Tensor) else scale
        return A.index_select(0, keep).float(), B.index_select(1, keep).float().mul_(scale)
    return A.float(), B.float() * scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("how", ["vector", "vector+keep", "float", "keep-all"])
def test_deferred_fold_is_the_eager_fold(tmp_path, monkeypatch, dtype, how):
    """Rows in blocks, the whole factors, and the bytes a writer puts on disk (in blocks of 3 rows, cast and padded
    or not) equal the eager fold's, and the saved tensors are left as they were (they are views of the user's file:
    a fold in place would write into its private mapping and change what the next read sees)."""
    import adaconvert.io.safetensors_writer as writer_module

    monkeypatch.setattr(writer_module, "_BUFFER_BYTES", 3 * 8 * 4)  # 3 rows of the widest padded float32 tensor
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(6, 8, generator=g).to(dtype), torch.randn(10, 6, generator=g).to(dtype)
    saved = A.clone(), B.clone()
    scale = torch.randn(6, generator=g) * 3 if how != "float" else 0.37
    keep = {"vector+keep": torch.tensor([0, 2, 5]), "keep-all": torch.arange(6)}.get(how)
    eager_A, eager_B = _eager(A, B, scale, keep)

    delta = LowRankDelta.folding(A, B, scale, keep)
    assert (delta.rank, delta.in_features, delta.out_features) == (len(eager_A), 8, 10)
    assert delta.num_params == eager_A.numel() + eager_B.numel()
    first_a, first_b = delta.first_entries()
    assert torch.equal(first_a, eager_A[:, 0]) and torch.equal(first_b, eager_B[0])
    blocks = torch.cat([delta.rows("B", start, start + 4) for start in range(0, 10, 4)])
    assert torch.equal(blocks, eager_B) and torch.equal(delta.rows("A", 1, 3), eager_A[1:3])

    columns = torch.cat([delta.columns("A", start, start + 3) for start in range(0, 8, 3)])
    assert torch.equal(columns, eager_A.T) and torch.equal(delta.columns("B", 1, 3), eager_B[:, 1:3].T)

    out = tmp_path / "f.safetensors"
    r, specs = delta.rank, []  # (name, factor, dtype, padded shape): computed into the writer's buffer, or not
    for out_dtype, pad in ((torch.float32, 0), (torch.float32, 2), (torch.bfloat16, 2)):
        for part, factor, shape in (("A", eager_A, (r + pad, 8)), ("B", eager_B, (10, r + pad))):
            transposed = shape[::-1]  # mlx-lm's lora_a (in, R) and lora_b (R, out)
            specs += [(f"{part}{pad}{out_dtype}", part, False, factor, out_dtype, shape)]
            specs += [(f"{part}T{pad}{out_dtype}", part, True, factor.T, out_dtype, transposed)]
    _write_and_compare(out, delta, specs)
    assert torch.equal(delta.A, eager_A) and torch.equal(delta.B, eager_B)
    assert delta.B is delta.B  # computed once
    assert torch.equal(A, saved[0]) and torch.equal(B, saved[1])
    _write_and_compare(tmp_path / "g.safetensors", delta, specs)  # from the factors built now


def _write_and_compare(path, delta, specs):
    """Write each factor of ``delta`` (or its transpose) padded to its shape; the file holds it, zero-padded."""
    with SafetensorsWriter(path, [(name, dtype, shape) for name, _, _, _, dtype, shape in specs]) as writer:
        for name, part, transposed, _, dtype, shape in specs:
            factor = delta.factor(part).T if transposed else delta.factor(part)
            assert factor.shape == (delta.columns if transposed else delta.rows)(part, 0, 10**6).shape
            writer.write_padded(name, factor, dtype, shape)
    written = load_file(path)
    for name, _, _, factor, dtype, shape in specs:
        expected = torch.zeros(shape, dtype=dtype)
        expected[: factor.shape[0], : factor.shape[1]] = factor.to(dtype)
        assert torch.equal(written[name], expected), name
