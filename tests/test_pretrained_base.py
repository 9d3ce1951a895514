"""The pretrained tiny base that the comparison tests and ``compare --demo`` use: it knows the general text, and it
is built once per recipe."""

from __future__ import annotations

import json

import pytest
import torch

from adaconvert.demo.pretrain import MARK_NAME, demo_texts, pretrained_tiny_base


def _loss(model_dir, texts) -> float:
    """Mean next-token loss of the model on ``texts`` (PEFT-free: the base alone), one text at a time."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        losses = [
            float(model(**(ids := tokenizer(t, return_tensors="pt")), labels=ids["input_ids"]).loss) for t in texts
        ]
    return sum(losses) / len(losses)


@pytest.mark.slow
def test_the_pretrained_base_knows_the_general_text_better_than_a_random_one(pretrained_tiny, tmp_path):
    _, general = demo_texts()
    record = json.loads((pretrained_tiny / MARK_NAME).read_text())
    assert record["last_loss"] < record["first_loss"] / 3
    random_base = pretrained_tiny_base(tmp_path / "random", steps=1)
    assert _loss(pretrained_tiny, general[:20]) < _loss(random_base, general[:20]) / 2


@pytest.mark.slow
def test_it_is_built_once_per_recipe(tmp_path):
    base = pretrained_tiny_base(tmp_path / "base", steps=3)
    weights = base / "model.safetensors"
    built = weights.stat().st_mtime_ns
    assert pretrained_tiny_base(tmp_path / "base", steps=3) == base and weights.stat().st_mtime_ns == built
    pretrained_tiny_base(tmp_path / "base", steps=4)  # another recipe: rebuilt
    assert json.loads((base / MARK_NAME).read_text())["recipe"]["steps"] == 4
