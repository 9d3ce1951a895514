"""The conversion pipeline every export verb shares.

Read → strip → compress happen once, in :func:`prepare_conversion`; each export (``peft_lora``, ``gguf``,
``mlx_lm`` beside this module) then writes its own format inside an atomic output and finishes with the report
and card.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from adaconvert.adapter import Adapter, output_dtype
from adaconvert.compat.vllm import check_bucket
from adaconvert.constants import CARD_NAME, CONVERSION_REPORT_NAME
from adaconvert.conversion.report import ConversionReport, build_report
from adaconvert.errors import InvalidConfigError, NonFiniteError
from adaconvert.readers import read_adapter
from adaconvert.transforms import compress_ranks, strip_empty

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prepared:
    """What the shared steps produce, ready for a format writer.

    Attributes:
        source: the reader's output, before any transform (the checkpoint as saved).
        exact: ``strip_empty(source)``: the same ΔW per module, zero components and empty modules removed.
        adapter: what is to be written: ``exact``, compressed if asked (float32 factors, scaling folded in).
        out_dtype: the dtype the writer casts every tensor to.

    The source's value checks may still be running (they are left to run while the output is written when nothing
    before the write needs them): an export calls :meth:`verify` before its output is published.
    """

    source: Adapter
    exact: Adapter
    adapter: Adapter
    out_dtype: torch.dtype

    def verify(self) -> None:
        """Wait for the source's value checks; ``NonFiniteError`` if it holds NaN or Inf or a fold overflows."""
        self.source.verify()

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
    output_dtype(dtype)


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
        :class:`Prepared`; without compression options ``adapter`` computes exactly the source's ΔW. Its value
        checks may still run: call ``verify()`` before publishing what was made from it.

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
    # the value checks (one pass over all the data) run while the output is written, unless the compression's SVD
    # or a cast's range check needs them first
    source = read_adapter(src, defer_checks=True)
    out_dtype = output_dtype(dtype) or getattr(torch, source.provenance.get("dtype", "float32"))
    if compressing or out_dtype != torch.float32:
        source.verify()
    exact = adapter = strip_empty(source)
    if compressing:
        adapter = strip_empty(compress_ranks(adapter, max_rank=limit, energy=energy, tol=tol))
    if not adapter.deltas:
        raise InvalidConfigError("every module is empty (rank 0 or all-zero weights); nothing to write", path=src)
    _check_fits(adapter, out_dtype, src)
    return Prepared(source=source, exact=exact, adapter=adapter, out_dtype=out_dtype)


def write_report_and_card(directory: str | Path, report: ConversionReport, card: str) -> None:
    """``conversion_report.json`` and ``README.md`` (the card) into ``directory`` (a temporary output)."""
    directory = Path(directory)
    (directory / CONVERSION_REPORT_NAME).write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
    (directory / CARD_NAME).write_text(card, encoding="utf-8")


def _check_fits(adapter: Adapter, dtype: torch.dtype, src) -> None:
    """Every factor must stay finite in the output dtype: float16 tops out at 65504, and a large scaling folded
    into B can pass it (the file would hold Inf, which PEFT and vLLM load without a word)."""
    limit = torch.finfo(dtype).max
    if limit >= torch.finfo(torch.float32).max:
        return  # the readers checked the folded float32 factors already
    for module, delta in adapter.deltas.items():
        if delta.bound is not None and delta.bound <= limit:
            continue  # the reader's bound on every entry (bfloat16's limit is just below float32's)
        for part, tensor in (("lora_A", delta.factor("A").whole()), ("lora_B", delta.factor("B").whole())):
            if tensor.numel() and max(-tensor.min().item(), tensor.max().item()) > limit:
                raise NonFiniteError(
                    f"{part} (scaling folded in) exceeds {str(dtype).removeprefix('torch.')}'s largest value "
                    f"{limit:.4g}; write float32 or bfloat16 instead",
                    path=src,
                    module=module,
                )
