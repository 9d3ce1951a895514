"""Synthetic llama-shaped checkpoints for tests and benchmarks: no model, no training, any size.

- AdaLoRA adapters written directly with safetensors, in the layout PEFT saves (docs/design.md §2): for tests and
  benchmarks that need many adapters fast (batch conversion, Hub pushes).
- Base checkpoints written tensor by tensor, sharded (merge benchmarks, memory tests): random weights, no tokenizer;
  transformers, PEFT and vLLM load them, they are not meant to generate text.

Shapes follow a llama: q/k/v/o in the attention, gate/up/down in the MLP.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from adaconvert.io.safetensors_writer import byte_view
from adaconvert.writers.sharded import Shard, ShardFiles, parse_size, plan_shards

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LlamaShape:
    """The dimensions of a llama that matter to an adapter: hidden, MLP width, layers, k/v output width."""

    hidden: int
    intermediate: int
    layers: int
    kv_dim: int

    def module_shapes(self, targets=LLAMA_TARGETS) -> dict[str, tuple[int, int]]:
        """{module name: (out_features, in_features)} for every targeted module."""
        h, i, kv = self.hidden, self.intermediate, self.kv_dim
        kinds = {
            "self_attn.q_proj": (h, h),
            "self_attn.k_proj": (kv, h),
            "self_attn.v_proj": (kv, h),
            "self_attn.o_proj": (h, h),
            "mlp.gate_proj": (i, h),
            "mlp.up_proj": (i, h),
            "mlp.down_proj": (h, i),
        }
        return {
            f"model.layers.{layer}.{kind}": shape
            for layer in range(self.layers)
            for kind, shape in kinds.items()
            if kind.rsplit(".", 1)[-1] in targets
        }


# adaconvert.demo.tiny's llama (hidden 64, 2 layers, one 32-wide k/v head) and Llama-2-7B.
TINY_LLAMA = LlamaShape(hidden=64, intermediate=128, layers=2, kv_dim=32)
LLAMA_7B = LlamaShape(hidden=4096, intermediate=11008, layers=32, kv_dim=4096)


def write_synthetic_adalora(
    directory: str | Path,
    *,
    shape: LlamaShape = TINY_LLAMA,
    init_r: int = 8,
    target_r: int = 4,
    lora_alpha: float = 16,
    seed: int = 0,
    base_model: str = "tiny-llama",
    dtype: torch.dtype = torch.float32,
    targets=LLAMA_TARGETS,
) -> Path:
    """Write an AdaLoRA directory as PEFT saves it after budgeting: ``rank_pattern`` set, tensors sliced.

    Each module keeps a random number of its ``init_r`` triplets (0 allowed: zero-size tensors, as PEFT writes a
    fully pruned module). Keys ``base_model.model.<module>.lora_A`` (r_m, in), ``.lora_E`` (r_m, 1),
    ``.lora_B`` (out, r_m).

    Args:
        directory: created if missing; adapter_config.json and adapter_model.safetensors go there.
        shape: the base model's dimensions.
        init_r, target_r, lora_alpha: AdaLoRA settings, as in ``peft.AdaLoraConfig``.
        seed: makes the ranks and values reproducible.
        base_model: ``base_model_name_or_path`` to record.
        dtype: tensor dtype.
        targets: module kinds to adapt.

    Returns:
        ``directory`` as a Path.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    rank_pattern: dict[str, list[bool]] = {}
    for module, (out_f, in_f) in module_shapes_sorted(shape, targets):
        keep = torch.rand(init_r, generator=gen) < 0.6
        rank_pattern[f"{module}.lora_E"] = [bool(k) for k in keep]
        r = int(keep.sum())
        prefix = f"base_model.model.{module}"
        tensors[f"{prefix}.lora_A"] = (torch.randn(r, in_f, generator=gen) * 0.02).to(dtype)
        tensors[f"{prefix}.lora_E"] = torch.randn(r, 1, generator=gen).to(dtype)
        tensors[f"{prefix}.lora_B"] = (torch.randn(out_f, r, generator=gen) * 0.02).to(dtype)
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = _adalora_config(
        base_model=base_model,
        init_r=init_r,
        target_r=target_r,
        lora_alpha=lora_alpha,
        targets=list(targets),
        rank_pattern=rank_pattern,
    )
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return directory


def module_shapes_sorted(shape: LlamaShape, targets=LLAMA_TARGETS) -> list[tuple[str, tuple[int, int]]]:
    return sorted(shape.module_shapes(targets).items())


def _adalora_config(*, base_model, init_r, target_r, lora_alpha, targets, rank_pattern) -> dict:
    """adapter_config.json with the fields ``peft.AdaLoraConfig.save_pretrained`` writes (peft 0.21)."""
    return {
        "task_type": "CAUSAL_LM",
        "peft_type": "ADALORA",
        "auto_mapping": None,
        "base_model_name_or_path": base_model,
        "revision": None,
        "inference_mode": True,
        "r": 8,
        "target_modules": targets,
        "exclude_modules": None,
        "lora_alpha": lora_alpha,
        "lora_dropout": 0.0,
        "fan_in_fan_out": False,
        "bias": "none",
        "use_rslora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": {},
        "use_dora": False,
        "lora_bias": False,
        "target_r": target_r,
        "init_r": init_r,
        "tinit": 0,
        "tfinal": 0,
        "deltaT": 1,
        "beta1": 0.85,
        "beta2": 0.85,
        "orth_reg_weight": 0.5,
        "total_step": 100,
    }


def llama_tensor_shapes(
    *, hidden: int, intermediate: int, layers: int, kv_dim: int, vocab: int, tie_word_embeddings: bool = False
) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} of a llama checkpoint, in the order transformers saves it."""
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}"
        shapes |= {
            f"{p}.input_layernorm.weight": (hidden,),
            f"{p}.self_attn.q_proj.weight": (hidden, hidden),
            f"{p}.self_attn.k_proj.weight": (kv_dim, hidden),
            f"{p}.self_attn.v_proj.weight": (kv_dim, hidden),
            f"{p}.self_attn.o_proj.weight": (hidden, hidden),
            f"{p}.post_attention_layernorm.weight": (hidden,),
            f"{p}.mlp.gate_proj.weight": (intermediate, hidden),
            f"{p}.mlp.up_proj.weight": (intermediate, hidden),
            f"{p}.mlp.down_proj.weight": (hidden, intermediate),
        }
    shapes["model.norm.weight"] = (hidden,)
    if not tie_word_embeddings:
        shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def write_synthetic_llama(
    directory: str | Path,
    *,
    hidden: int = 4096,
    intermediate: int = 14336,
    layers: int = 2,
    heads: int = 32,
    kv_heads: int = 8,
    vocab: int = 32000,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_size: int | str = "5GB",
    seed: int = 0,
) -> Path:
    """Write a random llama checkpoint (config.json + safetensors shards) with the given dimensions.

    Defaults are Llama-3-8B's layer shapes (GQA with 8 k/v heads) with a 32000 vocabulary. Memory: one tensor at a
    time. Weights ~ N(0, 0.02²), norms 1.

    Returns:
        ``directory`` as a Path.
    """
    from transformers import LlamaConfig

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    head_dim = hidden // heads
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=vocab,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    config.dtype = dtype
    config.save_pretrained(str(directory))
    shapes = llama_tensor_shapes(
        hidden=hidden, intermediate=intermediate, layers=layers, kv_dim=kv_heads * head_dim, vocab=vocab
    )
    shards = plan_shards([(name, dtype, shape) for name, shape in shapes.items()], parse_size(max_shard_size))
    gen = torch.Generator().manual_seed(seed)

    def tensor(shape):
        return (
            torch.ones(shape, dtype=dtype) if len(shape) == 1 else (torch.randn(shape, generator=gen) * 0.02).to(dtype)
        )

    write_shards(directory, shards, ((name, tensor(shape)) for name, shape in shapes.items()))
    return directory


def write_shards(directory: Path, shards: Sequence[Shard], tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Write ``shards`` into ``directory`` from whole ``tensors``, (name, tensor) pairs each dropped once written;
    then the index when there is more than one shard.

    Raises:
        ValueError: a tensor is not in the plan, or the plan's tensors are not all given exactly once.
    """
    with ShardFiles(directory, shards) as files:
        for name, tensor in tensors:
            files.write(name, 0, byte_view(tensor.contiguous()))
