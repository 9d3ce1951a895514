"""What a conversion did, per module and in total, as a plain object that serialises to JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from adaconvert.adapter import Adapter, LowRankDelta, split_module_name
from adaconvert.metrics import relative_error
from adaconvert.vllm_compat import smallest_bucket


@dataclass
class ModuleReport:
    """One module: rank and parameters before and after, and the relative Frobenius error of the written ΔW
    (compression and dtype cast included) against the source ΔW."""

    name: str
    layer: int | None
    kind: str
    rank_before: int
    rank_after: int
    params_before: int
    params_after: int
    rel_error: float


@dataclass
class ConversionReport:
    source: str
    source_kind: str
    destination: str
    dtype: str
    modules: list[ModuleReport]
    max_rank: int
    vllm_max_lora_rank: int | None
    params_before: int
    params_after: int
    bytes_after: int
    max_rel_error: float
    removed_modules: list[str] = field(default_factory=list)
    provenance: dict = field(default_factory=dict)
    layout: str = "compact"
    # zero parameters the layout adds on disk (uniform: Σ (R − r_m)·(in + out)); bytes_after includes them
    layout_overhead_params: int = 0
    # the portability check of the files as written: runtime → verdict (``runtimes.check_runtimes``)
    runtimes: dict = field(default_factory=dict)
    # the source's base_model_name_or_path: formats without such a field (mlx-lm) keep it here for the card
    base_model: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _cast(delta: LowRankDelta, dtype: torch.dtype) -> LowRankDelta:
    return LowRankDelta(A=delta.A.to(dtype).float(), B=delta.B.to(dtype).float())


def _empty_like(delta: LowRankDelta) -> LowRankDelta:
    return LowRankDelta(A=delta.A.new_zeros(0, delta.in_features), B=delta.B.new_zeros(delta.out_features, 0))


def build_report(
    source: Adapter,
    exact: Adapter,
    result: Adapter,
    *,
    dtype: torch.dtype,
    destination: str,
    layout: str = "compact",
    overhead_params: int = 0,
) -> ConversionReport:
    """Compare the written adapter (``result`` cast to ``dtype``) with the source, module by module.

    Args:
        source: the reader's output, before any transform: "before" means the checkpoint as saved.
        exact: ``strip_empty(source)``, the same ΔW per module with zero components removed; errors are measured
            against it, so that a module passed through untouched in float32 costs nothing to check (its error is
            exactly 0: the tensors written are the ones compared).
        result: what is written, each module at its own rank.
        layout: the export layout's name.
        overhead_params: zero parameters the layout adds on disk (uniform, mlx: padding); in ``bytes_after``.
    """
    stored = source.provenance.get("stored_ranks", source.ranks)
    modules = []
    for name, before in sorted(source.deltas.items()):
        reference, after = exact.deltas.get(name), result.deltas.get(name)
        layer, kind = split_module_name(name)
        if reference is None or (after is reference and dtype == torch.float32):
            error = 0.0  # ΔW is zero in the source (and strip_empty removed it), or passed through bit for bit
        else:
            error = relative_error(reference, _cast(after, dtype) if after else _empty_like(reference))
        modules.append(
            ModuleReport(
                name=name,
                layer=layer,
                kind=kind,
                rank_before=stored.get(name, before.rank),
                rank_after=after.rank if after else 0,
                params_before=before.num_params,
                params_after=after.num_params if after else 0,
                rel_error=error,
            )
        )
    element = dtype.itemsize
    return ConversionReport(
        source=str(source.provenance.get("source", "")),
        source_kind=source.source_kind,
        destination=destination,
        dtype=str(dtype).removeprefix("torch."),
        modules=modules,
        max_rank=result.max_rank,
        vllm_max_lora_rank=smallest_bucket(result.max_rank),
        params_before=source.num_params,
        params_after=result.num_params,
        bytes_after=(result.num_params + overhead_params) * element,
        max_rel_error=max((m.rel_error for m in modules), default=0.0),
        removed_modules=sorted(set(source.deltas) - set(result.deltas)),
        provenance={k: v for k, v in result.provenance.items() if k not in ("stored_ranks", "scalings")},
        layout=layout,
        layout_overhead_params=overhead_params,
        base_model=source.base_model,
    )
