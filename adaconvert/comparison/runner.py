"""``compare``: train LoRA, AdaLoRA and LoRA-Drop on one budget (plan.py), convert, validate and evaluate all of
them, and write the comparison (report.py).

Layout of the output directory, filled as the work goes so that an interruption loses only the method in progress:

    OUTPUT/compare_plan.json          the checked options (a --resume must give the same)
    OUTPUT/<method>/<method>/         the trained adapter (``train``; atomic)
    OUTPUT/<method>/<method>-lora/    its ``to-lora`` conversion (atomic)
    OUTPUT/<method>/method.json       what the run measured; written last: its presence marks the method finished
    OUTPUT/validation_report.json, compare.json, compare.md, eval_loss.png, quality_vs_params.png

Each method trains in this process, one after another; peak memory is measured per method (CUDA's
``max_memory_allocated`` on a GPU, the peak RSS reset before each run on CPU: :func:`MemoryProbe`).
"""

from __future__ import annotations

import gc
import importlib.util
import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

from adaconvert.comparison.demo import DEMO_DIR, DEMO_OPTIONS, DEMO_SPLIT_ON, build_demo_inputs, demo_inputs
from adaconvert.comparison.plan import ComparePlan, load_plan
from adaconvert.comparison.report import CompareReport
from adaconvert.constants import VALIDATION_REPORT_NAME
from adaconvert.errors import InvalidConfigError, OutputExistsError, first_line
from adaconvert.io.atomic import atomic_output_file, check_no_overlap
from adaconvert.process import peak_rss_bytes, reset_peak_rss
from adaconvert.training.sharding import world_size

logger = logging.getLogger(__name__)

DEFAULT_DEMO_DIR = "adaconvert-compare"
PLAN_NAME = "compare_plan.json"
METHOD_RECORD_NAME = "method.json"


def compare(
    *,
    config: str | Path | None = None,
    output: str | Path | None = None,
    methods=None,
    reference_data: str | Path | None = None,
    split_on: str | None = None,
    engine: str | None = None,
    max_new_tokens: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    demo: bool = False,
    echo: Callable[[str], None] | None = None,
    **train,
) -> CompareReport:
    """Train each method on the same data, steps, seed and precision at the same final budget, convert each to a
    plain LoRA, validate the conversions, evaluate them side by side, and write the comparison into ``output``.

    Args:
        config: a compare recipe (YAML; see :func:`~adaconvert.comparison.plan.load_plan`).
        output: the comparison's directory.
        methods: a subset of ``lora``, ``adalora``, ``lora-drop`` (list or comma-separated), default all three.
        reference_data: general text the adapters were not trained on: forgetting is measured on it.
        split_on: a marker (``"answer :"``) splitting eval rows into prompt and reference for ROUGE-L.
        engine: ``auto`` (vLLM where installed), ``vllm`` or ``hf`` for validation and evaluation.
        max_new_tokens: greedy tokens per prompt for ROUGE-L.
        resume: continue an interrupted comparison in ``output`` (finished methods are kept, the rest re-run).
        overwrite: replace an existing ``output``.
        demo: compare on the embedded demo data with a tiny base pretrained first (:mod:`.demo`), all built in
            ``output`` (default ``adaconvert-compare``); explicit options override the demo's.
        echo: called with each line of progress (``click.echo``); None is silent.
        **train: :class:`~adaconvert.training.config.TrainOptions` fields shared by every run (``model``,
            ``data``, ``eval_data`` are required; ``r`` sets the budget; ``quiet`` turns progress bars off).

    Returns:
        The :class:`CompareReport`, also written as ``compare.json`` and ``compare.md``; ``report.failures``
        names the methods that failed (the others' results are complete).

    Raises:
        InvalidConfigError: bad options, an unknown method, a --resume whose options differ from the first run's, a
            distributed launch.
        OutputExistsError: ``output`` exists without ``overwrite`` or ``resume``.
        OutputOverlapError: ``output`` overlaps an input.
    """
    say = echo or (lambda _line: None)
    quiet = bool(train.pop("quiet", False))
    if world_size() > 1:  # every process would run the whole comparison, and race for its output directory
        raise InvalidConfigError(
            f"compare runs in one process, not under torchrun / accelerate launch ({world_size()} processes here): "
            "launch it alone, or train each method there (adaconvert train METHOD) and compare the adapters with "
            "adaconvert eval"
        )
    if demo:
        output = output or DEFAULT_DEMO_DIR
        train = {**DEMO_OPTIONS, **demo_inputs(output), **{k: v for k, v in train.items() if v is not None}}
        split_on = split_on or DEMO_SPLIT_ON
        reference_data = reference_data or train.pop("reference_data")
    plan = load_plan(
        config=config,
        output=output,
        methods=methods,
        reference_data=reference_data,
        split_on=split_on,
        engine=engine,
        max_new_tokens=max_new_tokens,
        **train,
    )
    if plan.train.get("eval_steps") is None and plan.train.get("steps"):
        plan.train["eval_steps"] = max(1, plan.train["steps"] // 20)  # ~20 points per curve: enough for the jitter
    root = _prepare(plan, resume=resume, overwrite=overwrite, own_inputs=demo)
    started = time.perf_counter()
    if demo:
        say(f"building the demo's inputs in {root / DEMO_DIR}: data splits, a tiny base pretrained on general text")
        build_demo_inputs(root)
    inputs_s = time.perf_counter() - started
    say(f"comparing {', '.join(plan.methods)} on {plan.train['model']}; budget: {plan.budget_rule()}")
    records = {}
    for i, method in enumerate(plan.methods, start=1):
        records[method] = _method(plan, root, method, quiet=quiet, say=say, step=f"[{i}/{len(plan.methods) + 1}]")
    say(f"[{len(plan.methods) + 1}/{len(plan.methods) + 1}] validating and evaluating the converted adapters")
    quality = _quality(plan, root, records, progress=not quiet)
    report = CompareReport.build(plan, records, quality, seconds=time.perf_counter() - started, inputs_s=inputs_s)
    report.write(root)
    return report


def _prepare(plan: ComparePlan, *, resume: bool, overwrite: bool, own_inputs: bool) -> Path:
    """The output directory, created (or kept for ``resume``), with the plan recorded. ``own_inputs``: the inputs
    are made inside it (``--demo``), so they may lie there."""
    root = Path(plan.output)
    inputs = [plan.train.get("model"), plan.train.get("data"), plan.train.get("eval_data"), plan.reference_data]
    check_no_overlap(root, [] if own_inputs else inputs)
    if resume and (root / PLAN_NAME).is_file():
        before = _flat(json.loads((root / PLAN_NAME).read_text(encoding="utf-8")))
        now = _flat(json.loads(json.dumps(plan.to_dict(), default=str)))
        changed = sorted(k for k in {**before, **now} if before.get(k) != now.get(k))
        if changed:
            raise InvalidConfigError(
                f"--resume with other options than the first run ({', '.join(changed)}); give the same options, or "
                "--overwrite to start again",
                path=root,
            )
        return root
    if root.exists() or root.is_symlink():
        if resume:
            raise OutputExistsError(
                "is not an interrupted comparison (no compare_plan.json); cannot --resume", path=root
            )
        if not overwrite:
            raise OutputExistsError(
                "output already exists; pass --overwrite to replace it, or --resume to continue it", path=root
            )
        where = root.resolve()
        if where in (Path.home().resolve(), Path(where.anchor)) or where in (
            Path.cwd().resolve(),
            *Path.cwd().parents,
        ):
            # --overwrite replaces the whole directory: never the home directory, a root or one holding the cwd
            raise OutputExistsError("is the home directory, a root, or holds the working directory", path=root)
        shutil.rmtree(root) if root.is_dir() and not root.is_symlink() else root.unlink()
    root.mkdir(parents=True)
    _write_json(root / PLAN_NAME, plan.to_dict())
    return root


def _flat(plan: dict) -> dict:
    """A plan's options in one mapping (the shared training options by their own names)."""
    return {**{k: v for k, v in plan.items() if k != "train"}, **plan["train"]}


def _method(plan: ComparePlan, root: Path, method: str, *, quiet: bool, say, step: str) -> dict:
    """Train and convert ``method`` (or read its record when a previous run finished it); a failure becomes the
    record ``{"status": "failed", "error": ...}``: the other methods go on."""
    where = root / method
    if (where / METHOD_RECORD_NAME).is_file():
        say(f"{step} {method}: finished by an earlier run, kept")
        return json.loads((where / METHOD_RECORD_NAME).read_text(encoding="utf-8"))
    if where.exists():  # interrupted while this method ran: start it again
        shutil.rmtree(where)
    where.mkdir()
    say(f"{step} {method}: training ({_steps(plan)}), then converting to plain LoRA")
    try:
        record = _train_and_convert(plan, where, method, quiet=quiet)
    except KeyboardInterrupt:
        say(f"interrupted: finished methods are kept in {root}; the same command with --resume continues")
        raise
    except Exception as exc:  # one method's failure must not lose the others' results
        logger.debug("%s failed", method, exc_info=True)
        say(f"      {method} FAILED: {first_line(exc)}")
        return {"method": method, "status": "failed", "error": first_line(exc)}
    _write_json(where / METHOD_RECORD_NAME, record)
    say(
        f"      {method}: {record['train_wall_s']:.1f} s, eval loss {record['final_eval_loss']:.4f}, "
        f"{record['params']['final']:,} adapter parameters, vLLM bucket {record['rank_bucket']}"
    )
    return record


def _steps(plan: ComparePlan) -> str:
    steps = plan.train.get("steps")
    return f"{steps} optimizer steps" if steps else f"{plan.train.get('epochs') or 1} epoch(s)"


def _train_and_convert(plan: ComparePlan, where: Path, method: str, *, quiet: bool) -> dict:
    from adaconvert.conversion.peft_lora import to_lora
    from adaconvert.training import train

    probe = MemoryProbe()
    started = time.perf_counter()
    result = train(method, output=str(where / method), quiet=quiet, **plan.run_options(method))
    train_wall = time.perf_counter() - started
    peak, memory_kind = probe.peak()
    peft_trainable, _ = result.model.get_nb_trainable_parameters()  # PEFT's own count of what was trained
    started = time.perf_counter()
    conversion = to_lora(where / method, where / f"{method}-lora")
    convert_s = time.perf_counter() - started
    main, pilot = result.main, result.pilot
    record = {
        "method": method,
        "status": "ok",
        "adapter": str(where / method),
        "converted": str(where / f"{method}-lora"),
        "params": {
            "pilot": pilot.trainable_params if pilot is not None else None,
            "main": main.trainable_params,
            "peft_trainable": peft_trainable,
            "final": conversion.params_after,
        },
        "optimizer_steps": main.optimizer_steps,
        "median_step_s": main.median_step_s,
        "tokens_per_s": main.tokens_per_s,
        "peak_memory_bytes": peak,
        "memory_kind": memory_kind,
        "train_wall_s": train_wall,
        "phases_wall_s": main.wall_s + (pilot.wall_s if pilot is not None else 0.0),
        "pilot_wall_s": pilot.wall_s if pilot is not None else None,
        "eval_s": main.eval_s,
        "train_loss": main.train_loss,
        "eval": result.eval,
        "final_eval_loss": result.eval["final_loss"] if result.eval else float("nan"),
        "convert_s": convert_s,
        "rank_bucket": conversion.vllm_max_lora_rank,
        "max_rank": conversion.max_rank,
        "kept_layers": result.lora_drop["kept"] if result.lora_drop else None,
        "total_rank": sum(result.ranks.values()) if result.ranks else None,
    }
    del result
    gc.collect()
    return record


class MemoryProbe:
    """Peak memory of what runs between its creation and :meth:`peak`: CUDA's ``max_memory_allocated`` on a GPU,
    else the peak RSS (reset at creation where Linux allows it)."""

    def __init__(self):
        self.cuda = torch.cuda.is_available()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self.kind = "CUDA max_memory_allocated"
        else:
            self.kind = "peak RSS" if reset_peak_rss() else "peak RSS (whole process so far)"

    def peak(self) -> tuple[int | None, str]:
        return (torch.cuda.max_memory_allocated() if self.cuda else peak_rss_bytes()), self.kind


def _quality(plan: ComparePlan, root: Path, records: dict, *, progress: bool) -> dict:
    """Validation of every conversion against its original, then one evaluation of all of them (the base as the
    reference row), on one vLLM engine where it is used. A failure here is recorded; the training results stay."""
    done = [m for m, r in records.items() if r["status"] == "ok"]
    if not done:
        return {"error": "no method finished"}
    base = plan.train["model"]
    pairs = [(root / m / m, root / m / f"{m}-lora") for m in done]
    use_vllm = plan.engine == "vllm" or (plan.engine == "auto" and importlib.util.find_spec("vllm") is not None)
    quality: dict = {"engine": "vllm" if use_vllm else "hf"}
    clock = time.perf_counter
    try:
        started = clock()
        llm = _engine(plan, [c for _, c in pairs]) if use_vllm else None
        quality["engine_start_s"], started = clock() - started, clock()
        quality["validation"] = _validate(base, pairs, llm, root, progress=progress)
        quality["validation_s"], started = clock() - started, clock()
        quality["evaluation"] = _evaluate(plan, [c for _, c in pairs], llm, progress=progress)
        quality["evaluation_s"] = clock() - started
    except Exception as exc:  # the trained and converted adapters are kept whatever happens here
        logger.debug("validation / evaluation failed", exc_info=True)
        quality["error"] = first_line(exc)
    return quality


def _engine(plan: ComparePlan, converted: list[Path]):
    """One vLLM engine serving every conversion, started the way ``eval`` needs it (LoRA on the adapted module kinds
    only: vLLM's prompt log-probabilities fail with a LoRA-wrapped head); long enough for any eval request."""
    from adaconvert.evaluation.engines import start_engine

    max_length = plan.train.get("max_length") or 512
    return start_engine(plan.train["model"], converted, max_model_len=max_length + plan.max_new_tokens, quiet=True)


def _validate(base, pairs, llm, root: Path, *, progress: bool) -> dict:
    """{converted directory name: passed} and the report's path (weights and logits levels, and vLLM with ``llm``)."""
    from adaconvert.validation import validate

    path = root / VALIDATION_REPORT_NAME
    report = validate(
        base,
        pairs=pairs,
        vllm=llm is not None,
        llm=llm,
        report=path,
        overwrite=True,
        raise_on_failure=False,
        progress=progress,
    )
    passed = {}
    for _, converted in pairs:
        mine = [c.passed for c in report.checks if c.subject == converted.name]
        passed[converted.name] = all(mine) if mine else report.passed
    return {"passed": passed, "report": str(path)}


def _evaluate(plan: ComparePlan, converted: list[Path], llm, *, progress: bool) -> dict:
    """The evaluation's rows by converted directory name (and ``base``): loss, ROUGE-L, forgetting.

    The one call into ``adaconvert.evaluation``: ``evaluate(base, adapters, data=...) -> EvalReport``, one row per
    subject labelled by its directory name.
    """
    from adaconvert.evaluation import evaluate

    report = evaluate(
        plan.train["model"],
        converted,
        data=plan.train["eval_data"],
        reference_data=plan.reference_data,
        text_column=plan.train.get("text_column") or "text",
        split_on=plan.split_on,
        max_length=plan.train.get("max_length") or 512,
        max_new_tokens=plan.max_new_tokens,
        engine="vllm" if llm is not None else "hf",
        llm=llm,
        progress=progress,
    )
    rows = {}
    for row in report.rows:  # labelled by directory name: ``base``, ``<method>-lora``
        rows[row.label] = {
            "loss": row.loss,
            "perplexity": row.perplexity,
            "rougeL": row.rougeL,
            "exact_match": row.exact_match,
            "forgetting": row.forgetting,
            "reference_loss": row.reference_loss,
            "parameters": row.parameters,
        }
    return {"rows": rows, "seconds": report.seconds, "pairs": report.pairs, "examples": report.examples}


def _write_json(path: Path, data: dict) -> None:
    with atomic_output_file(path, overwrite=True) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
