"""``to_lora``: any supported adapter → the safe export layout of a rank-varying PEFT LoRA."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from adaconvert.card import conversion_card
from adaconvert.errors import InvalidConfigError, NonFiniteError, RankLimitError
from adaconvert.io.atomic import atomic_output_dir, check_output
from adaconvert.readers import read_adapter
from adaconvert.report import REPORT_NAME, ConversionReport, build_report
from adaconvert.transforms import compress_ranks, strip_empty
from adaconvert.vllm_compat import check_bucket, require_vllm_compat
from adaconvert.writers import write_peft_lora

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def to_lora(
    src: str | Path,
    dst: str | Path,
    *,
    max_rank: int | None = None,
    energy: float | None = None,
    tol: float | None = None,
    vllm_max_lora_rank: int | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
) -> ConversionReport:
    """Convert an AdaLoRA / LoRA / LoRA-Drop adapter into a rank-varying LoRA that PEFT and vLLM load.

    Reads ``src`` (directory or Hub id), folds every scaling into B, strips empty components and modules,
    optionally compresses ranks, and writes ``dst`` atomically: adapter_config.json, adapter_model.safetensors,
    README.md and conversion_report.json. Without compression options the result is exact (up to the dtype).

    Args:
        src: adapter directory or Hub repo id.
        dst: output directory; must not exist unless ``overwrite``.
        max_rank: cap every module's rank (best approximation, through the factors' SVD).
        energy: keep singular values up to this fraction of each module's energy Σs².
        tol: keep the smallest rank whose relative Frobenius error is at most ``tol``.
        vllm_max_lora_rank: a vLLM bucket (1, 8, 16, 32, 64, ...) every module must fit; with a compression
            option the ranks are capped to it, without one a larger rank is an error.
        dtype: ``float32``, ``float16`` or ``bfloat16``; default the source's dtype. Math is float32.
        overwrite: replace an existing ``dst``.

    Returns:
        The :class:`ConversionReport` (also written as ``conversion_report.json``).

    Raises:
        AdaconvertError subclasses: source problems, ``RankLimitError``, ``OutputExistsError``.

    Example:
        >>> report = to_lora("runs/adalora", "runs/adalora-lora", vllm_max_lora_rank=16, max_rank=16)
        >>> report.vllm_max_lora_rank
        16
    """
    dst = check_output(dst, overwrite=overwrite, inputs=[src])
    compressing = any(x is not None for x in (max_rank, energy, tol))
    _check_options(max_rank=max_rank, energy=energy, tol=tol, vllm_max_lora_rank=vllm_max_lora_rank, dtype=dtype)
    cap = min((x for x in (max_rank, vllm_max_lora_rank if compressing else None) if x is not None), default=None)

    source = read_adapter(src)
    exact = adapter = strip_empty(source)
    if compressing:
        adapter = strip_empty(compress_ranks(adapter, max_rank=cap, energy=energy, tol=tol))
    if not adapter.deltas:
        raise InvalidConfigError("every module is empty (rank 0 or all-zero weights); nothing to write", path=src)
    if vllm_max_lora_rank is not None:
        _check_rank_limit(adapter.ranks, vllm_max_lora_rank, src)
    out_dtype = DTYPES[dtype] if dtype else getattr(torch, source.provenance.get("dtype", "float32"))
    _check_fits(adapter, out_dtype, src)
    report = build_report(source, exact, adapter, dtype=out_dtype, destination=str(dst))
    with atomic_output_dir(dst, overwrite=overwrite, inputs=[src]) as tmp:
        write_peft_lora(adapter, tmp, dtype=out_dtype)
        (tmp / REPORT_NAME).write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
        (tmp / "README.md").write_text(conversion_card(report, base_model=adapter.base_model), encoding="utf-8")
        # docs/design.md §4, checked on the files as written: nothing vLLM would reject gets renamed into place.
        # Without --vllm-max-lora-rank a rank above every bucket is only a warning (PEFT still loads it).
        warn_only = ("max-lora-rank",) if vllm_max_lora_rank is None else ()
        require_vllm_compat(tmp, max_lora_rank=vllm_max_lora_rank, what="the conversion", warn_only=warn_only)
    logger.info("wrote %s: %d modules, max rank %d", dst, len(adapter.deltas), adapter.max_rank)
    return report


def _check_options(*, max_rank, energy, tol, vllm_max_lora_rank, dtype) -> None:
    if max_rank is not None and max_rank < 1:
        raise InvalidConfigError(f"--max-rank must be at least 1, got {max_rank}")
    if energy is not None and not 0 < energy <= 1:
        raise InvalidConfigError(f"--energy must be in (0, 1], got {energy}")
    if tol is not None and not 0 <= tol < 1:
        raise InvalidConfigError(f"--tol must be in [0, 1), got {tol}")
    if vllm_max_lora_rank is not None:
        check_bucket(vllm_max_lora_rank)
    if dtype is not None and dtype not in DTYPES:
        raise InvalidConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")


def _check_fits(adapter, dtype: torch.dtype, src) -> None:
    """Every factor must stay finite in the output dtype: float16 tops out at 65504, and a large scaling folded
    into B can pass it (the file would hold Inf, which PEFT and vLLM load without a word)."""
    limit = torch.finfo(dtype).max
    for module, delta in adapter.deltas.items():
        for part, tensor in (("lora_A", delta.A), ("lora_B", delta.B)):
            if tensor.numel() and max(-tensor.min().item(), tensor.max().item()) > limit:
                raise NonFiniteError(
                    f"{part} (scaling folded in) exceeds {str(dtype).removeprefix('torch.')}'s largest value "
                    f"{limit:.4g}; write float32 or bfloat16 instead",
                    path=src,
                    module=module,
                )


def _check_rank_limit(ranks: dict[str, int], limit: int, src) -> None:
    over = {name: r for name, r in ranks.items() if r > limit}
    if over:
        worst = max(over, key=over.get)
        raise RankLimitError(
            f"{len(over)} module(s) exceed vLLM max_lora_rank {limit} (largest: {worst} with rank {over[worst]}); "
            "add --max-rank, --energy or --tol to compress, or use a larger bucket",
            path=src,
            expected=limit,
            actual=over,
        )
