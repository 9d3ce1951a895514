"""adaconvert: convert, merge, validate and serve dynamic-rank adapters (AdaLoRA, LoRA-Drop) as plain LoRA.

The Python API mirrors the CLI verbs::

    import adaconvert
    report = adaconvert.to_lora("runs/adalora", "runs/adalora-lora")
    summary = adaconvert.inspect("runs/adalora-lora")
"""

from adaconvert.adapter import Adapter, LowRankDelta
from adaconvert.convert import to_lora
from adaconvert.errors import AdaconvertError
from adaconvert.inspection import inspect
from adaconvert.readers import read_adapter

__version__ = "0.1.0"

__all__ = ["AdaconvertError", "Adapter", "LowRankDelta", "inspect", "read_adapter", "to_lora"]
