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
def block_magnitude_bits(bits, blocksize, out):
    """``out[b] = max(bits[j] & mask)`` over block b: the bit pattern of the block's largest magnitude.

    Args:
        bits: (blocks · blocksize,) the weight's bits as signed integers of its width (int16 for float16 /
            bfloat16, int32 for float32); ``mask`` clears the sign. For IEEE floats of one sign the order of the
            bit patterns is the order of the values, so this is max |x|, exactly, in the integers (which the
            compiler vectorises, unlike a float max that must respect NaN); NaN and Inf come out as patterns at or
            above the exponent mask, for the caller to find.
        out: (blocks,) of ``bits``' dtype.
    """
    mask = (1 << (bits.itemsize * 8 - 1)) - 1
    for b in range(out.shape[0]):
        m = 0
        for j in range(b * blocksize, (b + 1) * blocksize):
            v = bits[j] & mask
            m = v if v > m else m
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


@numba.njit(nogil=True, cache=True)
def requantize_blocks(x, blocksize, absmax, scales, bounds, values, out):
    """``out[j] = values[rank(x[j] · (1 / absmax[b]))] · scales[b]``: quantise and dequantise in one pass.

    Args:
        x, blocksize, absmax, bounds: as :func:`quantize_blocks`.
        scales: (blocks,) float32, the scale dequantisation multiplies by (absmax, or its double-quantised value).
        values: (16,) float32, the code book in rank order (``code[order]``).
        out: (blocks · blocksize,) float32, written (it may be ``x``): code value × scale, bitsandbytes' float32
            product.
    """
    ranks = np.empty(blocksize, np.int32)
    for b in range(absmax.shape[0]):
        start = b * blocksize
        _ranks(x, start, np.float32(1.0) / max(absmax[b], np.float32(1e-38)), bounds, ranks)
        s = scales[b]
        for j in range(blocksize):
            out[start + j] = values[ranks[j]] * s
