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
        # Σ|x| per component is exact (no squares to underflow) and NaN-safe (NaN != 0 keeps it, never dropped)
        keep = (delta.A.abs().sum(dim=1) != 0) & (delta.B.abs().sum(dim=0) != 0)
        if not keep.any():
            continue
        if keep.all():
            deltas[name] = delta
        else:
            idx = torch.nonzero(keep).flatten()
            deltas[name] = LowRankDelta(A=delta.A.index_select(0, idx), B=delta.B.index_select(1, idx))
    return adapter.replace(deltas=deltas)
