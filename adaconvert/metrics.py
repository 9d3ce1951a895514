"""Exact error measures between low-rank deltas, computed from the factors: O((m+n)·r²), never a dense m × n."""

from __future__ import annotations

import math

import torch

from adaconvert.adapter import LowRankDelta


def _frobenius_sq(B: torch.Tensor, A: torch.Tensor) -> float:
    """‖B @ A‖_F² = Σ (BᵀB) ∘ (A Aᵀ), in float64 so that small differences survive cancellation."""
    B64, A64 = B.double(), A.double()
    return float(((B64.T @ B64) * (A64 @ A64.T)).sum().clamp_min(0))


def frobenius_norm(delta: LowRankDelta) -> float:
    """‖ΔW‖_F of ΔW = B @ A."""
    return math.sqrt(_frobenius_sq(delta.B, delta.A))


def relative_error(reference: LowRankDelta, other: LowRankDelta) -> float:
    """‖ΔW_ref − ΔW_other‖_F / ‖ΔW_ref‖_F, exactly, from the factors.

    The difference is itself low rank: [B_ref, −B_other] @ [A_ref; A_other]. Both zero gives 0; a zero reference
    and a non-zero other gives inf.
    """
    diff_sq = _frobenius_sq(torch.cat([reference.B, -other.B], dim=1), torch.cat([reference.A, other.A], dim=0))
    ref_sq = _frobenius_sq(reference.B, reference.A)
    if ref_sq == 0.0:
        return 0.0 if diff_sq == 0.0 else math.inf
    return math.sqrt(diff_sq / ref_sq)
