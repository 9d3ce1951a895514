"""The two ways ``eval`` runs the models: transformers + PEFT, one subject at a time, or one vLLM engine serving
every adapter at once (multi-LoRA, batched).

Both score the same token ids and decode greedily from the same prompt ids; they differ only in the order their
kernels sum in (docs/design.md §7), which the tests bound.

- **hf**: the base model is loaded once; each adapter is attached with PEFT, run, and detached (``unload``); a
  merged model is loaded on its own and freed. The loss is PEFT's forward pass on right-padded batches (padding
  masked out of the loss, as in training); generation is ``generate`` on left-padded batches.
- **vllm**: every adapter is loaded into one engine on the base; every request of every subject (loss, forgetting
  and generation) goes in one batched call. The loss comes from vLLM's prompt log-probabilities (log-softmax of
  the raw logits at every prompt position). vLLM loads only plain PEFT LoRA with scaling it reads the same way
  everywhere: any other adapter (AdaLoRA, LoRA with patterns or rsLoRA, LoRA-Drop) is converted with ``to_lora``
  into a temporary directory first (exact, docs/design.md §7). A merged model has other weights than the base and
  would need a second engine, which vLLM 0.32 cannot run in-process beside the first: merged models run through
  the hf engine, and their rows say so.
"""

from __future__ import annotations

import gc
import logging
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adaconvert.errors import InvalidConfigError, RankLimitError
from adaconvert.evaluation.metrics import LossTotals
from adaconvert.evaluation.subjects import ADAPTER, BASE, MERGED, Subject
from adaconvert.training.data import IGNORE_INDEX, CausalCollator

logger = logging.getLogger(__name__)

ENGINES = ("auto", "vllm", "hf")


@dataclass
class Workload:
    """What every subject is run on, as token ids (the base tokenizer's; identical for both engines).

    Attributes:
        examples: loss examples, each ≥ 2 tokens.
        prompts: generation prompts (may be empty).
        reference_examples: examples of the general reference text, for forgetting (may be empty).
        max_new_tokens: greedy tokens per prompt at most.
        stop_ids: generation ends at the first of these (the EOS ids); they are not part of the output.
    """

    examples: list[list[int]]
    prompts: list[list[int]] = field(default_factory=list)
    reference_examples: list[list[int]] = field(default_factory=list)
    max_new_tokens: int = 32
    stop_ids: frozenset[int] = frozenset()

    @property
    def context(self) -> int:
        """The longest sequence any request needs, in tokens."""
        longest_prompt = max(map(len, self.prompts), default=0) + self.max_new_tokens if self.prompts else 0
        return max(max(map(len, self.examples)), max(map(len, self.reference_examples), default=0), longest_prompt)

    def cut(self, generated: list[int]) -> list[int]:
        """The generated tokens before the first stop id."""
        stop = next((i for i, t in enumerate(generated) if t in self.stop_ids), len(generated))
        return list(generated[:stop])


@dataclass
class SubjectOutput:
    """What one subject produced: loss totals on the eval data and on the reference data, greedy generations."""

    loss: LossTotals
    reference: LossTotals | None = None
    generations: list[list[int]] = field(default_factory=list)
    engine: str | None = None  # set where a subject ran on another engine than the report's


# ------------------------------------------------------------------------------------------------------------- hf


class HFEngine:
    """transformers + PEFT. Subjects run one after another on one copy of the base model.

    Args:
        base_dir: the base model directory.
        dtype: compute dtype (float32 by default).
        batch_size: sequences per forward pass / ``generate`` call.
        progress: a progress bar on stderr, one step per batch.
    """

    name = "hf"

    def __init__(self, base_dir: str | Path, *, dtype: torch.dtype, batch_size: int, progress: bool):
        from adaconvert.validation.logits import HFRunner

        self.runner = HFRunner(base_dir, dtype=dtype, progress=progress)
        self.batch_size = batch_size
        self.progress = progress

    @property
    def tokenizer(self):
        return self.runner.tokenizer

    def run(self, subjects: list[Subject], work: Workload) -> dict[str, SubjectOutput]:
        from tqdm.auto import tqdm

        batches = -(-len(work.examples) // self.batch_size) + -(-len(work.reference_examples) // self.batch_size)
        batches += -(-len(work.prompts) // self.batch_size)
        bar = tqdm(total=batches * len(subjects), desc="eval (hf)", unit="batch", disable=not self.progress)
        outputs = {}
        with bar:
            for subject in subjects:
                bar.set_postfix_str(subject.label)
                with self._model(subject) as model:
                    outputs[subject.label] = SubjectOutput(
                        loss=self._loss(model, work.examples, bar.update),
                        reference=self._loss(model, work.reference_examples, bar.update)
                        if work.reference_examples
                        else None,
                        generations=self._generate(model, work, bar.update),
                    )
        return outputs

    def _model(self, subject: Subject):
        if subject.kind == MERGED:
            return self.runner.merged(subject.path)
        return self.runner.attached(subject.path if subject.kind == ADAPTER else None)

    @torch.no_grad()
    def _loss(self, model, examples: list[list[int]], step: Callable[[int], object]) -> LossTotals:
        """Token-weighted NLL: logits at position t predict token t + 1; padding is labelled -100 and skipped."""
        collate = CausalCollator(self.tokenizer.pad_token_id)
        order = sorted(range(len(examples)), key=lambda i: len(examples[i]))  # similar lengths: less padding
        totals = LossTotals()
        for start in range(0, len(order), self.batch_size):
            batch = collate([{"input_ids": examples[i]} for i in order[start : start + self.batch_size]])
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"][:, 1:]
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
            )
            totals.add(float(nll), int((labels != IGNORE_INDEX).sum()))
            step(1)
        return totals

    @torch.no_grad()
    def _generate(self, model, work: Workload, step: Callable[[int], object]) -> list[list[int]]:
        """Greedy decoding of every prompt; prompts left-padded in batches of similar length."""
        pad = self.tokenizer.pad_token_id
        order = sorted(range(len(work.prompts)), key=lambda i: len(work.prompts[i]))
        results: list[list[int]] = [[] for _ in work.prompts]
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            width = max(len(work.prompts[i]) for i in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, i in enumerate(chunk):
                prompt = work.prompts[i]
                ids[row, width - len(prompt) :] = torch.tensor(prompt)
                mask[row, width - len(prompt) :] = 1
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=False,
                num_beams=1,
                max_new_tokens=work.max_new_tokens,
                pad_token_id=pad,
                eos_token_id=sorted(work.stop_ids) or None,
            )
            for row, i in enumerate(chunk):
                results[i] = work.cut(out[row, width:].tolist())
            step(1)
        return results


# ----------------------------------------------------------------------------------------------------------- vllm


class VllmEngine:
    """One vLLM engine for the base and every adapter (multi-LoRA, one batched call), plus one plain engine per
    merged model.

    Args:
        base: the resolved base model.
        llm: an engine already running on the base with LoRA enabled (a session's shared engine); its
            ``max_model_len`` and ``max_lora_rank`` must fit the work. Default: one is started and stopped here.
        dtype: the engine's dtype when it is started here.
        progress: vLLM's progress bar on stderr.
    """

    name = "vllm"

    def __init__(
        self,
        base,
        *,
        llm=None,
        dtype: str = "float32",
        max_num_seqs: int = 32,
        batch_size: int = 8,
        progress: bool = True,
    ):
        from transformers import AutoTokenizer

        from adaconvert.adapter import output_dtype

        self.base = base
        self.llm = llm
        self.dtype = dtype
        self.torch_dtype = output_dtype(dtype)
        self.batch_size = batch_size
        self.max_num_seqs = max_num_seqs
        self.progress = progress
        self.tokenizer = AutoTokenizer.from_pretrained(str(base.root))
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def run(self, subjects: list[Subject], work: Workload) -> dict[str, SubjectOutput]:
        on_base = [s for s in subjects if s.kind in (BASE, ADAPTER)]
        outputs = {}
        with tempfile.TemporaryDirectory(prefix="adaconvert-eval-") as tmp:
            served = {s.label: _servable(s, Path(tmp)) for s in on_base if s.kind == ADAPTER}
            llm, own = self._engine(list(served.values()), work)
            try:
                outputs.update(self._run(llm, on_base, served, work))
            finally:
                del llm  # an engine started here is freed with the object (in-process engine core)
                if own:
                    gc.collect()
        merged = [s for s in subjects if s.kind == MERGED]
        if merged:
            # a merged model has its own weights, so it would need a second engine; vLLM 0.32 keeps its parallel
            # state per process, and freeing a second in-process engine tears it down under the first (measured:
            # "pipeline model parallel group is not initialized" on its next request): merged models run through
            # transformers
            hf = HFEngine(self.base.root, dtype=self.torch_dtype, batch_size=self.batch_size, progress=self.progress)
            outputs.update(hf.run(merged, work))
            for subject in merged:
                outputs[subject.label].engine = HFEngine.name
        return outputs

    def _engine(self, adapter_dirs: list[Path], work: Workload):
        """(engine, started here) for the base and ``adapter_dirs``; a given engine is checked to fit them."""
        from adaconvert.compat.vllm import bucket_for, require_vllm_compat
        from adaconvert.validation.vllm_level import engine_settings

        for directory in adapter_dirs:
            require_vllm_compat(directory, base_config=self.base, what="the adapter as served to vLLM")
        targets = lora_targets(adapter_dirs)
        if self.llm is None:
            return self._start(self.base.root, adapter_dirs, work, lora=bool(adapter_dirs)), True
        max_lora_rank, _ = engine_settings(self.llm)
        if adapter_dirs and max_lora_rank is None:
            raise InvalidConfigError("the vLLM engine given was started without enable_lora=True")
        need = bucket_for(adapter_dirs, minimum=1) if adapter_dirs else 0
        if adapter_dirs and need > max_lora_rank:
            raise RankLimitError(f"the adapters need max_lora_rank {need}; the engine given has {max_lora_rank}")
        lora_config = self.llm.llm_engine.vllm_config.lora_config
        served = getattr(lora_config, "target_modules", None)
        if adapter_dirs and (served is None or "lm_head" in served or not set(targets) <= set(served)):
            raise InvalidConfigError(
                f"the vLLM engine given must be started with lora_target_modules={targets} (it has {served}): "
                "vLLM's prompt log-probabilities fail with a LoRA on lm_head (start it with start_engine)"
            )
        if adapter_dirs and lora_config.max_loras < lora_slots(adapter_dirs):
            raise InvalidConfigError(
                f"the vLLM engine given has {lora_config.max_loras} LoRA slot(s) for {len(adapter_dirs)} adapters; "
                f"start it with max_loras={lora_slots(adapter_dirs)} or more"
            )
        limit = self.llm.llm_engine.vllm_config.model_config.max_model_len
        if work.context > limit:
            raise InvalidConfigError(
                f"the longest request needs {work.context} tokens; the engine given has max_model_len {limit}"
            )
        return self.llm, False

    def _start(self, model_dir, adapter_dirs, work: Workload, *, lora: bool):
        return start_engine(
            model_dir,
            adapter_dirs,
            dtype=self.dtype,
            max_model_len=work.context + 8,
            max_num_seqs=self.max_num_seqs,
            quiet=not self.progress,
            lora=lora,
        )

    def _run(self, llm, subjects: list[Subject], served: dict[str, Path], work: Workload):
        """Every request of every subject in one ``generate`` call; adapters removed from the engine after."""
        from vllm import SamplingParams

        from adaconvert.validation.vllm_level import lora_request

        requests = {s.label: lora_request(s.label, served[s.label]) if s.label in served else None for s in subjects}
        score = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0, detokenize=False)
        greedy = SamplingParams(max_tokens=work.max_new_tokens, temperature=0.0, detokenize=False)
        parts = (("loss", work.examples, score), ("reference", work.reference_examples, score))
        parts += (("generate", work.prompts, greedy),)
        inputs, params, loras, where = [], [], [], []
        for subject in subjects:
            for part, sequences, sampling in parts:
                for ids in sequences:
                    inputs.append({"prompt_token_ids": list(ids)})
                    params.append(sampling)
                    loras.append(requests[subject.label])
                    where.append((subject.label, part))
        try:
            results = llm.generate(inputs, params, lora_request=loras, use_tqdm=self.progress)
        finally:
            for request in requests.values():
                if request is not None:
                    llm.llm_engine.remove_lora(request.lora_int_id)
        outputs = {
            s.label: SubjectOutput(LossTotals(), LossTotals() if work.reference_examples else None) for s in subjects
        }
        for (label, part), result in zip(where, results, strict=True):
            out = outputs[label]
            if part == "generate":
                out.generations.append(work.cut(result.outputs[0].token_ids))
                continue
            ids = result.prompt_token_ids
            # position 0 has no log-probability (nothing precedes it); each later one: log p(token | tokens before)
            nll = -sum(step[token].logprob for step, token in zip(result.prompt_logprobs[1:], ids[1:], strict=True))
            (out.loss if part == "loss" else out.reference).add(nll, len(ids) - 1)
        return outputs


def _servable(subject: Subject, tmp: Path) -> Path:
    """The directory vLLM loads for an adapter: itself when vLLM reads its scaling as PEFT does, else its
    ``to_lora`` conversion in ``tmp``."""
    from adaconvert.compat.layout import is_safe_layout
    from adaconvert.conversion.peft_lora import to_lora

    if is_safe_layout(subject.path):
        return subject.path
    out = tmp / re.sub(r"[^\w.-]", "_", subject.label)
    logger.info("%s (%s): converting with to-lora for vLLM into %s", subject.label, subject.method, out)
    to_lora(subject.path, out)
    return out


def lora_targets(adapter_dirs) -> list[str]:
    """The module kinds (name suffixes: ``q_proj``, ``down_proj``...) the adapters adapt, sorted.

    Raises:
        InvalidConfigError: an adapter adapts ``lm_head``: vLLM's prompt log-probabilities leave its delta out
            (vLLM issue 51594), so the loss would be wrong.
    """
    from adaconvert.compat.vllm import parse_lora_key, tensor_shapes

    found = {
        parsed[0].rsplit(".", 1)[-1] for d in adapter_dirs for k in tensor_shapes(d) if (parsed := parse_lora_key(k))
    }
    if "lm_head" in found:
        raise InvalidConfigError(
            "an adapter adapts lm_head: vLLM's prompt log-probabilities leave that delta out; use --engine hf"
        )
    return sorted(found)


def lora_slots(adapter_dirs) -> int:
    """LoRA slots an engine needs to score the base and every adapter in one batch: one per adapter, at least 2.

    Measured with vLLM 0.32 on CPU: with a single slot, or fewer slots than adapters, requests without an adapter
    that share a batch with adapter requests were computed with an adapter applied (the base row came out equal to
    an adapter's, silently).
    """
    return max(2, len(adapter_dirs))


def start_engine(
    model_dir: str | Path,
    adapter_dirs: list[Path],
    *,
    max_model_len: int,
    dtype: str = "float32",
    max_num_seqs: int = 32,
    quiet: bool = False,
    lora: bool = True,
    max_loras: int | None = None,
):
    """A vLLM engine for ``eval`` (:func:`~adaconvert.validation.vllm_level.make_engine`), LoRA restricted to the
    module kinds the adapters adapt (``lora_target_modules``).

    Why restricted: with LoRA on, vLLM also wraps the output head (lm_head) for LoRA, and its prompt
    log-probabilities then fail on a batch of several requests (vLLM 0.32: the head's LoRA indices are per request,
    the prompt positions per token; vLLM issue 29955). Adapters that adapt no lm_head lose nothing by it.

    Args:
        model_dir: the base (``lora``) or a merged model (``lora=False``: a plain engine).
        adapter_dirs: the adapters to serve, in vLLM's format (they size ``max_lora_rank`` and the targets).
        max_loras: LoRA slots; default :func:`lora_slots`.
    """
    from adaconvert.validation.vllm_level import make_engine

    options = {"max_model_len": max_model_len, "dtype": dtype, "max_num_seqs": max_num_seqs, "quiet": quiet}
    if not lora:
        return make_engine(str(model_dir), [], enable_lora=False, **options)
    options["max_loras"] = max_loras if max_loras is not None else lora_slots(adapter_dirs)
    return make_engine(str(model_dir), adapter_dirs, lora_target_modules=lora_targets(adapter_dirs) or None, **options)
