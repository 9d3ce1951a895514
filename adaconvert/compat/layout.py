"""Which adapter directory layouts a runtime can take as they are: the rules the other modules ask about files."""

from __future__ import annotations

from pathlib import Path

from adaconvert.compat.vllm import parse_lora_key, tensor_shapes
from adaconvert.constants import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME
from adaconvert.io.source import read_json


def is_mlx_config(config: dict) -> bool:
    """An ``adapter_config.json`` written for mlx-lm (``to-mlx``): ``lora_parameters`` and no ``peft_type``."""
    return "lora_parameters" in config and "peft_type" not in config


def is_safe_layout(adapter_dir: str | Path) -> bool:
    """True when ``adapter_dir`` is a PEFT LoRA whose every module has scaling exactly 1 and whose weights are
    safetensors: what ``to_lora`` writes, served alike by every vLLM version, LoRAX and llama.cpp."""
    from adaconvert.scaling import LoraPatterns

    root = Path(adapter_dir)
    if not (root / ADAPTER_WEIGHTS_NAME).is_file() or not (root / ADAPTER_CONFIG_NAME).is_file():
        return False
    config = read_json(root / ADAPTER_CONFIG_NAME)
    if str(config.get("peft_type", "")).upper() != "LORA" or config.get("use_rslora"):
        return False
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(r, int) or not isinstance(alpha, int | float):
        return False
    modules = {parsed[0] for key in tensor_shapes(root) if (parsed := parse_lora_key(key))}
    patterns = {"rank_pattern": config.get("rank_pattern"), "alpha_pattern": config.get("alpha_pattern")}
    try:
        lookup = LoraPatterns(r=r, lora_alpha=alpha, **patterns)
        scalings = [lookup.rank_and_alpha(m) for m in modules]
    except (TypeError, ValueError, AttributeError):  # patterns that are not {str: number}
        return False
    return all(r_m == alpha_m for r_m, alpha_m in scalings)
