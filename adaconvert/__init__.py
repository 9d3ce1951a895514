"""adaconvert: convert, merge, validate and serve dynamic-rank adapters (AdaLoRA, LoRA-Drop) as plain LoRA.

The Python API mirrors the CLI verbs::

    import adaconvert
    report = adaconvert.to_lora("runs/adalora", "runs/adalora-lora")
    summary = adaconvert.inspect("runs/adalora-lora")
    adaconvert.merge("models/base", ["runs/adalora-lora"], "models/merged")
"""

from __future__ import annotations

import importlib

from adaconvert.errors import AdaconvertError

__version__ = "0.1.0"

# name → module that defines it. Imported on first use: `adaconvert to-lora` should not pay for transformers'
# Trainer, vLLM helpers or the Hub client (seconds and hundreds of MiB at start-up) when it does not use them, and
# the CLI imports torch itself, the way that costs least (cli.import_torch).
_LAZY = {
    "Adapter": "adaconvert.adapter",
    "compare": "adaconvert.comparison",
    "evaluate": "adaconvert.evaluation",
    "LowRankDelta": "adaconvert.adapter",
    "inspect": "adaconvert.inspection",
    "lora_drop_plan": "adaconvert.inspection",
    "merge": "adaconvert.merging",
    "push": "adaconvert.hub",
    "read_adapter": "adaconvert.readers",
    "serve": "adaconvert.serving.server",
    "to_gguf": "adaconvert.conversion.gguf",
    "to_lora": "adaconvert.conversion.peft_lora",
    "to_lora_many": "adaconvert.conversion.batch",
    "to_mlx": "adaconvert.conversion.mlx_lm",
    "train": "adaconvert.training",
    "validate": "adaconvert.validation",
}

__all__ = ["AdaconvertError", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'adaconvert' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
