"""bitsandbytes' CPU 4-bit quantisation (NF4 / FP4 codes and block scales), bit for bit, several times faster.

bitsandbytes 0.50 quantises on CPU with its ``default`` kernel (``backends/default/ops.py``, ``quantize_4bit``):
per block of ``blocksize`` elements of the flattened weight, ``absmax = max |x|``, ``scaled = clamp(x · (1 /
max(absmax, 1e-38)), -1, 1)``, and the code is ``bucketize(scaled, midpoints)``: the number of midpoints between
consecutive code values that are strictly below ``scaled`` (FP4 then maps that rank through its code order).
``torch.bucketize`` is a binary search per element, about 30 ns each on one core: most of a requantised merge.

Here the same ranks come from a table: [-1, 1] is cut into ``_CELLS`` equal cells, and a cell holds the number of
midpoints surely below any value that lands in it and the one midpoint (at most) that may fall inside, so a rank
is one lookup, one comparison and one addition. The cell of a value is computed in float32 and may be off by a
rounding; each cell's table entries therefore cover its interval widened by ``_MARGIN`` (far above that rounding,
far below the midpoints' spacing), which keeps the count exact. The scaled values are bitsandbytes' own product,
element for element, and the scales the same numbers; blocks are processed in chunks that stay in the CPU's caches,
in several threads. :func:`dequantize_4bit_codes` turns unpacked codes back into weights the way bitsandbytes'
dequantisation does, so that a round trip need not pack the codes and unpack them again.
``tests/test_qlora.py::test_our_4bit_quantisation_is_bitsandbytes`` holds the codes, the statistics and the
dequantised weights equal to bitsandbytes' ``quantize_4bit`` and ``dequantize_4bit``, values on the midpoints
included.
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor

import torch

_CELLS = 1024  # cells over [-1, 1], each 2 / 1024 wide: the closest NF4 / FP4 midpoints are 0.04 apart
_MARGIN = 1e-5  # float32 rounding of the cell position is below 1e-6
_CHUNK = 1 << 16  # elements per step: its float32 buffers (a few × 256 KiB) stay in L2


@functools.cache
def _tables(quant_type: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(midpoints, code order, cell → midpoints below it (uint8), cell → midpoint inside it or +inf), as bitsandbytes
    derives its midpoints (``_get_4bit_quantize_bounds``)."""
    from bitsandbytes.backends.default.ops import _get_4bit_quantize_bounds

    bounds, order = _get_4bit_quantize_bounds(quant_type, torch.device("cpu"))
    edges = torch.arange(_CELLS + 1, dtype=torch.float64) / (_CELLS / 2) - 1  # cell c starts at edges[c]
    low, high = (edges - _MARGIN).view(-1, 1), (edges + 2 / _CELLS + _MARGIN).view(-1, 1)
    b = bounds.double().view(1, -1)
    below = (b < low).sum(1)
    inside = (b >= low) & (b <= high)
    if int(inside.sum(1).max()) > 1:  # cannot happen with the code tables bitsandbytes ships
        raise AssertionError(f"two {quant_type} midpoints in one cell: use more cells")
    threshold = torch.full((_CELLS + 1,), torch.inf)
    for cell, index in inside.nonzero().tolist():
        threshold[cell] = bounds[index]
    return bounds, order.to(torch.uint8), below.to(torch.uint8), threshold


def quantize_4bit_codes(
    weight: torch.Tensor, *, quant_type: str, blocksize: int, threads: int = 1
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """What ``torch.ops.bitsandbytes.quantize_4bit.default(weight, blocksize, quant_type, torch.uint8)`` returns on
    CPU, bit for bit.

    Args:
        weight: a float32 / float16 / bfloat16 tensor on the CPU, any shape.
        quant_type: ``nf4`` or ``fp4``.
        blocksize: elements per absmax block (bitsandbytes' valid sizes, 32 to 4096).
        threads: threads that share the chunks (each runs torch ops on its own buffers).

    Returns:
        (packed codes, shape (⌈numel / 2⌉, 1) uint8, two per byte, the first in the high nibble; absmax, float32,
        one per block); None when a block holds NaN or Inf (no cell to look up: let bitsandbytes do it).
    """
    found = _codes(weight, quant_type=quant_type, blocksize=blocksize, threads=threads)
    if found is None:
        return None
    codes, absmax = found
    return ((codes[::2] << 4) | codes[1::2]).unsqueeze(1), absmax


def dequantize_4bit_codes(
    codes: torch.Tensor, scales: torch.Tensor, *, quant_type: str, blocksize: int, dtype: torch.dtype, threads: int = 1
) -> torch.Tensor:
    """``code[codes] · scales`` per block, computed in float32 and rounded once to ``dtype``: what bitsandbytes'
    4-bit dequantisation computes (and CUDA's kernel: the code book value times the block's absmax, then the cast).

    Args:
        codes: (n,) unpacked uint8 codes, n a multiple of ``blocksize``; scales: (n / blocksize,) float32.

    Returns:
        (n,) tensor of ``dtype``.
    """
    import bitsandbytes.functional as F

    book = F.get_4bit_type(quant_type, device="cpu")
    n = codes.numel()
    out = torch.empty(n, dtype=dtype)
    chunk = max(blocksize, _CHUNK - _CHUNK % blocksize)
    starts = list(range(0, n, chunk))

    def run(part: int) -> None:
        index = torch.empty(chunk, dtype=torch.int32)
        values = torch.empty(chunk)
        for start in starts[part::parts]:
            stop = min(n, start + chunk)
            k = stop - start
            torch.index_select(book, 0, index[:k].copy_(codes[start:stop]), out=values[:k])
            block = scales[start // blocksize : stop // blocksize].view(-1, 1)
            torch.mul(values[:k].view(-1, blocksize), block, out=out[start:stop].view(-1, blocksize))

    parts = max(1, min(threads, len(starts)))
    _each(run, parts)
    return out


def _each(run, parts: int) -> list:
    """``[run(0), ..., run(parts - 1)]``, on ``parts`` threads (each runs torch ops on its own buffers)."""
    if parts == 1:
        return [run(0)]
    with ThreadPoolExecutor(parts, thread_name_prefix="adaconvert-quant4") as pool:
        return list(pool.map(run, range(parts)))


def _codes(
    weight: torch.Tensor, *, quant_type: str, blocksize: int, threads: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(unpacked codes, (⌈numel / 2⌉ · 2,) uint8, an odd count padded with the code of 0.0 as bitsandbytes pads it;
    absmax) of :func:`quantize_4bit_codes`, or None."""
    bounds, order, below, threshold = _tables(quant_type)
    flat = weight.reshape(-1)
    n = flat.numel()
    full = n - n % blocksize
    codes = torch.empty(n + n % 2, dtype=torch.uint8)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32)
    chunk = max(blocksize, _CHUNK - _CHUNK % blocksize)
    starts = list(range(0, full, chunk))
    parts = max(1, min(threads, len(starts)))

    def run(part: int) -> bool:
        x = torch.empty(chunk)
        work = torch.empty(chunk)
        cells = torch.empty(chunk, dtype=torch.int32)
        limits = torch.empty(chunk)
        above = torch.empty(chunk, dtype=torch.bool)
        for start in starts[part::parts]:
            stop = min(full, start + chunk)
            k = stop - start
            xs, ws = x[:k], work[:k]
            xs.copy_(flat[start:stop])
            blocks = xs.view(-1, blocksize)
            scale = absmax[start // blocksize : stop // blocksize]
            # max |x|, bitsandbytes' own expression (a per-block aminmax is 7× slower: measured 1.9 against
            # 0.28 ns per element); NaN propagates, and a block of zeros gets +0.0
            torch.amax(torch.abs(blocks, out=ws.view(-1, blocksize)), dim=-1, out=scale)
            if not bool(torch.isfinite(scale).all()):
                return False
            # bitsandbytes clamps to [-1, 1]; unclamped, |x| · (1 / absmax) exceeds 1 by a rounding at most, which
            # lands in the first or last cell and ranks like ±1 there
            blocks.mul_((1.0 / scale.clamp(min=1e-38)).view(-1, 1))
            torch.mul(xs, _CELLS / 2, out=ws).add_(_CELLS / 2)  # the cell: (x + 1) · _CELLS / 2, truncated below
            cs = cells[:k]
            cs.copy_(ws)
            torch.gt(xs, torch.index_select(threshold, 0, cs, out=limits[:k]), out=above[:k])
            out = codes[start:stop]
            torch.index_select(below, 0, cs, out=out).add_(above[:k])
            if quant_type != "nf4":
                out.copy_(torch.index_select(order, 0, out.int()))
        return True

    if not all(_each(run, parts)):
        return None
    if full < n or n % 2:  # the last, short block and the padding: bitsandbytes' own expressions, on a few values
        tail = flat[full:].float()
        scaled = torch.empty(0)
        if full < n:
            am = tail.abs().max().clamp(min=1e-38)
            absmax[-1] = am
            scaled = torch.clamp(tail / am, -1, 1)
        if n % 2:
            scaled = torch.nn.functional.pad(scaled, (0, 1))
        q = torch.bucketize(scaled, bounds, out_int32=True)
        codes[full:] = (order[q] if quant_type != "nf4" else q).to(torch.uint8)
    return codes, absmax
