"""``EvalReport``: one row per subject (the base, each adapter, each merged model), rendered as a table, a dict
(``--json``) and a quality-vs-parameters plot."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from adaconvert.io.atomic import atomic_output_file


@dataclass
class EvalRow:
    """The measurements of one subject.

    Attributes:
        label, kind, method, converted_from, source: what was evaluated (see :class:`~adaconvert.evaluation.
            subjects.Subject`).
        parameters: parameters in the adapter file (PEFT's own count when it loads it for training); 0 for the
            base, None for a merged model.
        trained_parameters: trainable parameters of the ``adaconvert train`` run that made it, when known.
        loss: mean NLL per predicted token on the eval data (nats), token-weighted over non-padding tokens.
        perplexity: exp(loss).
        tokens: predicted tokens the loss is over.
        rouge1, rouge2, rougeL: mean F-measure (0..1) of the greedy generations against the references; None
            without prompt/reference pairs.
        exact_match: fraction of generations equal to the reference (lowercased, whitespace collapsed).
        reference_loss: the same loss on the reference (general) data; None without it.
        forgetting: ``reference_loss`` minus the base's; > 0: the subject lost some of the base's fit to it.
        predictions: the greedy generation for each prompt, decoded.
        engine: set when this row ran on another engine than the report's (merged models under vLLM run
            through transformers).
    """

    label: str
    kind: str
    method: str
    source: str | None
    converted_from: str | None
    parameters: int | None
    trained_parameters: int | None
    loss: float
    perplexity: float
    tokens: int
    rouge1: float | None = None
    rouge2: float | None = None
    rougeL: float | None = None  # rouge-score's own name for it
    exact_match: float | None = None
    reference_loss: float | None = None
    forgetting: float | None = None
    predictions: list[str] = field(default_factory=list)
    engine: str | None = None


@dataclass
class EvalReport:
    """The result of :func:`adaconvert.evaluation.evaluate`.

    Attributes:
        base: the base model as given.
        engine: ``vllm`` or ``hf``.
        dtype: the compute dtype.
        data, reference_data: the eval and reference data as given.
        examples: eval rows scored for the loss; ``pairs``: rows with a prompt/reference pair.
        references: the reference answers, in prompt order.
        max_new_tokens: the greedy generation limit.
        rows: one :class:`EvalRow` per subject, the base first.
        seconds: wall time of the engine run (models loaded, converted, evaluated).
    """

    base: str
    engine: str
    dtype: str
    data: str
    reference_data: str | None
    examples: int
    pairs: int
    max_new_tokens: int
    rows: list[EvalRow]
    seconds: float
    references: list[str] = field(default_factory=list)

    def row(self, label: str) -> EvalRow:
        """The row called ``label``.

        Raises:
            KeyError: no such row.
        """
        for row in self.rows:
            if row.label == label:
                return row
        raise KeyError(label)

    @property
    def quality_metric(self) -> str:
        """What the plot and the summary line rank by: ROUGE-L where there are pairs, else the loss."""
        return "rougeL" if self.pairs else "loss"

    def table(self) -> str:
        """A header line, one line per subject, and which subject is best on each measurement."""
        ref = f"; reference {self.reference_data}" if self.reference_data else ""
        gen = f"; {self.pairs} prompts, greedy, ≤ {self.max_new_tokens} new tokens" if self.pairs else ""
        lines = [
            f"eval on {self.data}: {self.examples} rows, {self.rows[0].tokens} tokens{gen}{ref}; engine "
            f"{self.engine} ({self.dtype}), {self.seconds:.1f} s"
        ]
        columns = [("subject", 20, "label"), ("method", 16, None), ("params", 10, "parameters")]
        columns += [("loss", 8, "loss"), ("ppl", 9, "perplexity")]
        if self.pairs:
            columns += [("ROUGE-1", 8, "rouge1"), ("ROUGE-2", 8, "rouge2"), ("ROUGE-L", 8, "rougeL")]
            columns += [("EM", 6, "exact_match")]
        if self.reference_data:
            columns += [("ref loss", 9, "reference_loss"), ("forgetting", 11, "forgetting")]
        lines.append(" ".join(f"{name:<{w}}" if i < 2 else f"{name:>{w}}" for i, (name, w, _) in enumerate(columns)))
        for row in self.rows:
            cells = []
            for i, (_, width, attr) in enumerate(columns):
                value = _method(row) if attr is None else getattr(row, attr)
                cells.append(f"{value:<{width}}" if i < 2 else f"{_fmt(attr, value):>{width}}")
            lines.append(" ".join(cells).rstrip())
        lines += self._best()
        return "\n".join(lines)

    def _best(self) -> list[str]:
        """One line per measurement: which subject did best in this run (never a general claim)."""
        rows = [r for r in self.rows if r.kind != "base"] or self.rows
        best = [("lowest loss", min(rows, key=lambda r: r.loss).label)]
        if self.pairs:
            best.append(("highest ROUGE-L", max(rows, key=lambda r: r.rougeL).label))
        if self.reference_data:
            best.append(("least forgetting", min(rows, key=lambda r: r.forgetting).label))
        return ["in this run: " + "; ".join(f"{what}: {label}" for what, label in best)]

    def to_dict(self) -> dict:
        """Everything, JSON-ready (non-finite numbers as strings)."""
        return _finite(asdict(self))

    def plot(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write a PNG of quality (ROUGE-L, else eval loss) against adapter parameters, one point per adapter, the
        base as a horizontal line; merged models (no adapter count) are left out. Written atomically.

        Raises:
            OutputExistsError: ``path`` exists and ``overwrite`` is false.
            ImportError: matplotlib is not installed (``pip install 'adaconvert[plot]'``).
        """
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        metric = self.quality_metric
        name = {"rougeL": "ROUGE-L (higher is better)", "loss": "eval loss, nats/token (lower is better)"}[metric]
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        try:
            base = self.rows[0]
            ax.axhline(getattr(base, metric), color="grey", linestyle="--", label=f"base: {getattr(base, metric):.4g}")
            for row in self.rows:
                if row.kind == "adapter":
                    ax.scatter(row.parameters, getattr(row, metric), label=f"{row.label} ({_method(row)})")
                    ax.annotate(row.label, (row.parameters, getattr(row, metric)), fontsize=8,
                                xytext=(4, 4), textcoords="offset points")  # fmt: skip
            ax.set_xlabel("adapter parameters")
            ax.set_ylabel(name)
            ax.set_title(f"{Path(self.data).name}: quality vs adapter size ({self.engine})")
            ax.legend(fontsize=8)
            fig.tight_layout()
            with atomic_output_file(path, overwrite=overwrite) as tmp:
                fig.savefig(tmp, format="png", dpi=120)
        finally:
            plt.close(fig)
        return Path(path)


def _method(row: EvalRow) -> str:
    method = f"{row.method}←{row.converted_from}" if row.converted_from else row.method
    return f"{method} ({row.engine})" if row.engine else method


def _fmt(attr: str | None, value) -> str:
    if value is None:
        return "-"
    if attr in ("parameters",):
        return f"{value:,}"
    if attr in ("rouge1", "rouge2", "rougeL", "exact_match"):
        return f"{value:.3f}"
    if attr == "forgetting":
        return f"{value:+.4f}"
    if attr == "perplexity":
        return f"{value:.2f}" if math.isfinite(value) else "inf"
    return f"{value:.4f}"


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
