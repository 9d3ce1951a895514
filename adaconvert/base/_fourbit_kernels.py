"""The compiled loops of :mod:`adaconvert.base.fourbit` (numba; imported only by its functions).

Each works on one chunk of whole blocks of a flattened weight, in float32 arithmetic as bitsandbytes' CPU kernel
does it, and releases the GIL, so that threads can share a tensor's chunks. ``cache=True`` keeps the machine code
beside this file (or in numba's user cache where that is not writable): only the first run on a machine compiles.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite.binding import ffi


def _no_dunder_functions() -> None:
    """Make llvmlite's ``ffi.lib`` raise AttributeError for dunder names, as any object does.

    It answers every attribute with a native-function wrapper, ``__dict__`` included. vLLM's CPU worker (0.32,
    ``triton_utils/dispatcher.py``, ``_rebind_kernels``) reads ``vars(value).get(...)`` of every module global
    that has a ``__dict__`` when an engine starts, so in any process that imported numba first (as this module
    does: a requantising merge, then validation's vLLM engine, in one process) it failed with
    "'_lib_fn_wrapper' object has no attribute 'get'". No llvmlite function has a dunder name.
    """
    kind = type(ffi.lib)
    functions = kind.__getattr__
    if getattr(functions, "skips_dunders", False):
        return

    def __getattr__(self, name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return functions(self, name)

    __getattr__.skips_dunders = True
    kind.__getattr__ = __getattr__


_no_dunder_functions()


@numba.njit(nogil=True, cache=True)
def block_magnitude_bits(bits, blocksize, magnitude, out):
    """``out[b] = max(bits[j] & magnitude)`` over block b: the bit pattern of the block's largest magnitude.

    Args:
        bits: (blocks · blocksize,) the weight's bits as unsigned integers of its width (uint16 for float16 /
            bfloat16, uint32 for float32); ``magnitude``, of the same type, clears the sign. For IEEE floats of one
            sign the order of the bit patterns is the order of the values, so this is max |x|, exactly, in the
            integers (which the compiler vectorises, unlike a float max that must respect NaN); NaN and Inf come
            out as patterns at or above the exponent mask, for the caller to find.
        out: (blocks,) of ``bits``' dtype.
    """
    # two loops per block, each of a fixed length and in the integers' own width, which the compiler turns into
    # SIMD instructions (measured 0.17 against 0.75 ns per bfloat16 element for one loop doing both)
    scratch = np.empty(blocksize, bits.dtype)
    for b in range(out.shape[0]):
        start = b * blocksize
        for j in range(blocksize):
            scratch[j] = bits[start + j] & magnitude
        m = scratch[0]
        for j in range(blocksize):  # (from 0 again: a loop of 63 would leave a remainder out of the SIMD lanes)
            m = max(m, scratch[j])
        out[b] = m


@numba.njit(inline="always")
def _ranks(x, start, inv, bounds, ranks):
    """``ranks[j]`` = the number of the 15 sorted ``bounds`` strictly below ``x[start + j] · inv``, for j over
    ``ranks``: ``torch.bucketize(x · inv, bounds)`` (a tie with a bound does not count it, ``right=False``).

    Fifteen comparisons summed, not a binary search: with no branch to mispredict the loop runs in SIMD lanes
    (measured 1.6 against 6.2 ns per element for four branchy comparisons, on random weights). bitsandbytes clamps
    x · inv to [-1, 1] first; that changes no rank (every bound lies inside), so it is left out. The product is a
    float32 operation, as bitsandbytes' ``x * (1.0 / absmax)``.
    """
    for j in range(ranks.shape[0]):
        v = x[start + j] * inv
        r = np.int32(0)
        for k in range(15):
            r += np.int32(v > bounds[k])
        ranks[j] = r


@numba.njit(nogil=True, cache=True)
def quantize_blocks(x, blocksize, absmax, bounds, order, codes):
    """``codes[j] = order[rank(x[j] · (1 / max(absmax[b], 1e-38)))]``: bitsandbytes' 4-bit code of each element.

    Args:
        x: (blocks · blocksize,) float32; absmax: (blocks,) float32, each block's max |x|.
        bounds: (15,) float32 midpoints between consecutive code values, sorted; order: (16,) uint8, rank → code.
        codes: (blocks · blocksize,) uint8, written.
    """
    ranks = np.empty(blocksize, np.int32)
    for b in range(absmax.shape[0]):
        start = b * blocksize
        _ranks(x, start, np.float32(1.0) / max(absmax[b], np.float32(1e-38)), bounds, ranks)
        for j in range(blocksize):
            codes[start + j] = order[ranks[j]]


@numba.njit(inline="always")
def _code_value(x, bounds, values):
    """``values[rank]``, rank = the number of the 15 sorted ``bounds`` strictly below ``x`` (as :func:`_ranks`).

    A chain of selects with constant indices into tuples: the code value comes out without a rank or a table
    lookup, so the loop calling this runs in SIMD lanes (measured 1.0 against 3.7 ns per element for ranks summed
    in a loop, then looked up). For sorted bounds the ones below ``x`` are a prefix, and the last select taken is
    the one at its end.

    Args:
        x: float32; bounds: (15,) float32 tuple, sorted; values: (16,) float32 tuple, the code book in rank order.
    """
    v = values[0]
    v = values[1] if x > bounds[0] else v
    v = values[2] if x > bounds[1] else v
    v = values[3] if x > bounds[2] else v
    v = values[4] if x > bounds[3] else v
    v = values[5] if x > bounds[4] else v
    v = values[6] if x > bounds[5] else v
    v = values[7] if x > bounds[6] else v
    v = values[8] if x > bounds[7] else v
    v = values[9] if x > bounds[8] else v
    v = values[10] if x > bounds[9] else v
    v = values[11] if x > bounds[10] else v
    v = values[12] if x > bounds[11] else v
    v = values[13] if x > bounds[12] else v
    v = values[14] if x > bounds[13] else v
    v = values[15] if x > bounds[14] else v
    return v


@numba.njit(nogil=True, cache=True)
def requantize_blocks(x, blocksize, absmax, scales, bounds, values, out):
    """``out[j] = values[rank(x[j] · (1 / absmax[b]))] · scales[b]``: quantise and dequantise in one pass.

    Args:
        x, blocksize, absmax: as :func:`quantize_blocks`.
        scales: (blocks,) float32, the scale dequantisation multiplies by (absmax, or its double-quantised value).
        bounds, values: as :func:`_code_value`.
        out: (blocks · blocksize,) float32, written (it may be ``x``): code value × scale, bitsandbytes' float32
            product.
    """
    for b in range(absmax.shape[0]):
        start = b * blocksize
        inv = np.float32(1.0) / max(absmax[b], np.float32(1e-38))
        s = scales[b]
        for j in range(start, start + blocksize):
            out[j] = _code_value(x[j] * inv, bounds, values) * s


@numba.njit(nogil=True, cache=True)
def requantize_bfloat16_blocks(bits, blocksize, absmax, scales, bounds, values, out):
    """:func:`requantize_blocks` for a bfloat16 weight, read and written as its bits (uint16), with no float32
    copy of it: each element widened exactly to float32 (its bits shifted up), and the float32 product rounded to
    bfloat16 to nearest even, as torch casts it (no NaN or Inf can arise from finite scales).

    Args:
        bits: (blocks · blocksize,) uint16; out: the same, written (it may be ``bits``: each block is read whole
            before it is written).
    """
    wide = np.empty(blocksize, np.uint32)
    product = np.empty(blocksize, np.float32)
    widened, product_bits = wide.view(np.float32), product.view(np.uint32)
    for b in range(absmax.shape[0]):
        start = b * blocksize
        inv = np.float32(1.0) / max(absmax[b], np.float32(1e-38))
        s = scales[b]
        for j in range(blocksize):
            wide[j] = np.uint32(bits[start + j]) << np.uint32(16)
        for j in range(blocksize):
            product[j] = _code_value(widened[j] * inv, bounds, values) * s
        for j in range(blocksize):
            p = product_bits[j]
            rounded = p + np.uint32(0x7FFF) + ((p >> np.uint32(16)) & np.uint32(1))
            out[start + j] = np.uint16(rounded >> np.uint32(16))
