"""bitsandbytes quantisation of a base model (QLoRA), in one place for training and for the QLoRA-faithful merge.

A base loaded through ``BitsAndBytesConfig`` holds dequant(quant(W)), not W: an adapter trained on it learned a
correction to those weights. :func:`requantized` computes exactly what the loaded layer holds, with bitsandbytes'
own functions and the settings its layers use (transformers builds ``Linear4bit`` / ``Linear8bitLt`` from the
config; bitsandbytes quantises the weight when it is placed on its device):

- ``nf4`` / ``fp4``: blocks of 64 consecutive elements of the flattened weight (the ``Params4bit`` default; the
  config cannot change it), one absmax scale per block. With double quantisation the scales are themselves
  quantised, in blocks of 256, after subtracting their mean over the *whole tensor*: a tensor must be quantised
  whole, or chunks would get other scales.
- ``int8`` (LLM.int8()): the weight cast to float16, then one absmax scale per row; dequantised as
  ``CB · SCB / 127`` in float32. Its forward pass also quantises the activations, which no merged float model
  reproduces: merging into the dequantised int8 weights was measured no closer to PEFT on the int8 base than the
  plain merge (max |Δlogit| 0.116 against 0.120, tiny llama), so the merge offers 4-bit requantisation only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from adaconvert.errors import InvalidConfigError, first_line

if TYPE_CHECKING:
    import torch

# torch is imported inside the functions: the training options (and so the CLI) import this table
QUANTIZATIONS = ("nf4", "fp4", "int8")
FOUR_BIT = ("nf4", "fp4")  # what a merge can requantise to (see above)
# what Params4bit uses when, as under transformers, no blocksize is given
BLOCKSIZE_4BIT = 64


def check_bitsandbytes(quantize: str, device: str = "cpu") -> None:
    """Refuse ``quantize`` on a machine where bitsandbytes cannot run it: not installed, or its kernels fail on
    ``device`` (one tiny quantise/dequantise round trip is tried there, through :func:`requantized`: on a CPU our
    compiled 4-bit loops and bitsandbytes' native library, without importing the package).

    Raises:
        InvalidConfigError: an unknown method, bitsandbytes (or, for 4-bit on a CPU, numba) missing, or no working
            kernel on ``device``.
    """
    import importlib.util

    if quantize not in QUANTIZATIONS:
        raise InvalidConfigError(f"quantisation must be one of {', '.join(QUANTIZATIONS)}, got {quantize!r}")
    needed = ["bitsandbytes", *(["numba"] if quantize in FOUR_BIT and device == "cpu" else [])]
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        raise InvalidConfigError(
            f"--quantize {quantize} needs {' and '.join(missing)} (pip install 'adaconvert[qlora]')"
        )
    import torch

    try:
        requantized(torch.ones(2, BLOCKSIZE_4BIT, device=device), quantize, double_quant=True)
    except Exception as exc:  # whatever the native library raises: it cannot run here
        raise InvalidConfigError(
            f"bitsandbytes cannot run {quantize} on {device} here ({type(exc).__name__}: {first_line(exc)})"
        ) from exc


def bnb_config(quantize: str, *, double_quant: bool = True, compute_dtype: torch.dtype | None = None):
    """The ``transformers.BitsAndBytesConfig`` for ``quantize`` (``nf4``, ``fp4`` or ``int8``); 4-bit layers compute
    in ``compute_dtype`` (default float32)."""
    import torch
    from transformers import BitsAndBytesConfig

    if quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantize,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype or torch.float32,
    )


def requantized(
    weight: torch.Tensor,
    quantize: str,
    *,
    double_quant: bool = True,
    transposed: bool = False,
    threads: int = 1,
    in_place: bool = False,
) -> torch.Tensor:
    """dequant(quant(``weight``)): the weights a layer loaded with :func:`bnb_config` holds, as a dense tensor.

    Args:
        weight: a whole (out, in) weight, in the dtype the model is loaded in (4-bit dequantises back to it).
        quantize: ``nf4``, ``fp4`` or ``int8``.
        double_quant: 4-bit only, as ``bnb_4bit_use_double_quant``.
        transposed: ``weight`` is stored (in, out), as GPT-2's Conv1D: transformers quantises its transpose.
        threads: 4-bit on CPU: threads sharing the work (:mod:`adaconvert.base.fourbit`).
        in_place: ``weight`` is not needed afterwards: 4-bit on CPU may write the result into its memory (a
            weight of hundreds of MiB then needs no second buffer of its size).

    Returns:
        ``weight``'s shape; its dtype for 4-bit, float32 for int8 (what bitsandbytes' dequantisation returns).
    """
    import torch

    if transposed:
        return requantized(weight.T, quantize, double_quant=double_quant, threads=threads, in_place=in_place).T
    w = weight.detach()
    owned = in_place or not w.is_contiguous()  # (a copy made here is ours to overwrite)
    w = w.contiguous()
    fast_dtypes = (torch.float32, torch.float16, torch.bfloat16)
    whole_blocks = w.dim() and w.shape[-1] % BLOCKSIZE_4BIT == 0
    if quantize in FOUR_BIT and w.device.type == "cpu" and w.dtype in fast_dtypes and whole_blocks:
        fast = _requantized_4bit(w, quantize, double_quant=double_quant, threads=threads, out=w if owned else None)
        if fast is not None:
            return fast
    import bitsandbytes.functional as F  # (its import sets up torch.compile: seconds, so only when needed)

    if quantize == "int8":
        codes, scales, _ = F.int8_vectorwise_quant(w.to(torch.float16))
        return F.int8_vectorwise_dequant(codes, scales)
    return F.dequantize_4bit(*quantize_4bit(w, quantize, double_quant=double_quant, threads=threads))


def _requantized_4bit(weight: torch.Tensor, quant_type: str, *, double_quant: bool, threads: int, out=None):
    """``dequantize_4bit(*quantize_4bit(weight))`` without codes (:mod:`adaconvert.base.fourbit`): the block scales,
    double-quantised as ``quantize_4bit`` / ``dequantize_4bit`` do, then each code value times its scale, into
    ``out`` if given. Only for rows of whole blocks: bitsandbytes' CPU dequantisation restarts the blocks at each
    row, so elsewhere its own functions decide. None when a block holds NaN or Inf."""
    from adaconvert.base.fourbit import block_absmax, dequantized_4bit, double_quantized

    absmax = block_absmax(weight, blocksize=BLOCKSIZE_4BIT, threads=threads)
    if absmax is None:
        return None
    scales = double_quantized(absmax, threads=threads) if double_quant else absmax
    return dequantized_4bit(
        weight, absmax, scales, quant_type=quant_type, blocksize=BLOCKSIZE_4BIT, threads=threads, out=out
    )


def quantize_4bit(weight: torch.Tensor, quant_type: str, *, double_quant: bool, threads: int = 1):
    """``bitsandbytes.functional.quantize_4bit(weight, blocksize=64, compress_statistics=double_quant,
    quant_type=quant_type)``: the same packed codes and ``QuantState``; on CPU the codes come from
    :func:`~adaconvert.base.fourbit.quantize_4bit_codes` (bitsandbytes' kernel, bit for bit, faster), and the
    statistics are compressed with bitsandbytes' own functions, as ``quantize_4bit`` does.

    Returns:
        (packed uint8 codes, ``QuantState``), what ``bitsandbytes.functional.dequantize_4bit`` takes.
    """
    import bitsandbytes.functional as F
    import torch

    from adaconvert.base.fourbit import quantize_4bit_codes

    fast = None
    if weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.float16, torch.bfloat16):
        fast = quantize_4bit_codes(weight, quant_type=quant_type, blocksize=BLOCKSIZE_4BIT, threads=threads)
    if fast is None:  # another device, or NaN / Inf in the weight: bitsandbytes itself
        return F.quantize_4bit(
            weight, blocksize=BLOCKSIZE_4BIT, compress_statistics=double_quant, quant_type=quant_type
        )
    packed, absmax = fast
    settings = {"shape": weight.shape, "dtype": weight.dtype, "blocksize": BLOCKSIZE_4BIT, "quant_type": quant_type}
    code = F.get_4bit_type(quant_type, device=weight.device)
    if not double_quant:
        return packed, F.QuantState(absmax=absmax, code=code, **settings)
    offset = absmax.mean()
    qabsmax, state2 = F.quantize_blockwise(absmax - offset, blocksize=256)
    return packed, F.QuantState(absmax=qabsmax, code=code, offset=offset, state2=state2, **settings)


def exact_cpu_kernels(model) -> None:
    """Keep bitsandbytes' 4-bit layers of ``model`` on their dequantise-then-matmul path on CPU.

    On CPUs with AVX512-BF16, a ``Linear4bit`` in eval mode without gradients repacks its weight for a bfloat16
    kernel on its first forward pass: measured here 0.04 logits away from the float32 path on a tiny llama, and
    absent on other CPUs, so results would depend on the machine. Training never takes that path; validation and
    LoRA-Drop's scoring (eval mode, no gradients) must not either.
    """
    from bitsandbytes.nn import Linear4bit

    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False
