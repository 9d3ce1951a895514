"""Weights level: ΔW of the conversion against ΔW of the original, module by module, from the low-rank factors;
and a merged checkpoint's W_merged − W_base against the original's ΔW, read one tensor at a time."""

from __future__ import annotations

import logging
import math

import torch

from adaconvert.adapter import Adapter, LowRankDelta
from adaconvert.base.model import BaseModel, BaseModule
from adaconvert.io.checkpoint import Checkpoint, TensorReader, match_tensor
from adaconvert.metrics import frobenius_norm, relative_error
from adaconvert.validation.checks import Check, Tolerances, ValidationReport

logger = logging.getLogger(__name__)

LEVEL = "weights"


def check_against_base(
    adapter: Adapter, base: dict[str, BaseModule], report: ValidationReport, *, subject: str, role: str
) -> set[str]:
    """A problem for every module of ``adapter`` that the base model lacks (vLLM would silently ignore it) or
    whose shape does not fit the base layer.

    Returns:
        The names of the modules found wrong.
    """
    bad = set()
    for name, delta in sorted(adapter.deltas.items()):
        layer = base.get(name)
        if layer is not None and layer.kind == "embedding":
            continue
        if layer is None or (delta.in_features, delta.out_features) != (layer.in_features, layer.out_features):
            bad.add(name)
        if layer is None:
            report.fail(
                LEVEL,
                subject,
                f"{role} has a module that matches nothing in the base model (wrong key prefix?): vLLM would "
                "silently ignore it and serve base-model outputs",
                module=name,
            )
        elif name in bad:
            report.fail(
                LEVEL,
                subject,
                f"{role} ΔW is {delta.out_features}×{delta.in_features} but the base layer is "
                f"{layer.out_features}×{layer.in_features}",
                module=name,
            )
    return bad


def compare_adapters(
    original: Adapter,
    converted: Adapter,
    report: ValidationReport,
    *,
    subject: str,
    tol: Tolerances,
    reported: set[str] = frozenset(),
) -> dict[str, float | None]:
    """Per-module relative ΔW error of ``converted`` against ``original``; rows and problems go into ``report``.

    A module of the original whose ΔW is zero may be missing from the conversion (it was stripped). A module with a
    non-zero ΔW that is missing counts as relative error 1; a module only in the conversion is a problem.

    Args:
        reported: modules already reported as wrong (unknown to the base model); not reported again as extra.

    Returns:
        ``{module: relative error}``, None for modules present only in the conversion.
    """
    errors: dict[str, float | None] = {}
    missing, extra = [], sorted(set(converted.deltas) - set(original.deltas))
    for name, ref in sorted(original.deltas.items()):
        other = converted.deltas.get(name)
        if other is None:
            if frobenius_norm(ref) == 0.0:
                continue
            missing.append(name)
            other = LowRankDelta(A=ref.A.new_zeros(0, ref.in_features), B=ref.B.new_zeros(ref.out_features, 0))
        if (other.in_features, other.out_features) != (ref.in_features, ref.out_features):
            report.fail(
                LEVEL,
                subject,
                f"ΔW is {other.out_features}×{other.in_features} in the conversion, "
                f"{ref.out_features}×{ref.in_features} in the original",
                module=name,
            )
            errors[name] = math.inf
            continue
        errors[name] = relative_error(ref, other)
    for name in extra:
        errors[name] = None
        if name not in reported:  # a module already named as unknown to the base is not named twice
            report.fail(LEVEL, subject, "module is in the conversion but not in the original", module=name)
    for name in missing:
        report.fail(
            LEVEL, subject, "module with a non-zero ΔW in the original is missing from the conversion", module=name
        )
    for name, err in errors.items():
        if err is not None and name not in missing and not err <= tol.weight_rel:
            report.fail(LEVEL, subject, f"relative ΔW error {err:.3g} > {tol.weight_rel:g}", module=name)

    measured = {k: v for k, v in errors.items() if v is not None}
    worst = max(measured, key=measured.get, default="")
    report.checks.append(
        Check.measure(LEVEL, subject, "max rel. ΔW error", measured.get(worst, 0.0), tol.weight_rel, detail=worst)
    )
    stripped = len(set(original.deltas) - set(converted.deltas)) - len(missing)
    report.checks.append(  # the problems were added per module above
        Check.measure(
            LEVEL,
            subject,
            "modules missing or extra",
            float(len(missing) + len(extra)),
            0.0,
            detail=f"{len(original.deltas)} in original ({stripped} with ΔW = 0, stripped), {len(converted.deltas)} "
            "in conversion",
        )
    )
    return errors


def compare_merged(
    original: Adapter,
    base_model: BaseModel,
    merged: Checkpoint,
    report: ValidationReport,
    *,
    tol: Tolerances,
    subject: str = "merged",
    requantize: str | None = None,
    double_quant: bool = True,
) -> None:
    """Check that W_merged − W_base equals the original's ΔW on every adapted module and zero elsewhere.

    For a QLoRA-faithful merge (``requantize``, as ``merge(requantize=...)`` took it), W_base of every quantised
    layer is dequant(quant(W_base)).

    Both checkpoints are read through :mod:`adaconvert.io.checkpoint`, one tensor at a time, and each module finds
    its base tensor by the merge's own rule (:func:`adaconvert.io.checkpoint.match_tensor`: ``<module>.weight``, or a
    prefixed name such as ``language_model.<module>.weight``). Rounding is allowed for: a module passes when
    ‖(W_merged − W_base) − ΔW‖ ≤ weight_rel·‖ΔW‖ + 2u·‖W_merged‖, u the unit roundoff of the merged dtype (plus the
    base's, when the dtypes differ). The rows show the worst ratio of error to allowance (≤ 1 passes), for the
    adapted modules and for every other tensor.

    Args:
        base_model: the base, resolved once (its checkpoint's headers are read here).
        merged: opened with :func:`adaconvert.io.checkpoint.open_checkpoint` (headers only).
    """
    from adaconvert.base.quantization import requantized

    base = base_model.checkpoint
    requant = {f"{m}.weight": t for m, t in base_model.quantized_modules.items()} if requantize else {}
    adapted: dict[str, str] = {}
    for module in sorted(original.deltas):
        candidates = match_tensor(module, base.tensors)
        if len(candidates) == 1:
            adapted[candidates[0]] = module
        else:
            found = f"several candidates ({', '.join(candidates)})" if candidates else "no weight"
            report.fail(LEVEL, subject, f"adapted module has {found} in the base checkpoint", module=module)
    for key in sorted(k for k in base.tensors if k not in merged.tensors)[:5]:
        report.fail(LEVEL, subject, f"tensor {key!r} of the base is missing from the merged checkpoint")
    worst = {"adapted": ("", 0.0), "other": ("", 0.0)}
    with TensorReader() as reader:
        for key in sorted(set(base.tensors) & set(merged.tensors)):
            w_base, w_merged = reader.read(base.tensors[key]), reader.read(merged.tensors[key])
            if key in requant:
                w_base = requantized(w_base, requantize, double_quant=double_quant, transposed=requant[key])
            module = adapted.get(key)
            ratio = _merged_tensor_ratio(original, key, module, w_base, w_merged, report, tol=tol, subject=subject)
            if ratio is not None:
                group = "other" if module is None else "adapted"
                worst[group] = max(worst[group], (module or key, ratio), key=lambda t: t[1])
    for group, metric in (("adapted", "merged ΔW error / allowance"), ("other", "other tensors changed / allowance")):
        name, ratio = worst[group]
        report.checks.append(Check.measure(LEVEL, subject, metric, ratio, 1.0, detail=name))


def _merged_tensor_ratio(original, key, module, w_base, w_merged, report, *, tol, subject) -> float | None:
    """Error / allowance of one tensor of the merged checkpoint (a problem when above 1); None if incomparable."""
    if w_base.shape != w_merged.shape:
        report.fail(LEVEL, subject, f"tensor {key!r} is {list(w_merged.shape)}, base {list(w_base.shape)}")
        return None
    u = _unit_roundoff(w_merged.dtype) + _unit_roundoff(w_base.dtype) * (w_base.dtype != w_merged.dtype)
    diff = w_merged.float() - w_base.float()
    noise = 2 * u * float(w_merged.float().norm())
    if module is None:
        changed = float(diff.norm())
        if changed > noise:
            report.fail(LEVEL, subject, f"{key} differs from the base, yet the adapter does not touch it")
        return changed / max(noise, 1e-30)
    delta = original.deltas[module].delta_weight()
    if original.fan_in_fan_out or diff.shape != delta.shape:
        delta = delta.T  # Conv1D stores (in, out)
    if diff.shape != delta.shape:
        report.fail(LEVEL, subject, f"ΔW shape {list(delta.shape)} does not fit {list(diff.shape)}", module=module)
        return None
    err, ref = float((diff - delta).norm()), float(delta.norm())
    ratio = err / max(tol.weight_rel * ref + noise, 1e-30)
    if ratio > 1:
        what = f"relative error {err / ref:.3g}" if ref else "the original's ΔW is zero here"
        report.fail(LEVEL, subject, f"W_merged − W_base differs from the original's ΔW: {what}", module=module)
    return ratio


def _unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2 if dtype.is_floating_point else 0.0
