"""From AdaLoRA to LoRA-Drop: ``inspect --lora-drop-plan`` on a real AdaLoRA run, and ``train lora-drop
--keep-layers`` running the command it prints."""

from __future__ import annotations

import json
import re
import shlex

import pytest
import torch
from transformers import TrainerCallback

import adaconvert
from adaconvert.adapter import split_module_name
from adaconvert.cli import main
from adaconvert.constants import LORA_DROP_NAME
from adaconvert.demo.tiny import build_tiny_model
from adaconvert.inspection import lora_drop_plan
from tests.helpers.peft_utils import TARGETS
from tests.helpers.training_utils import quick_train, write_jsonl

LEARNING = {1, 3}  # the blocks whose adapters get a learning signal; 0 and 2 get none


class OnlyLayersLearn(TrainerCallback):
    """Zero the adapter gradients of every block outside ``layers`` before each optimizer step.

    AdaLoRA scores a singular triplet by |p · ∂L/∂p| of its parameters: a block with no gradient scores exactly 0,
    so once the budget (init_r → target_r) is smaller than what the learning blocks can hold, every pruned triplet
    is one of the silent blocks' and all of the budget goes to ``layers``. That makes the expected plan known in
    advance without reading our own numbers back.
    """

    def __init__(self, layers: set[int]):
        self.layers = layers

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        for name, param in model.named_parameters():
            layer, _ = split_module_name(name)
            if "lora_" in name and layer is not None and layer not in self.layers and param.grad is not None:
                param.grad.zero_()


@pytest.fixture(scope="module")
def skewed_adalora(tmp_path_factory):
    """A 4-block tiny llama and an AdaLoRA (init_r 8 → target_r 3 on 28 modules: budget 84 of the 112 ranks blocks
    1 and 3 can hold) trained with learning signal in blocks 1 and 3 only."""
    root = tmp_path_factory.mktemp("plan")
    build_tiny_model(root / "base", "llama", layers=4)
    data = write_jsonl(root / "data.jsonl")
    result = quick_train(
        "adalora", root / "base", data, root / "adalora", callbacks=[OnlyLayersLearn(LEARNING)], tfinal=8
    )
    return root, result


def test_a_skewed_adalora_budget_plans_exactly_its_layers(skewed_adalora):
    root, result = skewed_adalora
    ranks = result.ranks
    assert sum(ranks.values()) == result.rank_history["target_budget"] == 84
    plan = lora_drop_plan(root / "adalora")
    assert plan.kept == ["1", "3"]  # the default threshold 0.9 needs both halves of the budget
    assert plan.layer_ranks["0"] == plan.layer_ranks["2"] == 0
    assert plan.layer_ranks["1"] + plan.layer_ranks["3"] == 84
    assert plan.kept_share == pytest.approx(1.0)
    assert 1.0 < plan.effective_layers <= 2.0  # two layers share it, not necessarily evenly
    assert plan.measure == "share of the kept rank budget"
    # one layer alone: the larger of the two, whichever AdaLoRA favoured
    top = max(("1", "3"), key=lambda u: (plan.layer_ranks[u], u == "1"))
    assert lora_drop_plan(root / "adalora", keep_fraction=0.25).kept == [top]


def test_the_printed_command_trains_those_layers(skewed_adalora, tmp_path, monkeypatch, capsys):
    root, _ = skewed_adalora
    plot = tmp_path / "plan.png"
    assert main(["inspect", str(root / "adalora"), "--lora-drop-plan", "--plot", str(plot)]) == 0
    text = capsys.readouterr().out
    assert "effective layers" in text and plot.stat().st_size > 1000
    command = text.strip().splitlines()[-2]
    assert command.startswith("adaconvert train lora-drop ") and "--keep-layers 1,3" in command
    monkeypatch.chdir(tmp_path)  # the command names a relative output directory
    # as printed, plus settings that keep the run short
    assert main([*shlex.split(command)[1:], "--steps", "4", "--max-length", "16", "--quiet"]) == 0
    out = tmp_path / "adalora-lora-drop"
    record = json.loads((out / LORA_DROP_NAME).read_text())
    assert record["kept"] == ["1", "3"] and record["shared"] == ["0", "2"] and record["pilot"] is None
    adapter = adaconvert.read_adapter(out)
    assert adapter.source_kind == "lora-drop" and len(adapter.deltas) == 28
    for names in record["shared_groups"].values():  # blocks 0 and 2 hold one shared LoRA per module kind
        a0, a2 = (adapter.deltas[n] for n in names)
        assert torch.equal(a0.A, a2.A) and torch.equal(a0.B, a2.B)


def test_plan_json(skewed_adalora, capsys):
    root, _ = skewed_adalora
    assert main(["inspect", str(root / "adalora"), "--lora-drop-plan", "--threshold", "0.5", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["threshold"] == 0.5 and sum(data["importance"].values()) == pytest.approx(1.0)
    assert len(data["kept"]) == 1 and data["command"].endswith(f"--keep-layers {data['kept'][0]} --r 3")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--threshold", "0.5", "--keep-fraction", "0.5"], "not both"),
        (["--threshold", "1.5"], r"--threshold must be in \(0, 1\]"),
    ],
)
def test_plan_bad_options(skewed_adalora, extra, message, capsys):
    root, _ = skewed_adalora
    assert main(["inspect", str(root / "adalora"), "--lora-drop-plan", *extra]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and re.search(message, err)


def test_plan_refuses_a_plain_lora(skewed_adalora, tmp_path, capsys):
    root, _ = skewed_adalora
    adaconvert.to_lora(root / "adalora", tmp_path / "lora")
    assert main(["inspect", str(tmp_path / "lora"), "--lora-drop-plan"]) == 2
    assert "reads an AdaLoRA rank allocation; this is a lora adapter" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--keep-layers", "1,7"], r"names block\(s\) 7 but the model has 4 \(0-3\)"),
        (["--keep-layers", "1", "--threshold", "0.5"], "drop --threshold / --keep-fraction"),
        (["--keep-layers", "one"], r"takes block indices \(0,3,...\), got one"),
        (["--keep-layers", "1", "--granularity", "module"], "needs --granularity layer"),
    ],
)
def test_keep_layers_bad_input(skewed_adalora, tmp_path, options, message, capsys):
    root, _ = skewed_adalora
    out = tmp_path / "out"
    argv = ["train", "lora-drop", "--model", str(root / "base"), "--data", str(root / "data.jsonl")]
    assert main([*argv, "--output", str(out), *options]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and re.search(message, err)
    assert not out.exists()


def test_plan_of_an_adalora_trained_elsewhere(adalora_llama, tiny_llama):
    """No training_summary.json (PEFT's own loop): the base comes from the adapter config, the data is a
    placeholder, the targets are the adapter's module kinds."""
    plan = lora_drop_plan(adalora_llama, keep_fraction=0.5)
    words = shlex.split(plan.command)
    assert words[words.index("--model") + 1] == str(tiny_llama)
    assert words[words.index("--data") + 1] == "DATA"
    assert set(words[words.index("--target-modules") + 1].split(",")) == set(TARGETS["llama"])
    assert len(plan.kept) == 1 and plan.layers == 2  # ceil(0.5 × 2)
    assert sum(plan.layer_ranks.values()) == sum(adaconvert.inspect(adalora_llama).ranks.values())
