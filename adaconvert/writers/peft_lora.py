"""Write a PEFT LoRA directory in which every module has scaling exactly 1, in one of two layouts (docs/design.md §3).

Each module's scaling is already folded into B.

- ``compact``: each module at its own rank r_m; the config says ``r = lora_alpha = R = max_m r_m`` and
  ``rank_pattern = alpha_pattern = {module: r_m}``. PEFT and vLLM ≥ 0.11 read the patterns (scale r_m / r_m = 1);
  runtimes that ignore them (llama.cpp, SGLang, LoRAX/TGI) compute another scale or refuse it (``runtimes.py``).
- ``uniform``: every module zero-padded to rank R (``transforms.pad_ranks``), no patterns, integer
  ``r = lora_alpha = R``: scale 1 in every runtime that reads ``lora_alpha / r``.
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
LAYOUTS = ("compact", "uniform")


def lora_config_dict(adapter: Adapter, *, layout: str = "compact") -> dict:
    """adapter_config.json for ``adapter`` in ``layout`` (``compact`` or ``uniform``, see the module docstring).

    ``target_modules`` lists the full module names, so PEFT wraps exactly the modules that have weights. For
    ``uniform`` the adapter must already be padded (every module at the same rank).

    Raises:
        InvalidConfigError: the adapter has no module.
        ValueError: ``uniform`` with modules of different ranks (a programming error: pad first).
    """
    if not adapter.deltas:
        raise InvalidConfigError("adapter has no module with a non-zero update left; nothing to write")
    # PEFT and vLLM take the first key matching a dotted suffix of a module name. Deeper names first: a module's
    # own key then always comes before any key that is a suffix of it (``encoder.fc`` inside ``vision.encoder.fc``).
    ranks = {name: adapter.deltas[name].rank for name in sorted(adapter.deltas, key=lambda n: (-n.count("."), n))}
    max_rank = max(ranks.values())
    if layout == "uniform":
        if set(ranks.values()) != {max_rank}:
            raise ValueError("the uniform layout needs every module at one rank: pad the adapter first")
        patterns = {}  # PEFT's default: every module at r, alpha lora_alpha
    elif layout == "compact":
        patterns = ranks
    else:
        raise ValueError(f"unknown layout {layout!r}; known: {', '.join(LAYOUTS)}")
    return {
        "peft_type": "LORA",
        "task_type": adapter.task_type,
        "base_model_name_or_path": adapter.base_model,
        "r": max_rank,
        # an int, never 8.0: Ollama's llama.cpp runner parses lora_alpha as an unsigned integer
        "lora_alpha": max_rank,
        "rank_pattern": patterns,
        "alpha_pattern": dict(patterns),
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


def write_peft_lora(adapter: Adapter, directory: str | Path, *, dtype: torch.dtype, layout: str = "compact") -> None:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into an existing ``directory``.

    ``layout`` as in :func:`lora_config_dict`: a ``uniform`` adapter must already be padded.

    Tensors are cast to ``dtype`` one at a time and streamed to disk. Keys are
    ``base_model.model.<module>.lora_A.weight`` (r_m, in) and ``.lora_B.weight`` (out, r_m), modules sorted.
    Callers wanting atomic output pass a temporary directory (see ``io.atomic.atomic_output_dir``).
    """
    directory = Path(directory)
    config = lora_config_dict(adapter, layout=layout)
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
