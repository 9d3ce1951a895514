"""Write a PEFT LoRA directory in which every module has scaling exactly 1, in one of two layouts (docs/design.md §3).

Each module's scaling is already folded into B.

- ``compact``: each module at its own rank r_m; the config says ``r = lora_alpha = R = max_m r_m`` and
  ``rank_pattern = alpha_pattern = {module: r_m}``. PEFT and vLLM ≥ 0.11 read the patterns (scale r_m / r_m = 1);
  runtimes that ignore them (llama.cpp, SGLang, LoRAX/TGI) compute another scale or refuse it (``runtimes.py``).
- ``uniform``: every module zero-padded to rank R as it is written (``SafetensorsWriter.write_padded``), no
  patterns, integer ``r = lora_alpha = R``: scale 1 in every runtime that reads ``lora_alpha / r``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch

from adaconvert.adapter import Adapter
from adaconvert.constants import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, PEFT_PREFIX
from adaconvert.errors import InvalidConfigError
from adaconvert.io.safetensors_writer import SafetensorsWriter
from adaconvert.transforms.pad import uniform_modules, zero_delta

LAYOUTS = ("compact", "uniform")


def lora_config_dict(adapter: Adapter, *, layout: str = "compact", modules: Iterable[str] = ()) -> dict:
    """adapter_config.json for ``adapter`` in ``layout`` (``compact`` or ``uniform``, see the module docstring).

    ``target_modules`` lists the full module names, so PEFT wraps exactly the modules that have weights; with
    ``uniform``, also ``modules`` the adapter lacks (written as zeros).

    Raises:
        InvalidConfigError: the adapter has no module.
    """
    if not adapter.deltas:
        raise InvalidConfigError("adapter has no module with a non-zero update left; nothing to write")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; known: {', '.join(LAYOUTS)}")
    max_rank = adapter.max_rank
    names = set(adapter.deltas) | (set(modules) if layout == "uniform" else set())
    # PEFT and vLLM take the first key matching a dotted suffix of a module name. Deeper names first: a module's
    # own key then always comes before any key that is a suffix of it (``encoder.fc`` inside ``vision.encoder.fc``).
    ordered = sorted(names, key=lambda n: (-n.count("."), n))
    # uniform: PEFT's default, every module at r with alpha lora_alpha
    patterns = {name: adapter.deltas[name].rank for name in ordered} if layout == "compact" else {}
    return {
        "peft_type": "LORA",
        "task_type": adapter.task_type,
        "base_model_name_or_path": adapter.base_model,
        "r": max_rank,
        # an int, never 8.0: Ollama's llama.cpp runner parses lora_alpha as an unsigned integer
        "lora_alpha": max_rank,
        "rank_pattern": patterns,
        "alpha_pattern": dict(patterns),
        "target_modules": ordered,
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


def write_peft_lora(
    adapter: Adapter,
    directory: str | Path,
    *,
    dtype: torch.dtype,
    layout: str = "compact",
    fill_from: Adapter | None = None,
) -> None:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into an existing ``directory``.

    Tensors are cast to ``dtype`` (and, for ``uniform``, zero-padded to the max rank R) one module at a time and
    streamed to disk. Keys are ``base_model.model.<module>.lora_A.weight`` (r, in) and ``.lora_B.weight``
    (out, r). ``uniform`` also writes the modules of ``fill_from`` that ``adapter`` lacks, as zeros
    (``transforms.uniform_modules``). Callers wanting atomic output pass a temporary directory
    (see ``io.atomic.atomic_output_dir``).
    """
    directory = Path(directory)
    uniform = layout == "uniform"
    shapes = uniform_modules(adapter, fill_from if uniform else None)  # {module: (in, out)}
    config = lora_config_dict(adapter, layout=layout, modules=shapes)
    rank = config["r"]

    layout_specs = []
    for name in config["target_modules"]:
        (fan_in, fan_out), r = shapes[name], rank if uniform else adapter.deltas[name].rank
        layout_specs += [
            (f"{PEFT_PREFIX}{name}.lora_A.weight", dtype, (r, fan_in)),
            (f"{PEFT_PREFIX}{name}.lora_B.weight", dtype, (fan_out, r)),
        ]
    with SafetensorsWriter(directory / ADAPTER_WEIGHTS_NAME, layout_specs, metadata={"format": "pt"}) as writer:
        for name in config["target_modules"]:
            (fan_in, fan_out), found = shapes[name], adapter.deltas.get(name) or zero_delta(*shapes[name], 0)
            r = rank if uniform else found.rank  # uniform: zero-padded as it is written
            writer.write_padded(f"{PEFT_PREFIX}{name}.lora_A.weight", found.factor("A"), dtype, (r, fan_in))
            writer.write_padded(f"{PEFT_PREFIX}{name}.lora_B.weight", found.factor("B"), dtype, (fan_out, r))
    (directory / ADAPTER_CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
