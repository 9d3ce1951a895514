"""Exact error measures between low-rank deltas, computed from the factors: O((m+n)·r²), never a dense m × n."""

from __future__ import annotations

import math

import torch

from adaconvert.adapter import LowRankDelta


def _frobenius_sq(terms: list[tuple[torch.Tensor, torch.Tensor]], *, cancelling: bool = False) -> float:
    """‖Σₖ Bₖ @ Aₖ‖_F² = Σⱼₖ Σ (BⱼᵀBₖ) ∘ (AⱼAₖᵀ), from the factors of each term (never concatenated: a copy of them
    all, and (Σ rₖ)² Gram entries where the pairs j ≤ k need fewer).

    In float32 when that is precise: when the sum is at least half its diagonal Σᵢ ‖bᵢ‖²‖aᵢ‖² over every
    component of every term (each ≥ 0), rounding costs a few float32 digits of the result at most (about 10⁻⁷
    relative, measured, on 8B shapes). Else, when the terms cancel (the difference of two near-equal deltas;
    ``cancelling``: the caller knows they do), in float64, 3× slower: float32 could lose every digit there.
    """
    if not cancelling and all(B.dtype == A.dtype == torch.float32 for B, A in terms):
        total, diagonal = _gram_sums(terms)
        if math.isfinite(total) and total >= 0.5 * diagonal:
            return total
    total, _ = _gram_sums([(B.double(), A.double()) for B, A in terms])
    return max(total, 0.0)


def _gram_sums(terms: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float]:
    """(Σⱼₖ Σ (BⱼᵀBₖ) ∘ (AⱼAₖᵀ), its diagonal Σⱼ Σᵢ (BⱼᵀBⱼ)ᵢᵢ (AⱼAⱼᵀ)ᵢᵢ), in the factors' dtype."""
    total = diagonal = 0.0
    for j, (Bj, Aj) in enumerate(terms):
        for k in range(j, len(terms)):
            Bk, Ak = terms[k]
            products = (Bj.T @ Bk) * (Aj @ Ak.T)
            if k == j:
                total += float(products.sum())
                diagonal += float(products.diagonal().sum())
            else:  # the (k, j) block is its transpose: the same sum
                total += 2 * float(products.sum())
    return total, diagonal


def factors(delta: LowRankDelta) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) of ``delta``, float32, not kept by it: measuring an export's error must not hold a second copy of
    every folded factor until it is written (``Factor.whole``)."""
    return delta.factor("B").whole(), delta.factor("A").whole()


def frobenius_norm(delta: LowRankDelta) -> float:
    """‖ΔW‖_F of ΔW = B @ A."""
    return math.sqrt(_frobenius_sq([factors(delta)]))


def relative_error(reference: LowRankDelta, other: LowRankDelta) -> float:
    """‖ΔW_ref − ΔW_other‖_F / ‖ΔW_ref‖_F, exactly, from the factors.

    The difference is itself low rank. Factors of the same shapes (a cast, a copy) give it as two terms of its own
    size, B₁A₁ − B₂A₂ = (B₁ − B₂)A₁ + B₂(A₁ − A₂), which float32 computes precisely; other ranks give
    B₁A₁ + (−B₂)A₂, two terms of the size of ΔW that cancel (float64). Both zero gives 0; a zero reference
    and a non-zero other gives inf.
    """
    (B1, A1), (B2, A2) = factors(reference), factors(other)
    if B1.shape == B2.shape and A1.shape == A2.shape:
        diff_sq = _frobenius_sq([(B1 - B2, A1), (B2, A1 - A2)])
    else:
        diff_sq = _frobenius_sq([(B1, A1), (-B2, A2)], cancelling=True)
    ref_sq = _frobenius_sq([(B1, A1)])
    if ref_sq == 0.0:
        return 0.0 if diff_sq == 0.0 else math.inf
    return math.sqrt(diff_sq / ref_sq)
