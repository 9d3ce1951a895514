"""strip_empty: its batched first look decides as the per-module look does."""

from __future__ import annotations

import torch

from adaconvert.adapter import Adapter, LowRankDelta
from adaconvert.transforms.strip import _nonzero_components, strip_empty


def _by_module(adapter: Adapter) -> dict[str, LowRankDelta]:
    """What strip_empty keeps, each module decided alone (the reference)."""
    kept = {}
    for name, d in adapter.deltas.items():
        keep = _nonzero_components(d.A, d.B)
        if keep.any():
            idx = torch.nonzero(keep).flatten()
            kept[name] = LowRankDelta(A=d.A.index_select(0, idx), B=d.B.index_select(1, idx))
    return kept


def test_strip_empty_matches_the_per_module_look():
    g = torch.Generator().manual_seed(0)

    def delta(r, n_in, n_out):
        return LowRankDelta(A=torch.randn(r, n_in, generator=g), B=torch.randn(n_out, r, generator=g))

    deltas = {f"m{i}": delta(4, 6, 5) for i in range(8)}
    deltas["m1"].A[2, 0] = 0  # first entry 0, rest not: kept after the closer look
    deltas["m2"].A[1] = 0  # a zero row of A: dropped
    deltas["m3"].B[:, 3] = 0  # a zero column of B: dropped
    deltas["m4"].B[0, 0] = float("nan")  # NaN: kept
    deltas["m5"].A[:, 0] = 0
    deltas["m5"].A[0] = 0  # component 0 empty, the others kept after the closer look
    deltas["m6"].B.zero_()  # every component empty: the module goes
    deltas["rank0"] = delta(0, 6, 5)
    deltas["no_in"] = delta(3, 0, 5)
    deltas["tiny64"] = LowRankDelta(A=torch.full((2, 3), 1e-300, dtype=torch.float64), B=torch.ones(4, 2).double())
    adapter = Adapter(deltas=deltas)

    stripped = strip_empty(adapter).deltas
    expected = _by_module(adapter)
    assert list(stripped) == list(expected)
    assert "m6" not in stripped and "rank0" not in stripped and "no_in" not in stripped
    assert stripped["m0"] is deltas["m0"]  # untouched modules are not copied
    assert [stripped[n].rank for n in ("m1", "m2", "m3", "m5", "tiny64")] == [4, 3, 3, 3, 2]
    for name, d in expected.items():
        assert torch.equal(stripped[name].A.nan_to_num(7.0), d.A.nan_to_num(7.0))
        assert torch.equal(stripped[name].B.nan_to_num(7.0), d.B.nan_to_num(7.0))
