"""Write the safe export layout: a PEFT LoRA directory in which every module has scaling exactly 1.

Each module's scaling is already folded into B; the config then says ``r = lora_alpha = max_m r_m`` and
``rank_pattern = alpha_pattern = {module: r_m}``. PEFT and vLLM ≥ 0.11 read the patterns (scaling r_m / r_m = 1);
older vLLM, LoRAX and llama.cpp ignore them and use lora_alpha / r = 1 as well.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from adaconvert.adapter import Adapter
from adaconvert.errors import InvalidConfigError
from adaconvert.io.safetensors_writer import SafetensorsWriter
from adaconvert.readers._common import PEFT_PREFIX

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"


def lora_config_dict(adapter: Adapter) -> dict:
    """adapter_config.json for ``adapter`` in the safe export layout.

    ``target_modules`` lists the full module names, so PEFT wraps exactly the modules that have weights.

    Raises:
        InvalidConfigError: the adapter has no module.
    """
    if not adapter.deltas:
        raise InvalidConfigError("adapter has no module with a non-zero update left; nothing to write")
    # PEFT and vLLM take the first key matching a dotted suffix of a module name. Deeper names first: a module's
    # own key then always comes before any key that is a suffix of it (``encoder.fc`` inside ``vision.encoder.fc``).
    ranks = {name: adapter.deltas[name].rank for name in sorted(adapter.deltas, key=lambda n: (-n.count("."), n))}
    max_rank = max(ranks.values())
    return {
        "peft_type": "LORA",
        "task_type": adapter.task_type,
        "base_model_name_or_path": adapter.base_model,
        "r": max_rank,
        "lora_alpha": max_rank,
        "rank_pattern": ranks,
        "alpha_pattern": dict(ranks),
        "target_modules": list(ranks),
        "fan_in_fan_out": adapter.fan_in_fan_out,
        "bias": "none",
        "lora_dropout": 0.0,
        "use_rslora": False,
        "use_dora": False,
        "lora_bias": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "inference_mode": True,
    }


def write_peft_lora(adapter: Adapter, directory: str | Path, *, dtype: torch.dtype) -> None:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into an existing ``directory``.

    Tensors are cast to ``dtype`` one at a time and streamed to disk. Keys are
    ``base_model.model.<module>.lora_A.weight`` (r_m, in) and ``.lora_B.weight`` (out, r_m), modules sorted.
    Callers wanting atomic output pass a temporary directory (see ``io.atomic.atomic_output_dir``).
    """
    directory = Path(directory)
    config = lora_config_dict(adapter)
    layout = []
    for name in config["target_modules"]:
        d = adapter.deltas[name]
        layout += [
            (f"{PEFT_PREFIX}{name}.lora_A.weight", dtype, d.A.shape),
            (f"{PEFT_PREFIX}{name}.lora_B.weight", dtype, d.B.shape),
        ]
    with SafetensorsWriter(directory / WEIGHTS_NAME, layout, metadata={"format": "pt"}) as writer:
        for name in config["target_modules"]:
            d = adapter.deltas[name]
            writer.write(f"{PEFT_PREFIX}{name}.lora_A.weight", d.A.to(dtype))
            writer.write(f"{PEFT_PREFIX}{name}.lora_B.weight", d.B.to(dtype))
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
