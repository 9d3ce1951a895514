"""The ``adaconvert`` command: a thin click layer over the Python API.

Errors become one line and a non-zero exit in exactly one place (``main``); ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import logging
import os
import sys
import warnings

import click

from adaconvert import errors
from adaconvert.quantization import FOUR_BIT, QUANTIZATIONS
from adaconvert.training.config import FIELDS, METHODS, flag, option_help, option_kind

logger = logging.getLogger("adaconvert")

# exit codes by error family, so scripts can tell "bad input" from "not found" without parsing text
EXIT_CODES: dict[type[errors.AdaconvertError], int] = {
    errors.SourceNotFoundError: 3,
    errors.OutputExistsError: 4,
    errors.RankLimitError: 5,
    errors.ValidationError: 6,
    errors.HubError: 7,
    errors.BatchConversionError: 8,
    errors.ServeError: 9,
    errors.OutputWriteError: 1,  # the environment (disk full, read-only), as for any OSError below
    errors.AdaconvertError: 2,
}


def common_options(*, overwrite: bool = False, one_torch_thread: bool = False):
    """The flags every command shares: --json, --debug, --quiet (and --overwrite for commands that write).

    Every command needs torch: it is imported here (:func:`import_torch`), once the arguments are parsed, so that
    ``--help`` stays instant; ``one_torch_thread`` as in :func:`import_torch`.
    """

    def decorate(fn):
        @click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
        @click.option("--debug", is_flag=True, help="Show tracebacks and debug logging.")
        @click.option("--quiet", "-q", is_flag=True, help="Only errors on stderr; no progress bars.")
        @functools.wraps(fn)
        def wrapper(*args, as_json: bool, debug: bool, quiet: bool, **kwargs):
            level = logging.DEBUG if debug else logging.ERROR if quiet or as_json else logging.INFO
            logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
            import_torch(one_thread=one_torch_thread)
            with quiet_third_party(level >= logging.ERROR):
                return fn(*args, as_json=as_json, **kwargs)

        if overwrite:
            wrapper = click.option("--overwrite", is_flag=True, help="Replace DST if it exists.")(wrapper)
        return wrapper

    return decorate


@contextlib.contextmanager
def quiet_third_party(enabled: bool):
    """While a quiet command runs, silence what libraries print besides our errors: Python warnings (PEFT's, torch's)
    and transformers' logging, which has its own level and handler, read from TRANSFORMERS_VERBOSITY when it is
    first imported. Everything is restored afterwards (``main`` may run in a longer-lived process)."""
    if not enabled:
        yield
        return
    had_env = os.environ.get("TRANSFORMERS_VERBOSITY")
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    was_imported = "transformers" in sys.modules
    before = sys.modules["transformers"].logging.get_verbosity() if was_imported else logging.WARNING
    if was_imported:
        sys.modules["transformers"].logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        if had_env is None:
            del os.environ["TRANSFORMERS_VERBOSITY"]
        else:
            os.environ["TRANSFORMERS_VERBOSITY"] = had_env
        if "transformers" in sys.modules:
            sys.modules["transformers"].logging.set_verbosity(before)


def compression_options(fn):
    """--max-rank, --energy, --tol: the rank compression every export verb offers (see ``prepare_conversion``)."""
    options = [
        click.option("--max-rank", type=int, help="Cap every module's rank (best approximation by SVD)."),
        click.option("--energy", type=float, help="Keep singular values up to this fraction of each module's energy."),
        click.option("--tol", type=float, help="Max relative Frobenius error per module; keep the smallest rank."),
    ]
    for option in reversed(options):  # click lists options in decoration order, outermost first
        fn = option(fn)
    return fn


def emit(result: dict, text: str, *, as_json: bool) -> None:
    """Results go to stdout: JSON with --json, else the human text."""
    click.echo(json.dumps(result, indent=2, default=str) if as_json else text)


def import_torch(*, one_thread: bool = False) -> None:
    """Import torch with Python's cycle collector paused, then freeze what the import made.

    torch's import creates some 10⁶ objects and no garbage: collections during it cost ~0.15 s of its ~1.3 s, and
    every later full collection would walk those objects again (measured on 2 cores).

    ``one_thread``: use one torch thread unless OMP_NUM_THREADS says otherwise. Conversion and inspection are
    memory-bound passes over many small tensors: one thread is as fast on an idle machine, and OpenMP's thread
    hand-offs made them 10-20× slower on a busy one.
    """
    from adaconvert.runtime import paused_gc

    with paused_gc():
        import torch
    gc.freeze()  # objects alive now are never collected: later collections skip them
    if one_thread and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)


@click.group()
@click.version_option(package_name="adaconvert")
def cli():
    """Convert, inspect, merge and serve dynamic-rank adapters (AdaLoRA, LoRA-Drop) as plain LoRA."""


@cli.command("to-lora")
@click.argument("paths", nargs=-1, required=True, metavar="SRC DST | SRC... --output-dir DIR")
@compression_options
@click.option("--vllm-max-lora-rank", type=int, help="vLLM bucket every module must fit (compresses if asked to).")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), help="Output dtype (default: source).")
@click.option(
    "--layout",
    type=click.Choice(["compact", "uniform"]),
    default="compact",
    show_default=True,
    help="compact: each module at its own rank (PEFT, vLLM); uniform: all zero-padded to the max rank, no patterns "
    "(also llama.cpp, SGLang, LoRAX/TGI).",
)
@click.option(
    "--output-dir",
    type=click.Path(file_okay=False),
    help="Convert every SRC (paths, Hub ids, quoted globs, @list.txt) into DIR/<name>, with a summary table.",
)
@click.option("--jobs", "-j", type=click.IntRange(min=1), default=1, help="Worker processes for --output-dir.")
@common_options(overwrite=True, one_torch_thread=True)
def to_lora_cmd(paths, *, as_json, output_dir, jobs, **options):
    """Convert SRC (AdaLoRA, LoRA or LoRA-Drop; directory or Hub id) into a rank-varying LoRA at DST.

    With --output-dir DIR, convert many sources in --jobs worker processes; a bad source is reported and the
    others go on; the exit status is non-zero if any failed, and the error names every failure.
    """
    if output_dir is not None:
        from adaconvert.batch import expand_sources, to_lora_many

        progress = logging.getLogger().isEnabledFor(logging.INFO)
        sources = expand_sources(paths)
        result = to_lora_many(sources, output_dir, jobs=jobs, raise_on_failure=False, progress=progress, **options)
        emit(result.to_dict(), result.table(), as_json=as_json)
        result.raise_for_failures()
        return
    if len(paths) != 2 or jobs != 1:
        raise click.UsageError("give SRC DST, or several sources with --output-dir DIR (and --jobs)")
    src, dst = paths
    from adaconvert.card import layout_summary
    from adaconvert.convert import to_lora

    report = to_lora(src, dst, **options)
    text = (
        f"wrote {dst}: {sum(1 for m in report.modules if m.rank_after)} modules "
        f"({len(report.removed_modules)} empty {'removed' if report.layout == 'compact' else 'written as zeros'}), "
        f"max rank {report.max_rank}, "
        f"{report.params_after:,} parameters ({report.params_before:,} before), "
        f"max relative error {report.max_rel_error:.2e}\n"
        f"layout: {layout_summary(report)}\n"
        f"serve with vLLM: --enable-lora --max-lora-rank {report.vllm_max_lora_rank}"
    )
    emit(report.to_dict(), text, as_json=as_json)


@cli.command("to-gguf")
@click.argument("src")
@click.argument("dst", type=click.Path(dir_okay=False))
@click.option("--base", help="Base model directory or Hub id; only its config.json is read (default: the adapter's).")
@click.option(
    "--outtype",
    type=click.Choice(["f32", "f16", "bf16", "q8_0"]),
    default="f32",
    show_default=True,
    help="GGUF tensor type (q8_0 needs every rank and input width to be a multiple of 32).",
)
@compression_options
@common_options(overwrite=True, one_torch_thread=True)
def to_gguf_cmd(src, dst, *, as_json, **options):
    """Convert SRC (AdaLoRA, LoRA or LoRA-Drop; directory or Hub id) into a GGUF LoRA file DST for llama.cpp / Ollama.

    For DST = NAME.gguf, NAME.report.json and NAME.README.md (the card, with llama-server and Ollama Modelfile
    snippets) go beside it.
    """
    from adaconvert.gguf_export import side_files, to_gguf

    # gguf's writer logs every file it opens at INFO (our temporary sibling's name, endianness): noise for users
    logging.getLogger("gguf").setLevel(logging.WARNING)
    report = to_gguf(src, dst, progress=logging.getLogger().isEnabledFor(logging.INFO), **options)
    report_path, card_path = side_files(dst)
    text = (
        f"wrote {dst}: {sum(1 for m in report.modules if m.rank_after)} modules "
        f"({len(report.removed_modules)} empty removed), max rank {report.max_rank}, {report.dtype}, "
        f"{report.bytes_after / 2**20:,.2f} MiB, max relative error {report.max_rel_error:.2e}\n"
        f"report: {report_path}; card: {card_path}\n"
        f"run with llama.cpp: llama-server -m BASE.gguf --lora {dst}"
    )
    emit(report.to_dict(), text, as_json=as_json)


@cli.command("to-mlx")
@click.argument("src")
@click.argument("dst", type=click.Path(file_okay=False))
@click.option("--base", help="Base model (directory or Hub id; only config.json is read) for its number of blocks.")
@compression_options
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), help="Output dtype (default: source).")
@common_options(overwrite=True, one_torch_thread=True)
def to_mlx_cmd(src, dst, *, as_json, **options):
    """Convert SRC (AdaLoRA, LoRA or LoRA-Drop; directory or Hub id) into an mlx-lm adapter directory at DST."""
    from adaconvert.card import layout_summary
    from adaconvert.export_mlx import to_mlx

    report = to_mlx(src, dst, **options)
    text = (
        f"wrote {dst}: {sum(1 for m in report.modules if m.rank_after)} modules at rank {report.max_rank}, "
        f"{report.params_after:,} parameters ({report.params_before:,} before), "
        f"max relative error {report.max_rel_error:.2e}\n"
        f"layout: {layout_summary(report)}\n"
        f"use with mlx-lm: mlx_lm.generate --model BASE --adapter-path {dst}"
    )
    emit(report.to_dict(), text, as_json=as_json)


@cli.command("inspect")
@click.argument("adapter")
@click.option("--plot", type=click.Path(dir_okay=False), help="Write a rank heatmap (layers × modules) PNG.")
@click.option(
    "--runtimes", "show_runtimes", is_flag=True, help="Say in which runtimes it is exact, wrong-scale or refused."
)
@click.option(
    "--lora-drop-plan",
    "drop_plan",
    is_flag=True,
    help="AdaLoRA: rank each layer by its share of the kept rank budget and print the `train lora-drop` command "
    "that keeps the important ones (--plot: a bar chart of the shares instead).",
)
@click.option("--threshold", type=float, help="--lora-drop-plan: keep layers up to this cumulative share (0.9).")
@click.option("--keep-fraction", type=float, help="--lora-drop-plan: keep this fraction of the layers instead.")
@common_options(overwrite=True, one_torch_thread=True)
def inspect_cmd(adapter, *, as_json, plot, show_runtimes, drop_plan, threshold, keep_fraction, overwrite):
    """Show ADAPTER's rank allocation per layer and module, its size and the vLLM bucket it needs.

    --runtimes adds the portability check: per runtime (PEFT, vLLM, llama.cpp/Ollama, SGLang, LoRAX/TGI, mlx-lm),
    exact, wrong-scale (which modules, by which factor) or refused (why), from the config and tensor shapes alone.
    --lora-drop-plan turns an AdaLoRA allocation into the LoRA-Drop layers to keep.
    """
    if drop_plan:
        _print_lora_drop_plan(
            adapter, plot=plot, overwrite=overwrite, threshold=threshold, keep_fraction=keep_fraction, as_json=as_json
        )
        return
    if threshold is not None or keep_fraction is not None:
        raise click.UsageError("--threshold and --keep-fraction go with --lora-drop-plan")
    from adaconvert.card import text_rank_table
    from adaconvert.inspection import inspect

    report = inspect(adapter, plot=plot, overwrite=overwrite)
    lines = text_rank_table(report.ranks)
    lines += [
        "",
        f"kind: {report.source_kind}   dtype: {report.dtype}",
        f"modules: {report.modules_with_weights} with weights of {report.modules}; total rank {report.total_rank}, "
        f"max {report.max_rank}",
        f"parameters: {report.params:,} ({report.bytes / 2**20:.2f} MiB)",
        f"fixed-rank LoRA with the same budget: rank {report.equal_budget_rank:.2f}; "
        f"fixed rank {report.max_rank} everywhere: {report.fixed_max_rank_params:,} parameters",
        f"vLLM --max-lora-rank: {report.vllm_max_lora_rank}",
    ]
    if plot:
        lines.append(f"heatmap: {plot}")
    if show_runtimes:
        from adaconvert.runtimes import runtimes_table

        lines += ["", "runtimes:", *(f"  {line}" for line in runtimes_table(report.runtimes))]
    emit(report.to_dict(), "\n".join(lines), as_json=as_json)


def _print_lora_drop_plan(adapter, *, plot, as_json, **selection) -> None:
    from adaconvert.inspection import lora_drop_plan

    plan = lora_drop_plan(adapter, plot=plot, **selection)
    width = max(len(u) for u in plan.importance)
    lines = [f"{'layer':>{max(width, 5)}}  rank  share"]
    for unit, share in plan.importance.items():
        bar = "#" * round(40 * share)
        mark = " kept" if unit in plan.kept else ""
        lines.append(f"{unit:>{max(width, 5)}}  {plan.layer_ranks[unit]:>4}  {share:5.1%} {bar}{mark}")
    rule = f"threshold {plan.threshold}" if plan.threshold is not None else f"keep fraction {plan.keep_fraction}"
    lines += [
        "",
        f"importance: {plan.measure}; the budget is spread as if over {plan.effective_layers:.1f} of {plan.layers} "
        "layers (effective layers, 1/Σ share²)",
        f"keep {len(plan.kept)} of {plan.layers} layers ({rule}): {','.join(plan.kept)}, "
        f"{plan.kept_share:.1%} of the budget",
        plan.command,
    ]
    if plot:
        lines.append(f"bar chart: {plot}")
    emit(plan.to_dict(), "\n".join(lines), as_json=as_json)


@cli.command("push")
@click.argument("adapter", type=click.Path())
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repo private (an existing repo keeps its visibility).")
@click.option("--revision", "--branch", "revision", help="Branch to commit to (created if missing; default main).")
@click.option("--commit-message", help="Commit message (default: 'Upload adapter converted by adaconvert').")
@click.option("--token", help="Hub token (default: HF_TOKEN, else the `hf auth login` token). Never printed.")
@click.option("--dry-run", is_flag=True, help="List exactly what would be uploaded, and the card; send nothing.")
@click.option("--force", is_flag=True, help="Push even if the vLLM check fails or the conversion report is missing.")
@common_options()
def push_cmd(adapter, repo_id, *, as_json, **options):
    """Upload ADAPTER (a to-lora, to-mlx or merge output directory, or a to-gguf file) to the Hub as REPO_ID."""
    from adaconvert.hub import push

    result = push(adapter, repo_id, progress=logging.getLogger().isEnabledFor(logging.INFO), **options)
    where = f"{result.repo_id}@{result.revision}" + (" (private)" if result.private else "")
    listing = "\n".join(f"{size:>14,}  {name}" for name, size in result.files)
    if result.dry_run:
        card = f"\n\n--- README.md (model card) ---\n{result.card}" if result.card else ""
        text = f"dry run: would push {len(result.files)} files to {where}:\n{listing}{card}"
    else:
        text = f"pushed {len(result.files)} files to {where}:\n{listing}\ncommit: {result.commit_url}"
    emit(result.to_dict(), text, as_json=as_json)


def _name_value(items, what: str) -> list[tuple[str, str]]:
    """``["a=b", ...]`` → ``[("a", "b"), ...]``, split at the first ``=``; a UsageError naming ``what`` otherwise."""
    pairs = [tuple(item.split("=", 1)) for item in items]
    bad = [item for item, pair in zip(items, pairs, strict=True) if len(pair) != 2 or not all(pair)]
    if bad:
        raise click.UsageError(f"expected {what}, got {bad[0]!r}")
    return pairs


@cli.command("validate")
@click.argument("paths", nargs=-1, metavar="BASE [ORIGINAL CONVERTED]")
@click.option("--pair", "pairs", multiple=True, metavar="ORIG=CONV", help="Another original/converted pair (repeat).")
@click.option(
    "--merged",
    type=click.Path(file_okay=False),
    multiple=True,
    help="Also check a merged checkpoint of ORIGINAL (repeat: e.g. the plain and the --requantize merge).",
)
@click.option(
    "--quantize",
    type=click.Choice(QUANTIZATIONS),
    help="ORIGINAL was trained on BASE quantised so (QLoRA): PEFT runs on that quantised base.",
)
@click.option(
    "--double-quant/--no-double-quant", default=True, show_default=True, help="With a 4-bit --quantize: as trained."
)
@click.option("--vllm", is_flag=True, help="Also run the converted adapters in a real vLLM engine.")
@click.option(
    "--vllm-static",
    "static",
    multiple=True,
    metavar="ADAPTER",
    help="Only check ADAPTER against vLLM's rules, without an engine (repeat; BASE adds module-name checks).",
)
@click.option("--max-lora-rank", type=int, help="With --vllm-static: the --max-lora-rank it will be served with.")
@click.option("--prompts", type=click.Path(dir_okay=False), help="Prompts file: one per line, or a JSON list.")
@click.option("--report", type=click.Path(dir_okay=False), help="Write the full report as JSON.")
@click.option("--tolerance", multiple=True, metavar="NAME=VALUE", help="Override a tolerance, e.g. logit_abs=1e-2.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=8, help="Greedy tokens per prompt (--vllm).")
@common_options(overwrite=True)
def validate_cmd(paths, *, as_json, pairs, static, max_lora_rank, tolerance, merged, **options):
    """Prove that CONVERTED computes what ORIGINAL computes on BASE: weights, logits and (--vllm) vLLM outputs.

    Exit status 0 only if every level passes. `validate --vllm-static ADAPTER [BASE]` only checks vLLM's rules.
    """
    if static:
        from adaconvert.base_modules import base_modules
        from adaconvert.vllm_compat import check_vllm_compat

        if len(paths) > 1:
            raise click.UsageError("--vllm-static takes the adapters as options and at most BASE as argument")
        base = base_modules(paths[0]) if paths else None  # built once (a meta-device model), shared by all adapters
        found = {a: check_vllm_compat(a, max_lora_rank=max_lora_rank, base_config=base) for a in static}
        lines = []
        for adapter, problems in found.items():
            lines.append(f"{adapter}: {len(problems)} problem(s)" if problems else f"{adapter}: ok")
            lines += [f"  {p}" for p in problems]
        emit({a: [p.to_dict() for p in ps] for a, ps in found.items()}, "\n".join(lines), as_json=as_json)
        failed = {a: ps for a, ps in found.items() if ps}
        if failed:
            first = next(iter(failed))
            problems = {a: [str(p) for p in ps] for a, ps in failed.items()}
            raise errors.ValidationError(f"vLLM would not load it: {failed[first][0]}", path=first, problems=problems)
        return
    if len(paths) not in (1, 3) or (len(paths) == 1 and not pairs):
        raise click.UsageError("give BASE ORIGINAL CONVERTED, or BASE with --pair ORIG=CONV (repeatable)")
    from adaconvert.validation import validate
    from adaconvert.validation.runner import failure

    base, *pair = paths
    tolerances = {k: float(v) for k, v in _name_value(tolerance, "NAME=VALUE")}
    result = validate(
        base,
        *pair,
        pairs=_name_value(pairs, "ORIG=CONV"),
        tolerances=tolerances,
        merged=merged or None,
        raise_on_failure=False,
        progress=logging.getLogger().isEnabledFor(logging.INFO),
        **options,
    )
    emit(result.to_dict(), result.table(), as_json=as_json)
    if not result.passed:
        raise failure(result)


def _train_options(fn):
    """The ``train`` flags, one per :class:`~adaconvert.training.config.TrainOptions` field (its type, choices and
    help). Every flag defaults to unset, so that a ``--config`` recipe can set it; fields with their own spelling
    (the METHOD argument, the shared ``--overwrite`` / ``--quiet``) are declared where that spelling lives."""
    for name in reversed(list(FIELDS)):
        if FIELDS[name].metadata["flag"] is not None:
            continue
        kind, choices, text = option_kind(name), FIELDS[name].metadata["choices"], option_help(name)
        if kind is bool:
            spelling = flag(name)
            fn = click.option(f"{spelling}/--no-{spelling[2:]}", name, default=None, help=text)(fn)
        else:
            click_type = click.Choice(choices) if choices else {list: str}.get(kind, kind)
            fn = click.option(flag(name), name, type=click_type, default=None, help=text)(fn)
    fn = click.option("--bf16", "precision_flag", flag_value="bf16", help="Same as --precision bf16.")(fn)
    fn = click.option("--fp16", "precision_flag", flag_value="fp16", help="Same as --precision fp16.")(fn)
    return click.option("--config", type=click.Path(dir_okay=False), help="YAML recipe (see training/).")(fn)


@cli.command("train")
@click.argument("method", type=click.Choice(METHODS))
@_train_options
@common_options(overwrite=True)
def train_cmd(method, *, as_json, config, overwrite, precision_flag, **options):
    """Train a METHOD adapter (lora, adalora, lora-drop) on top of the HF Trainer; DDP or --fsdp via torchrun.

    Example: adaconvert train adalora --model Qwen/Qwen2.5-0.5B --data data.jsonl --output runs/ada --steps 500
    """
    from adaconvert.training import train

    options["precision"] = precision_flag or options["precision"]
    quiet = click.get_current_context().params.get("quiet", False) or as_json
    result = train(method, config=config, overwrite=overwrite or None, quiet=quiet or None, **options)
    if not result.written:  # a non-main process of a torchrun / accelerate run: the main one reports
        return
    main = result.main
    lines = [
        f"wrote {result.output}: {method}, "
        f"{main.optimizer_steps} optimizer steps in {main.wall_s:.1f} s "
        f"(median {main.median_step_s * 1e3:.1f} ms/step, {main.tokens_per_s:,.0f} tokens/s), "
        f"{main.trainable_params:,} trainable parameters, loss {main.train_loss:.4f}"
    ]
    if result.ranks is not None:
        history = result.rank_history
        lines.append(
            f"AdaLoRA: total rank {sum(result.ranks.values())} (budget {history['target_budget']}, from "
            f"{history['init_r']} × {len(result.ranks)} modules), {len(history['history'])} budget steps; "
            f"history in rank_history.json"
        )
    if result.lora_drop is not None:
        drop = result.lora_drop
        pilot = "no pilot (--keep-layers), "
        if drop["pilot"]:
            pilot = f"{drop['pilot']['trainable_params']:,} in the pilot, "
        lines.append(
            f"LoRA-Drop: kept {drop['kept']}, {drop['policy']} {drop['shared'] or drop['dropped']}; trainable "
            f"parameters {pilot}{drop['main']['trainable_params']:,} in the main run; details in lora_drop.json"
        )
    lines.append(f"next: adaconvert to-lora {result.output} {result.output}-lora")
    emit(result.to_dict(), "\n".join(lines), as_json=as_json)


@cli.command("demo")
@click.option("--dir", "directory", type=click.Path(file_okay=False), help="Where to leave the artefacts.")
@click.option("--steps", type=click.IntRange(min=10), help="Optimizer steps per training run (default 300).")
@click.option("--vllm/--no-vllm", default=None, help="Serve both adapters under vLLM (default: if installed).")
@click.option("--verbose", is_flag=True, help="Show third-party logs (else they go to DIR/third_party.log).")
@common_options(overwrite=True)
def demo_cmd(*, as_json, directory, steps, vllm, verbose, overwrite):
    """Tiny model, AdaLoRA and LoRA-Drop trained on an embedded dataset, converted, validated and served."""
    from adaconvert.demo.demo import run_demo

    quiet = click.get_current_context().params.get("quiet", False) or as_json
    echo = None if quiet else click.echo
    report = run_demo(directory, steps=steps, vllm=vllm, overwrite=overwrite, echo=echo, verbose=verbose)
    emit(report.to_dict(), f"demo finished; artefacts in {report.directory}", as_json=as_json)


class _PassThroughCommand(click.Command):
    """A command whose arguments after ``--`` are kept apart, untouched, in ``ctx.meta['passthrough']``."""

    def parse_args(self, ctx, args):
        if "--" in args:
            cut = args.index("--")
            args, ctx.meta["passthrough"] = args[:cut], args[cut + 1 :]
        return super().parse_args(ctx, args)


@cli.command("serve", cls=_PassThroughCommand)
@click.argument("base")
@click.argument("adapters", nargs=-1, required=True, metavar="NAME=ADAPTER... [-- VLLM_ARGS...]")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--api-key",
    envvar="VLLM_API_KEY",
    help="Clients must send it as a bearer token; needed for a non-loopback --host. Prefer the VLLM_API_KEY "
    "environment variable: a command-line argument shows in `ps`. Never printed.",
)
@click.option("--insecure", is_flag=True, help="Allow a non-loopback --host without an API key (anyone may use it).")
@click.option("--port", type=int, default=8000, show_default=True, help="Port to listen on.")
@click.option("--max-lora-rank", type=int, help="vLLM bucket (default: the smallest that serves every adapter).")
@click.option("--max-loras", type=click.IntRange(min=1), help="Adapters in one batch (default: all).")
@click.option("--max-cpu-loras", type=click.IntRange(min=1), help="Adapters kept in CPU memory (default: all).")
@click.option("--cache-dir", type=click.Path(file_okay=False), help="Where conversions made for serving go.")
@click.option("--print-command", is_flag=True, help="Print the exact `vllm serve` command instead of running it.")
@click.option("--dry-run", is_flag=True, help="Read, check and convert everything, check the port; start nothing.")
@click.option("--ready-timeout", type=float, default=1800, show_default=True, help="Seconds to wait for readiness.")
@click.option("--log-file", type=click.Path(dir_okay=False), help="Send vLLM's output to this file.")
@common_options()
def serve_cmd(base, adapters, *, as_json, print_command, dry_run, **options):
    """Serve NAME=ADAPTER pairs on BASE with vLLM's OpenAI-compatible server; Ctrl-C stops it.

    Adapters not in the safe export layout (AdaLoRA, LoRA with alpha != r...) are converted first, into the cache.
    """
    from adaconvert.serving import serve

    extra = click.get_current_context().meta.get("passthrough", [])
    named = _name_value(adapters, "NAME=ADAPTER")
    plan = serve(base, named, extra_args=extra, print_command=print_command, dry_run=dry_run, **options)
    if print_command:
        emit(plan.to_dict(), plan.shell_command(), as_json=as_json)
    elif dry_run:
        lines = [f"{'name':<16} {'kind':<9} {'rank':>4}  {'served from'}"]
        for a in plan.adapters:
            how = " (converted, cached)" if a.cached else " (converted now)" if a.converted else ""
            lines.append(f"{a.name:<16} {a.kind:<9} {a.max_rank:>4}  {a.path}{how}")
        lines += [f"--max-lora-rank {plan.max_lora_rank}; listening on {plan.url}", plan.shell_command()]
        emit(plan.to_dict(), "\n".join(lines), as_json=as_json)


@cli.command("merge")
@click.argument("base")
@click.argument("adapters", nargs=-1, required=True, metavar="ADAPTER[:WEIGHT]...")
@click.argument("dst", type=click.Path(file_okay=False))
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), help="Output dtype (default: base).")
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest output shard (5GB, 500MB, 2GiB).")
@click.option("--threads", type=click.IntRange(min=1), help="Worker threads (default: one per CPU, at most 4).")
@click.option(
    "--requantize",
    type=click.Choice(FOUR_BIT),
    help="QLoRA-faithful merge for adapters trained on a quantised base: merge into dequant(quant(W)), the weights "
    "the adapter was trained against (default: into W).",
)
@click.option(
    "--double-quant/--no-double-quant",
    default=True,
    show_default=True,
    help="With a 4-bit --requantize: training used double quantisation.",
)
@common_options(overwrite=True)
def merge_cmd(base, adapters, dst, *, as_json, **options):
    """Fold ADAPTERs (AdaLoRA, LoRA, LoRA-Drop; `path:0.5` weights one) into BASE and write a full checkpoint at DST.

    Streams tensor by tensor: memory stays flat whatever the model size. BASE is a directory or Hub id with
    safetensors weights; DST gets shards, index, config and tokenizer files that transformers and vLLM load.
    """
    from adaconvert.merging import merge

    quiet = click.get_current_context().params.get("quiet", False) or as_json
    report = merge(base, adapters, dst, progress=not quiet, **options)
    weights = ", ".join(f"{a['source']} ×{a['weight']:g} ({a['modules']} modules)" for a in report.adapters)
    rss = f", peak RSS {report.peak_rss_bytes / 2**20:,.0f} MiB" if report.peak_rss_bytes else ""
    text = (
        f"wrote {dst}: {report.tensors_touched} of {report.tensors} tensors merged from {weights}; "
        f"{report.bytes_written / 2**20:,.1f} MiB {report.dtype} in {report.shards} shard(s), "
        f"{report.seconds:.1f} s{rss}"
    )
    if report.requantized:
        q = report.requantized
        text += f"\n{q['tensors']} quantised layers merged into their {q['method']} dequantisation"
    emit(report.to_dict(), text, as_json=as_json)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI; turn our errors into one line on stderr and an exit code."""
    try:
        cli.main(args=argv, prog_name="adaconvert", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except errors.AdaconvertError as exc:
        if _debug(argv):
            raise
        click.echo(f"error: {exc}", err=True)
        return next(code for cls, code in EXIT_CODES.items() if isinstance(exc, cls))
    except OSError as exc:  # disk full, permission denied...: the environment, not a bug of ours
        if _debug(argv):
            raise
        click.echo(f"error: {exc}", err=True)
        return 1
    return 0


def _debug(argv: list[str] | None) -> bool:
    return "--debug" in (sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
