"""The numbers ``eval`` reports: token-weighted loss and perplexity, ROUGE, exact match, adapter parameters."""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


@dataclass
class LossTotals:
    """Negative log-likelihood summed over predicted tokens, and how many there were.

    An example of n tokens predicts n − 1 of them (each from the ones before); padding predicts nothing. The loss
    is therefore weighted by tokens, not by examples: ``nll / tokens`` over the whole data, the mean a single
    forward pass over all examples with padding masked out computes.
    """

    nll: float = 0.0
    tokens: int = 0

    def add(self, nll: float, tokens: int) -> None:
        self.nll += nll
        self.tokens += tokens

    @property
    def loss(self) -> float:
        """Mean NLL per predicted token, in nats."""
        return self.nll / self.tokens if self.tokens else math.nan

    @property
    def perplexity(self) -> float:
        """exp(loss); inf where the loss is too large for a float."""
        try:
            return math.exp(self.loss)
        except OverflowError:
            return math.inf


def rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measure (0..1) of ``predictions`` against ``references``, through Google's ``rouge-score``
    package (its tokenizer: lowercase, non-alphanumerics as spaces; no stemming).

    Raises:
        ImportError: ``rouge-score`` is not installed (``pip install 'adaconvert[eval]'``).
    """
    try:
        from rouge_score import rouge_scorer
    except ImportError as exc:
        raise ImportError(
            "ROUGE needs the rouge-score package: pip install 'adaconvert[eval]' (or rouge-score)"
        ) from exc
    absl = logging.getLogger("absl")  # rouge-score logs "Using default tokenizer" at INFO on every scorer
    level = absl.level
    absl.setLevel(max(level, logging.WARNING))
    try:
        scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=False)
    finally:
        absl.setLevel(level)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for prediction, reference in zip(predictions, references, strict=True):
        scores = scorer.score(reference, prediction)
        for name in ROUGE_TYPES:
            totals[name] += scores[name].fmeasure
    return {name: total / max(len(predictions), 1) for name, total in totals.items()}


def normalize_answer(text: str) -> str:
    """Lowercase, whitespace runs as one space, stripped: what exact match compares."""
    return re.sub(r"\s+", " ", text).strip().lower()


def exact_match(predictions: list[str], references: list[str]) -> float:
    """Fraction (0..1) of predictions equal to their reference after :func:`normalize_answer`."""
    hits = sum(normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references, strict=True))
    return hits / max(len(predictions), 1)


def adapter_parameters(adapter_dir: str | Path) -> int:
    """Parameters stored in an adapter directory's weights file (every tensor, AdaLoRA's ``lora_E`` included):
    what PEFT counts as trainable when it loads the adapter for training, and what a server holds in memory."""
    from adaconvert.compat.vllm import tensor_shapes

    return sum(math.prod(shape) for shape in tensor_shapes(adapter_dir).values())
