"""``CompareReport``: the comparison as one table (terminal and Markdown), a JSON record, two charts, and one
closing line per criterion naming the method that did best in this run."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from adaconvert.io.atomic import atomic_output_file
from adaconvert.training.heldout import jitter

COMPARE_JSON_NAME = "compare.json"
COMPARE_MD_NAME = "compare.md"
CURVES_PLOT_NAME = "eval_loss.png"
QUALITY_PLOT_NAME = "quality_vs_params.png"

# (row key, criterion as the closing line says it, lower is better)
CRITERIA = (
    ("eval_loss", "lowest held-out loss", True),
    ("rougeL", "highest ROUGE-L", False),
    ("forgetting", "least forgetting", True),
    ("jitter", "smoothest held-out curve (lowest jitter)", True),
    ("final_params", "fewest adapter parameters", True),
    ("trainable_total", "fewest trainable parameters (pilot + main)", True),
    ("median_step_ms", "fastest optimizer step", True),
    ("tokens_per_s", "most tokens/s", False),
    ("peak_memory_mib", "lowest peak memory", True),
    ("train_wall_s", "shortest wall time (pilot included)", True),
    ("rank_bucket", "smallest vLLM rank bucket", True),
)
UNITS = {"median_step_ms": " ms", "tokens_per_s": " tokens/s", "peak_memory_mib": " MiB", "train_wall_s": " s"}


@dataclass
class MethodRow:
    """One method's measurements (None where not measured: a failed method, no reference data, no pairs)."""

    method: str
    status: str
    error: str | None = None
    pilot_params: int | None = None
    main_params: int | None = None
    peft_trainable: int | None = None
    final_params: int | None = None
    median_step_ms: float | None = None
    tokens_per_s: float | None = None
    peak_memory_mib: float | None = None
    train_wall_s: float | None = None
    train_loss: float | None = None
    eval_loss: float | None = None
    rougeL: float | None = None  # the metric's own name
    forgetting: float | None = None
    jitter: float | None = None
    rank_bucket: int | None = None
    validated: bool | None = None
    curve: list[dict] = field(default_factory=list)

    @property
    def trainable_total(self) -> int | None:
        if self.main_params is None:
            return None
        return self.main_params + (self.pilot_params or 0)


@dataclass
class CompareReport:
    """The result of :func:`adaconvert.comparison.compare`.

    Attributes:
        rows: one per method, in the order run.
        base: the base model's own eval loss / ROUGE-L (the reference row), when evaluated.
        budget_rule: how the three budgets were made equal.
        memory_kind: what ``peak_memory_mib`` measures (``peak RSS`` on CPU, ``CUDA max_memory_allocated``).
        jitter_from_step: the common window of the jitter column (AdaLoRA's final fine-tuning, when it ran).
        seconds: the whole comparison; ``train_seconds``: the training runs within it; ``inputs_s``: building the
            ``--demo`` inputs (pretraining its tiny base) within it.
        quality: the engine and any validation / evaluation error.
    """

    output: str
    rows: list[MethodRow]
    base: dict | None
    budget_rule: str
    memory_kind: str
    jitter_from_step: int
    seconds: float
    train_seconds: float
    quality: dict
    options: dict = field(default_factory=dict)
    inputs_s: float = 0.0

    @classmethod
    def build(cls, plan, records: dict, quality: dict, *, seconds: float, inputs_s: float = 0.0) -> CompareReport:
        ok = [r for r in records.values() if r["status"] == "ok"]
        window = next((r["eval"]["jitter_from_step"] for r in ok if r["method"] == "adalora" and r["eval"]), 0)
        evaluation = (quality.get("evaluation") or {}).get("rows", {})
        passed = (quality.get("validation") or {}).get("passed", {})
        rows = [_row(r, evaluation, passed, window) for r in records.values()]
        return cls(
            output=plan.output,
            rows=rows,
            base=evaluation.get("base"),
            budget_rule=plan.budget_rule(),
            memory_kind=next((r["memory_kind"] for r in ok), "peak RSS"),
            jitter_from_step=window,
            seconds=seconds,
            train_seconds=sum(r["train_wall_s"] for r in ok),
            quality={k: v for k, v in quality.items() if k != "evaluation"},
            options=plan.to_dict(),
            inputs_s=inputs_s,
        )

    @property
    def failures(self) -> dict[str, str]:
        """{method: its one-line error} for the methods that failed."""
        return {r.method: r.error or "failed" for r in self.rows if r.status != "ok"}

    @property
    def overhead(self) -> float:
        """The comparison's time beyond its training runs (conversion, validation, evaluation, reports; not the
        ``--demo`` inputs, which a user's own base and data do not need), as a fraction of the training runs' wall
        time."""
        extra = self.seconds - self.train_seconds - self.inputs_s
        return extra / self.train_seconds if self.train_seconds else math.nan

    def winners(self) -> list[str]:
        """One line per criterion: which method did best IN THIS RUN (ties named), or why none is named."""
        lines = []
        for key, what, lower in CRITERIA:
            values = {r.method: getattr(r, key) for r in self.rows if r.status == "ok"}
            values = {m: v for m, v in values.items() if v is not None and math.isfinite(v)}
            if len(values) < 2:
                continue
            best = min(values.values()) if lower else max(values.values())
            won = [m for m, v in values.items() if v == best]
            unit = UNITS.get(key, "")
            if len(won) == len(values):
                lines.append(f"{what}: a tie ({_fmt(key, best)}{unit} each)")
                continue
            others = ", ".join(f"{m} {_fmt(key, v)}" for m, v in values.items() if m not in won)
            who = " and ".join(won) + (" (tie)" if len(won) > 1 else "")
            lines.append(f"{what}: {who} ({_fmt(key, best)}{unit}; {others})")
        return lines

    def table(self) -> str:
        """The comparison as an aligned text table, the closing lines and where everything is."""
        header, body = self._cells()
        widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
        lines = [" | ".join(c.ljust(w) for c, w in zip(header, widths, strict=True)).rstrip()]
        lines.append("-+-".join("-" * w for w in widths))
        lines += [" | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in body]
        return "\n".join([*lines, "", *self._notes()])

    def markdown(self) -> str:
        header, body = self._cells()
        lines = [f"# adaconvert compare: {', '.join(r.method for r in self.rows)}", ""]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        lines += ["", *(f"- {line}" for line in self._notes())]
        lines += ["", f"![held-out loss]({CURVES_PLOT_NAME})", "", f"![quality vs parameters]({QUALITY_PLOT_NAME})"]
        return "\n".join(lines) + "\n"

    def _cells(self) -> tuple[list[str], list[list[str]]]:
        memory = "peak RSS MiB" if self.memory_kind.startswith("peak RSS") else "CUDA peak MiB"
        header = [
            "method",
            "trainable pilot / main",
            "adapter params",
            "ms/step",
            "tokens/s",
            memory,
            "wall s",
            "eval loss",
            "ROUGE-L",
            "forgetting",
            f"jitter (step ≥ {self.jitter_from_step})",
            "vLLM bucket",
        ]
        body = []
        if self.base is not None:
            body.append(["base", "-", "0", "-", "-", "-", "-", _fmt("eval_loss", self.base["loss"]),
                         _fmt("rougeL", self.base["rougeL"]), "0", "-", "-"])  # fmt: skip
        for r in self.rows:
            if r.status != "ok":
                body.append([r.method, f"FAILED: {r.error}", *["-"] * (len(header) - 2)])
                continue
            body.append(
                [
                    r.method + ("" if r.validated in (True, None) else " (validation FAILED)"),
                    f"{_fmt('n', r.pilot_params)} / {_fmt('n', r.main_params)}",
                    _fmt("n", r.final_params),
                    _fmt("median_step_ms", r.median_step_ms),
                    _fmt("tokens_per_s", r.tokens_per_s),
                    _fmt("peak_memory_mib", r.peak_memory_mib),
                    _fmt("train_wall_s", r.train_wall_s),
                    _fmt("eval_loss", r.eval_loss),
                    _fmt("rougeL", r.rougeL),
                    _fmt("forgetting", r.forgetting),
                    _fmt("jitter", r.jitter),
                    _fmt("n", r.rank_bucket),
                ]
            )
        return header, body

    def _notes(self) -> list[str]:
        notes = [f"budget: {self.budget_rule}; same data, steps, seed and precision for all"]
        notes.append(
            f"memory: {self.memory_kind}; wall: the whole train run, LoRA-Drop's pilot included; eval loss, ROUGE-L "
            f"and forgetting: the converted adapters ({self.quality.get('engine', '?')}); forgetting: loss on the "
            "reference text minus the base's"
        )
        if self.quality.get("error"):
            notes.append(f"validation / evaluation failed: {self.quality['error']}")
        notes += [f"in this run, {line}" for line in self.winners()]
        inputs = f", {self.inputs_s:.0f} s building the demo's inputs" if self.inputs_s else ""
        notes.append(
            f"{self.seconds:.0f} s in all, {self.train_seconds:.0f} s training{inputs} (compare's own overhead: "
            f"{self.overhead:.0%} of the training time)"
        )
        return notes

    def to_dict(self) -> dict:
        data = asdict(self)
        data["winners"] = self.winners()
        data["failures"] = self.failures
        data["overhead"] = self.overhead
        return data

    def write(self, root: str | Path) -> None:
        """compare.json, compare.md and the two charts (the charts where matplotlib is installed) in ``root``."""
        root = Path(root)
        _write(root / COMPARE_JSON_NAME, json.dumps(self.to_dict(), indent=2, default=str) + "\n")
        _write(root / COMPARE_MD_NAME, self.markdown())
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            return
        self.plot_curves(root / CURVES_PLOT_NAME)
        self.plot_quality(root / QUALITY_PLOT_NAME)

    def plot_curves(self, path: Path) -> None:
        """The held-out loss of every method against the optimizer step, on one chart."""
        plt = _pyplot()
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        for i, r in enumerate(self.rows):
            if r.curve:
                steps, losses = [p["step"] for p in r.curve], [p["loss"] for p in r.curve]
                ax.plot(steps, losses, marker="o", ms=3, color=f"C{i}", label=r.method)
        if self.jitter_from_step:
            ax.axvline(self.jitter_from_step, color="grey", ls=":", lw=1, label="jitter window")
        ax.set_xlabel("optimizer step (LoRA-Drop: main run, after its pilot)")
        ax.set_ylabel("held-out loss (nats / token)")
        ax.set_title("held-out loss during training")
        ax.legend()
        _save(fig, path)

    def plot_quality(self, path: Path) -> None:
        """Held-out loss (and ROUGE-L where measured) against the adapter's parameters, one point per method."""
        plt = _pyplot()
        # each method in the colour of its curve (plot_curves), the base in black
        points = [
            (r.method, r.final_params, r.eval_loss, r.rougeL, f"C{i}")
            for i, r in enumerate(self.rows)
            if r.final_params is not None
        ]
        if self.base is not None:
            points.insert(0, ("base", 0, self.base["loss"], self.base["rougeL"], "black"))
        with_rouge = any(p[3] is not None for p in points)
        fig, axes = plt.subplots(1, 2 if with_rouge else 1, figsize=(10 if with_rouge else 5.5, 4.0), squeeze=False)
        for ax, index, label in zip(axes[0], (2, 3), ("held-out loss (lower is better)", "ROUGE-L (higher is better)"),
                                    strict=False):  # fmt: skip
            for point in points:
                if point[index] is not None:
                    ax.scatter(point[1], point[index], color=point[4])
                    ax.annotate(point[0], (point[1], point[index]), textcoords="offset points", xytext=(4, 4))
            ax.set_xlabel("adapter parameters (converted, served)")
            ax.set_ylabel(label)
        fig.suptitle("quality vs parameters")
        _save(fig, path)


def _row(record: dict, evaluation: dict, passed: dict, window: int) -> MethodRow:
    if record["status"] != "ok":
        return MethodRow(record["method"], "failed", error=record.get("error"))
    method, params = record["method"], record["params"]
    quality = evaluation.get(f"{method}-lora", {})
    curve = record["eval"]["curve"] if record["eval"] else []
    peak = record["peak_memory_bytes"]
    return MethodRow(
        method=method,
        status="ok",
        pilot_params=params["pilot"],
        main_params=params["main"],
        peft_trainable=params["peft_trainable"],
        final_params=params["final"],
        median_step_ms=record["median_step_s"] * 1e3,
        tokens_per_s=record["tokens_per_s"],
        peak_memory_mib=peak / 2**20 if peak is not None else None,
        train_wall_s=record["train_wall_s"],
        train_loss=record["train_loss"],
        eval_loss=quality.get("loss", record["final_eval_loss"]),
        rougeL=quality.get("rougeL"),
        forgetting=quality.get("forgetting"),
        jitter=jitter(curve, start_step=window),
        rank_bucket=record["rank_bucket"],
        validated=passed.get(f"{method}-lora"),
        curve=curve,
    )


def _fmt(key: str, value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if key in ("n", "final_params", "trainable_total", "rank_bucket"):
        return f"{value:,}"
    if key in ("tokens_per_s", "peak_memory_mib"):
        return f"{value:,.0f}"
    if key in ("median_step_ms", "train_wall_s"):
        return f"{value:.1f}"
    if key == "forgetting":
        return f"{value:+.4f}"
    return f"{value:.4f}"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_output_file(path, overwrite=True) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def _write(path: Path, text: str) -> None:
    with atomic_output_file(path, overwrite=True) as tmp:
        tmp.write_text(text, encoding="utf-8")
