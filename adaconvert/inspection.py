"""``inspect``: where an adapter's rank budget went, per layer and module, and what it would cost in vLLM."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from adaconvert.io.atomic import atomic_output_file, check_no_overlap
from adaconvert.readers import read_adapter
from adaconvert.runtimes import check_runtimes, runtimes_dict
from adaconvert.transforms import strip_empty
from adaconvert.vllm_compat import smallest_bucket


@dataclass
class InspectReport:
    """Ranks that really carry weight (zero components not counted) and what they cost.

    ``equal_budget_rank`` is the rank a fixed-rank LoRA on the same modules would have for the same parameter
    count; ``fixed_max_rank_params`` what a fixed-rank LoRA needs to give every module the largest rank seen.
    """

    source: str
    source_kind: str
    dtype: str
    ranks: dict[str, int]
    modules: int
    modules_with_weights: int
    total_rank: int
    max_rank: int
    params: int
    bytes: int
    equal_budget_rank: float
    fixed_max_rank_params: int
    vllm_max_lora_rank: int | None
    provenance: dict
    # the portability check (runtimes.check_runtimes): runtime → verdict dict
    runtimes: dict

    def to_dict(self) -> dict:
        return asdict(self)


def inspect(src: str | Path, *, plot: str | Path | None = None) -> InspectReport:
    """Summarise the rank allocation of any supported adapter, and which runtimes compute it exactly.

    Args:
        src: adapter directory or Hub repo id (AdaLoRA, LoRA, LoRA-Drop output, or a converted adapter).
        plot: write a layers × modules heatmap of the ranks to this PNG (needs matplotlib), atomically; it may
            not lie inside ``src``.

    Example:
        >>> r = inspect("runs/adalora")
        >>> r.max_rank, r.vllm_max_lora_rank
        (11, 16)
    """
    if plot is not None:
        check_no_overlap(plot, [src])
    source = read_adapter(src)
    adapter = strip_empty(source)
    ranks = {name: adapter.deltas[name].rank if name in adapter.deltas else 0 for name in sorted(source.deltas)}
    width = sum(d.in_features + d.out_features for d in source.deltas.values())
    dtype = source.provenance.get("dtype", "float32")
    report = InspectReport(
        source=str(src),
        source_kind=source.source_kind,
        dtype=dtype,
        ranks=ranks,
        modules=len(ranks),
        modules_with_weights=len(adapter.deltas),
        total_rank=sum(ranks.values()),
        max_rank=adapter.max_rank,
        params=adapter.num_params,
        bytes=adapter.num_params * getattr(torch, dtype).itemsize,
        equal_budget_rank=adapter.num_params / width if width else 0.0,
        fixed_max_rank_params=adapter.max_rank * width,
        vllm_max_lora_rank=smallest_bucket(adapter.max_rank),
        provenance={k: v for k, v in source.provenance.items() if k in ("init_r", "target_r", "lora_drop", "source")},
        runtimes=runtimes_dict(check_runtimes(src)),
    )
    if plot is not None:
        plot_rank_heatmap(ranks, plot)
    return report


def plot_rank_heatmap(ranks: dict[str, int], path: str | Path) -> None:
    """Save a layers × module-kinds heatmap of ``ranks`` (empty cells for modules not targeted) as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from adaconvert.card import rank_table

    kinds, rows = rank_table(ranks)
    grid = np.array([[np.nan if r is None else r for r in row] for _, row in rows], dtype=float)
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(kinds), 1.2 + 0.3 * len(rows)))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0)
    ax.set_xticks(range(len(kinds)), [k.split(".")[-1] for k in kinds], rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), [label for label, _ in rows])
    ax.set_xlabel("module")
    ax.set_ylabel("layer")
    ax.set_title("rank per module")
    for (i, j), value in np.ndenumerate(grid):
        if not np.isnan(value) and grid.size <= 400:
            ax.text(j, i, int(value), ha="center", va="center", color="w", fontsize=7)
    fig.colorbar(image, ax=ax, label="rank")
    fig.tight_layout()
    with atomic_output_file(path, overwrite=True) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
