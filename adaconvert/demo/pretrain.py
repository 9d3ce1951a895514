"""A tiny base that knows something: the demo's tiny llama, pretrained (every weight) on the general-text half of the
embedded data before any adapter sees it, so that the held-out loss, ROUGE and forgetting of a comparison measure
something. A random base has nothing to forget and no language to build answers from.

The numbers such a model gives demonstrate the mechanism (what is measured, and how), not the methods: the model is
four layers of 64 units trained for about a minute on 130 sentences.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path

import torch

from adaconvert.demo.tiny import build_tiny_model

DATA_FILE = Path(__file__).with_name("data.jsonl")
MODEL = {"arch": "llama", "layers": 4, "hidden": 64}
PRETRAIN = {"steps": 400, "batch_size": 16, "lr": 3e-3, "max_length": 32, "seed": 0}
MARK_NAME = "pretrain.json"  # written last: a directory holding it with the same recipe is a finished base


def demo_texts() -> tuple[list[str], list[str]]:
    """(question/answer lines, general lines) of the embedded data (``data.jsonl``, see ``DATA.md``)."""
    from adaconvert.training.data import load_texts

    texts = load_texts(DATA_FILE)
    return [t for t in texts if t.startswith("question :")], [t for t in texts if not t.startswith("question :")]


def pretrained_tiny_base(directory: str | Path, *, steps: int | None = None, seed: int = 0) -> Path:
    """The demo's tiny llama, its word-level tokenizer built over all the embedded data, every weight trained as
    a causal LM on the general lines; built in ``directory``, or reused from there when a previous call with the
    same recipe finished it (``pretrain.json`` records the recipe).

    Args:
        directory: where the base lives (created; replaced if it holds an unfinished or other base).
        steps: optimizer steps (default 400: about a minute on one laptop core).
        seed: initialisation and batch order.

    Returns:
        ``directory``, a transformers model directory with its tokenizer.
    """
    directory = Path(directory)
    recipe = {**MODEL, **PRETRAIN, "steps": steps or PRETRAIN["steps"], "seed": seed}
    questions, general = demo_texts()
    recipe["data"] = hashlib.sha256("\n".join(general).encode()).hexdigest()[:16]
    mark = directory / MARK_NAME
    if mark.is_file() and json.loads(mark.read_text(encoding="utf-8")).get("recipe") == recipe:
        return directory
    if directory.exists():
        shutil.rmtree(directory)
    layers, hidden = MODEL["layers"], MODEL["hidden"]
    model = build_tiny_model(
        directory, MODEL["arch"], layers=layers, hidden=hidden, seed=seed, sentences=questions + general
    )
    losses = _pretrain(model, directory, general, recipe)
    model.save_pretrained(str(directory))
    record = {"recipe": recipe, "examples": len(general), "first_loss": losses[0], "last_loss": losses[-1]}
    mark.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return directory


def _pretrain(model, directory: Path, texts: list[str], recipe: dict) -> list[float]:
    """Full-parameter causal-LM training on ``texts`` (random batches, AdamW, linear decay); the loss per step."""
    from transformers import AutoTokenizer

    from adaconvert.process import torch_threads
    from adaconvert.training.data import CausalCollator, tokenize

    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    examples = tokenize(texts, tokenizer, max_length=recipe["max_length"]).examples
    collate = CausalCollator(tokenizer.pad_token_id)
    rng = random.Random(recipe["seed"])
    torch.manual_seed(recipe["seed"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe["lr"])
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / recipe["steps"])
    model.train()
    losses = []
    with torch_threads(1):  # a model this small gains nothing from more threads
        for _ in range(recipe["steps"]):
            batch = collate([{"input_ids": ids} for ids in rng.sample(examples, recipe["batch_size"])])
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
    model.eval()
    return losses
