"""Training: LoRA, AdaLoRA (with the budget callback HF ``Trainer`` lacks) and LoRA-Drop, on ``transformers.Trainer``.

from adaconvert.training import train
result = train("adalora", model="Qwen/Qwen2.5-0.5B", data="data.jsonl", output="runs/ada", steps=500)
"""

from adaconvert.training.config import TrainOptions, load_options
from adaconvert.training.trainer import TrainResult, train

__all__ = ["TrainOptions", "TrainResult", "load_options", "train"]
