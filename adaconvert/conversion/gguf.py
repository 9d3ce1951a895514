"""``to_gguf``: any adapter ``to_lora`` reads → one GGUF LoRA file for llama.cpp and Ollama, with report and card.

Beside ``NAME.gguf`` go ``NAME.report.json`` (the conversion report) and ``NAME.README.md`` (the card): a GGUF is one
file that users keep among others (several adapters and bases in one ``models/`` folder, the way llama.cpp and
Ollama are used), so the side files are named after it and never collide with another adapter's (in a Hub repo of
its own they belong as ``README.md`` and ``conversion_report.json``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from adaconvert.conversion.card import gguf_card
from adaconvert.conversion.pipeline import prepare_conversion
from adaconvert.conversion.report import ConversionReport, gguf_side_files
from adaconvert.errors import InvalidConfigError
from adaconvert.io.atomic import atomic_output_files, check_output
from adaconvert.io.source import read_model_config
from adaconvert.writers.gguf import OUTTYPES, GGUFBase, gguf_base, write_gguf_lora

logger = logging.getLogger(__name__)

# the dtype the report measures each --outtype's error in (q8_0: the float32 factors before block quantisation)
_REPORT_DTYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16", "q8_0": "float32"}


def load_gguf_base(base: str | Path) -> GGUFBase:
    """The :class:`GGUFBase` of a base model directory or Hub model id: only its ``config.json`` is read (a Hub
    id downloads that file alone, or finds it in the cache).

    Raises:
        SourceNotFoundError: no such directory, no config.json, or the Hub cannot provide it.
        InvalidConfigError: the config is not JSON, or its architecture is not supported.
    """
    config, path = read_model_config(base)
    return gguf_base(config, path=path)


def to_gguf(
    src: str | Path,
    dst: str | Path,
    *,
    base: str | Path | None = None,
    outtype: str = "f32",
    max_rank: int | None = None,
    energy: float | None = None,
    tol: float | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> ConversionReport:
    """Convert an AdaLoRA / LoRA / LoRA-Drop adapter into a GGUF LoRA that llama.cpp and Ollama apply exactly.

    The shared pipeline (read → fold scaling → strip → compress,
    :func:`~adaconvert.conversion.pipeline.prepare_conversion`), then
    :func:`~adaconvert.writers.gguf.write_gguf_lora`: per-module ranks kept compact, ``adapter.lora.alpha = 0`` so
    llama.cpp's scale is exactly 1 for every tensor, q/k rows permuted for llama-family bases. ``dst`` and its two
    side files (:func:`~adaconvert.conversion.report.gguf_side_files`) are each written to a temporary sibling and
    renamed into place as one group once all three are complete (:func:`~adaconvert.io.atomic.atomic_output_files`);
    whatever is refused (options, architecture, module names, q8_0 shapes) leaves nothing.

    Args:
        src: adapter directory or Hub repo id.
        dst: the ``.gguf`` file to write; neither it nor its side files may exist unless ``overwrite``.
        base: base model directory or Hub id whose ``config.json`` gives the architecture and heads; default the
            adapter's ``base_model_name_or_path``.
        outtype: ``f32``, ``f16``, ``bf16`` or ``q8_0`` (blocks of 32 along each row: every rank and input width
            must be a multiple of 32). The report measures errors in the float type (float32 for q8_0).
        max_rank, energy, tol: rank compression, as in :func:`~adaconvert.conversion.peft_lora.to_lora`.
        overwrite: replace existing outputs.
        progress: a progress bar on stderr while tensors are written.

    Returns:
        The :class:`ConversionReport` (also written as ``NAME.report.json``); ``bytes_after`` is the file's size.

    Raises:
        AdaconvertError subclasses: source or base problems, unsupported architecture or module, q8_0 on a shape
        it cannot quantise (``AdapterShapeError``), ``OutputExistsError``.

    Example:
        >>> report = to_gguf("runs/adalora", "runs/adalora.gguf", base="models/llama", outtype="f16")
        >>> report.layout
        'gguf'
    """
    dst = Path(dst)
    if dst.suffix != ".gguf":
        raise InvalidConfigError("the output must be a .gguf file", path=dst)
    if outtype not in OUTTYPES:
        raise InvalidConfigError(f"--outtype must be one of {', '.join(OUTTYPES)}, got {outtype!r}")
    outputs = (dst, *gguf_side_files(dst))
    for path in outputs:
        check_output(path, overwrite=overwrite, inputs=[src])
    prepared = prepare_conversion(src, max_rank=max_rank, energy=energy, tol=tol, dtype=_REPORT_DTYPES[outtype])
    adapter = prepared.adapter
    base = base if base is not None else adapter.base_model
    if not base:
        raise InvalidConfigError("no --base given and the adapter names no base_model_name_or_path", path=src)
    gbase = load_gguf_base(base)
    report = prepared.report(dst, layout="gguf")
    report.dtype = outtype
    # the GGUF, then its report and card, published as one group: two runs into one directory never mix their files
    with atomic_output_files(outputs, overwrite=overwrite, inputs=[src]) as (gguf_tmp, report_tmp, card_tmp):
        write_gguf_lora(adapter, gguf_tmp, base=gbase, outtype=outtype, name=dst.stem, progress=progress)
        prepared.verify()  # the value checks ran while the output was written
        report.bytes_after = gguf_tmp.stat().st_size
        report_tmp.write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
        card_tmp.write_text(gguf_card(report, dst.name, base_model=str(base), arch=gbase.arch), encoding="utf-8")
    logger.info("wrote %s: %d modules, max rank %d, %s", dst, len(adapter.deltas), adapter.max_rank, outtype)
    return report
