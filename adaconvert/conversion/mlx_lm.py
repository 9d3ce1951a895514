"""``to_mlx``: any supported adapter → an mlx-lm adapter directory (the uniform layout, transposed)."""

from __future__ import annotations

import logging
from pathlib import Path

from adaconvert.compat.runtimes import check_runtimes, runtimes_dict
from adaconvert.conversion.card import conversion_card
from adaconvert.conversion.pipeline import prepare_conversion, write_report_and_card
from adaconvert.conversion.report import ConversionReport
from adaconvert.errors import AdaconvertError, InvalidConfigError
from adaconvert.io.atomic import atomic_output_dir, check_output
from adaconvert.io.source import read_model_config
from adaconvert.writers.mlx_lm import plan_mlx, write_mlx_adapter

logger = logging.getLogger(__name__)


def to_mlx(
    src: str | Path,
    dst: str | Path,
    *,
    base: str | Path | None = None,
    max_rank: int | None = None,
    energy: float | None = None,
    tol: float | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
) -> ConversionReport:
    """Convert an AdaLoRA / LoRA / LoRA-Drop adapter into an mlx-lm adapter directory.

    mlx-lm has one rank and one scale per adapter: every module of every block is written at the max rank R
    (zero-padded; zeros for modules the adapter lacks), ``lora_a`` = Aᵀ (in, R), ``lora_b`` = Bᵀ (R, out), with
    ``scale`` 1 (every scaling is folded into B). ``dst`` gets adapters.safetensors, adapter_config.json,
    README.md and conversion_report.json, atomically. Load it with ``mlx_lm.load(BASE, adapter_path=dst)``.

    Args:
        src: adapter directory or Hub repo id.
        dst: output directory; must not exist unless ``overwrite``.
        base: the base model (directory or Hub id; only its config.json is read) for its number of blocks,
            ``num_layers``. Default: the adapter's ``base_model_name_or_path`` if its config can be read, else the
            highest block the adapter touches (mlx-lm then refuses the load if the base has more blocks).
        max_rank, energy, tol: compression, as for :func:`~adaconvert.conversion.peft_lora.to_lora`.
        dtype: ``float32``, ``float16`` or ``bfloat16``; default the source's dtype.
        overwrite: replace an existing ``dst``.

    Returns:
        The :class:`ConversionReport` (``layout`` ``mlx``; ``layout_overhead_params`` counts the padding zeros).

    Raises:
        InvalidConfigError: a module mlx-lm cannot represent (lm_head, embeddings, Conv1D / fan_in_fan_out),
            named; the base config has fewer blocks than the adapter. Source errors as for ``to_lora``.
        SourceNotFoundError: ``base`` was given and has no readable config.
        OutputExistsError: ``dst`` exists and ``overwrite`` is false.

    Example:
        >>> report = to_mlx("runs/adalora", "runs/adalora-mlx", base="meta-llama/Llama-3.2-1B")
        >>> report.layout
        'mlx'
    """
    dst = check_output(dst, overwrite=overwrite)
    prepared = prepare_conversion(src, max_rank=max_rank, energy=energy, tol=tol, dtype=dtype)
    plan = plan_mlx(prepared.source, num_layers=_num_layers(base, prepared.source.base_model), path=src)
    adapter = prepared.adapter
    overhead = plan.params(adapter.max_rank) - adapter.num_params
    report = prepared.report(dst, layout="mlx", overhead_params=overhead)
    with atomic_output_dir(dst, overwrite=overwrite) as tmp:
        write_mlx_adapter(adapter, plan, tmp, dtype=prepared.out_dtype)
        prepared.verify()  # the value checks ran while the output was written
        report.runtimes = runtimes_dict(check_runtimes(tmp))
        write_report_and_card(tmp, report, conversion_card(report, base_model=prepared.adapter.base_model))
    logger.info("wrote %s: %d blocks × %d keys at rank %d", dst, plan.num_layers, len(plan.keys), adapter.max_rank)
    return report


def _num_layers(base, adapter_base: str | None) -> int | None:
    """``num_hidden_layers`` of ``base`` (an error if it cannot be read), else of the adapter's base model if its
    config can be read, else None. Only config.json is read (a Hub id downloads that file alone)."""
    if base is None and not adapter_base:
        return None
    try:
        config, path = read_model_config(base or adapter_base)
    except AdaconvertError:
        if base is not None:
            raise
        logger.warning("base config %s not readable: num_layers from the adapter's own blocks", adapter_base)
        return None
    text = config.get("text_config") or config  # multimodal: the language model's blocks
    # transformers' names for it (GPT-2 style configs say n_layer)
    layers = next((text[k] for k in ("num_hidden_layers", "n_layer", "num_layers") if k in text), None)
    if not isinstance(layers, int):
        raise InvalidConfigError("the base config has no num_hidden_layers", path=path)
    return layers
