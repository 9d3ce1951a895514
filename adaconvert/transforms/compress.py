"""Rank compression of low-rank deltas: exact SVD from the factors, then truncation.

For ΔW = B @ A with B: (m, r), A: (r, n): B = Q_B R_B and Aᵀ = Q_A R_A (thin QR), so ΔW = Q_B (R_B R_Aᵀ) Q_Aᵀ and
the SVD of the r × r core C = U S Vᵀ gives ΔW's own SVD, (Q_B U) S (Q_A V)ᵀ. Cost O((m+n)·r²); a dense m × n SVD is
never formed. Keeping the top k singular values is the best rank-k approximation (Eckart–Young), and its relative
error is √(Σ_{i≥k} s_i²) / √(Σ s_i²).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adaconvert.adapter import Adapter, LowRankDelta


@dataclass(frozen=True)
class LowRankSVD:
    """ΔW = U @ diag(S) @ Vh. U: (m, r), S: (r,) descending, Vh: (r, n); float64."""

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor

    def truncation_error(self, k: int) -> float:
        """Relative Frobenius error of keeping the top k singular values."""
        total = float((self.S**2).sum())
        return (float((self.S[k:] ** 2).sum()) / total) ** 0.5 if total > 0 else 0.0

    def to_delta(self, k: int) -> LowRankDelta:
        """Rank-k LowRankDelta, the singular values split evenly (√S into each factor), float32."""
        root = self.S[:k].sqrt()
        return LowRankDelta(A=(root[:, None] * self.Vh[:k]).float(), B=(self.U[:, :k] * root).float())


def low_rank_svd(delta: LowRankDelta) -> LowRankSVD:
    """The thin SVD of ΔW = B @ A, from QR of both factors and an SVD of the r × r core."""
    Q_B, R_B = torch.linalg.qr(delta.B.double())
    Q_A, R_A = torch.linalg.qr(delta.A.double().T)
    U, S, Vh = torch.linalg.svd(R_B @ R_A.T)
    return LowRankSVD(U=Q_B @ U, S=S, Vh=Vh @ Q_A.T)


def choose_rank(
    svd: LowRankSVD, *, max_rank: int | None = None, energy: float | None = None, tol: float | None = None
) -> int:
    """The smallest rank meeting ``energy`` (fraction of Σs² kept) and ``tol`` (max relative error), capped at
    ``max_rank``. With neither criterion, the full rank (capped)."""
    S2 = svd.S**2
    total = float(S2.sum())
    k = len(svd.S)
    if total > 0 and energy is not None:
        kept = torch.cumsum(S2, 0) / total
        k = min(k, int((kept < energy - 1e-12).sum()) + 1)
    if tol is not None:
        k = min(k, next(j for j in range(len(svd.S) + 1) if svd.truncation_error(j) <= tol))
    if max_rank is not None:
        k = min(k, max_rank)
    return k


def compress_ranks(
    adapter: Adapter, *, max_rank: int | None = None, energy: float | None = None, tol: float | None = None
) -> Adapter:
    """Re-factor every module through its SVD and truncate it to the rank ``choose_rank`` picks.

    Modules whose rank already fits ``max_rank`` are left untouched when no ``energy``/``tol`` is given, so a
    request that truncates nothing is exact bit for bit. ``provenance['compression']`` records, per re-factored
    module, the rank before and after and the truncation error incurred.

    Args:
        max_rank: upper bound on every module's rank.
        energy: keep singular values until this fraction (0 < F ≤ 1) of Σ s² is reached.
        tol: largest allowed relative Frobenius error per module (≥ 0).
    """
    deltas: dict[str, LowRankDelta] = {}
    record: dict[str, dict] = {}
    for name, delta in adapter.deltas.items():
        if energy is None and tol is None and (max_rank is None or delta.rank <= max_rank):
            deltas[name] = delta
            continue
        svd = low_rank_svd(delta)
        k = choose_rank(svd, max_rank=max_rank, energy=energy, tol=tol)
        deltas[name] = svd.to_delta(k)
        record[name] = {"rank_before": delta.rank, "rank_after": k, "truncation_error": svd.truncation_error(k)}
    provenance = {**adapter.provenance, "compression": {**adapter.provenance.get("compression", {}), **record}}
    return adapter.replace(deltas=deltas, provenance=provenance)
