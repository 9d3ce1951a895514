"""Zero-pad every module to one rank: the uniform export layout (DESIGN.md §2)."""

from __future__ import annotations

import torch

from adaconvert.adapter import Adapter, LowRankDelta


def pad_ranks(adapter: Adapter, rank: int | None = None, *, fill_from: Adapter | None = None) -> Adapter:
    """Every module at rank ``rank`` (default: the adapter's max rank), extra rows of A and columns of B zero.

    Exact: the added components have zero factors, so B @ A is unchanged, bit for bit. Runtimes that read one
    ``r`` and ``lora_alpha`` for the whole adapter (llama.cpp, SGLang, LoRAX/TGI, mlx-lm) then compute
    scale = lora_alpha / r = 1 on every module. A: (rank, in), B: (out, rank).

    Args:
        fill_from: modules of this adapter that ``adapter`` lacks (fully pruned ones, from the source) are added
            as all-zero modules of rank ``rank``: LoRAX applies a module kind only if every layer has it.

    Raises:
        ValueError: a module's rank is already above ``rank`` (a programming error: callers pad to the max).
    """
    rank = adapter.max_rank if rank is None else rank
    deltas = {}
    for name, d in (fill_from.deltas if fill_from is not None else {}).items():
        if name not in adapter.deltas:
            deltas[name] = LowRankDelta(A=d.A.new_zeros(rank, d.in_features), B=d.B.new_zeros(d.out_features, rank))
    for name, d in adapter.deltas.items():
        if d.rank > rank:
            raise ValueError(f"{name} has rank {d.rank}, above the padding rank {rank}")
        if d.rank == rank:
            deltas[name] = d
            continue
        extra = rank - d.rank
        deltas[name] = LowRankDelta(
            A=torch.cat([d.A, d.A.new_zeros(extra, d.in_features)], dim=0),
            B=torch.cat([d.B, d.B.new_zeros(d.out_features, extra)], dim=1),
        )
    return adapter.replace(deltas=dict(sorted(deltas.items())))
