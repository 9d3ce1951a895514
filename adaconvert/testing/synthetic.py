"""Synthetic AdaLoRA checkpoints, written directly with safetensors, in the layout PEFT saves (docs/design.md §2).

For tests and benchmarks that need many adapters fast (batch conversion, Hub pushes): no model, no training.
Shapes follow a llama: q/k/v/o in the attention, gate/up/down in the MLP.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

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
