"""bitsandbytes' CPU 4-bit quantisation (NF4 / FP4 codes and block scales), bit for bit, many times faster.

bitsandbytes 0.50 quantises on CPU with its ``default`` kernel (``backends/default/ops.py``, ``quantize_4bit``):
per block of ``blocksize`` elements of the flattened weight, ``absmax = max |x|``, ``scaled = clamp(x · (1 /
max(absmax, 1e-38)), -1, 1)``, and the code is ``bucketize(scaled, midpoints)``: the number of midpoints between
consecutive code values that are strictly below ``scaled`` (FP4 then maps that rank through its code order).
In torch that is a dozen passes over the weight and a binary search per element: most of a requantised merge.

Here the same arithmetic runs in compiled loops (``_fourbit_kernels``, numba): one pass for the block scales, one
for the codes, or, for a round trip, one that goes from the weight straight to code value × scale, with no codes
stored. The scales are the same float32 numbers, the scaled values bitsandbytes' own float32 products, and the rank
the same count of midpoints below; the weight is processed in chunks that stay in the CPU's caches, in several
threads. ``tests/test_qlora.py::test_our_4bit_quantisation_is_bitsandbytes`` holds the codes, the statistics and the
dequantised weights equal to bitsandbytes' ``quantize_4bit`` and ``dequantize_4bit``, values on the midpoints
included.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

_CHUNK = 1 << 16  # elements per step: a float32 chunk (256 KiB) stays in L2 between the conversion and the loop


# bitsandbytes' 4-bit code books (``bitsandbytes.functional.get_4bit_type``, before its division by the largest
# magnitude): NF4 from the QLoRA paper, FP4 by code. Held here, like the 8-bit dynamic map below, so that a merge
# need not import bitsandbytes, whose import sets up ``torch.compile`` (measured 4.6 s); tests/test_qlora.py
# asserts both are bitsandbytes' own.
_CODE_BOOKS = {
    "nf4": [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
            0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023,
            1.0],
    "fp4": [0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0],
}  # fmt: skip


@functools.cache
def code_book(quant_type: str) -> torch.Tensor:
    """(16,) float32: the value of each 4-bit code, as ``bitsandbytes.functional.get_4bit_type`` makes it."""
    book = torch.tensor(_CODE_BOOKS[quant_type])
    return book.div_(book.abs().max())


@functools.cache
def _tables(quant_type: str):
    """(midpoints (15,) float32, code order (16,) uint8, code values in rank order (16,) float32): the code values
    sorted, and the midpoints between neighbours, as bitsandbytes' ``_get_4bit_quantize_bounds`` computes them."""
    book = code_book(quant_type)
    order = torch.argsort(book)
    bounds = (book[order[:-1]] + book[order[1:]]) / 2
    return bounds, order.to(torch.uint8), book[order].contiguous()


@functools.cache
def dynamic_map() -> torch.Tensor:
    """(256,) float32: bitsandbytes' signed 8-bit dynamic map (``create_dynamic_map()``), which double quantisation
    quantises the block scales to. For each exponent e = 0..6, the 2^e means of neighbouring points of
    ``linspace(0.1, 1, 2^e + 1)`` (float32) times 10^(e - 6), with both signs; then 0 and 1; sorted."""
    data = []
    for e in range(7):
        edges = torch.linspace(0.1, 1, 2**e + 1, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0
        data += (10 ** (e - 6) * means).tolist() + (-(10 ** (e - 6)) * means).tolist()
    data += [0, 1.0]
    return torch.tensor(sorted(data), dtype=torch.float32)


def double_quantized(absmax: torch.Tensor, *, threads: int = 1) -> torch.Tensor:
    """The block scales as a double-quantised 4-bit layer dequantises them: ``dequantize_blockwise(
    quantize_blockwise(absmax - mean, blocksize=256)) + mean`` (``quantize_4bit(compress_statistics=True)``, then
    ``dequantize_4bit``), through bitsandbytes' own CPU kernels, called in its native library directly.

    Args:
        absmax: (blocks,) float32.
        threads: threads sharing the work, in chunks of whole blocks of 256 (each block is quantised on its own).

    Returns:
        (blocks,) float32.
    """
    offset = absmax.mean()
    centred = (absmax - offset).contiguous()
    lib = _native_library()
    if lib is None:  # no such library file or functions: bitsandbytes' Python API (a slower import)
        import bitsandbytes.functional as F

        return F.dequantize_blockwise(*F.quantize_blockwise(centred, blocksize=256)) + offset
    code, n = dynamic_map(), centred.numel()
    codes = torch.empty(n, dtype=torch.uint8)
    scales = torch.empty(-(-n // 256), dtype=torch.float32)
    out = torch.empty(n, dtype=torch.float32)

    def run(start: int, stop: int, _buffer) -> None:  # (ctypes releases the GIL during each call)
        x, c, s, o = centred[start:stop], codes[start:stop], scales[start // 256 :], out[start:stop]
        lib.cquantize_blockwise_cpu_fp32(code.data_ptr(), x.data_ptr(), s.data_ptr(), c.data_ptr(), 256, stop - start)
        lib.cdequantize_blockwise_cpu_fp32(
            code.data_ptr(), c.data_ptr(), s.data_ptr(), o.data_ptr(), 256, stop - start
        )

    _in_chunks(run, n, 256, threads, buffer=False)
    return out + offset


@functools.cache
def _native_library():
    """bitsandbytes' CPU library, loaded with ctypes without importing the package (as its ``cextension`` loads
    it); None when it or its blockwise functions are not there."""
    import ctypes
    import importlib.util
    import sys
    from pathlib import Path

    spec = importlib.util.find_spec("bitsandbytes")  # finds a top-level package without running it
    if spec is None or spec.origin is None:
        return None
    suffix = {"darwin": ".dylib", "win32": ".dll"}.get(sys.platform, ".so")
    try:
        lib = ctypes.CDLL(str(Path(spec.origin).parent / f"libbitsandbytes_cpu{suffix}"))
        functions = (lib.cquantize_blockwise_cpu_fp32, lib.cdequantize_blockwise_cpu_fp32)
    except (OSError, AttributeError):
        return None
    for function in functions:  # (code, A, absmax, out, blocksize, n), as bitsandbytes' CPU backend calls them
        function.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_longlong] * 2
        function.restype = None
    return lib


def block_absmax(weight: torch.Tensor, *, blocksize: int, threads: int = 1) -> torch.Tensor | None:
    """``max |x|`` of each whole block of the flattened ``weight``, as bitsandbytes computes its 4-bit scales.

    Args:
        weight: contiguous float32 / float16 / bfloat16 on the CPU; a last, short block is ignored.

    Returns:
        (numel // blocksize,) float32; None when a block holds NaN or Inf (let bitsandbytes decide those).
    """
    import numpy

    from adaconvert.base._fourbit_kernels import block_magnitude_bits

    flat = weight.reshape(-1)
    full = flat.numel() - flat.numel() % blocksize
    out = torch.empty(full // blocksize, dtype=flat.dtype)
    bits, out_bits = _bits(flat[:full]), _bits(out)
    magnitude = bits.dtype.type(numpy.iinfo(bits.dtype).max >> 1)  # every bit but the sign

    def run(start: int, stop: int, _buffer) -> None:
        block_magnitude_bits(bits[start:stop], blocksize, magnitude, out_bits[start // blocksize : stop // blocksize])

    _in_chunks(run, full, blocksize, threads, buffer=False)
    absmax = out.float()
    return absmax if bool(torch.isfinite(absmax).all()) else None


def quantize_4bit_codes(
    weight: torch.Tensor, *, quant_type: str, blocksize: int, threads: int = 1
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """What ``torch.ops.bitsandbytes.quantize_4bit.default(weight, blocksize, quant_type, torch.uint8)`` returns on
    CPU, bit for bit.

    Args:
        weight: a float32 / float16 / bfloat16 tensor on the CPU, any shape.
        quant_type: ``nf4`` or ``fp4``.
        blocksize: elements per absmax block (bitsandbytes' valid sizes, 32 to 4096).
        threads: threads that share the chunks.

    Returns:
        (packed codes, shape (⌈numel / 2⌉, 1) uint8, two per byte, the first in the high nibble; absmax, float32,
        one per block); None when a block holds NaN or Inf (let bitsandbytes do it).
    """
    from adaconvert.base._fourbit_kernels import quantize_blocks

    flat = weight.contiguous().reshape(-1)
    n = flat.numel()
    full = n - n % blocksize
    absmax = block_absmax(flat, blocksize=blocksize, threads=threads)
    if absmax is None:
        return None
    bounds, order, _ = _tables(quant_type)
    codes = torch.empty(n + n % 2, dtype=torch.uint8)
    b, o, a, c = bounds.numpy(), order.numpy(), absmax.numpy(), codes.numpy()

    def run(start: int, stop: int, buffer) -> None:
        x = _float32(flat, start, stop, buffer)
        quantize_blocks(x, blocksize, a[start // blocksize : stop // blocksize], b, o, c[start:stop])

    _in_chunks(run, full, blocksize, threads)
    if full < n or n % 2:  # the last, short block and the padding: bitsandbytes' own expressions, on a few values
        tail = flat[full:].float()
        scaled = torch.empty(0)
        if full < n:
            am = tail.abs().max().clamp(min=1e-38)
            absmax = torch.cat([absmax, am.view(1)])
            scaled = torch.clamp(tail / am, -1, 1)
        if n % 2:
            scaled = torch.nn.functional.pad(scaled, (0, 1))
        q = torch.bucketize(scaled, bounds, out_int32=True)
        codes[full:] = (order[q] if quant_type != "nf4" else q).to(torch.uint8)
    return ((codes[::2] << 4) | codes[1::2]).unsqueeze(1), absmax


def dequantized_4bit(
    weight: torch.Tensor,
    absmax: torch.Tensor,
    scales: torch.Tensor,
    *,
    quant_type: str,
    blocksize: int,
    threads: int = 1,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``dequantize_4bit(quantize_4bit(weight))`` for a weight of whole blocks, without storing a code: each
    element's code value (bitsandbytes' rank of x · (1 / absmax)) times its block's scale, in float32, rounded once
    to ``weight``'s dtype, as bitsandbytes' dequantisation computes it (and CUDA's kernel: the code book value
    times the block's absmax, then the cast).

    Args:
        weight: contiguous, numel a multiple of ``blocksize``; absmax: (numel / blocksize,) float32 from
            :func:`block_absmax`; scales: what dequantisation multiplies by, absmax or its double-quantised value.
        out: where to write the result (default a new tensor); may be ``weight`` itself: each chunk is read
            before it is written.

    Returns:
        ``weight``'s shape and dtype (``out``, if given).
    """
    from adaconvert.base._fourbit_kernels import requantize_bfloat16_blocks, requantize_blocks

    flat = weight.reshape(-1)
    bounds, _, values = _tables(quant_type)
    out = torch.empty_like(flat) if out is None else out.view(-1)
    # tuples, not arrays: the compiled loop holds them in registers (see _code_value)
    b, v = tuple(bounds.numpy()), tuple(values.numpy())
    a, s = absmax.numpy(), scales.float().contiguous().numpy()
    direct = out.dtype == torch.float32

    if flat.dtype == out.dtype == torch.bfloat16:  # bits in, bits out: no float32 copy
        x_bits, out_bits = _bits(flat), _bits(out)

        def run(start: int, stop: int, _buffer) -> None:
            blocks = slice(start // blocksize, stop // blocksize)
            requantize_bfloat16_blocks(x_bits[start:stop], blocksize, a[blocks], s[blocks], b, v, out_bits[start:stop])

        _in_chunks(run, flat.numel(), blocksize, threads, buffer=False)
        return out.view(weight.shape)

    def run(start: int, stop: int, buffer) -> None:
        x = _float32(flat, start, stop, buffer)
        target = out[start:stop].numpy() if direct else x  # in place: each element is read, then written
        blocks = slice(start // blocksize, stop // blocksize)
        requantize_blocks(x, blocksize, a[blocks], s[blocks], b, v, target)
        if not direct:
            out[start:stop].copy_(buffer[: stop - start])  # float32 → float16 / bfloat16, to nearest even

    _in_chunks(run, flat.numel(), blocksize, threads)
    return out.view(weight.shape)


def _bits(flat: torch.Tensor):
    """The memory of a 1-D float tensor as a numpy array of unsigned integers of its width (uint16 / uint32)."""
    return (
        flat.view(torch.int32 if flat.element_size() == 4 else torch.int16)
        .numpy()
        .view("u4" if flat.element_size() == 4 else "u2")
    )


def _float32(flat: torch.Tensor, start: int, stop: int, buffer: torch.Tensor):
    """``flat[start:stop]`` as a float32 numpy array: the tensor's own memory when it is float32, else converted
    (exactly) into ``buffer``."""
    if flat.dtype == torch.float32:
        return flat[start:stop].numpy()
    return buffer[: stop - start].copy_(flat[start:stop]).numpy()


def _in_chunks(run: Callable, n: int, blocksize: int, threads: int, *, buffer: bool = True) -> None:
    """``run(start, stop, buffer)`` over [0, n) in chunks of whole blocks, on up to ``threads`` threads (the loops
    release the GIL); each thread gets a float32 scratch ``buffer`` of a chunk's size (None if not asked)."""
    chunk = max(blocksize, _CHUNK - _CHUNK % blocksize)
    starts = list(range(0, n, chunk))
    parts = max(1, min(threads, len(starts)))

    def part(index: int) -> None:
        scratch = torch.empty(chunk) if buffer else None
        for start in starts[index::parts]:
            run(start, min(n, start + chunk), scratch)

    if parts == 1:
        part(0)
        return
    with ThreadPoolExecutor(parts, thread_name_prefix="adaconvert-quant4") as pool:
        list(pool.map(part, range(parts)))
