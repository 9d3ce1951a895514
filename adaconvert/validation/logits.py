"""Logits level: PEFT(original) against PEFT(converted) and against a merged model, on the same prompts.

One base model is loaded once; each adapter is attached with PEFT, run, and detached again (``unload``), so that
at most one copy of the base weights is in memory.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import torch

from adaconvert.errors import InvalidConfigError, SourceNotFoundError
from adaconvert.process import hf_progress
from adaconvert.validation.checks import Check, Tolerances, ValidationReport

logger = logging.getLogger(__name__)

LEVEL = "logits"

DEFAULT_PROMPTS = (
    "the quick brown fox jumps over the lazy dog",
    "the model reads a prompt and writes the next token",
    "Once upon a time, in a small village by the sea,",
    "def fibonacci(n):\n    ",
    "Question: what is the capital of France? Answer:",
    "low rank adapters are served side by side in one engine",
)

# PEFT raises these when an adapter does not fit the model; they become problems, not crashes
PEFT_LOAD_ERRORS = (ValueError, RuntimeError, KeyError, OSError, TypeError)


def read_prompts(prompts) -> list[str]:
    """Prompts from a list, or a file: a JSON list of strings (``.json``) or one prompt per non-empty line.

    Raises:
        SourceNotFoundError: the file does not exist.
        InvalidConfigError: the file holds no prompt, or JSON that is not a list of strings.
    """
    if prompts is None:
        return list(DEFAULT_PROMPTS)
    if isinstance(prompts, list | tuple):
        result = [str(p) for p in prompts]
    else:
        path = Path(prompts)
        if not path.is_file():
            raise SourceNotFoundError("no such prompts file", path=path)
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json":
            try:
                result = json.loads(text)
            except json.JSONDecodeError as exc:
                raise InvalidConfigError(f"not valid JSON ({exc})", path=path) from exc
            if not isinstance(result, list) or not all(isinstance(p, str) for p in result):
                raise InvalidConfigError("expected a JSON list of strings", path=path)
        else:
            result = [line for line in text.splitlines() if line.strip()]
    if not result or not all(p.strip() for p in result):
        raise InvalidConfigError("need at least one non-empty prompt", path=None if prompts is None else str(prompts))
    return result


class HFRunner:
    """A base model and its tokenizer, loaded once; adapters attached through PEFT one at a time.

    Args:
        base_dir: the base model directory.
        dtype: compute dtype (float32 by default, so that the comparison measures the adapter, not the math).
        progress: show transformers' loading progress bars.
        quantization: a ``BitsAndBytesConfig``: load the base quantised by bitsandbytes, as QLoRA trains on it.
    """

    def __init__(
        self, base_dir: str | Path, *, dtype: torch.dtype = torch.float32, progress: bool = True, quantization=None
    ):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.base_dir = str(base_dir)
        self.dtype = dtype
        self.progress = progress
        self.tokenizer = AutoTokenizer.from_pretrained(self.base_dir)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        with hf_progress(progress):
            kwargs = {} if quantization is None else {"quantization_config": quantization}
            self.model = AutoModelForCausalLM.from_pretrained(self.base_dir, dtype=dtype, **kwargs).eval()
        if quantization is not None:
            from adaconvert.base.quantization import exact_cpu_kernels

            exact_cpu_kernels(self.model)

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask), each (prompts, tokens), right padded."""
        self.tokenizer.padding_side = "right"
        batch = self.tokenizer(prompts, return_tensors="pt", padding=True)
        return batch["input_ids"], batch["attention_mask"]

    @contextlib.contextmanager
    def attached(self, adapter: str | Path | None) -> Iterator[torch.nn.Module]:
        """The base model with ``adapter`` attached through PEFT (the bare base for None), in eval mode; the adapter
        is detached again on exit (``unload``), so that one copy of the base weights serves every adapter.

        Raises:
            the PEFT errors of :data:`PEFT_LOAD_ERRORS` when the adapter does not load.
        """
        if adapter is None:
            yield self.model
            return
        from peft import PeftModel

        peft_model = PeftModel.from_pretrained(self.model, str(adapter)).eval()
        try:
            yield peft_model
        finally:
            self.model = peft_model.unload()

    @contextlib.contextmanager
    def merged(self, merged_dir: str | Path) -> Iterator[torch.nn.Module]:
        """A merged checkpoint, loaded in the compute dtype for the block and freed afterwards."""
        from transformers import AutoModelForCausalLM

        with hf_progress(self.progress):
            model = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=self.dtype).eval()
        try:
            yield model
        finally:
            del model

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, adapter: str | Path | None = None):
        """Logits (prompts, tokens, vocab), float32, of the base model with ``adapter`` attached (None: bare base).

        Raises:
            the PEFT errors of :data:`PEFT_LOAD_ERRORS` when the adapter does not load.
        """
        with self.attached(adapter) as model:
            return model(input_ids=input_ids, attention_mask=attention_mask).logits.float()

    @torch.no_grad()
    def merged_logits(self, merged_dir: str | Path, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """Logits of a merged checkpoint, loaded in the compute dtype and freed afterwards."""
        with self.merged(merged_dir) as model:
            return model(input_ids=input_ids, attention_mask=attention_mask).logits.float()


def logit_metrics(reference: torch.Tensor, other: torch.Tensor, mask: torch.Tensor) -> dict:
    """Compare two logit tensors (prompts, tokens, vocab) at the positions where ``mask`` is 1.

    Returns:
        ``max_abs`` max |Δlogit|; ``kl`` max over positions of KL(P_ref ‖ P_other) in nats; ``kl_mean``;
        ``top1`` fraction of positions with the same argmax; ``worst_prompt`` index of the prompt with the
        largest |Δlogit|.
    """
    keep = mask.bool()
    ref, oth = reference[keep].double(), other[keep].double()  # (positions, vocab)
    abs_diff = (ref - oth).abs().amax(dim=-1)
    log_p, log_q = torch.log_softmax(ref, dim=-1), torch.log_softmax(oth, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).clamp_min(0)
    prompt_of = torch.arange(mask.shape[0]).unsqueeze(1).expand_as(mask)[keep]
    return {
        "max_abs": float(abs_diff.max()),
        "kl": float(kl.max()),
        "kl_mean": float(kl.mean()),
        "top1": float((ref.argmax(-1) == oth.argmax(-1)).double().mean()),
        "worst_prompt": int(prompt_of[abs_diff.argmax()]),
    }


def add_logit_checks(
    report: ValidationReport, subject: str, metrics: dict, tol: Tolerances | None, prompts: list[str]
) -> None:
    """Three rows (max |Δlogit|, KL, top-1) for one comparison; information rows, held to no limit, when ``tol``
    is None."""
    worst = f"prompt {metrics['worst_prompt']}: {prompts[metrics['worst_prompt']][:30]!r}"
    rows = (
        ("max |Δlogit|", metrics["max_abs"], "logit_abs", False, worst),
        ("max KL(orig‖other)", metrics["kl"], "kl", False, ""),
        ("top-1 agreement", metrics["top1"], "top1", True, ""),
    )
    for metric, value, limit, higher, detail in rows:
        if tol is None:
            report.add(Check(LEVEL, subject, metric, value, higher_is_better=higher, detail=detail))
        else:
            report.add(Check.measure(LEVEL, subject, metric, value, getattr(tol, limit), higher_is_better=higher,
                                     detail=detail))  # fmt: skip
