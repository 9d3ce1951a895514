"""Write a GGUF LoRA adapter for llama.cpp and Ollama, with the ``gguf`` package (llama.cpp's own writer).

The file is what llama.cpp's ``convert_lora_to_gguf.py`` writes for the same adapter, tensor by tensor
(``LoraModel.modify_tensors`` there): ``general.type = adapter``, ``adapter.type = lora``, ``adapter.lora.alpha``,
the base's ``general.architecture``, and for each module the base tensor's GGUF name (gguf's ``TensorNameMap``)
with ``.lora_a`` = A (r_m × in) and ``.lora_b`` = B (out × r_m) — GGUF lists dimensions reversed, so llama.cpp sees
``a->ne = {in, r_m}`` and ``b->ne = {r_m, out}``.

Scale: llama.cpp multiplies each module by ``get_scale`` (``src/llama-adapter.h`` line 55 in llama-cpp-python
0.3.36's vendored llama.cpp): ``alpha ? adapter_scale * alpha / rank : adapter_scale`` with ``rank = b->ne[0]``.
Our scaling is already folded into B, so the adapter is written with ``alpha = 0``: every tensor gets scale exactly
1 (times the user's ``--lora-scaled`` factor) whatever its own rank, and per-module ranks stay compact.

Rotary layout: for llama-family bases the converter permutes the rows of q/k projection weights
(``LlamaModel.permute`` in ``conversion/llama.py``, with ``n_head`` for q and ``n_kv_head`` for k); a LoRA's output
rows are B's rows, so B gets the same permutation (the converter's ``LoraTorchTensor`` does exactly this).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from adaconvert.adapter import Adapter, Factor
from adaconvert.errors import AdapterShapeError, InvalidConfigError

# base config ``model_type`` → (GGUF architecture, rows of q/k permuted). HF Mistral goes through the converter's
# LlamaModel (``conversion/llama.py`` registers MistralForCausalLM): architecture ``llama``, permuted. Qwen2Model
# (``conversion/qwen.py``) keeps the HF row order.
ARCHITECTURES: dict[str, tuple[str, bool]] = {
    "llama": ("LLAMA", True),
    "mistral": ("LLAMA", True),
    "qwen2": ("QWEN2", False),
}
OUTTYPES = ("f32", "f16", "bf16", "q8_0")
# the base tensors a LoRA can adapt in llama.cpp (2-D projections; ``output`` only when it is not tied)
_ADAPTABLE = ("ATTN_Q", "ATTN_K", "ATTN_V", "ATTN_OUT", "FFN_GATE", "FFN_UP", "FFN_DOWN", "OUTPUT")


@dataclass(frozen=True)
class GGUFBase:
    """What the writer needs to know about the base model, from its config alone.

    Attributes:
        model_type: the config's ``model_type`` (``llama``, ``mistral``, ``qwen2``).
        arch: the GGUF architecture name (``general.architecture``; llama.cpp refuses a mismatch with the base).
        n_head, n_kv_head: attention heads and key/value heads (GQA), for the q/k row permutation.
        n_layer: transformer blocks.
        tied_embeddings: ``lm_head`` shares the embedding matrix (no ``output`` tensor in the base GGUF).
    """

    model_type: str
    arch: str
    n_head: int
    n_kv_head: int
    n_layer: int
    tied_embeddings: bool

    @property
    def permute_qk(self) -> bool:
        return ARCHITECTURES[self.model_type][1]


def gguf_base(config, *, path=None) -> GGUFBase:
    """A :class:`GGUFBase` from a transformers config (object or dict).

    Raises:
        InvalidConfigError: the architecture is not one we can name tensors for, or a field is missing.
    """
    get = config.get if isinstance(config, dict) else lambda key, default=None: getattr(config, key, default)
    model_type = get("model_type")
    if model_type not in ARCHITECTURES:
        raise InvalidConfigError(
            f"GGUF export supports the {', '.join(ARCHITECTURES)} architectures; the base is {model_type!r}",
            path=path,
        )
    gguf = _gguf()

    n_head, n_layer = get("num_attention_heads"), get("num_hidden_layers")
    if not n_head or not n_layer:
        raise InvalidConfigError("base config lacks num_attention_heads or num_hidden_layers", path=path)
    return GGUFBase(
        model_type=model_type,
        arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[ARCHITECTURES[model_type][0]]],
        n_head=n_head,
        n_kv_head=get("num_key_value_heads") or n_head,
        n_layer=n_layer,
        tied_embeddings=bool(get("tie_word_embeddings", False)),
    )


def _gguf():
    """The ``gguf`` package, imported without its Mistral tokenizer support.

    ``gguf/__init__`` imports ``gguf.vocab``, which imports ``mistral_common`` when it is installed (vLLM brings it):
    about 0.4 s of OpenCV and pydantic, as long as the rest of an export, for tokenizers an adapter never has.
    ``gguf.vocab`` takes an ImportError as "not installed"; the block lasts for the import only, and only when
    nothing in the process has imported ``mistral_common`` already.
    """
    if "gguf" in sys.modules:
        return sys.modules["gguf"]
    blocked = "mistral_common" not in sys.modules
    if blocked:
        sys.modules["mistral_common"] = None  # an import of it raises ImportError
    try:
        import gguf
    finally:
        if blocked and sys.modules.get("mistral_common", 0) is None:
            del sys.modules["mistral_common"]
    return gguf


def permute_rows(weight: torch.Tensor, n_head: int, n_head_kv: int | None = None) -> torch.Tensor:
    """The row permutation of ``LlamaModel.permute`` (convert_hf_to_gguf's ``conversion/llama.py``), on (out, ·).

    Within each head, HF's rotary layout (first half, second half) becomes llama.cpp's interleaved pairs.
    """
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    per_half = weight.shape[0] // n_head // 2
    return weight.reshape(n_head, 2, per_half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor to write: GGUF name, the adapter module it comes from, and the factor it holds, computed as it is
    written (``data``), one module in memory at a time.

    Attributes:
        heads: ``(n_head, n_head_kv)`` of a q or k ``lora_b``, whose rows are permuted as llama.cpp wants them.
    """

    name: str
    module: str
    factor: Factor
    heads: tuple[int, int | None] | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.factor.shape

    def data(self) -> torch.Tensor:
        """The tensor as llama.cpp wants it, float32."""
        data = self.factor.whole()
        return permute_rows(data, *self.heads) if self.heads else data


def gguf_tensors(adapter: Adapter, base: GGUFBase) -> list[GGUFTensor]:
    """Every ``<gguf name>.lora_a`` / ``.lora_b`` pair of ``adapter``, modules sorted, q/k B rows permuted.

    Raises:
        InvalidConfigError: a module has no GGUF name (embeddings, a tied ``lm_head``, anything outside the
            projections llama.cpp adapts), or the adapter is for Conv1D layers.
    """
    gguf = _gguf()

    if adapter.fan_in_fan_out:
        raise InvalidConfigError("GGUF export needs nn.Linear layers; this adapter is for Conv1D (fan_in_fan_out)")
    arch = gguf.MODEL_ARCH[ARCHITECTURES[base.model_type][0]]
    names = gguf.get_tensor_name_map(arch, base.n_layer)
    adaptable = {gguf.MODEL_TENSOR[k] for k in _ADAPTABLE} & set(gguf.MODEL_TENSORS[arch])
    if base.tied_embeddings:
        adaptable.discard(gguf.MODEL_TENSOR.OUTPUT)
    out = []
    for module in sorted(adapter.deltas):
        found = names.get_type_and_name(f"{module}.weight", try_suffixes=(".weight",))
        if found is None or found[0] not in adaptable:
            tied = found is not None and found[0] == gguf.MODEL_TENSOR.OUTPUT
            why = "is tied to the embeddings" if tied else "has no tensor llama.cpp can adapt"
            raise InvalidConfigError(
                f"{why} in a {base.arch} GGUF; convert the adapter without it (to-gguf supports the attention and "
                "MLP projections, and an untied lm_head)",
                module=module,
            )
        kind, name = found
        delta, heads = adapter.deltas[module], None
        if base.permute_qk and kind == gguf.MODEL_TENSOR.ATTN_Q:
            heads = (base.n_head, base.n_head)
        elif base.permute_qk and kind == gguf.MODEL_TENSOR.ATTN_K:
            heads = (base.n_head, base.n_kv_head)
        out += [
            GGUFTensor(f"{name}.lora_a", module, delta.factor("A")),
            GGUFTensor(f"{name}.lora_b", module, delta.factor("B"), heads),
        ]
    return out


def _encoded(tensor: GGUFTensor, qtype) -> tuple[tuple[int, ...], object, int]:
    """(shape as GGUFWriter.add_tensor_info takes it, numpy dtype, bytes) of ``tensor`` encoded as ``qtype``.

    Raises:
        AdapterShapeError: a block-quantised type whose block does not divide the row (ne[0]).
    """
    gguf = _gguf()
    import numpy as np

    shape = tuple(tensor.shape)
    if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        dtype = np.float32 if qtype == gguf.GGMLQuantizationType.F32 else np.float16
        return shape, dtype, int(np.prod(shape)) * np.dtype(dtype).itemsize
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if shape[-1] % block:
        raise AdapterShapeError(
            f"{qtype.name} quantises rows in blocks of {block}, but {tensor.name} has rows of {shape[-1]} (a lora_b "
            "row is the module's rank, a lora_a row its input width); use --outtype f16, bf16 or f32",
            module=tensor.module,
        )
    byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype)
    return byte_shape, np.uint8, int(np.prod(byte_shape))


def write_gguf_lora(
    adapter: Adapter,
    path: str | Path,
    *,
    base: GGUFBase,
    outtype: str = "f32",
    alpha: float = 0.0,
    name: str | None = None,
    progress: bool = False,
) -> list[GGUFTensor]:
    """Write ``adapter`` as a GGUF LoRA file at ``path`` (overwritten; callers publish atomically).

    Every shape is checked before the file is opened; tensors are then encoded and written one at a time, so
    memory beyond the adapter stays one tensor.

    Args:
        base: the base model's :class:`GGUFBase` (architecture, heads).
        outtype: ``f32``, ``f16``, ``bf16`` or ``q8_0`` (llama.cpp's converter's ``--outtype``; q8_0 quantises
            rows in blocks of 32, so every rank and input width must be a multiple of 32).
        alpha: ``adapter.lora.alpha``; 0 (the default) makes llama.cpp's scale exactly 1 for every tensor. Another
            value reproduces what a converter that copies ``lora_alpha`` writes (each module × alpha / r_m).
        name: ``general.name``; default the file's stem.

    Returns:
        The tensors written, in file order.

    Raises:
        InvalidConfigError: a module has no GGUF name (see :func:`gguf_tensors`), or ``outtype`` is unknown.
        AdapterShapeError: ``q8_0`` on a shape it cannot quantise.
    """
    gguf = _gguf()
    from tqdm.auto import tqdm

    if outtype not in OUTTYPES:
        raise InvalidConfigError(f"--outtype must be one of {', '.join(OUTTYPES)}, got {outtype!r}")
    qtype = gguf.GGMLQuantizationType[outtype.upper()]
    path = Path(path)
    tensors = gguf_tensors(adapter, base)
    encoded = [_encoded(t, qtype) for t in tensors]  # every shape checked before anything is written

    writer = _writer_class()(path, base.arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    writer.add_name(name or path.stem)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for tensor, (shape, dtype, nbytes) in zip(tensors, encoded, strict=True):
        writer.add_tensor_info(tensor.name, shape, dtype, nbytes, raw_dtype=qtype)
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    try:
        for data in tqdm(_encode_all(tensors, qtype), total=len(tensors), desc="gguf", disable=not progress):
            writer.write_tensor_data(data)
    finally:
        writer.close()
    return tensors


def _writer_class():
    """``gguf.GGUFWriter`` that opens an existing empty ``path`` without truncating it.

    Callers hand the writer the empty temporary file they created (``io.atomic``). Opened with ``"wb"``, ext4 sees a
    file truncated and rewritten, and on close starts writing all of it back to disk before ``close`` returns
    (``auto_da_alloc``, there for programs that replace a file in place without fsync): 50 ms of a 160 MiB export,
    which the rename into place does not need.
    """
    gguf = _gguf()

    class Writer(gguf.GGUFWriter):
        def open_output_file(self, path: Path | None = None) -> None:
            target = Path(path) if path is not None else self.path
            fresh = self.state is gguf.gguf_writer.WriterState.NO_FILE and target is not None
            if not (fresh and target.is_file() and target.stat().st_size == 0):  # "wb": nothing old may remain
                return super().open_output_file(path)
            self.path, self.fout = target, [open(target, "r+b")]  # noqa: SIM115 - closed by close()
            self.state = gguf.gguf_writer.WriterState.EMPTY

    return Writer


def _encode_all(tensors: list[GGUFTensor], qtype) -> Iterator:
    gguf = _gguf()

    for tensor in tensors:
        # float32 → f32 is a view (no copy); the others convert one tensor at a time, with gguf's own rounding
        yield gguf.quants.quantize(tensor.data().float().contiguous().numpy(), qtype)
