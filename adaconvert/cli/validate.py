"""`validate`: prove a converted or merged artefact computes what the original did."""

from __future__ import annotations

import logging

import click

from adaconvert.base.quantization import QUANTIZATIONS
from adaconvert.cli.options import common_options, emit, name_value


@click.command("validate")
@click.argument("paths", nargs=-1, metavar="BASE [ORIGINAL [CONVERTED]]")
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
@click.option("--kv-cache-gib", type=float, help="With --vllm: the engine's KV cache in GiB (default: sized here).")
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

    With --merged DIR, CONVERTED may be left out (BASE ORIGINAL --merged DIR). Exit status 0 only if every level
    passes. `validate --vllm-static ADAPTER [BASE]` only checks vLLM's rules.
    """
    if static:
        from adaconvert.compat.vllm import static_check

        if len(paths) > 1:
            raise click.UsageError("--vllm-static takes the adapters as options and at most BASE as argument")
        result = static_check(static, max_lora_rank=max_lora_rank, base=paths[0] if paths else None)
        emit(result.to_dict(), result.text(), as_json=as_json)
        result.raise_for_problems()
        return
    if not (len(paths) == 3 or (len(paths) == 2 and merged) or (len(paths) == 1 and pairs)):
        raise click.UsageError(
            "give BASE ORIGINAL CONVERTED, BASE ORIGINAL --merged DIR, or BASE with --pair ORIG=CONV (repeatable)"
        )
    from adaconvert.validation import validate
    from adaconvert.validation.runner import failure

    base, *pair = paths
    tolerances = {k: float(v) for k, v in name_value(tolerance, "NAME=VALUE")}
    result = validate(
        base,
        *pair,
        pairs=name_value(pairs, "ORIG=CONV"),
        tolerances=tolerances,
        merged=merged or None,
        raise_on_failure=False,
        progress=logging.getLogger().isEnabledFor(logging.INFO),
        **options,
    )
    emit(result.to_dict(), result.table(), as_json=as_json)
    if not result.passed:
        raise failure(result)
