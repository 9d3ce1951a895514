"""What a conversion did, per module and in total, as a plain object that serialises to JSON."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from adaconvert.adapter import Adapter, LowRankDelta, split_module_name
from adaconvert.compat.vllm import smallest_bucket
from adaconvert.metrics import factors, relative_error


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
        """The JSON form. Its dicts and lists are the report's own, not copies (``dataclasses.asdict`` would
        deep-copy every number of the provenance and the runtime verdicts, one by one)."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        # a module's fields are all numbers and strings: the shallow dict is what asdict's deep copy makes
        names = [f.name for f in fields(ModuleReport)]
        data["modules"] = [{name: getattr(m, name) for name in names} for m in self.modules]
        return data

    @classmethod
    def read(cls, path: str | Path) -> ConversionReport:
        """The report as written by ``to_dict`` (``conversion_report.json``, or a GGUF's ``NAME.report.json``);
        unknown keys are ignored, so that a report from a newer adaconvert still reads."""
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        known = {f.name for f in fields(cls)}
        module_keys = {f.name for f in fields(ModuleReport)}
        modules = [ModuleReport(**{k: v for k, v in m.items() if k in module_keys}) for m in data.get("modules", [])]
        return cls(**{**{k: v for k, v in data.items() if k in known}, "modules": modules})

    @property
    def written_modules(self) -> int:
        """Modules written with a non-zero rank."""
        return sum(1 for m in self.modules if m.rank_after)

    def layout_summary(self) -> str:
        """One line: the layout and what it costs on disk against compact."""
        if not self.layout_overhead_params:
            return self.layout
        share = self.layout_overhead_params / self.params_after if self.params_after else 0.0
        return f"{self.layout} (+{self.layout_overhead_params:,} zero parameters, {share:.1%} over compact)"

    def summary(self) -> str:
        """What the CLI prints after an export: what was written, the layout, and how to run it."""
        dst, error = self.destination, f"max relative error {self.max_rel_error:.2e}"
        params = f"{self.params_after:,} parameters ({self.params_before:,} before)"
        if self.layout == "gguf":
            report_path, card_path = gguf_side_files(dst)
            return (
                f"wrote {dst}: {self.written_modules} modules ({len(self.removed_modules)} empty removed), "
                f"max rank {self.max_rank}, {self.dtype}, {self.bytes_after / 2**20:,.2f} MiB, {error}\n"
                f"report: {report_path}; card: {card_path}\n"
                f"run with llama.cpp: llama-server -m BASE.gguf --lora {dst}"
            )
        if self.layout == "mlx":
            return (
                f"wrote {dst}: {self.written_modules} modules at rank {self.max_rank}, {params}, {error}\n"
                f"layout: {self.layout_summary()}\n"
                f"use with mlx-lm: mlx_lm.generate --model BASE --adapter-path {dst}"
            )
        empty = "removed" if self.layout == "compact" else "written as zeros"
        return (
            f"wrote {dst}: {self.written_modules} modules ({len(self.removed_modules)} empty {empty}), "
            f"max rank {self.max_rank}, {params}, {error}\n"
            f"layout: {self.layout_summary()}\n"
            f"serve with vLLM: --enable-lora --max-lora-rank {self.vllm_max_lora_rank}"
        )


def gguf_side_files(dst: str | Path) -> tuple[Path, Path]:
    """(report, card) paths written beside a GGUF ``dst``: ``x.gguf`` → ``x.report.json``, ``x.README.md``."""
    dst = Path(dst)
    stem = dst.name.removesuffix(".gguf")
    return dst.with_name(f"{stem}.report.json"), dst.with_name(f"{stem}.README.md")


def _cast(delta: LowRankDelta, dtype: torch.dtype) -> LowRankDelta:
    B, A = factors(delta)
    return LowRankDelta(A=A.to(dtype).float(), B=B.to(dtype).float())


def _empty_like(delta: LowRankDelta) -> LowRankDelta:
    return LowRankDelta(A=torch.zeros(0, delta.in_features), B=torch.zeros(delta.out_features, 0))


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
            B, A = factors(reference)  # folded once, also for its cast when it is what is written
            folded = LowRankDelta(A=A, B=B)
            written = folded if after is reference else after
            error = relative_error(folded, _cast(written, dtype) if after else _empty_like(reference))
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
