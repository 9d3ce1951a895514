"""Training: LoRA, AdaLoRA (with the budget callback HF ``Trainer`` lacks) and LoRA-Drop, on ``transformers.Trainer``.

from adaconvert.training import train
result = train("adalora", model="Qwen/Qwen2.5-0.5B", data="data.jsonl", output="runs/ada", steps=500)
"""

from adaconvert.training.config import TrainOptions, load_options

__all__ = ["TrainOptions", "TrainResult", "load_options", "train"]


def __getattr__(name: str):
    # the trainer imports torch and transformers: only when asked for, so that the CLI builds its ``train`` flags
    # from the options (this package's config module) without them
    if name in ("TrainResult", "train"):
        from adaconvert.training import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
