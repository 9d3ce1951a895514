"""``inspect``: where an adapter's rank budget went, per layer and module, and what it would cost in vLLM."""

from __future__ import annotations

import json
import shlex
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from adaconvert.adapter import Adapter, split_module_name
from adaconvert.compat.runtimes import check_runtimes, runtimes_dict
from adaconvert.compat.vllm import smallest_bucket
from adaconvert.errors import InvalidConfigError
from adaconvert.io.atomic import atomic_output_file, check_output
from adaconvert.readers import read_adapter
from adaconvert.transforms import strip_empty


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

    def text(self, *, plot: str | Path | None = None, show_runtimes: bool = False) -> str:
        """The rank table and the totals, as ``adaconvert inspect`` prints them."""
        from adaconvert.compat.runtimes import runtimes_table
        from adaconvert.conversion.card import text_rank_table

        lines = text_rank_table(self.ranks)
        lines += [
            "",
            f"kind: {self.source_kind}   dtype: {self.dtype}",
            f"modules: {self.modules_with_weights} with weights of {self.modules}; total rank {self.total_rank}, "
            f"max {self.max_rank}",
            f"parameters: {self.params:,} ({self.bytes / 2**20:.2f} MiB)",
            f"fixed-rank LoRA with the same budget: rank {self.equal_budget_rank:.2f}; "
            f"fixed rank {self.max_rank} everywhere: {self.fixed_max_rank_params:,} parameters",
            f"vLLM --max-lora-rank: {self.vllm_max_lora_rank}",
        ]
        if plot:
            lines.append(f"heatmap: {plot}")
        if show_runtimes:
            lines += ["", "runtimes:", *(f"  {line}" for line in runtimes_table(self.runtimes))]
        return "\n".join(lines)


def inspect(src: str | Path, *, plot: str | Path | None = None, overwrite: bool = False) -> InspectReport:
    """Summarise the rank allocation of any supported adapter, and which runtimes compute it exactly.

    Args:
        src: adapter directory or Hub repo id (AdaLoRA, LoRA, LoRA-Drop output, or a converted adapter).
        plot: write a layers × modules heatmap of the ranks to this PNG (needs matplotlib), atomically; it may
            not lie inside ``src``, and an existing file is only replaced with ``overwrite``.
        overwrite: replace an existing ``plot``.

    Example:
        >>> r = inspect("runs/adalora")
        >>> r.max_rank, r.vllm_max_lora_rank
        (11, 16)
    """
    if plot is not None:
        check_output(plot, overwrite=overwrite, inputs=[src])
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
        plot_rank_heatmap(ranks, plot, overwrite=overwrite)
    return report


def plot_rank_heatmap(ranks: dict[str, int], path: str | Path, *, overwrite: bool = False) -> None:
    """Save a layers × module-kinds heatmap of ``ranks`` (empty cells for modules not targeted) as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from adaconvert.conversion.card import rank_table

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
    save_png(fig, path, overwrite=overwrite)


@dataclass
class LoraDropPlan:
    """Which layers LoRA-Drop should keep, read off an AdaLoRA rank allocation.

    A layer's importance is its **share of the kept rank budget**: the ranks AdaLoRA left to its modules, summed,
    over the total rank left to the modules of all blocks (fully pruned modules count 0; modules outside the
    blocks, such as an adapted head, are left out). The rank budget is what AdaLoRA itself
    decided from its sensitivity scores; ‖ΔW‖ would instead measure how far training moved the factors, which
    depends on the learning rate, the initialisation and ``lora_alpha`` as much as on what the layer needs, and a
    layer can be given rank and still hold a small ΔW. The rank share is also what a LoRA-Drop run spends.

    ``effective_layers`` is how many layers the budget is spread over, 1 / Σ Iₗ² (the inverse Simpson index): it
    equals ``layers`` when every layer got the same share and 1 when one layer got all of it.

    ``kept`` are the layers the selection keeps (the same rule as LoRA-Drop's, :func:`select_units`), in model
    order; ``command`` is the ``adaconvert train lora-drop`` call that trains them.
    """

    source: str
    measure: str
    layers: int
    layer_ranks: dict[str, int]
    importance: dict[str, float]
    effective_layers: float
    threshold: float | None
    keep_fraction: float | None
    kept: list[str]
    kept_share: float
    command: str

    def to_dict(self) -> dict:
        return asdict(self)

    def text(self, *, plot: str | Path | None = None) -> str:
        """The per-layer shares as bars, the kept layers and the ``train lora-drop`` command."""
        width = max(5, *(len(u) for u in self.importance))
        lines = [f"{'layer':>{width}}  rank  share"]
        for unit, share in self.importance.items():
            bar = "#" * round(40 * share)
            mark = " kept" if unit in self.kept else ""
            lines.append(f"{unit:>{width}}  {self.layer_ranks[unit]:>4}  {share:5.1%} {bar}{mark}")
        rule = f"threshold {self.threshold}" if self.threshold is not None else f"keep fraction {self.keep_fraction}"
        lines += [
            "",
            f"importance: {self.measure}; the budget is spread as if over {self.effective_layers:.1f} of "
            f"{self.layers} layers (effective layers, 1/Σ share²)",
            f"keep {len(self.kept)} of {self.layers} layers ({rule}): {','.join(self.kept)}, "
            f"{self.kept_share:.1%} of the budget",
            self.command,
        ]
        if plot:
            lines.append(f"bar chart: {plot}")
        return "\n".join(lines)


def lora_drop_plan(
    src: str | Path,
    *,
    threshold: float | None = None,
    keep_fraction: float | None = None,
    plot: str | Path | None = None,
    overwrite: bool = False,
) -> LoraDropPlan:
    """Turn an AdaLoRA rank allocation into a LoRA-Drop layer selection and the command that trains it.

    Args:
        src: an AdaLoRA adapter directory (as PEFT or ``adaconvert train adalora`` writes it) or Hub id.
        threshold: keep the most important layers until their shares sum to at least this (default 0.9, as
            LoRA-Drop's own default).
        keep_fraction: keep this fraction of the layers instead.
        plot: write a bar chart of the per-layer shares (kept layers highlighted) to this PNG (needs matplotlib),
            atomically; not inside ``src``, and an existing file only with ``overwrite``.
        overwrite: replace an existing ``plot``.

    Returns:
        The :class:`LoraDropPlan`.

    Raises:
        InvalidConfigError: not an AdaLoRA adapter, both or bad threshold / keep_fraction, no rank left at all.

    Example:
        >>> plan = lora_drop_plan("runs/adalora", threshold=0.8)
        >>> plan.kept, plan.command
        (['0', '3'], 'adaconvert train lora-drop --model ... --keep-layers 0,3')
    """
    from adaconvert.training.config import DEFAULT_THRESHOLD
    from adaconvert.training.lora_drop import select_units, unit_scores

    if plot is not None:
        check_output(plot, overwrite=overwrite, inputs=[src])
    if threshold is not None and keep_fraction is not None:
        raise InvalidConfigError("give --threshold or --keep-fraction, not both")
    for name, value in (("threshold", threshold), ("keep-fraction", keep_fraction)):
        if value is not None and not 0 < value <= 1:
            raise InvalidConfigError(f"--{name} must be in (0, 1], got {value}")
    if threshold is None and keep_fraction is None:
        threshold = DEFAULT_THRESHOLD
    source = read_adapter(src)
    if source.source_kind != "adalora":
        raise InvalidConfigError(
            f"the LoRA-Drop plan reads an AdaLoRA rank allocation; this is a {source.source_kind} adapter", path=src
        )
    kept_ranks = strip_empty(source).ranks
    ranks = {name: kept_ranks.get(name, 0) for name in source.deltas}
    # modules outside the numbered blocks (an adapted head) are no layer that --keep-layers can name
    per_layer = {unit: int(r) for unit, r in unit_scores(ranks, "layer").items() if unit.isdigit()}
    total = sum(per_layer.values())
    if total == 0:
        raise InvalidConfigError("AdaLoRA pruned every module to rank 0: no allocation to plan from", path=src)
    importance = {unit: r / total for unit, r in per_layer.items()}
    kept, _ = select_units(importance, threshold=threshold, keep_fraction=keep_fraction)
    plan = LoraDropPlan(
        source=str(src),
        measure="share of the kept rank budget",
        layers=len(importance),
        layer_ranks=per_layer,
        importance=importance,
        effective_layers=1.0 / sum(i * i for i in importance.values()),
        threshold=threshold if keep_fraction is None else None,
        keep_fraction=keep_fraction,
        kept=kept,
        kept_share=sum(importance[u] for u in kept),
        command=lora_drop_command(source, kept),
    )
    if plot is not None:
        plot_layer_importance(plan, plot, overwrite=overwrite)
    return plan


def lora_drop_command(source: Adapter, kept: list[str]) -> str:
    """The ``adaconvert train lora-drop`` command that trains ``kept`` layers of ``source``'s base.

    Base model, data and target modules come from the AdaLoRA run when ``adaconvert train`` wrote it (its
    ``training_summary.json``); otherwise the base is the adapter's ``base_model_name_or_path`` and the data a
    ``DATA`` placeholder. The rank is AdaLoRA's ``target_r``: the average rank it was asked to end with.
    """
    from adaconvert.constants import TRAINING_SUMMARY_NAME

    root = Path(source.provenance.get("source", "."))
    summary = root / TRAINING_SUMMARY_NAME
    options = json.loads(summary.read_text(encoding="utf-8")).get("options", {}) if summary.is_file() else {}
    kinds = sorted({split_module_name(name)[1].rsplit(".", 1)[-1] for name in source.deltas})
    targets = options.get("target_modules") or kinds
    words = [
        *("adaconvert", "train", "lora-drop"),
        "--model", options.get("model") or source.base_model or "BASE",
        "--data", options.get("data") or "DATA",
        "--output", f"{root.name or 'adalora'}-lora-drop",
        "--target-modules", ",".join(targets),
        "--keep-layers", ",".join(kept),
    ]  # fmt: skip
    if source.provenance.get("target_r"):
        words += ["--r", str(source.provenance["target_r"])]
    return shlex.join(words)


def plot_layer_importance(plan: LoraDropPlan, path: str | Path, *, overwrite: bool = False) -> None:
    """Save a bar chart of each layer's share of the rank budget (kept layers in a second colour) as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    units = list(plan.importance)
    kept = set(plan.kept)
    fig, ax = plt.subplots(figsize=(2 + 0.35 * len(units), 3.2))
    ax.bar(
        range(len(units)),
        [plan.importance[u] for u in units],
        color=["tab:orange" if u in kept else "tab:gray" for u in units],
    )
    ax.axhline(1 / len(units), color="k", linestyle=":", linewidth=1, label="equal share")
    ax.set_xticks(range(len(units)), units)
    ax.set_xlabel("layer (orange: kept)")
    ax.set_ylabel("share of the rank budget")
    ax.set_title(f"AdaLoRA budget per layer: effective {plan.effective_layers:.1f} of {plan.layers} layers")
    ax.legend()
    save_png(fig, path, overwrite=overwrite)


def save_png(fig, path: str | Path, *, overwrite: bool) -> None:
    """Save a matplotlib figure as PNG at ``path``, atomically (an existing file only with ``overwrite``), and
    close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_output_file(path, overwrite=overwrite) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
