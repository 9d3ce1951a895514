"""Zero padding to one rank: the uniform export layout (docs/design.md §3), one module at a time.

Writers pad each module as they write it, so that a padded copy of the whole adapter never sits in memory beside
the compact one (on a 160 MiB adapter that was +260 MiB of peak RSS).
"""

from __future__ import annotations

import torch

from adaconvert.adapter import Adapter, LowRankDelta


def pad_delta(delta: LowRankDelta, rank: int) -> LowRankDelta:
    """``delta`` at rank ``rank``: extra rows of A (rank, in) and columns of B (out, rank) are zero.

    Exact: the added components have zero factors, so B @ A is unchanged. Runtimes that read one ``r`` and
    ``lora_alpha`` for the whole adapter (llama.cpp's converter, SGLang, LoRAX/TGI, mlx-lm) then compute
    scale = lora_alpha / r = 1 on every module.

    Raises:
        ValueError: ``delta`` already has a larger rank (a programming error: callers pad to the max).
    """
    if delta.rank > rank:
        raise ValueError(f"rank {delta.rank} is above the padding rank {rank}")
    if delta.rank == rank:
        return delta
    extra = rank - delta.rank
    return LowRankDelta(
        A=torch.cat([delta.A, delta.A.new_zeros(extra, delta.in_features)], dim=0),
        B=torch.cat([delta.B, delta.B.new_zeros(delta.out_features, extra)], dim=1),
    )


def zero_delta(in_features: int, out_features: int, rank: int) -> LowRankDelta:
    """An all-zero module of rank ``rank``: A (rank, in), B (out, rank)."""
    return LowRankDelta(A=torch.zeros(rank, in_features), B=torch.zeros(out_features, rank))


def uniform_modules(adapter: Adapter, fill_from: Adapter | None = None) -> dict[str, tuple[int, int]]:
    """{module: (in, out)} of the uniform layout: ``adapter``'s modules, plus those of ``fill_from`` it lacks
    (fully pruned ones, from the source: LoRAX applies a module kind only where every layer has it)."""
    modules = {n: (d.in_features, d.out_features) for n, d in (fill_from.deltas if fill_from else {}).items()}
    modules.update({n: (d.in_features, d.out_features) for n, d in adapter.deltas.items()})
    return modules


def padding_params(adapter: Adapter, modules: dict[str, tuple[int, int]], rank: int) -> int:
    """Zero parameters that padding ``adapter`` to ``rank`` on ``modules`` adds: Σ rank·(in + out) − its own."""
    return sum(rank * (fan_in + fan_out) for fan_in, fan_out in modules.values()) - adapter.num_params
