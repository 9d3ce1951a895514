"""`compare`."""

from __future__ import annotations

import click

from adaconvert.cli.options import common_options, emit
from adaconvert.cli.train import train_flags


@click.command("compare")
@click.option("--output", help="Directory of the comparison (default with --demo: ./adaconvert-compare).")
@click.option("--methods", help="Comma-separated subset of lora,adalora,lora-drop (default: all three).")
@click.option("--reference-data", help="General text the adapters are not trained on: forgetting is measured there.")
@click.option("--split-on", help="Marker splitting eval rows into prompt and reference for ROUGE-L ('answer :').")
@click.option(
    "--engine", type=click.Choice(["auto", "vllm", "hf"]), help="Evaluation engine (auto: vLLM if installed)."
)
@click.option("--max-new-tokens", type=click.IntRange(min=1), help="Greedy tokens per prompt (default 16).")
@click.option("--resume", is_flag=True, help="Continue an interrupted comparison in --output (same options).")
@click.option(
    "--demo", is_flag=True, help="The embedded demo data and a tiny base pretrained first: a few minutes on CPU."
)
@train_flags(exclude=("output", "init_r", "target_r", "eval_fraction", "resume"))
@common_options(overwrite=True)
def compare_cmd(*, as_json, config, overwrite, precision_flag, **options):
    """Train LoRA, AdaLoRA and LoRA-Drop at the same final budget (LoRA r; AdaLoRA 2r → r; LoRA-Drop r on its kept
    layers), convert, validate and evaluate them, and write compare.json, compare.md and two charts.

    Example: adaconvert compare --model Qwen/Qwen2.5-0.5B --data train.jsonl --eval-data eval.jsonl --output cmp
    """
    from adaconvert.comparison import compare
    from adaconvert.errors import ComparisonError

    options["precision"] = precision_flag or options["precision"]
    quiet = click.get_current_context().params.get("quiet", False) or as_json
    echo = None if quiet else click.echo
    report = compare(config=config, overwrite=overwrite, quiet=quiet, echo=echo, **options)
    emit(report.to_dict(), report.table(), as_json=as_json)
    if report.failures:
        failed = "; ".join(f"{m}: {e}" for m, e in report.failures.items())
        raise ComparisonError(f"{len(report.failures)} method(s) failed ({failed}); the others' results are written")
    if report.quality.get("error"):
        raise ComparisonError(
            f"validation / evaluation failed ({report.quality['error']}); the trained adapters are written"
        )
