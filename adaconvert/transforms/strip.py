"""Remove what contributes nothing: zero rank components, then modules with rank 0."""

from __future__ import annotations

import torch

from adaconvert.adapter import Adapter, LowRankDelta


def strip_empty(adapter: Adapter) -> Adapter:
    """Drop every rank component whose row of A or column of B is exactly zero, then every module left with rank 0.

    Exact: a component with a zero factor adds nothing to ΔW. This removes AdaLoRA's pruned singular values
    (zeros in lora_E, folded into B), fully pruned modules, and untouched LoRA modules (B still at its zero init).
    PEFT rejects r = 0, so modules with nothing left must disappear rather than be written with rank 0.
    """
    deltas: dict[str, LowRankDelta] = {}
    for name, delta in adapter.deltas.items():
        keep = _nonzero(delta.A, dim=1) & _nonzero(delta.B, dim=0)
        if not keep.any():
            continue
        deltas[name] = delta if keep.all() else LowRankDelta(A=delta.A[keep], B=delta.B[:, keep])
    return adapter.replace(deltas=deltas)


def _nonzero(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Per slice along ``dim``: holds a non-zero. aminmax is one fast pass with no tensor-sized temporary."""
    lo, hi = torch.aminmax(x, dim=dim)
    return (lo != 0) | (hi != 0)
