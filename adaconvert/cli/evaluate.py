"""`eval`: the base, adapters and merged models on the same data — loss, generation quality, forgetting."""

from __future__ import annotations

import logging

import click

from adaconvert.cli.options import common_options, emit


@click.command("eval")
@click.argument("base")
@click.argument("adapters", nargs=-1)
@click.option(
    "--data", required=True, help="Eval data: .jsonl/.json/.txt/.csv/.tsv/.parquet, a dataset dir or Hub name."
)
@click.option("--merged", multiple=True, type=click.Path(file_okay=False), help="A merged model of BASE (repeat).")
@click.option(
    "--reference-data", help="General text the adapters were not trained on: forgetting = loss there − base's."
)
@click.option("--text-column", default="text", show_default=True, help="Column of the texts (loss, --split-on).")
@click.option("--prompt-column", help="Column of the prompts (with --reference-column).")
@click.option("--reference-column", help="Column of the expected answers (with --prompt-column).")
@click.option(
    "--split-on", metavar="MARKER", help="Prompt = text up to MARKER (e.g. 'answer :'), reference = the rest."
)
@click.option("--split", default="train", show_default=True, help="Dataset split (directories and Hub names).")
@click.option("--data-config", help="Dataset configuration (Hub names).")
@click.option("--limit", type=int, help="Evaluate the first N usable rows only.")
@click.option("--max-length", type=int, default=512, show_default=True, help="Cut texts to this many tokens.")
@click.option("--max-new-tokens", type=int, default=32, show_default=True, help="Greedy tokens per prompt at most.")
@click.option(
    "--engine",
    type=click.Choice(["auto", "vllm", "hf"]),
    default="auto",
    show_default=True,
    help="vllm: one engine, every adapter batched together; hf: transformers + PEFT; auto: vllm where installed.",
)
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True)
@click.option("--batch-size", type=int, default=8, show_default=True, help="Sequences per forward pass (hf).")
@click.option("--plot", type=click.Path(dir_okay=False), help="Write quality vs adapter parameters as a PNG.")
@common_options(overwrite=True)
def eval_cmd(base, adapters, *, as_json, **options):
    """Evaluate BASE alone, each ADAPTER on it (and each --merged model) on the same --data.

    Held-out loss and perplexity; with prompt/reference pairs, greedy generations scored by ROUGE-1/2/L and exact
    match; with --reference-data, forgetting. One row per subject, the base first.
    """
    from adaconvert.evaluation import evaluate

    report = evaluate(base, adapters, progress=logging.getLogger().isEnabledFor(logging.INFO), **options)
    emit(report.to_dict(), report.table(), as_json=as_json)
