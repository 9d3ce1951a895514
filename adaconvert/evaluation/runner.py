"""``evaluate``: the base, adapters and merged models on the same data, side by side."""

from __future__ import annotations

import importlib.util
import logging
import time
from collections.abc import Sequence
from pathlib import Path

from adaconvert.adapter import output_dtype
from adaconvert.base.model import BaseModel
from adaconvert.constants import GENERATION_CONFIG_NAME
from adaconvert.errors import InvalidConfigError
from adaconvert.evaluation.data import EvalData, load_eval_data
from adaconvert.evaluation.engines import ENGINES, HFEngine, SubjectOutput, VllmEngine, Workload
from adaconvert.evaluation.metrics import exact_match, rouge
from adaconvert.evaluation.report import EvalReport, EvalRow
from adaconvert.evaluation.subjects import Subject, resolve_subjects
from adaconvert.io.atomic import check_output
from adaconvert.io.location import require_source
from adaconvert.io.source import read_json
from adaconvert.training.data import load_texts, tokenize

logger = logging.getLogger(__name__)


def evaluate(
    base: str | Path,
    adapters: Sequence[str | Path] = (),
    *,
    data: str | Path,
    merged: Sequence[str | Path] = (),
    reference_data: str | Path | None = None,
    text_column: str = "text",
    prompt_column: str | None = None,
    reference_column: str | None = None,
    split_on: str | None = None,
    split: str = "train",
    data_config: str | None = None,
    limit: int | None = None,
    max_length: int = 512,
    max_new_tokens: int = 32,
    engine: str = "auto",
    llm=None,
    dtype: str = "float32",
    batch_size: int = 8,
    plot: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> EvalReport:
    """Evaluate the base model alone, each adapter on it and each merged model on the same data.

    Every subject gets: the held-out loss (mean NLL per predicted token, token-weighted over the non-padding
    tokens, on the texts tokenised as ``train`` tokenises them) and its perplexity; where the data has
    prompt/reference pairs, greedy generations scored by ROUGE-1/2/L (``rouge-score``) and exact match; with
    ``reference_data``, the loss there and the forgetting (that loss minus the base's).

    Args:
        base: the base model directory or Hub id the adapters were trained on.
        adapters: adapter directories: AdaLoRA, LoRA, LoRA-Drop (``adaconvert train`` outputs or any PEFT
            directory of those kinds), ``to-lora`` outputs.
        data: eval data, any source ``train`` reads (see :func:`~adaconvert.evaluation.data.load_eval_data` for
            ``text_column``, ``prompt_column``, ``reference_column``, ``split_on``, ``split``, ``data_config``,
            ``limit``).
        merged: merged model directories of this base (``adaconvert merge`` outputs).
        reference_data: general text the adapters were not trained on (its ``text_column``), for forgetting.
        max_length: texts are cut to this many tokens (as ``train --max-length``); prompts keep their last
            ``max_length`` tokens.
        max_new_tokens: greedy tokens per prompt at most (generation stops at EOS).
        engine: ``vllm`` (one engine, all adapters batched together), ``hf`` (transformers + PEFT, one subject at
            a time) or ``auto``: vLLM where it is installed.
        llm: with the vLLM engine, an engine already running on ``base`` with LoRA enabled (else one is started
            and stopped here).
        dtype: compute dtype, ``float32`` (default), ``bfloat16`` or ``float16``.
        batch_size: sequences per forward pass (hf, and merged models under vllm); vLLM batches by itself.
        plot: write the quality-vs-parameters PNG here (:meth:`EvalReport.plot`); checked before any work.
        overwrite: replace an existing ``plot``.
        progress: progress bars on stderr.

    Returns:
        The :class:`EvalReport` (``.table()``, ``.to_dict()``, ``.row(label)``); row ``base`` first.

    Raises:
        InvalidDataError: no usable row, a column missing, a marker no row contains, nothing 2 tokens long.
        InvalidConfigError: bad options; ``engine="vllm"`` without vLLM installed.
        BaseMismatchError: an adapter or a merged model made for another base.
        SourceNotFoundError: the base, an adapter, a merged model or the data is missing.
        OutputExistsError: ``plot`` exists and ``overwrite`` is false.

    Example:
        >>> report = evaluate("models/base", ["runs/ada", "runs/drop"], data="eval.jsonl", split_on="answer :")
        >>> report.row("ada").rougeL, report.row("drop").loss
        (0.41, 2.07)
    """
    for src in (base, *adapters, *merged):
        require_source(src)
    if plot is not None:  # before any model is loaded
        check_output(plot, overwrite=overwrite, inputs=[base, *adapters, *merged, data, reference_data])
    engine = _engine_name(engine)
    torch_dtype = output_dtype(dtype)
    if max_new_tokens < 1 or max_length < 2 or batch_size < 1:
        raise InvalidConfigError("--max-new-tokens and --batch-size must be at least 1, --max-length at least 2")
    eval_data = load_eval_data(
        data,
        text_column=text_column,
        prompt_column=prompt_column,
        reference_column=reference_column,
        split_on=split_on,
        split=split,
        data_config=data_config,
        limit=limit,
    )
    reference_texts = None
    if reference_data is not None:
        reference_texts = load_texts(reference_data, text_column=text_column, split=split, data_config=data_config)
    base_model = BaseModel.resolve(base, weights=True)
    subjects = resolve_subjects(base_model, list(adapters), list(merged))

    started = time.perf_counter()
    if engine == "vllm":
        runner = VllmEngine(base_model, llm=llm, dtype=dtype, batch_size=batch_size, progress=progress)
    else:
        runner = HFEngine(base_model.root, dtype=torch_dtype, batch_size=batch_size, progress=progress)
    work = _workload(runner.tokenizer, eval_data, reference_texts, data, reference_data, max_length, max_new_tokens)
    work.stop_ids = _stop_ids(base_model, runner.tokenizer)
    logger.info(
        "evaluating %d subject(s) on %d rows (%d prompts) with %s",
        len(subjects),
        len(work.examples),
        len(work.prompts),
        engine,
    )
    outputs = runner.run(subjects, work)
    seconds = time.perf_counter() - started

    base_out = outputs[subjects[0].label]
    rows = [_row(s, outputs[s.label], base_out, eval_data, runner.tokenizer) for s in subjects]
    report = EvalReport(
        base=str(base),
        engine=engine,
        dtype=dtype,
        data=str(data),
        reference_data=None if reference_data is None else str(reference_data),
        examples=len(work.examples),
        pairs=len(work.prompts),
        max_new_tokens=max_new_tokens,
        rows=rows,
        seconds=seconds,
        references=eval_data.references,
    )
    if plot is not None:
        report.plot(plot, overwrite=overwrite)
    return report


def _engine_name(engine: str) -> str:
    if engine not in ENGINES:
        raise InvalidConfigError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    installed = importlib.util.find_spec("vllm") is not None
    if engine == "vllm" and not installed:
        raise InvalidConfigError(
            "--engine vllm: vLLM is not installed (pip install 'adaconvert[vllm]'); or --engine hf"
        )
    return engine if engine != "auto" else "vllm" if installed else "hf"


def _workload(tokenizer, data: EvalData, reference_texts, where, reference_where, max_length, max_new_tokens):
    """Token ids of everything to run, tokenised once for both engines (``train``'s rule for the loss texts)."""
    examples = tokenize(data.texts, tokenizer, max_length=max_length, where=where).examples
    references = []
    if reference_texts is not None:
        references = tokenize(reference_texts, tokenizer, max_length=max_length, where=reference_where).examples
    prompts = [ids[-max_length:] for ids in tokenizer(data.prompts)["input_ids"]] if data.prompts else []
    if any(not p for p in prompts):
        raise InvalidConfigError("a prompt has no tokens", path=where)
    return Workload(examples, prompts, references, max_new_tokens)


def _stop_ids(base: BaseModel, tokenizer) -> frozenset[int]:
    """Where greedy generation ends: the tokenizer's EOS and the model's (its generation config's first, as both
    ``generate`` and vLLM read them)."""
    found = [tokenizer.eos_token_id, getattr(base.config, "eos_token_id", None)]
    generation_config = base.root / GENERATION_CONFIG_NAME
    if generation_config.is_file():
        found.append(read_json(generation_config).get("eos_token_id"))
    flat = [t for item in found for t in (item if isinstance(item, list) else [item])]
    return frozenset(t for t in flat if isinstance(t, int))


def _row(subject: Subject, out: SubjectOutput, base: SubjectOutput, data: EvalData, tokenizer) -> EvalRow:
    predictions = [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in out.generations]
    scores = rouge(predictions, data.references) if data.has_pairs else {}
    forgetting = None
    if out.reference is not None:
        forgetting = out.reference.loss - base.reference.loss
    return EvalRow(
        label=subject.label,
        kind=subject.kind,
        method=subject.method,
        source=None if subject.path is None else str(subject.path),
        converted_from=subject.converted_from,
        parameters=subject.parameters,
        trained_parameters=subject.trained_parameters,
        loss=out.loss.loss,
        perplexity=out.loss.perplexity,
        tokens=out.loss.tokens,
        rouge1=scores.get("rouge1"),
        rouge2=scores.get("rouge2"),
        rougeL=scores.get("rougeL"),
        exact_match=exact_match(predictions, data.references) if data.has_pairs else None,
        reference_loss=None if out.reference is None else out.reference.loss,
        forgetting=forgetting,
        predictions=predictions,
        engine=out.engine,
    )
