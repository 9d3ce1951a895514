"""Write a GGUF LoRA adapter for llama.cpp and Ollama (the file format: :mod:`adaconvert.io.gguf_file`).

The file is what llama.cpp's ``convert_lora_to_gguf.py`` writes for the same adapter, tensor by tensor
(``LoraModel.modify_tensors`` there): ``general.type = adapter``, ``adapter.type = lora``, ``adapter.lora.alpha``,
the base's ``general.architecture``, and for each module the base tensor's GGUF name (the one gguf's
``TensorNameMap`` gives it) with ``.lora_a`` = A (r_m × in) and ``.lora_b`` = B (out × r_m) — GGUF lists dimensions
reversed, so llama.cpp sees ``a->ne = {in, r_m}`` and ``b->ne = {r_m, out}``.

Scale: llama.cpp multiplies each module by ``get_scale`` (``src/llama-adapter.h`` line 55 in llama-cpp-python
0.3.36's vendored llama.cpp): ``alpha ? adapter_scale * alpha / rank : adapter_scale`` with ``rank = b->ne[0]``.
Our scaling is already folded into B, so the adapter is written with ``alpha = 0``: every tensor gets scale exactly
1 (times the user's ``--lora-scaled`` factor) whatever its own rank, and per-module ranks stay compact.

Rotary layout: for llama-family bases the converter permutes the rows of q/k projection weights
(``LlamaModel.permute`` in ``conversion/llama.py``, with ``n_head`` for q and ``n_kv_head`` for k); a LoRA's output
rows are B's rows, so B gets the same permutation (the converter's ``LoraTorchTensor`` does exactly this).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from adaconvert.adapter import Adapter, Factor
from adaconvert.errors import AdapterShapeError, InvalidConfigError
from adaconvert.io.gguf_file import Q8_0_BLOCK, GGUFTensorInfo, GGUFWriter, encode_q8_0

# base config ``model_type`` → (GGUF architecture, rows of q/k permuted). HF Mistral goes through the converter's
# LlamaModel (``conversion/llama.py`` registers MistralForCausalLM): architecture ``llama``, permuted. Qwen2Model
# (``conversion/qwen.py``) keeps the HF row order.
ARCHITECTURES: dict[str, tuple[str, bool]] = {
    "llama": ("llama", True),
    "mistral": ("llama", True),
    "qwen2": ("qwen2", False),
}
OUTTYPES = ("f32", "f16", "bf16", "q8_0")  # each a key of io.gguf_file.GGML_TYPES
# The base tensors a LoRA can adapt in llama.cpp, by their module name in the HF model: the attention and MLP
# projections of each block, and ``output`` when it is not tied. The names are those gguf's ``TensorNameMap`` gives
# these modules for LLAMA and QWEN2 (``tests/test_gguf.py`` compares every module of each base); the map itself is
# not used, as importing ``gguf`` costs a fifth of an export.
_BLOCK_TENSORS = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_BLOCK_MODULE = re.compile(r"model\.layers\.(0|[1-9][0-9]*)\.(.+)")
QUANTIZATION_VERSION = 2  # gguf's GGML_QUANT_VERSION, written by llama.cpp's converters


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

    def tensor_name(self, module: str) -> str | None:
        """The GGUF name of the base tensor that ``module`` (an HF module name) adapts, e.g. ``blk.0.attn_q.weight``;
        None when llama.cpp has no adaptable tensor of that name (a tied ``lm_head`` included)."""
        if module == "lm_head":
            return None if self.tied_embeddings else "output.weight"
        found = _BLOCK_MODULE.fullmatch(module)
        if found is None or int(found[1]) >= self.n_layer or found[2] not in _BLOCK_TENSORS:
            return None
        return f"blk.{found[1]}.{_BLOCK_TENSORS[found[2]]}.weight"


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
    n_head, n_layer = get("num_attention_heads"), get("num_hidden_layers")
    if not n_head or not n_layer:
        raise InvalidConfigError("base config lacks num_attention_heads or num_hidden_layers", path=path)
    return GGUFBase(
        model_type=model_type,
        arch=ARCHITECTURES[model_type][0],
        n_head=n_head,
        n_kv_head=get("num_key_value_heads") or n_head,
        n_layer=n_layer,
        tied_embeddings=bool(get("tie_word_embeddings", False)),
    )


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

    def data(self) -> torch.Tensor | Factor:
        """The tensor as llama.cpp wants it, float32: the factor itself (read in blocks of rows) unless its rows
        are permuted."""
        return permute_rows(self.factor.whole(), *self.heads) if self.heads else self.factor

    def whole(self) -> torch.Tensor:
        """:meth:`data` as one tensor."""
        data = self.data()
        return data if isinstance(data, torch.Tensor) else data.whole()


def gguf_tensors(adapter: Adapter, base: GGUFBase) -> list[GGUFTensor]:
    """Every ``<gguf name>.lora_a`` / ``.lora_b`` pair of ``adapter``, modules sorted, q/k B rows permuted.

    Raises:
        InvalidConfigError: a module has no GGUF name (embeddings, a tied ``lm_head``, anything outside the
            projections llama.cpp adapts), or the adapter is for Conv1D layers.
    """
    if adapter.fan_in_fan_out:
        raise InvalidConfigError("GGUF export needs nn.Linear layers; this adapter is for Conv1D (fan_in_fan_out)")
    out = []
    for module in sorted(adapter.deltas):
        name = base.tensor_name(module)
        if name is None:
            tied = module == "lm_head" and base.tied_embeddings
            why = "is tied to the embeddings" if tied else "has no tensor llama.cpp can adapt"
            raise InvalidConfigError(
                f"{why} in a {base.arch} GGUF; convert the adapter without it (to-gguf supports the attention and "
                "MLP projections, and an untied lm_head)",
                module=module,
            )
        delta, heads = adapter.deltas[module], None
        if base.permute_qk and name.endswith(".attn_q.weight"):
            heads = (base.n_head, base.n_head)
        elif base.permute_qk and name.endswith(".attn_k.weight"):
            heads = (base.n_head, base.n_kv_head)
        out += [
            GGUFTensor(f"{name}.lora_a", module, delta.factor("A")),
            GGUFTensor(f"{name}.lora_b", module, delta.factor("B"), heads),
        ]
    return out


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

    Every shape is checked before the file is opened; tensors are then written one at a time, each in blocks of
    rows (as for safetensors) unless its rows are permuted or it is q8_0, so memory beyond the adapter stays at
    most one tensor.

    Args:
        base: the base model's :class:`GGUFBase` (architecture, heads).
        outtype: ``f32``, ``f16``, ``bf16`` or ``q8_0`` (llama.cpp's converter's ``--outtype``; q8_0 quantises
            rows in blocks of 32, so every rank and input width must be a multiple of 32). f16 and bf16 round to
            nearest even, as gguf's own conversion does.
        alpha: ``adapter.lora.alpha``; 0 (the default) makes llama.cpp's scale exactly 1 for every tensor. Another
            value reproduces what a converter that copies ``lora_alpha`` writes (each module × alpha / r_m).
        name: ``general.name``; default the file's stem.

    Returns:
        The tensors written, in file order.

    Raises:
        InvalidConfigError: a module has no GGUF name (see :func:`gguf_tensors`), or ``outtype`` is unknown.
        AdapterShapeError: ``q8_0`` on a shape it cannot quantise.
    """
    from tqdm.auto import tqdm

    if outtype not in OUTTYPES:
        raise InvalidConfigError(f"--outtype must be one of {', '.join(OUTTYPES)}, got {outtype!r}")
    path = Path(path)
    tensors = gguf_tensors(adapter, base)
    for tensor in tensors if outtype == "q8_0" else ():  # every shape checked before anything is written
        if tensor.shape[1] % Q8_0_BLOCK[0]:
            raise AdapterShapeError(
                f"Q8_0 quantises rows in blocks of {Q8_0_BLOCK[0]}, but {tensor.name} has rows of {tensor.shape[1]} "
                "(a lora_b row is the module's rank, a lora_a row its input width); use --outtype f16, bf16 or f32",
                module=tensor.module,
            )
    infos = [GGUFTensorInfo(t.name, t.shape, outtype) for t in tensors]
    metadata = [
        ("general.architecture", base.arch),
        ("general.type", "adapter"),
        ("adapter.type", "lora"),
        ("adapter.lora.alpha", float(alpha)),
        ("general.name", name or path.stem),
        ("general.quantization_version", QUANTIZATION_VERSION),
    ]
    with GGUFWriter(path, infos, metadata) as writer:
        bar = tqdm(zip(tensors, infos, strict=True), total=len(tensors), desc="gguf", disable=not progress)
        for tensor, info in bar:
            dtype, shape = info.stored
            if outtype == "q8_0":
                writer.write(info.name, encode_q8_0(tensor.whole()))
            else:  # float32 rows written as they are; f16 / bf16 cast block by block
                writer.write_padded(info.name, tensor.data(), dtype, shape)
    return tensors
