"""LoRA-Drop: importance from real forward passes, selection, and the share / drop policies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import TrainerCallback

import adaconvert
from adaconvert.constants import LORA_DROP_NAME
from adaconvert.demo.tiny import build_tiny_model
from adaconvert.training import lora_drop
from tests.helpers.peft_utils import load_base, peft_model, prompt_ids
from tests.helpers.training_utils import quick_train, write_jsonl


class TwoLayers(nn.Module):
    """embedding → layers.0.proj → layers.1.proj, called like a causal LM (input_ids, attention_mask,
    logits_to_keep: it has no head)."""

    def __init__(self, vocab=11, hidden=6):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList([nn.ModuleDict({"proj": nn.Linear(hidden, hidden, bias=False)}) for _ in range(2)])

    def forward(self, input_ids, attention_mask=None, logits_to_keep=0):
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer["proj"](x)
        return x


def test_output_importance_matches_a_hand_computation():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(TwoLayers(), LoraConfig(r=2, lora_alpha=3, target_modules=["proj"], lora_dropout=0.5))
    modules = lora_drop.lora_modules(model)
    assert sorted(modules) == ["layers.0.proj", "layers.1.proj"]
    for layer in modules.values():  # PEFT starts B at zero: give both factors values
        nn.init.normal_(layer.lora_B["default"].weight)
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    batches = [{"input_ids": ids[:1], "attention_mask": mask[:1]}, {"input_ids": ids[1:], "attention_mask": mask[1:]}]
    model.train()  # the scorer must switch dropout off itself, and restore the mode
    got = lora_drop.output_importance(model, batches)
    assert model.training

    # by hand: g = Σ over real tokens of ‖s · B A x‖², x the layer's real input (previous layer's output incl. LoRA)
    expected = {}
    with torch.no_grad():
        x = model.base_model.model.embed(ids)
        for i in range(2):
            layer = modules[f"layers.{i}.proj"]
            A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            s = 3 / 2
            delta = (x @ A.T @ B.T) * s
            expected[f"layers.{i}.proj"] = float((delta.pow(2).sum(-1) * mask).sum())
            x = x @ layer.base_layer.weight.T + delta
    assert got == pytest.approx(expected, rel=1e-6)
    assert lora_drop.unit_scores(got, "layer") == pytest.approx(
        {"0": expected["layers.0.proj"], "1": expected["layers.1.proj"]}
    )


def test_weight_l1_importance():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(TwoLayers(), LoraConfig(r=2, target_modules=["proj"]))
    got = lora_drop.weight_l1_importance(model)
    for name, layer in lora_drop.lora_modules(model).items():
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        assert got[name] == pytest.approx(float(A.abs().sum() + B.abs().sum()))


IMPORTANCE = {"0": 0.1, "1": 0.4, "2": 0.3, "3": 0.15, "4": 0.05}


@pytest.mark.parametrize(
    ("rule", "kept"),
    [
        ({"threshold": 0.4}, ["1"]),  # the top unit alone reaches 0.4
        ({"threshold": 0.5}, ["1", "2"]),  # 0.4 < 0.5 <= 0.7: the unit that crosses T is kept
        ({"threshold": 0.85}, ["1", "2", "3"]),
        ({"threshold": 0.9}, ["0", "1", "2", "3"]),
        ({"threshold": 1.0}, ["0", "1", "2", "3", "4"]),
        ({"keep_fraction": 0.2}, ["1"]),
        ({"keep_fraction": 0.5}, ["1", "2", "3"]),  # ceil(2.5) = 3
        ({"keep_fraction": 0.01}, ["1"]),  # at least one
        ({"keep_fraction": 1.0}, ["0", "1", "2", "3", "4"]),
    ],
)
def test_selection(rule, kept):
    got_kept, rest = lora_drop.select_units(IMPORTANCE, **rule)
    assert got_kept == kept  # in model order
    assert rest == [u for u in IMPORTANCE if u not in kept]


def test_normalise_rejects_all_zero():
    with pytest.raises(adaconvert.AdaconvertError, match="pilot run left every LoRA at zero"):
        lora_drop.normalise({"0": 0.0, "1": 0.0})


@pytest.fixture(scope="module")
def four_layers(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-drop-4")
    build_tiny_model(root / "base", "llama", layers=4)
    return root / "base", write_jsonl(root / "data.jsonl")


@pytest.mark.slow
def test_drop_leaves_dropped_layers_without_adapter(four_layers, tmp_path):
    base, data = four_layers
    result = quick_train("lora-drop", base, data, tmp_path / "drop", policy="drop", keep_fraction=0.5)
    record = json.loads((tmp_path / "drop" / LORA_DROP_NAME).read_text())
    assert len(record["kept"]) == 2 and len(record["dropped"]) == 2 and record["shared"] == []
    assert record["normalized_importance"] == pytest.approx(result.lora_drop["normalized_importance"])
    top = sorted(record["normalized_importance"], key=record["normalized_importance"].get)[-2:]
    assert sorted(record["kept"]) == sorted(top)
    layers = {adaconvert.adapter.split_module_name(m)[0] for m in adaconvert.read_adapter(tmp_path / "drop").deltas}
    assert layers == {int(u) for u in record["kept"]}  # no tensor at all for a dropped layer
    assert result.main.trainable_params == result.pilot.trainable_params // 2
    summary = adaconvert.inspect(tmp_path / "drop")
    assert summary.source_kind == "lora-drop" and summary.provenance["lora_drop"]["dropped"] == record["dropped"]


@pytest.mark.slow
def test_share_ties_one_lora_and_saves_a_copy_per_layer(four_layers, tmp_path):
    base, data = four_layers
    out = tmp_path / "share"
    result = quick_train("lora-drop", base, data, out, policy="share", keep_fraction=0.5)
    record = result.lora_drop
    shared_layers = record["shared"]
    assert len(shared_layers) == 2 and len(record["kept"]) == 2
    modules = lora_drop.lora_modules(result.model)
    assert len(modules) == 28  # every layer keeps an adapted module per kind: own or shared
    for kind, names in record["shared_groups"].items():
        assert [str(adaconvert.adapter.split_module_name(n)[0]) for n in names] == shared_layers
        first = modules[names[0]]
        for name in names[1:]:  # the very same parameters, trained once
            assert modules[name].lora_A["default"] is first.lora_A["default"]
            assert modules[name].lora_B["default"] is first.lora_B["default"]
        assert first.lora_B["default"].weight.abs().sum() > 0, f"shared {kind} LoRA was not trained"
    # main run: 2 own LoRAs per kind + 1 shared, against 4 in the pilot
    assert result.main.trainable_params == result.pilot.trainable_params * 3 // 4

    # the checkpoint has one copy per sharing layer; PEFT loads it and computes what the trained model computed
    adapter = adaconvert.read_adapter(out)
    assert len(adapter.deltas) == 28 and adapter.source_kind == "lora-drop"
    for names in record["shared_groups"].values():
        a0, a1 = (adapter.deltas[n] for n in names)
        assert torch.equal(a0.A, a1.A) and torch.equal(a0.B, a1.B)
    ids = prompt_ids(base)
    with torch.no_grad():
        expected = result.model.eval()(ids).logits
        reloaded = peft_model(base, out)(ids).logits
        plain = load_base(base)(ids).logits
    torch.testing.assert_close(reloaded, expected, rtol=1e-5, atol=1e-5)
    assert (expected - plain).abs().max() > 1e-3, "the adapter must change the outputs for the test to mean something"


@pytest.mark.slow  # a CLI subprocess, or a model or file large enough to take seconds
def test_to_lora_reads_both_policies(trained, tmp_path):
    for name in ("lora-drop-share", "lora-drop-drop"):
        src = Path(trained.get(name).output)
        report = adaconvert.to_lora(src, tmp_path / name)
        assert report.source_kind == "lora-drop" and report.max_rel_error < 1e-6
        assert report.provenance["lora_drop"]["policy"] == name.rsplit("-", 1)[1]


@pytest.mark.slow
def test_weight_l1_scoring_end_to_end(four_layers, tmp_path):
    base, data = four_layers
    result = quick_train("lora-drop", base, data, tmp_path / "l1", importance="weight-l1", threshold=0.6)
    record = result.lora_drop
    assert record["importance"] == "weight-l1" and record["threshold"] == 0.6
    kept_mass = sum(record["normalized_importance"][u] for u in record["kept"])
    assert kept_mass >= 0.6
    without_last = kept_mass - min(record["normalized_importance"][u] for u in record["kept"])
    assert without_last < 0.6  # minimal: dropping the weakest kept layer falls below T


class LayerGrads(TrainerCallback):
    """Per phase, whether each decoder layer's output required a gradient in the training forward passes."""

    def __init__(self):
        self.phases: list[dict[int, list[bool]]] = []
        self.checkpointing: list[tuple[bool, bool]] = []  # (the model checkpoints, the Trainer was asked to)
        self.handles: list = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        seen: dict[int, list[bool]] = {}
        self.phases.append(seen)
        self.checkpointing.append((model.get_base_model().is_gradient_checkpointing, args.gradient_checkpointing))

        def record(index):
            def hook(_module, _inputs, output):
                hidden = output[0] if isinstance(output, tuple) else output
                seen.setdefault(index, []).append(hidden.requires_grad)

            return hook

        for index, layer in enumerate(model.get_base_model().model.layers):
            self.handles.append(layer.register_forward_hook(record(index)))

    def on_train_end(self, args, state, control, **kwargs):
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


@pytest.mark.slow
def test_drop_with_checkpointing_does_not_backpropagate_below_the_lowest_kept_layer(four_layers, tmp_path):
    """The pilot checkpoints; the embedding output used to require a gradient (for reentrant checkpointing), so
    the main run's backward pass went through every layer, also the dropped ones below the kept layers."""
    base, data = four_layers
    spy = LayerGrads()
    result = quick_train(
        "lora-drop", base, data, tmp_path / "drop", policy="drop", keep_fraction=0.25, gradient_checkpointing=True,
        callbacks=[spy],
    )  # fmt: skip
    lowest = min(int(u) for u in result.lora_drop["kept"])
    assert lowest > 0, "the test needs a dropped layer below the kept one"
    main = spy.phases[1]
    assert all(all(main[i]) for i in range(lowest, 4))  # the kept layer and those above it are backpropagated
    assert not any(any(main[i]) for i in range(lowest)), "the backward pass went through dropped layers"
    assert all(all(grads) for grads in spy.phases[0].values())  # the pilot trains every layer
    # checkpointing is switched on through the model, not the TrainingArguments flag transformers 5 deprecates
    assert spy.checkpointing == [(True, False), (True, False)]


def test_output_importance_computes_no_full_vocabulary_logits(tiny_llama):
    """The score needs the layers' outputs only: the head sees one position per sequence, not all of them."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(load_base(tiny_llama), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    ids = prompt_ids(tiny_llama)
    positions = []
    head = model.get_base_model().lm_head
    head.register_forward_hook(lambda _m, inputs, _out: positions.append(inputs[0].shape[1]))
    scores = lora_drop.output_importance(model, [{"input_ids": ids}])
    assert positions == [1] and ids.shape[1] > 1
    assert len(scores) == 4
