"""The conversion pipeline every export verb shares, and ``to_lora`` (a PEFT LoRA directory) on top of it.

Read → strip → compress happen once, in :func:`prepare_conversion`; each verb (``to_lora`` here, the GGUF and
MLX exports elsewhere) then writes its own format inside an atomic output and finishes with the report and card.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from adaconvert.adapter import Adapter
from adaconvert.card import conversion_card
from adaconvert.constants import CARD_NAME, CONVERSION_REPORT_NAME
from adaconvert.errors import InvalidConfigError, NonFiniteError, RankLimitError
from adaconvert.io.atomic import atomic_output_dir, check_output
from adaconvert.readers import read_adapter
from adaconvert.report import ConversionReport, build_report
from adaconvert.runtimes import check_runtimes, runtimes_dict
from adaconvert.transforms import compress_ranks, padding_params, strip_empty, uniform_modules
from adaconvert.vllm_compat import check_bucket, require_vllm_compat
from adaconvert.writers import LAYOUTS, write_peft_lora

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Prepared:
    """What the shared steps produce, ready for a format writer.

    Attributes:
        source: the reader's output, before any transform (the checkpoint as saved).
        exact: ``strip_empty(source)``: the same ΔW per module, zero components and empty modules removed.
        adapter: what is to be written: ``exact``, compressed if asked (float32 factors, scaling folded in).
        out_dtype: the dtype the writer casts every tensor to.
    """

    source: Adapter
    exact: Adapter
    adapter: Adapter
    out_dtype: torch.dtype

    def report(self, destination: str | Path, *, layout: str = "compact", overhead_params: int = 0):
        """The :class:`ConversionReport` of writing ``self.adapter`` to ``destination``.

        Args:
            layout: the name of the layout written, for the report and the card.
            overhead_params: zero parameters the layout adds on disk (padding), reported against compact.
        """
        return build_report(
            self.source,
            self.exact,
            self.adapter,
            dtype=self.out_dtype,
            destination=str(destination),
            layout=layout,
            overhead_params=overhead_params,
        )


def check_options(
    *,
    max_rank: int | None = None,
    energy: float | None = None,
    tol: float | None = None,
    vllm_max_lora_rank: int | None = None,
    dtype: str | None = None,
) -> None:
    """Reject bad compression / dtype options before any work (one line naming the option).

    Raises:
        InvalidConfigError: an option is out of range, or the vLLM bucket is not one vLLM accepts.
    """
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


def prepare_conversion(
    src: str | Path,
    *,
    max_rank: int | None = None,
    energy: float | None = None,
    tol: float | None = None,
    cap: int | None = None,
    dtype: str | None = None,
) -> Prepared:
    """Read ``src``, fold every scaling into B, strip empty components and modules, compress if asked.

    Args:
        src: adapter directory or Hub repo id (AdaLoRA, LoRA incl. rsLoRA and patterns, LoRA-Drop output).
        max_rank: cap every module's rank (best approximation, through the factors' SVD).
        energy: keep singular values up to this fraction of each module's energy Σs².
        tol: keep the smallest rank whose relative Frobenius error is at most ``tol``.
        cap: a target runtime's rank limit (vLLM's bucket); applied with ``max_rank`` only when a compression
            option is given (alone, the caller checks it and refuses larger ranks).
        dtype: ``float32``, ``float16`` or ``bfloat16``; default the source's dtype.

    Returns:
        :class:`Prepared`; without compression options ``adapter`` computes exactly the source's ΔW.

    Raises:
        InvalidConfigError: bad option, or every module is empty; source errors from the readers.

    Example:
        >>> p = prepare_conversion("runs/adalora", max_rank=16)
        >>> p.adapter.max_rank <= 16
        True
    """
    check_options(max_rank=max_rank, energy=energy, tol=tol, dtype=dtype)
    compressing = any(x is not None for x in (max_rank, energy, tol))
    limit = min((x for x in (max_rank, cap if compressing else None) if x is not None), default=None)
    source = read_adapter(src)
    exact = adapter = strip_empty(source)
    if compressing:
        adapter = strip_empty(compress_ranks(adapter, max_rank=limit, energy=energy, tol=tol))
    if not adapter.deltas:
        raise InvalidConfigError("every module is empty (rank 0 or all-zero weights); nothing to write", path=src)
    out_dtype = DTYPES[dtype] if dtype else getattr(torch, source.provenance.get("dtype", "float32"))
    _check_fits(adapter, out_dtype, src)
    return Prepared(source=source, exact=exact, adapter=adapter, out_dtype=out_dtype)


def write_report_and_card(directory: str | Path, report: ConversionReport, card: str) -> None:
    """``conversion_report.json`` and ``README.md`` (the card) into ``directory`` (a temporary output)."""
    directory = Path(directory)
    (directory / CONVERSION_REPORT_NAME).write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
    (directory / CARD_NAME).write_text(card, encoding="utf-8")


def to_lora(
    src: str | Path,
    dst: str | Path,
    *,
    max_rank: int | None = None,
    energy: float | None = None,
    tol: float | None = None,
    vllm_max_lora_rank: int | None = None,
    dtype: str | None = None,
    layout: str = "compact",
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
        layout: ``compact`` (each module at its own rank, through ``rank_pattern``/``alpha_pattern``: smallest,
            exact in PEFT and vLLM) or ``uniform`` (every module zero-padded to the max rank R, no patterns,
            ``lora_alpha = r = R``: exact in every runtime that reads one ``r``, e.g. llama.cpp, SGLang, LoRAX).
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
    check_options(vllm_max_lora_rank=vllm_max_lora_rank)
    check_layout(layout)
    prepared = prepare_conversion(src, max_rank=max_rank, energy=energy, tol=tol, cap=vllm_max_lora_rank, dtype=dtype)
    adapter = prepared.adapter
    if vllm_max_lora_rank is not None:
        _check_rank_limit(adapter.ranks, vllm_max_lora_rank, src)
    overhead = 0
    if layout == "uniform":
        overhead = padding_params(adapter, uniform_modules(adapter, prepared.source), adapter.max_rank)
    report = prepared.report(dst, layout=layout, overhead_params=overhead)
    with atomic_output_dir(dst, overwrite=overwrite, inputs=[src]) as tmp:
        write_peft_lora(adapter, tmp, dtype=prepared.out_dtype, layout=layout, fill_from=prepared.source)
        # docs/design.md §4, checked on the files as written: nothing vLLM would reject gets renamed into place.
        # Without --vllm-max-lora-rank a rank above every bucket is only a warning (PEFT still loads it).
        warn_only = ("max-lora-rank",) if vllm_max_lora_rank is None else ()
        require_vllm_compat(tmp, max_lora_rank=vllm_max_lora_rank, what="the conversion", warn_only=warn_only)
        report.runtimes = runtimes_dict(check_runtimes(tmp))
        card = conversion_card(report, base_model=adapter.base_model, task_type=adapter.task_type)
        write_report_and_card(tmp, report, card)
    logger.info("wrote %s: %d modules, max rank %d", dst, len(adapter.deltas), adapter.max_rank)
    return report


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise InvalidConfigError(f"--layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")


def _check_fits(adapter: Adapter, dtype: torch.dtype, src) -> None:
    """Every factor must stay finite in the output dtype: float16 tops out at 65504, and a large scaling folded
    into B can pass it (the file would hold Inf, which PEFT and vLLM load without a word)."""
    limit = torch.finfo(dtype).max
    if limit >= torch.finfo(torch.float32).max:
        return  # the readers checked the folded float32 factors already (bfloat16 has float32's range)
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
