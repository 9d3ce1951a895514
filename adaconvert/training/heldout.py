"""Held-out loss during training: the eval split, the Trainer hooks that make its eval loss token-weighted, the
curve, and the curve's jitter (docs/design.md, "Held-out loss and jitter").

The Trainer's own ``eval_loss`` is the mean over examples of each batch's mean loss: a batch of short examples
weighs as much as one of long ones. Here the Trainer's own loop still runs (its schedule, its distributed eval
dataloader, its ``gather_for_metrics`` that drops the examples repeated to even out the last batches), but
:func:`token_loss_step` returns, per example, the summed next-token loss and the number of predicted (non-padding)
tokens, and :func:`token_weighted_metrics` divides the sums: Σ loss / Σ tokens over the whole eval set, the same
number on every process.
"""

from __future__ import annotations

import itertools
import math
import random

import torch
from transformers import TrainerCallback

from adaconvert.errors import InvalidConfigError
from adaconvert.training.data import IGNORE_INDEX, TokenizedDataset


def split_heldout(
    dataset: TokenizedDataset, fraction: float, *, seed: int
) -> tuple[TokenizedDataset, TokenizedDataset]:
    """(train, eval): ``round(fraction · n)`` examples (at least 1) drawn with ``seed``, the rest kept in order.

    Raises:
        InvalidConfigError: nothing would be left to train on.
    """
    n = len(dataset)
    n_eval = max(1, round(fraction * n))
    if n_eval >= n:
        raise InvalidConfigError(f"--eval-fraction {fraction} of {n} examples leaves nothing to train on")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    train = [e for i, e in enumerate(dataset.examples) if i not in held]
    evaluate = [dataset.examples[i] for i in sorted(held)]
    return TokenizedDataset(train), TokenizedDataset(evaluate)


@torch.no_grad()
def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example summed next-token cross-entropy and count of predicted tokens.

    Args:
        logits: (B, T, V) model outputs.
        labels: (B, T) token ids, ``-100`` on padding.

    Returns:
        (loss sums (B,) float64, token counts (B,) float64): position t predicts label t + 1, padding skipped.
    """
    shifted = labels[:, 1:]
    per_token = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), shifted, ignore_index=IGNORE_INDEX, reduction="none"
    )
    mask = shifted != IGNORE_INDEX
    return (per_token * mask).double().sum(-1), mask.double().sum(-1)


def token_loss_step(trainer, model, inputs: dict) -> tuple[None, torch.Tensor, torch.Tensor]:
    """A ``Trainer.prediction_step`` for the held-out loss: no batch-mean loss, the per-example loss sums as the
    "predictions" and the token counts as the "labels" (each (B, 1), so that the Trainer's padding across processes
    leaves them as they are), gathered by the Trainer's loop for :func:`token_weighted_metrics`."""
    inputs = trainer._prepare_inputs(inputs)
    with torch.no_grad(), trainer.compute_loss_context_manager():
        # without labels: AdaLoRA's PEFT model would add its orthogonality penalty to a loss it computed itself
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    sums, counts = token_losses(logits, inputs["labels"])
    return None, sums[:, None], counts[:, None]


def token_weighted_metrics(prediction) -> dict[str, float]:
    """``compute_metrics`` for :func:`token_loss_step`: ``loss`` (the Trainer reports it as ``eval_loss``) =
    Σ loss / Σ tokens, and ``tokens``."""
    tokens = float(prediction.label_ids.sum())
    return {"loss": float(prediction.predictions.sum()) / tokens if tokens else float("nan"), "tokens": tokens}


class EvalCurve(TrainerCallback):
    """Collects ``(optimizer step, held-out loss)`` at every evaluation the Trainer runs."""

    def __init__(self):
        self.points: list[dict] = []

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if metrics and "eval_loss" in metrics:
            self.points.append({"step": state.global_step, "loss": float(metrics["eval_loss"])})


def jitter(curve: list[dict], *, start_step: int = 0) -> float | None:
    """Mean |L_k+1 − L_k| over consecutive held-out losses whose steps are both ≥ ``start_step``.

    Returns:
        None when the window holds fewer than 2 evaluations.
    """
    losses = [p["loss"] for p in curve if p["step"] >= start_step and math.isfinite(p["loss"])]
    if len(losses) < 2:
        return None
    return sum(abs(b - a) for a, b in itertools.pairwise(losses)) / (len(losses) - 1)


def eval_record(curve: list[dict], *, start_step: int, eval_steps: int, examples: int, tokens: int) -> dict:
    """The ``eval`` section of ``training_summary.json``: the curve, its last loss and its jitter (window start
    named)."""
    return {
        "examples": examples,
        "tokens": tokens,
        "eval_steps": eval_steps,
        "curve": curve,
        "final_loss": curve[-1]["loss"] if curve else None,
        "jitter": jitter(curve, start_step=start_step),
        "jitter_from_step": start_step,
    }
