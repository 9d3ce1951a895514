"""Helpers for the training tests: tiny JSONL data, quick settings, and adapters trained once per session."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from adaconvert.demo.tiny import SENTENCES
from adaconvert.process import torch_threads

# small and fast: 32 examples, batch 8, a high learning rate so that a few steps move the adapters
QUICK = {"batch_size": 8, "lr": 2e-2, "max_length": 16, "logging_steps": 1000, "quiet": True, "seed": 0}
ADALORA = {"init_r": 8, "target_r": 3, "tinit": 5, "tfinal": 5, "delta_t": 2, "steps": 30}


def write_jsonl(path: Path, texts=None, *, column: str = "text", repeat: int = 4) -> Path:
    """SENTENCES (× ``repeat``) as JSONL, one ``{column: text}`` per line."""
    texts = texts if texts is not None else SENTENCES * repeat
    path.write_text("".join(json.dumps({column: t}) + "\n" for t in texts), encoding="utf-8")
    return path


def torchrun() -> str:
    """The ``torchrun`` of this environment's torch."""
    found = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    assert found, "torchrun (from torch) must be installed"
    return found


def quick_train(method: str, base, data, output, **options):
    """``adaconvert.train`` with the quick settings (overridable), single-threaded."""
    from adaconvert.training import train

    settings = {**QUICK, **(ADALORA if method == "adalora" else {"steps": 20}), **options}
    with torch_threads(1):
        return train(method, model=str(base), data=str(data), output=str(output), **settings)


RECIPES = {
    "lora": ("lora", {}),
    "adalora": ("adalora", {}),
    # module granularity on a 2-layer model: 6 of 14 modules kept, the rest share one LoRA per module kind
    "lora-drop-share": ("lora-drop", {"granularity": "module", "keep_fraction": 0.4, "pilot_fraction": 0.25}),
    "lora-drop-drop": ("lora-drop", {"keep_fraction": 0.5, "policy": "drop", "pilot_fraction": 0.25}),
}


class TrainedAdapters:
    """Adapters trained by ``adaconvert.train`` on one base, each trained on first use and kept for the session.

    ``get(name)`` returns the TrainResult; the adapter directory is ``result.output``.
    """

    def __init__(self, base: Path, root: Path):
        self.base, self.root = base, root
        self.data = write_jsonl(root / "data.jsonl")
        self._results: dict = {}

    def get(self, name: str):
        if name not in self._results:
            method, options = RECIPES[name]
            self._results[name] = quick_train(method, self.base, self.data, self.root / name, **options)
        return self._results[name]
