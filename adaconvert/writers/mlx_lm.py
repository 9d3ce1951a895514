"""Write an mlx-lm adapter directory: the uniform layout, transposed into mlx-lm's own format (docs/design.md §3).

What mlx-lm 0.32 reads (``mlx_lm/tuner/utils.py``):

- ``load_adapters`` reads ``adapter_config.json`` (``fine_tune_type``, ``num_layers``, ``lora_parameters``) and
  ``adapters.safetensors``; every tensor name must be an adapter parameter of the wrapped model, with its shape,
  or the load fails; missing ones keep their initial values (``load_weights(strict=False)``).
- ``linear_to_lora_layers`` wraps, in each of the last ``num_layers`` blocks of ``model.layers``, the modules
  named by ``lora_parameters["keys"]`` (paths relative to the block, e.g. ``self_attn.q_proj``), every one with the
  same ``rank``, ``scale`` and ``dropout``; ``scale`` is required.
- ``tuner/lora.py`` ``LoRALinear``: ``y = linear(x) + scale · (x @ lora_a) @ lora_b`` with ``lora_a`` (in, r) and
  ``lora_b`` (r, out): so ``lora_a = Aᵀ``, ``lora_b = Bᵀ`` and ``scale = 1`` give ΔW = B @ A. Its ``lora_a`` starts
  random, so every wrapped module gets its tensors written, zeros where the adapter has nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from adaconvert.adapter import Adapter
from adaconvert.constants import ADAPTER_CONFIG_NAME, MLX_ADAPTER_WEIGHTS_NAME
from adaconvert.errors import InvalidConfigError
from adaconvert.io.safetensors_writer import SafetensorsWriter
from adaconvert.transforms.pad import zero_delta


@dataclass(frozen=True)
class MlxPlan:
    """Where an adapter's modules go in mlx-lm's format.

    Attributes:
        prefix: the path of the blocks (``model.layers``), as in the module names and in mlx-lm's parameter names.
        num_layers: blocks in the base model; mlx-lm wraps the last ``num_layers``, so all of them.
        keys: module paths inside a block (``self_attn.q_proj``), in the order written.
        shapes: key → (in_features, out_features).
    """

    prefix: str
    num_layers: int
    keys: tuple[str, ...]
    shapes: dict[str, tuple[int, int]]

    def names(self) -> dict[str, str]:
        """Every module mlx-lm wraps, in the order written → its key: ``model.layers.0.self_attn.q_proj`` →
        ``self_attn.q_proj``."""
        return {f"{self.prefix}.{layer}.{key}": key for layer in range(self.num_layers) for key in self.keys}

    def params(self, rank: int) -> int:
        """Parameters written at ``rank``: every block and key, rank·(in + out) each."""
        return self.num_layers * sum(rank * (fan_in + fan_out) for fan_in, fan_out in self.shapes.values())


def plan_mlx(source: Adapter, *, num_layers: int | None, path=None) -> MlxPlan:
    """Map ``source``'s modules (every targeted one, empty ones included) onto mlx-lm's per-block keys.

    Args:
        source: the adapter as read (before stripping: a fully pruned module still names a key to fill with zeros).
        num_layers: blocks of the base model (its ``num_hidden_layers``); None: the highest block index + 1.
        path: the source, for error messages.

    Raises:
        InvalidConfigError: a module mlx-lm cannot represent (outside the blocks: ``lm_head``, embeddings; a
            Conv1D base with ``fan_in_fan_out``), blocks under two different paths, a block index beyond
            ``num_layers``, or one key with two shapes.
    """
    if source.fan_in_fan_out:
        raise InvalidConfigError(
            "fan_in_fan_out (Conv1D base layers, GPT-2 style) has no mlx-lm LoRA representation", path=path
        )
    prefixes: set[str] = set()
    layers: set[int] = set()
    shapes: dict[str, tuple[int, int]] = {}
    for name, delta in sorted(source.deltas.items()):
        parts = name.split(".")
        index = next((i for i, p in enumerate(parts) if p.isdigit()), None)
        if index is None or index == len(parts) - 1:
            raise InvalidConfigError(
                "mlx-lm adapters only cover modules inside the transformer blocks (lora_parameters keys); "
                "this one (an lm_head or embedding?) cannot be exported",
                path=path,
                module=name,
            )
        prefixes.add(".".join(parts[:index]))
        layers.add(int(parts[index]))
        key, shape = ".".join(parts[index + 1 :]), (delta.in_features, delta.out_features)
        if shapes.setdefault(key, shape) != shape:
            raise InvalidConfigError(f"{key} has shapes {shapes[key]} and {shape} in different blocks", path=path)
    if len(prefixes) != 1:
        raise InvalidConfigError(
            f"modules in blocks under {len(prefixes)} paths ({', '.join(sorted(prefixes))}); mlx-lm adapts one "
            "stack of blocks",
            path=path,
        )
    if num_layers is not None and max(layers) >= num_layers:
        raise InvalidConfigError(
            f"the adapter has block {max(layers)} but the base model has {num_layers} blocks", path=path
        )
    return MlxPlan(
        prefix=prefixes.pop(),
        num_layers=num_layers if num_layers is not None else max(layers) + 1,
        keys=tuple(sorted(shapes)),
        shapes=shapes,
    )


def mlx_config_dict(plan: MlxPlan, rank: int) -> dict:
    """mlx-lm's ``adapter_config.json``: one rank and scale 1 for every key (the scaling is folded into B)."""
    return {
        "fine_tune_type": "lora",
        "num_layers": plan.num_layers,
        "lora_parameters": {"rank": rank, "scale": 1.0, "dropout": 0.0, "keys": list(plan.keys)},
    }


def write_mlx_adapter(adapter: Adapter, plan: MlxPlan, directory: str | Path, *, dtype: torch.dtype) -> None:
    """Write ``adapters.safetensors`` and ``adapter_config.json`` into an existing ``directory``.

    Every block and key of ``plan`` becomes ``<prefix>.<layer>.<key>.lora_a`` (in, R) = Aᵀ and ``.lora_b``
    (R, out) = Bᵀ (mlx-lm's parameter names, ``tuner/lora.py`` ``LoRALinear``), R the adapter's max rank: each
    module zero-padded to R (zeros where the adapter has nothing) as it is written, one module in memory at a time.
    """
    directory = Path(directory)
    names = plan.names()
    unplaced = set(adapter.deltas) - set(names)
    if unplaced:
        raise ValueError(f"modules outside the plan: {sorted(unplaced)[:3]}")
    rank = adapter.max_rank
    layout = []
    for name, key in names.items():
        fan_in, fan_out = plan.shapes[key]
        layout += [(f"{name}.lora_a", dtype, (fan_in, rank)), (f"{name}.lora_b", dtype, (rank, fan_out))]
    with SafetensorsWriter(directory / MLX_ADAPTER_WEIGHTS_NAME, layout, metadata={"format": "mlx"}) as writer:
        for name, key in names.items():
            fan_in, fan_out = plan.shapes[key]
            found = adapter.deltas.get(name) or zero_delta(fan_in, fan_out, 0)
            # transposed, cast and padded block by block
            writer.write_padded(f"{name}.lora_a", found.factor("A").T, dtype, (fan_in, rank))
            writer.write_padded(f"{name}.lora_b", found.factor("B").T, dtype, (rank, fan_out))
    config = mlx_config_dict(plan, rank)
    (directory / ADAPTER_CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
