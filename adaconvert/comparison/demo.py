"""``compare --demo``: the comparison on the embedded demo data, nothing downloaded, a few minutes on a laptop CPU.

The tiny base is pretrained first on the general half of the data (``adaconvert.demo.pretrain``), the adapters are
trained on four fifths of the question/answer half and evaluated on the rest (ROUGE-L of the answers after
``answer :``), and forgetting is measured on the general half. The numbers show the mechanism, not the methods.
"""

from __future__ import annotations

import json
from pathlib import Path

# what the demo trains with (explicit options override it); the 0.9 threshold keeps all 4 layers of so small a
# model: LoRA-Drop keeps half of them, as `adaconvert demo` does
DEMO_OPTIONS = {
    "steps": 200,
    "batch_size": 16,
    "max_length": 32,
    "lr": 5e-3,
    "r": 4,
    "keep_fraction": 0.5,
    "pilot_fraction": 0.25,
    "logging_steps": 1000,
    "seed": 0,
}
DEMO_SPLIT_ON = "answer :"
DEMO_DIR = "demo-inputs"  # inside the comparison's output directory
EVAL_EVERY = 5  # one question in five is held out


def demo_inputs(root: str | Path) -> dict[str, str]:
    """The paths ``--demo`` fills in: ``model``, ``data``, ``eval_data``, ``reference_data`` (under
    ``root/demo-inputs``; made by :func:`build_demo_inputs`)."""
    where = Path(root) / DEMO_DIR
    return {
        "model": str(where / "base"),
        "data": str(where / "train.jsonl"),
        "eval_data": str(where / "eval.jsonl"),
        "reference_data": str(where / "general.jsonl"),
    }


def build_demo_inputs(root: str | Path) -> dict[str, str]:
    """Write the demo's data splits and build (or reuse) its pretrained tiny base under ``root/demo-inputs``."""
    from adaconvert.demo.pretrain import demo_texts, pretrained_tiny_base

    paths = demo_inputs(root)
    questions, general = demo_texts()
    held = questions[::EVAL_EVERY]
    train = [q for i, q in enumerate(questions) if i % EVAL_EVERY]
    Path(paths["data"]).parent.mkdir(parents=True, exist_ok=True)
    for key, texts in (("data", train), ("eval_data", held), ("reference_data", general)):
        Path(paths[key]).write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    pretrained_tiny_base(paths["model"])
    return paths
