"""`merge`: fold adapters into the base weights, streamed."""

from __future__ import annotations

import click

from adaconvert.base.quantization import FOUR_BIT
from adaconvert.cli.options import common_options, emit
from adaconvert.constants import OUTPUT_DTYPES


@click.command("merge")
@click.argument("base")
@click.argument("adapters", nargs=-1, required=True, metavar="ADAPTER[:WEIGHT]...")
@click.argument("dst", type=click.Path(file_okay=False))
@click.option("--dtype", type=click.Choice(OUTPUT_DTYPES), help="Output dtype (default: base).")
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
    emit(report.to_dict(), report.text(), as_json=as_json)
