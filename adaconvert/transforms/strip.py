"""Remove what contributes nothing: zero rank components, then modules with rank 0."""

from __future__ import annotations

from adaconvert.adapter import Adapter, LowRankDelta


def strip_empty(adapter: Adapter) -> Adapter:
    """Drop every rank component whose row of A or column of B is exactly zero, then every module left with rank 0.

    Exact: a component with a zero factor adds nothing to ΔW. This removes AdaLoRA's pruned singular values
    (zeros in lora_E, folded into B), fully pruned modules, and untouched LoRA modules (B still at its zero init).
    PEFT rejects r = 0, so modules with nothing left must disappear rather than be written with rank 0.
    """
    deltas: dict[str, LowRankDelta] = {}
    for name, delta in adapter.deltas.items():
        keep = (delta.A != 0).any(dim=1) & (delta.B != 0).any(dim=0)
        if not keep.any():
            continue
        deltas[name] = delta if keep.all() else LowRankDelta(A=delta.A[keep], B=delta.B[:, keep])
    return adapter.replace(deltas=deltas)
