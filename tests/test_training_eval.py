"""Held-out loss during training (``--eval-data`` / ``--eval-fraction``, ``--eval-steps``): the curve in
``training_summary.json``, token-weighted like a direct PEFT forward pass, and its jitter."""

from __future__ import annotations

import json

import pytest

from adaconvert.constants import TRAINING_SUMMARY_NAME
from adaconvert.demo.tiny import SENTENCES
from adaconvert.errors import InvalidConfigError
from adaconvert.training import load_options
from adaconvert.training.heldout import jitter
from tests.helpers.peft_utils import EVAL_TEXTS, peft_token_loss
from tests.helpers.training_utils import quick_train, write_jsonl


def test_eval_curve_is_the_token_weighted_loss_of_the_saved_adapter(tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl")
    held = write_jsonl(tmp_path / "eval.jsonl", EVAL_TEXTS)
    result = quick_train("lora", tiny_llama, data, tmp_path / "out", eval_data=str(held), eval_steps=5, batch_size=2)
    summary = json.loads((tmp_path / "out" / TRAINING_SUMMARY_NAME).read_text())
    curve = summary["eval"]["curve"]
    assert [p["step"] for p in curve] == [5, 10, 15, 20]  # every 5 steps, the last one at the end
    assert curve == result.main.eval_curve
    # the held-out batches (3 examples in batches of 2: padded) give the same number as PEFT on each example alone:
    # float32 sums in another order, so 1e-5 relative
    assert curve[-1]["loss"] == pytest.approx(peft_token_loss(tiny_llama, tmp_path / "out", EVAL_TEXTS), rel=1e-5)
    assert summary["eval"]["jitter"] == pytest.approx(jitter(curve))
    assert summary["eval"]["examples"] == 3
    assert "held-out loss (3 examples" in result.text()


@pytest.mark.slow
def test_eval_fraction_holds_out_examples_and_adalora_jitter_starts_at_tfinal(tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl")  # 32 examples
    result = quick_train("adalora", tiny_llama, data, tmp_path / "out", eval_fraction=0.25, eval_steps=4)
    record = result.eval
    assert record["examples"] == 8
    history = result.rank_history
    assert record["jitter_from_step"] == history["total_step"] - history["tfinal"]
    assert record["jitter"] == pytest.approx(jitter(record["curve"], start_step=record["jitter_from_step"]))
    assert [p["step"] for p in record["curve"]] == [4, 8, 12, 16, 20, 24, 28, 30]


@pytest.mark.slow
def test_lora_drop_measures_its_main_run_only(tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl")
    result = quick_train(
        "lora-drop", tiny_llama, data, tmp_path / "out", eval_fraction=0.25, keep_fraction=0.5, pilot_fraction=0.25
    )
    assert result.pilot.eval_curve == []
    assert result.eval["curve"][-1]["step"] == result.main.optimizer_steps
    assert result.eval["jitter_from_step"] == 0


def test_jitter_is_the_mean_absolute_change_in_the_window():
    curve = [{"step": s, "loss": v} for s, v in [(2, 3.0), (4, 2.0), (6, 2.5), (8, 2.0)]]
    assert jitter(curve) == pytest.approx((1.0 + 0.5 + 0.5) / 3)
    assert jitter(curve, start_step=4) == pytest.approx(0.5)
    assert jitter(curve, start_step=8) is None


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"eval_data": "x.jsonl", "eval_fraction": 0.1}, "not both"),
        ({"eval_fraction": 1.0}, "--eval-fraction must be in (0, 1)"),
        ({"eval_steps": 5}, "--eval-steps needs held-out data"),
        ({"eval_steps": 0, "eval_fraction": 0.1}, "--eval-steps must be at least 1"),
    ],
)
def test_bad_eval_options_are_refused(options, message):
    with pytest.raises(InvalidConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_options("lora", model="m", data="d", output="o", **options)


def test_eval_options_are_train_flags_and_recipe_keys(tmp_path):
    from click.testing import CliRunner

    from adaconvert.cli.main import cli

    help_text = CliRunner().invoke(cli, ["train", "--help"]).output
    assert "--eval-data" in help_text and "--eval-fraction" in help_text and "--eval-steps" in help_text
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: lora\neval-fraction: 0.2\neval-steps: 3\n")
    opts = load_options(config=recipe, model="m", data="d", output="o")
    assert (opts.eval_fraction, opts.eval_steps) == (0.2, 3)


def test_eval_data_that_does_not_exist_is_refused_before_training(tiny_llama, tmp_path):
    from adaconvert.cli.main import main

    data = write_jsonl(tmp_path / "data.jsonl", SENTENCES)
    code = main(
        ["train", "lora", "--model", str(tiny_llama), "--data", str(data), "--output", str(tmp_path / "o"),
         "--eval-data", str(tmp_path / "missing.jsonl"), "--steps", "2", "--quiet"]
    )  # fmt: skip
    assert code == 3
    assert not (tmp_path / "o").exists()
