"""Synthetic llama base checkpoints of any size, written tensor by tensor (for merge benchmarks and memory tests;
not part of the installed package).

Random weights, no tokenizer: transformers, PEFT and vLLM load them; they are not meant to generate text.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from adaconvert.writers.sharded import Shard, ShardFiles, parse_size, plan_shards


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
            files.write(name, 0, memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()))
