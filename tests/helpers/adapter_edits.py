"""Make broken copies of an adapter directory: each edit breaks one thing, as a user's checkpoint might be broken."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

PREFIX = "base_model.model."


def edited_copy(src, dst, *, tensors=None, config=None) -> Path:
    """Copy adapter ``src`` to ``dst`` applying ``tensors(dict) -> dict`` and ``config(dict) -> dict``."""
    src, dst = Path(src), Path(dst)
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    weights = dst / "adapter_model.safetensors"
    tensor_dict = load_file(str(weights))
    cfg = json.loads((dst / "adapter_config.json").read_text())
    if tensors is not None:
        tensor_dict = tensors(tensor_dict)
    if config is not None:
        cfg = config(cfg)
    save_file({k: v.contiguous() for k, v in tensor_dict.items()}, str(weights), metadata={"format": "pt"})
    (dst / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    return dst


def set_config(**fields):
    return lambda cfg: {**cfg, **fields}


def misscaled(src, dst, factor: float):
    """Every ΔW multiplied by ``factor`` (the classic alpha / target_r instead of alpha / init_r bug)."""
    return edited_copy(src, dst, tensors=lambda t: {k: v * factor if ".lora_B." in k else v for k, v in t.items()})


def drop_module(src, dst, module: str):
    """``module``'s tensors and config entries removed."""

    def config(cfg):
        cfg["target_modules"] = [m for m in cfg["target_modules"] if m != module]
        for key in ("rank_pattern", "alpha_pattern"):
            (cfg.get(key) or {}).pop(module, None)
        return cfg

    return edited_copy(
        src, dst, tensors=lambda t: {k: v for k, v in t.items() if f".{module}." not in k}, config=config
    )


def wrong_prefix(src, dst):
    """Keys ``base_model.model.layers...`` instead of ``base_model.model.model.layers...`` (an adapter trained on the
    inner decoder), config patterns renamed alike: PEFT and vLLM load it and apply nothing."""

    def strip(name):
        return name.removeprefix("model.")

    def config(cfg):
        cfg["target_modules"] = [strip(m) for m in cfg["target_modules"]]
        for key in ("rank_pattern", "alpha_pattern"):
            cfg[key] = {strip(k): v for k, v in (cfg.get(key) or {}).items()}
        return cfg

    def tensors(t):
        return {PREFIX + strip(k.removeprefix(PREFIX)): v for k, v in t.items()}

    return edited_copy(src, dst, tensors=tensors, config=config)


def rename_module(src, dst, old: str, new: str):
    def config(cfg):
        cfg["target_modules"] = [new if m == old else m for m in cfg["target_modules"]]
        for key in ("rank_pattern", "alpha_pattern"):
            pattern = cfg.get(key) or {}
            if old in pattern:
                pattern[new] = pattern.pop(old)
        return cfg

    return edited_copy(
        src, dst, tensors=lambda t: {k.replace(f".{old}.", f".{new}."): v for k, v in t.items()}, config=config
    )


def padded_rank(src, dst, rank: int):
    """Every module zero-padded to ``rank`` (same ΔW), config saying so."""

    def tensors(t):
        out = {}
        for k, v in t.items():
            if ".lora_A." in k:
                out[k] = torch.cat([v, v.new_zeros(rank - v.shape[0], v.shape[1])])
            else:
                out[k] = torch.cat([v, v.new_zeros(v.shape[0], rank - v.shape[1])], dim=1)
        return out

    def config(cfg):
        ranks = dict.fromkeys(cfg["rank_pattern"], rank)
        return {**cfg, "r": rank, "lora_alpha": rank, "rank_pattern": ranks, "alpha_pattern": dict(ranks)}

    return edited_copy(src, dst, tensors=tensors, config=config)


def first_module(adapter_dir) -> str:
    cfg = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    return sorted(cfg["rank_pattern"])[0]


MODULES = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"]


def write_adalora(path: Path, *, init_r=4, kept=(3, 0), in_f=16, out_f=16, seed=0):
    """A small AdaLoRA directory laid out exactly as PEFT saves one with rank_pattern set."""
    g = torch.Generator().manual_seed(seed)
    path.mkdir(parents=True, exist_ok=True)
    tensors, pattern = {}, {}
    for module, k in zip(MODULES, kept, strict=True):
        p = f"base_model.model.{module}"
        tensors[f"{p}.lora_A"] = torch.randn(k, in_f, generator=g)
        tensors[f"{p}.lora_E"] = torch.randn(k, 1, generator=g)
        tensors[f"{p}.lora_B"] = torch.randn(out_f, k, generator=g)
        pattern[f"{module}.lora_E"] = [True] * k + [False] * (init_r - k)
    save_file(tensors, path / "adapter_model.safetensors")
    config = {
        "peft_type": "ADALORA",
        "init_r": init_r,
        "target_r": 2,
        "lora_alpha": 8,
        "rank_pattern": pattern,
        "target_modules": ["q_proj", "down_proj"],
        "base_model_name_or_path": "tiny",
        "task_type": "CAUSAL_LM",
    }
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


def edit_tensors(path, fn):
    tensors = load_file(path / "adapter_model.safetensors")
    fn(tensors)
    save_file(tensors, path / "adapter_model.safetensors")


def edit_config(path, fn):
    config = json.loads((path / "adapter_config.json").read_text())
    fn(config)
    (path / "adapter_config.json").write_text(json.dumps(config))
