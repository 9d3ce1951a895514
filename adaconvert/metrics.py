"""Exact error measures between low-rank deltas, computed from the factors: O((m+n)·r²), never a dense m × n."""

from __future__ import annotations

import math

import torch

from adaconvert.adapter import LowRankDelta


def _frobenius_sq(B: torch.Tensor, A: torch.Tensor, *, cancelling: bool = False) -> float:
    """‖B @ A‖_F² = Σ (BᵀB) ∘ (A Aᵀ).

    In float32 when that is precise: when the sum is at least half its diagonal Σᵢ ‖bᵢ‖²‖aᵢ‖² (each term ≥ 0),
    rounding costs a few float32 digits of the result at most (about 10⁻⁷ relative, measured, on 8B shapes). Else,
    when the rank-one terms cancel (the difference of two near-equal deltas; ``cancelling``: the caller knows they
    do), in float64, 3× slower: float32 could lose every digit there.
    """
    if B.dtype == A.dtype == torch.float32 and not cancelling:
        products = (B.T @ B) * (A @ A.T)
        total, diagonal = float(products.sum()), float(products.diagonal().sum())
        if math.isfinite(total) and total >= 0.5 * diagonal:
            return total
    B64, A64 = B.double(), A.double()
    return float(((B64.T @ B64) * (A64 @ A64.T)).sum().clamp_min(0))


def factors(delta: LowRankDelta) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) of ``delta``, float32, not kept by it: measuring an export's error must not hold a second copy of
    every folded factor until it is written (``Factor.whole``)."""
    return delta.factor("B").whole(), delta.factor("A").whole()


def frobenius_norm(delta: LowRankDelta) -> float:
    """‖ΔW‖_F of ΔW = B @ A."""
    return math.sqrt(_frobenius_sq(*factors(delta)))


def relative_error(reference: LowRankDelta, other: LowRankDelta) -> float:
    """‖ΔW_ref − ΔW_other‖_F / ‖ΔW_ref‖_F, exactly, from the factors.

    The difference is itself low rank. Factors of the same shapes (a cast, a copy) give it as two terms of its own
    size, B₁A₁ − B₂A₂ = (B₁ − B₂)A₁ + B₂(A₁ − A₂), which float32 computes precisely; other ranks give
    [B₁, −B₂] @ [A₁; A₂], two terms of the size of ΔW that cancel (float64). Both zero gives 0; a zero reference
    and a non-zero other gives inf.
    """
    (B1, A1), (B2, A2) = factors(reference), factors(other)
    if B1.shape == B2.shape and A1.shape == A2.shape:
        diff_sq = _frobenius_sq(torch.cat([B1 - B2, B2], dim=1), torch.cat([A1, A1 - A2], dim=0))
    else:
        diff_sq = _frobenius_sq(torch.cat([B1, -B2], dim=1), torch.cat([A1, A2], dim=0), cancelling=True)
    ref_sq = _frobenius_sq(B1, A1)
    if ref_sq == 0.0:
        return 0.0 if diff_sq == 0.0 else math.inf
    return math.sqrt(diff_sq / ref_sq)
