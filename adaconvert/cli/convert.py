"""`to-lora`, `to-gguf`, `to-mlx`: the export verbs."""

from __future__ import annotations

import logging

import click

from adaconvert.cli.options import common_options, compression_options, emit
from adaconvert.constants import OUTPUT_DTYPES


@click.command("to-lora")
@click.argument("paths", nargs=-1, required=True, metavar="SRC DST | SRC... --output-dir DIR")
@compression_options
@click.option("--vllm-max-lora-rank", type=int, help="vLLM bucket every module must fit (compresses if asked to).")
@click.option("--dtype", type=click.Choice(OUTPUT_DTYPES), help="Output dtype (default: source).")
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
        from adaconvert.conversion.batch import expand_sources, to_lora_many

        progress = logging.getLogger().isEnabledFor(logging.INFO)
        sources = expand_sources(paths)
        result = to_lora_many(sources, output_dir, jobs=jobs, raise_on_failure=False, progress=progress, **options)
        emit(result.to_dict(), result.table(), as_json=as_json)
        result.raise_for_failures()
        return
    if len(paths) != 2 or jobs != 1:
        raise click.UsageError("give SRC DST, or several sources with --output-dir DIR (and --jobs)")
    src, dst = paths
    from adaconvert.conversion.peft_lora import to_lora

    report = to_lora(src, dst, **options)
    emit(report.to_dict, report.summary(), as_json=as_json)


@click.command("to-gguf")
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
    from adaconvert.conversion.gguf import to_gguf

    # gguf's writer logs every file it opens at INFO (our temporary sibling's name, endianness): noise for users
    logging.getLogger("gguf").setLevel(logging.WARNING)
    report = to_gguf(src, dst, progress=logging.getLogger().isEnabledFor(logging.INFO), **options)
    emit(report.to_dict, report.summary(), as_json=as_json)


@click.command("to-mlx")
@click.argument("src")
@click.argument("dst", type=click.Path(file_okay=False))
@click.option("--base", help="Base model (directory or Hub id; only config.json is read) for its number of blocks.")
@compression_options
@click.option("--dtype", type=click.Choice(OUTPUT_DTYPES), help="Output dtype (default: source).")
@common_options(overwrite=True, one_torch_thread=True)
def to_mlx_cmd(src, dst, *, as_json, **options):
    """Convert SRC (AdaLoRA, LoRA or LoRA-Drop; directory or Hub id) into an mlx-lm adapter directory at DST."""
    from adaconvert.conversion.mlx_lm import to_mlx

    report = to_mlx(src, dst, **options)
    emit(report.to_dict, report.summary(), as_json=as_json)
