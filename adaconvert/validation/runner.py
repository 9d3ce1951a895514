"""``validate``: prove that converted (and merged) adapters compute what the original does, at three levels."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from adaconvert.adapter import Adapter
from adaconvert.base.model import BaseModel
from adaconvert.base.quantization import bnb_config, check_bitsandbytes
from adaconvert.compat.runtimes import check_runtimes, runtimes_dict
from adaconvert.constants import MERGE_REPORT_NAME
from adaconvert.errors import AdaconvertError, InvalidConfigError, ValidationError, first_line
from adaconvert.io.atomic import check_output
from adaconvert.io.checkpoint import Checkpoint, open_checkpoint
from adaconvert.io.location import require_source
from adaconvert.io.source import read_json
from adaconvert.readers import read_adapter
from adaconvert.serving.cpu_memory import check_kv_cache_gib
from adaconvert.validation import logits as logits_level
from adaconvert.validation import weights as weights_level
from adaconvert.validation.checks import Check, Tolerances, ValidationReport
from adaconvert.validation.vllm_level import VllmPair, engine_settings, make_engine, run_vllm_level

logger = logging.getLogger(__name__)


def validate(
    base: str | Path,
    original: str | Path | None = None,
    converted: str | Path | None = None,
    *,
    pairs: Sequence[tuple[str | Path, str | Path]] | None = None,
    merged: str | Path | Sequence[str | Path] | None = None,
    quantize: str | None = None,
    double_quant: bool = True,
    vllm: bool = False,
    llm=None,
    kv_cache_gib: float | None = None,
    prompts: Sequence[str] | str | Path | None = None,
    tolerances: dict[str, float] | None = None,
    max_new_tokens: int = 8,
    report: str | Path | None = None,
    overwrite: bool = False,
    raise_on_failure: bool = True,
    progress: bool = True,
) -> ValidationReport:
    """Compare original adapters with their conversions (and a merged model) at the weights, logits and vLLM levels.

    Weights: per-module ‖ΔW_orig − ΔW_conv‖/‖ΔW_orig‖ from the factors, modules present on one side only, and
    modules that match nothing in the base model (vLLM would silently ignore them); for ``merged``,
    W_merged − W_base against ΔW_orig, tensor by tensor. Logits: PEFT(original) against PEFT(converted) and the
    merged model on ``prompts``: max |Δlogit|, max KL, top-1 agreement. ``report.runtimes`` holds the portability
    check of each conversion (which runtimes compute it exactly). vLLM (``vllm=True``): the static check and
    vLLM's own loader, then greedy decoding of every converted adapter in one batch against PEFT(original): token
    agreement and max |Δlogprob|. Every problem is collected; the validation fails once, at the end.

    Args:
        base: base model directory (the one the adapters were trained on).
        original: the adapter as trained (AdaLoRA, LoRA, LoRA-Drop output: anything PEFT loads).
        converted: its conversion (``adaconvert to-lora`` output). May be None when only ``merged`` is checked.
        pairs: several (original, converted) pairs instead of ``original`` / ``converted``.
        merged: a merged checkpoint directory built from the (single) original, or several (a plain and a
            QLoRA-faithful merge); each is checked as subject ``merged`` (several: ``merged:<directory name>``).
        quantize: ``nf4``, ``fp4`` or ``int8``: the original was trained on the base quantised so (QLoRA). The
            reference, PEFT(original), and the conversions then run on that quantised base. A merged checkpoint is
            held to the tolerances when it was merged for the base the reference runs on (``merge --requantize``
            with the same settings; a plain merge without ``quantize``); any other is measured and reported,
            with a note, but cannot fail. Not with ``vllm``: vLLM serves the adapter on the 16-bit base.
        double_quant: with a 4-bit ``quantize``, as training used it.
        vllm: run the vLLM level.
        llm: an existing ``vllm.LLM`` with LoRA enabled to use for the vLLM level (else one is started and
            stopped here); its ``max_lora_rank`` must fit the adapters.
        kv_cache_gib: the KV cache of the engine started here, in GiB (default: sized by
            :func:`~adaconvert.validation.vllm_level.make_engine`).
        prompts: a list of prompts or a file (JSON list, or one prompt per line); default: built-in prompts.
        tolerances: overrides of :class:`Tolerances` fields (``{"logit_abs": 1e-2}``); the defaults depend on the
            dtypes (the converted adapter's and the merged model's; float32 tight, bfloat16 loosest).
        max_new_tokens: greedy tokens per prompt at the vLLM level.
        report: write the report as JSON here (atomically; an existing file only with ``overwrite``).
        overwrite: replace an existing ``report``.
        raise_on_failure: raise :class:`ValidationError` when any check fails (else just return the report).
        progress: show model-loading progress bars (stderr).

    Returns:
        The :class:`ValidationReport` (``report.table()`` prints it).

    Raises:
        ValidationError: some check failed (with ``raise_on_failure``); ``fields['problems']`` lists them all and
            ``fields['report']`` holds the report.
        InvalidConfigError, SourceNotFoundError: bad arguments, or a base model that cannot be read.
        plus the readers' errors for an adapter they refuse (the same error and message as ``to_lora``), before
            any model is loaded.
        ServeError: the vLLM engine could not start (vLLM's one-line reason).

    Example:
        >>> r = validate("models/base", "runs/adalora", "runs/adalora-lora", vllm=True)
        >>> r.passed
        True
    """
    merged_dirs = [] if merged is None else [merged] if isinstance(merged, (str, Path)) else list(merged)
    pair_list = _pair_list(original, converted, pairs, merged=merged_dirs)
    inputs = [base, *(p for pair in pair_list for p in pair if p is not None), *merged_dirs]
    for src in inputs:  # a missing local path is "not found" now, not a failed check after loading the base
        if src is not None:
            require_source(src)
    if report is not None:  # before any model is loaded
        prompts_file = prompts if isinstance(prompts, str | Path) else None
        check_output(report, overwrite=overwrite, inputs=[*inputs, prompts_file])
    if max_new_tokens < 1:
        raise InvalidConfigError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    prompt_list = logits_level.read_prompts(prompts)
    Tolerances.for_dtypes(overrides=tolerances)  # reject bad overrides before any work
    check_kv_cache_gib(kv_cache_gib)
    quantization = None
    if quantize is not None and vllm:
        # vLLM applies the converted adapter to the 16-bit base: PEFT(original) on the quantised base is another
        # function, and the comparison would fail however exact the conversion is
        raise InvalidConfigError(
            "--vllm with --quantize: vLLM serves the adapter on the 16-bit base, not on the quantised base the "
            "reference runs on; run the vLLM level without --quantize (it checks that 16-bit serving path)"
        )
    if quantize is not None:
        check_bitsandbytes(quantize)
        quantization = bnb_config(quantize, double_quant=double_quant)
    merges = _merged_subjects(merged_dirs, quantize, double_quant)
    # every adapter through the readers `to-lora` uses, before any model is loaded: one that they refuse (a bad
    # config, a malformed pattern, NaN...) stops here with their one-line error, never reaching PEFT
    read = {src: read_adapter(src) for pair in pair_list for src in pair if src is not None}
    base_model = BaseModel.resolve(base, weights=True)  # once: config, modules, checkpoint and weights
    modules = base_model.modules
    labels = _labels(pair_list)
    result = ValidationReport(
        base=str(base),
        pairs=[
            {"label": lb, "original": str(o), "converted": _str(c)}
            for lb, (o, c) in zip(labels, pair_list, strict=True)
        ],
        merged=_str(merged_dirs[0]) if len(merged_dirs) == 1 else [str(m) for m in merged_dirs] or None,
    )

    result.levels.append("weights")
    adapters: dict[str, tuple[Adapter, Adapter | None]] = {}
    tols: dict[str, Tolerances] = {}
    for label, (orig_dir, conv_dir) in zip(labels, pair_list, strict=True):
        orig, conv = read[orig_dir], read.get(conv_dir)
        tols[label] = Tolerances.for_dtypes(_dtype(conv), overrides=tolerances)
        result.tolerances[label] = tols[label].to_dict()
        reported: set[str] = set()
        for adapter, role in ((orig, "original"), (conv, "conversion")):
            if adapter is not None:
                reported |= weights_level.check_against_base(adapter, modules, result, subject=label, role=role)
        if conv is not None:
            result.modules[label] = weights_level.compare_adapters(
                orig, conv, result, subject=label, tol=tols[label], reported=reported
            )
        adapters[label] = (orig, conv)
        if conv is not None:
            try:
                result.runtimes[label] = runtimes_dict(check_runtimes(conv_dir))
            except AdaconvertError as exc:  # information only: a conversion we can read but not classify
                result.notes.append(f"{label}: no portability check ({first_line(exc)})")
    merged_tols: dict[str, Tolerances | None] = {}
    for subject, (directory, requant, held) in merges.items():
        merged_ckpt = open_checkpoint(directory)
        tol = Tolerances.for_dtypes(_checkpoint_dtype(merged_ckpt), overrides=tolerances)
        result.tolerances[subject] = tol.to_dict()
        merged_tols[subject] = tol if held else None
        method, dq = requant or (None, None)
        weights_level.compare_merged(
            adapters[labels[0]][0],
            base_model,
            merged_ckpt,
            result,
            tol=tol,
            subject=subject,
            requantize=method,
            double_quant=bool(dq),
        )

    # logits: one base model, adapters attached one at a time
    result.levels.append("logits")
    runner = logits_level.HFRunner(base_model.root, progress=progress, quantization=quantization)
    ids, mask = runner.encode(prompt_list)
    base_logits = runner.logits(ids, mask)
    for label, (orig_dir, conv_dir) in zip(labels, pair_list, strict=True):
        reference = _peft_logits(runner, ids, mask, orig_dir, result, label, role="original")
        if reference is None:
            continue
        effect = logits_level.logit_metrics(reference, base_logits, mask)["max_abs"]
        result.checks.append(Check("logits", label, "adapter effect: max |Δlogit| vs base", effect))
        if effect <= tols[label].logit_abs:
            result.notes.append(
                f"{label}: the original adapter changes the logits by at most {effect:.2g}, within the logit "
                "tolerance: the logits level cannot tell it from no adapter at all"
            )
        if conv_dir is not None:
            other = _peft_logits(runner, ids, mask, conv_dir, result, label, role="conversion")
            if other is not None:
                metrics = logits_level.logit_metrics(reference, other, mask)
                logits_level.add_logit_checks(result, label, metrics, tols[label], prompt_list)
        for subject, (directory, requant, held) in merges.items() if label == labels[0] else ():
            metrics = logits_level.logit_metrics(reference, runner.merged_logits(directory, ids, mask), mask)
            logits_level.add_logit_checks(result, subject, metrics, merged_tols[subject], prompt_list)
            if not held:
                result.notes.append(_unheld_note(subject, requant, quantize, metrics["max_abs"]))

    if vllm:
        result.levels.append("vllm")
        # the engine's context: the longest prompt (vLLM adds no special tokens HF would not) plus the new tokens
        context = int(ids.shape[1]) + max_new_tokens + 8
        engine_options = {"max_model_len": context, "quiet": not progress, "kv_cache_gib": kv_cache_gib}
        _run_vllm(base_model, llm, runner, pair_list, labels, tols, tolerances, result, prompt_list, max_new_tokens,
                  engine_options)  # fmt: skip

    if report is not None:
        result.write_json(report, overwrite=overwrite)
    logger.info(
        "validation %s: %d checks, %d problems",
        "passed" if result.passed else "failed",
        len(result.checks),
        len(result.problems),
    )
    if raise_on_failure and not result.passed:
        raise failure(result)
    return result


def failure(report: ValidationReport) -> ValidationError:
    """The one error for a failed validation: the levels that failed and the first problem, in one line."""
    first = report.problems[0]
    more = f" (+{len(report.problems) - 1} more)" if len(report.problems) > 1 else ""
    return ValidationError(
        f"validation failed at level(s) {', '.join(report.failed_levels)}: {first}{more}",
        problems=[str(p) for p in report.problems],
        report=report,
    )


def _run_vllm(base, llm, runner, pair_list, labels, tols, overrides, result, prompts, max_new_tokens, engine_options):
    runnable = [(lb, o, c) for lb, (o, c) in zip(labels, pair_list, strict=True) if c is not None]
    if not runnable:
        return
    own_engine = llm is None
    if own_engine:
        llm = make_engine(str(base.root), [c for _, _, c in runnable], **engine_options)
    _, engine_dtype = engine_settings(llm)
    pairs = [VllmPair(lb, str(o), str(c), _loosest(tols[lb], engine_dtype, overrides)) for lb, o, c in runnable]
    try:
        run_vllm_level(llm, runner, pairs, result, prompts=prompts, base=base, max_new_tokens=max_new_tokens)
    finally:
        if own_engine:
            del llm


def _loosest(tol: Tolerances, engine_dtype: str, overrides) -> Tolerances:
    """The pair's tolerances, loosened to the engine's dtype when that is looser; overrides win."""
    engine = Tolerances.for_dtypes(engine_dtype)
    merged = {
        name: (min(a, b) if name in ("top1", "greedy") else max(a, b))
        for (name, a), b in zip(tol.to_dict().items(), engine.to_dict().values(), strict=True)
    }
    return Tolerances(**{**merged, **{k: float(v) for k, v in (overrides or {}).items()}})


def _merged_subjects(merged_dirs, quantize, double_quant) -> dict[str, tuple[Path, tuple[str, bool] | None, bool]]:
    """{subject: (directory, (method, double_quant) it was requantised with or None, held to the tolerances)}.

    A merge is held to the tolerances when it targets the base the reference runs on: requantised with the same
    settings as ``quantize``, or plain when ``quantize`` is None. Its ``merge_report.json`` says which it is.
    """
    found = {}
    for directory in map(Path, merged_dirs):
        report_file = directory / MERGE_REPORT_NAME
        info = read_json(report_file) if report_file.is_file() else {}
        done = info.get("requantized")
        requant = _requant_key(done["method"], done["double_quant"]) if done else None
        held = requant == (_requant_key(quantize, double_quant) if quantize is not None else None)
        subject = "merged" if len(merged_dirs) == 1 else f"merged:{directory.name}"
        if subject in found:  # two directories of the same name
            subject = f"{subject}#{len(found) + 1}"
        found[subject] = (directory, requant, held)
    return found


def _requant_key(method: str, double_quant) -> tuple[str, bool | None]:
    """(method, double_quant), the flag dropped for int8, which has no double quantisation."""
    return method, None if method == "int8" else bool(double_quant)


def _unheld_note(subject: str, requant, quantize, max_abs: float) -> str:
    """Why a merged checkpoint's logit rows are information, not checks."""
    merge = f"requantised {requant[0]}" if requant else "plain (W + ΔW)"
    base = f"the {quantize} base" if quantize else "the unquantised base"
    return (
        f"{subject}: a {merge} merge, compared with PEFT on {base}: max |Δlogit| {max_abs:.3g} is what merging this "
        "way costs (reported, not held to a tolerance)"
    )


def _pair_list(original, converted, pairs, *, merged) -> list[tuple[Path, Path | None]]:
    result = []
    if original is not None:
        result.append((Path(original), Path(converted) if converted is not None else None))
    elif converted is not None:
        raise InvalidConfigError("CONVERTED given without ORIGINAL")
    for item in pairs or ():
        if len(item) != 2:
            raise InvalidConfigError(f"a pair is (original, converted), got {item!r}")
        result.append((Path(item[0]), Path(item[1])))
    if not result:
        raise InvalidConfigError("nothing to validate: give ORIGINAL and CONVERTED, or pairs")
    if merged and len(result) != 1:
        raise InvalidConfigError("--merged needs exactly one original adapter to compare with")
    if any(c is None for _, c in result) and not merged:
        raise InvalidConfigError("CONVERTED is missing (it may only be left out when --merged is checked)")
    return result


def _labels(pair_list) -> list[str]:
    labels = []
    for original, converted in pair_list:
        name = (converted or original).name or str(converted or original)
        labels.append(name if name not in labels else f"{name}#{len(labels) + 1}")
    return labels


def _peft_logits(runner, ids, mask, adapter_dir, report, label, *, role) -> torch.Tensor | None:
    try:
        return runner.logits(ids, mask, adapter=adapter_dir)
    except logits_level.PEFT_LOAD_ERRORS as exc:
        report.fail("logits", label, f"PEFT cannot load the {role}: {first_line(exc, 300)}")
        return None


def _dtype(adapter: Adapter | None) -> str | None:
    return adapter.provenance.get("dtype") if adapter is not None else None


def _checkpoint_dtype(checkpoint: Checkpoint) -> str:
    """The dtype of a checkpoint's first tensor in storage order whose dtype has tolerances (float32 if none)."""
    names = (str(t.dtype).removeprefix("torch.") for t in checkpoint.tensors.values())
    return next((name for name in names if name in _TOLERANCE_DTYPES), "float32")


_TOLERANCE_DTYPES = ("float32", "float16", "bfloat16", "float64")


def _str(path) -> str | None:
    return None if path is None else str(path)
