"""What a validation found: one row per check, every problem, tolerances used; prints as one table, saves as JSON."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from adaconvert.errors import InvalidConfigError
from adaconvert.io.atomic import atomic_output_file

LEVELS = ("weights", "logits", "vllm")


@dataclass(frozen=True)
class Tolerances:
    """Limits each level must meet. Defaults come from the loosest dtype involved (:meth:`for_dtypes`).

    Attributes:
        weight_rel: per-module ‖ΔW_orig − ΔW_conv‖_F / ‖ΔW_orig‖_F.
        logit_abs: max |Δlogit| over prompts, positions and vocabulary.
        kl: max over positions of KL(P_orig ‖ P_other), nats.
        top1: min fraction of positions whose argmax token agrees.
        logprob_abs: max |Δlogprob| of the greedy tokens, vLLM vs PEFT.
        greedy: min fraction of vLLM's greedy tokens that are PEFT's argmax too (teacher forced on vLLM's tokens).
    """

    weight_rel: float = 1e-5
    logit_abs: float = 1e-3
    kl: float = 1e-6
    top1: float = 1.0
    logprob_abs: float = 5e-3
    greedy: float = 1.0

    @classmethod
    def for_dtypes(cls, *dtypes: torch.dtype | str | None, overrides: dict | None = None) -> Tolerances:
        """The defaults of the loosest of ``dtypes`` (float32 tight, float16 looser, bfloat16 loosest),
        then ``overrides`` ({field: value}) on top.

        Raises:
            InvalidConfigError: an override names no field or is not a non-negative number.
        """
        names = {str(d).removeprefix("torch.") for d in dtypes if d is not None}
        base = _DEFAULTS["bfloat16"] if "bfloat16" in names else _DEFAULTS["float16"] if "float16" in names else cls()
        if not overrides:
            return base
        known = {f.name for f in fields(cls)}
        for key, value in overrides.items():
            if key not in known:
                raise InvalidConfigError(f"unknown tolerance {key!r}; known: {', '.join(sorted(known))}")
            if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
                raise InvalidConfigError(f"tolerance {key} must be a non-negative number, got {value!r}")
        return cls(**{**asdict(base), **{k: float(v) for k, v in overrides.items()}})

    def to_dict(self) -> dict:
        return asdict(self)


_DEFAULTS = {
    "float16": Tolerances(weight_rel=5e-3, logit_abs=0.1, kl=1e-3, top1=0.95, logprob_abs=0.1, greedy=0.9),
    "bfloat16": Tolerances(weight_rel=2e-2, logit_abs=0.5, kl=5e-3, top1=0.9, logprob_abs=0.3, greedy=0.8),
}


@dataclass
class Check:
    """One measured quantity against its limit.

    Attributes:
        level: ``weights``, ``logits`` or ``vllm``.
        subject: what was compared with the original: the converted adapter's label, or ``merged``.
        metric: what was measured (``max rel. ΔW error``, ``max |Δlogit|``...).
        value: the measurement.
        limit: the tolerance; None for information rows.
        passed: within the limit (information rows pass).
        higher_is_better: agreement rates are minima, errors are maxima.
        detail: where the worst case is (a module name, a prompt).
    """

    level: str
    subject: str
    metric: str
    value: float | None
    limit: float | None = None
    passed: bool = True
    higher_is_better: bool = False
    detail: str = ""

    @classmethod
    def measure(cls, level, subject, metric, value, limit, *, higher_is_better=False, detail="") -> Check:
        """A check that passes when ``value`` is within ``limit`` (≤, or ≥ when ``higher_is_better``)."""
        ok = value is not None and not math.isnan(value) and (value >= limit if higher_is_better else value <= limit)
        return cls(level, subject, metric, value, limit, ok, higher_is_better, detail)


@dataclass
class Problem:
    """One reason the validation fails, naming the level, the subject and, where there is one, the module."""

    level: str
    subject: str
    message: str
    module: str | None = None

    def __str__(self) -> str:
        where = f" module {self.module}:" if self.module else ""
        return f"{self.level} [{self.subject}]:{where} {self.message}"


@dataclass
class ValidationReport:
    """Everything a validation measured.

    Attributes:
        base: the base model.
        pairs: ``[{"label", "original", "converted"}]`` compared.
        merged: the merged checkpoint, if one was checked (a list when several were).
        levels: the levels that ran.
        tolerances: per subject, the limits used.
        checks: every measured row, in table order.
        problems: every failure; empty when the validation passed.
        modules: per pair, ``{module: relative ΔW error}`` (None for a module present on one side only).
        notes: things worth knowing that are not failures (an adapter that barely changes the outputs).
        runtimes: per pair, the portability check of the converted adapter (``runtimes.check_runtimes``): runtime
            → verdict dict. Information, not a pass/fail level.
    """

    base: str
    pairs: list[dict]
    merged: str | list[str] | None = None
    levels: list[str] = field(default_factory=list)
    tolerances: dict[str, dict] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    modules: dict[str, dict[str, float | None]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    runtimes: dict[str, dict[str, dict]] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return not self.problems

    @property
    def failed_levels(self) -> list[str]:
        return [level for level in LEVELS if any(p.level == level for p in self.problems)]

    def add(self, check: Check, *, module: str | None = None, message: str | None = None) -> Check:
        """Record ``check``; a failing one also becomes a problem (``message`` or one built from the check)."""
        self.checks.append(check)
        if not check.passed:
            bound = "≥" if check.higher_is_better else "≤"
            text = message or f"{check.metric} = {_fmt(check.value)}, must be {bound} {_fmt(check.limit)}"
            self.problems.append(Problem(check.level, check.subject, text, module))
        return check

    def fail(self, level: str, subject: str, message: str, *, module: str | None = None) -> None:
        self.problems.append(Problem(level, subject, message, module))

    def to_dict(self) -> dict:
        data = asdict(self)
        data["passed"] = self.passed
        data["failed_levels"] = self.failed_levels
        return _json_safe(data)

    def write_json(self, path: str | Path, *, overwrite: bool = False) -> None:
        """Write :meth:`to_dict` as JSON, atomically; an existing file is only replaced with ``overwrite``."""
        with atomic_output_file(path, overwrite=overwrite) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")

    def table(self) -> str:
        """The checks as one aligned text table, then the problems, then a verdict line."""
        header = ("level", "subject", "check", "value", "limit", "result", "worst")
        rows = [header]
        for c in self.checks:
            limit = "" if c.limit is None else ("≥ " if c.higher_is_better else "≤ ") + _fmt(c.limit)
            result = "FAIL" if not c.passed else "info" if c.limit is None else "ok"
            rows.append((c.level, c.subject, c.metric, _fmt(c.value), limit, result, c.detail))
        widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1] for r in rows]
        lines = [line.rstrip() for line in lines]
        lines += [f"note: {n}" for n in self.notes]
        for label, verdicts in self.runtimes.items():
            by_status: dict[str, list[str]] = {}
            for runtime, v in verdicts.items():
                by_status.setdefault(v["status"], []).append(runtime)
            lines.append(f"runtimes {label}: " + "; ".join(f"{s} in {', '.join(r)}" for s, r in by_status.items()))
        lines += [f"problem: {p}" for p in self.problems]
        verdict = "PASSED" if self.passed else f"FAILED at level(s): {', '.join(self.failed_levels)}"
        lines.append(f"{verdict} ({len(self.checks)} checks, {len(self.problems)} problems)")
        return "\n".join(lines)


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isinf(value):
            return "inf"
        if value == 0 or 1e-3 <= abs(value) < 1e4:
            return f"{value:.4g}"
        return f"{value:.2e}"
    return str(value)


def _json_safe(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj
