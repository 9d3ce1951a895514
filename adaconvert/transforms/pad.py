"""Zero padding to one rank: the uniform export layout (docs/design.md §3).

Each module at rank R: the extra rows of A (R, in) and columns of B (out, R) are zero. Exact: the added components
have zero factors, so B @ A is unchanged, and runtimes that read one ``r`` and ``lora_alpha`` for the whole adapter
(llama.cpp's converter, SGLang, LoRAX/TGI, mlx-lm) then compute scale = lora_alpha / r = 1 on every module. The
writers pad each module as they write it (``SafetensorsWriter.write_padded``): a padded copy of the adapter is never
built (on a 160 MiB adapter that was +260 MiB of peak RSS).
"""

from __future__ import annotations

import torch

from adaconvert.adapter import Adapter, LowRankDelta


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
