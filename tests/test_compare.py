"""``adaconvert compare``: the three methods at one budget on the pretrained tiny base, their actual parameter counts
against PEFT's own, the report and charts, bad input, a failing method, and an interrupted comparison resumed."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from adaconvert.cli.main import main
from adaconvert.comparison.demo import DEMO_SPLIT_ON, build_demo_inputs
from adaconvert.comparison.plan import load_plan
from adaconvert.comparison.report import COMPARE_JSON_NAME, COMPARE_MD_NAME, CURVES_PLOT_NAME, QUALITY_PLOT_NAME
from adaconvert.comparison.runner import METHOD_RECORD_NAME
from tests.helpers.needs import expect_installed

ROOT = Path(__file__).resolve().parents[1]
# short runs on the demo data: enough for the curves, the pilot and AdaLoRA's schedule to do their work
QUICK = ["--steps", "40", "--eval-steps", "5", "--batch-size", "16", "--max-length", "32", "--lr", "5e-3",
         "--r", "4", "--keep-fraction", "0.5", "--pilot-fraction", "0.25", "--max-new-tokens", "8"]  # fmt: skip


# inputs of the refusals: each is refused before any input is read
UNREAD = {"model": "base", "data": "train.jsonl", "eval_data": "eval.jsonl", "reference_data": "general.jsonl"}


@pytest.fixture(scope="module")
def inputs(pretrained_tiny, tmp_path_factory):
    """The demo's data splits beside the session's pretrained base."""
    paths = build_demo_inputs(tmp_path_factory.mktemp("compare-inputs"))
    paths["model"] = str(pretrained_tiny)
    return paths


def _args(inputs, output, *extra) -> list[str]:
    return ["compare", "--model", inputs["model"], "--data", inputs["data"], "--eval-data", inputs["eval_data"],
            "--reference-data", inputs["reference_data"], "--split-on", DEMO_SPLIT_ON, "--output", str(output),
            "--engine", "hf", "--quiet", *QUICK, *extra]  # fmt: skip


@pytest.fixture(scope="module")
def compared(inputs, tmp_path_factory):
    """One comparison of the three methods (hf engine), run through the CLI."""
    output = tmp_path_factory.mktemp("compare") / "cmp"
    assert main(_args(inputs, output)) == 0
    return output


@pytest.mark.slow
def test_compare_writes_one_table_two_charts_and_a_winner_per_criterion(compared):
    report = json.loads((compared / COMPARE_JSON_NAME).read_text())
    assert [r["method"] for r in report["rows"]] == ["lora", "adalora", "lora-drop"]
    assert all(r["status"] == "ok" and r["validated"] for r in report["rows"])
    for row in report["rows"]:
        assert row["eval_loss"] > 0 and 0 <= row["rougeL"] <= 1 and row["forgetting"] is not None
        assert row["jitter"] is not None and row["curve"][-1]["step"] == 40
        assert row["median_step_ms"] > 0 and row["tokens_per_s"] > 0 and row["peak_memory_mib"] > 0
    assert report["memory_kind"] == "peak RSS"
    assert report["base"]["loss"] > 0
    markdown = (compared / COMPARE_MD_NAME).read_text()
    assert "| method |" in markdown and "in this run, lowest held-out loss:" in markdown
    assert all(line.startswith(("lowest", "highest", "least", "smoothest", "fewest", "fastest", "most", "shortest",
                                "smallest")) for line in report["winners"])  # fmt: skip
    for name in (CURVES_PLOT_NAME, QUALITY_PLOT_NAME):
        assert (compared / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_trainable_parameters_are_peft_own_counts(compared, inputs):
    """pilot / main / final: PEFT's count of the trained model, and of the served adapter loaded for training."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    rows = {r["method"]: r for r in json.loads((compared / COMPARE_JSON_NAME).read_text())["rows"]}
    for method, row in rows.items():
        record = json.loads((compared / method / METHOD_RECORD_NAME).read_text())
        assert row["main_params"] == record["params"]["peft_trainable"]  # PEFT's get_nb_trainable_parameters
        base = AutoModelForCausalLM.from_pretrained(inputs["model"], dtype=torch.float32)
        served = PeftModel.from_pretrained(base, str(compared / method / f"{method}-lora"), is_trainable=True)
        assert row["final_params"] == served.get_nb_trainable_parameters()[0]
    # LoRA-Drop's pilot is a rank-r LoRA everywhere: LoRA's own run, counted the same
    assert rows["lora-drop"]["pilot_params"] == rows["lora"]["main_params"]
    assert rows["lora-drop"]["main_params"] < rows["lora"]["main_params"]
    assert rows["lora"]["pilot_params"] is None and rows["adalora"]["pilot_params"] is None


@pytest.mark.slow
def test_a_failing_method_keeps_the_others_results(inputs, tmp_path, capsys):
    # AdaLoRA's schedule needs tinit + tfinal < steps: only its run fails
    args = _args(inputs, tmp_path / "cmp", "--methods", "lora,adalora", "--tinit", "30", "--tfinal", "20")
    assert main(args) == 11
    assert "1 method(s) failed (adalora: AdaLoRA needs tinit + tfinal" in capsys.readouterr().err
    report = json.loads((tmp_path / "cmp" / COMPARE_JSON_NAME).read_text())
    assert [r["status"] for r in report["rows"]] == ["ok", "failed"]
    assert report["rows"][0]["eval_loss"] > 0


@pytest.mark.parametrize(
    ("recipe", "extra", "message"),
    [
        ("", ["--methods", "lora,qlora"], "--methods: unknown method qlora; choose from lora, adalora, lora-drop"),
        ("init_r: 8\n", [], "compare sets --init-r from --r"),
        ("method: lora\n", [], "not a compare option: method (compare runs every method itself)"),
    ],
)
def test_bad_options_are_one_line_before_any_work(tmp_path, capsys, recipe, extra, message):
    (tmp_path / "recipe.yaml").write_text(recipe or "r: 4\n")
    assert main(_args(UNREAD, tmp_path / "cmp", "--config", str(tmp_path / "recipe.yaml"), *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "cmp").exists()


def test_the_shipped_recipe_is_a_valid_plan():
    plan = load_plan(config=ROOT / "recipes" / "compare.yaml", output="runs/x")
    assert plan.methods == ["lora", "adalora", "lora-drop"] and plan.split_on == "### Assistant:"
    assert plan.run_options("adalora")["init_r"] == 2 * plan.r and plan.run_options("adalora")["target_r"] == plan.r
    assert plan.budget_rule() == "LoRA rank 8; AdaLoRA init_r 16 → target_r 8; LoRA-Drop rank 8 on its kept layers"


def test_existing_output_is_refused_without_overwrite(tmp_path, capsys):
    (tmp_path / "cmp").mkdir()
    assert main(_args(UNREAD, tmp_path / "cmp")) == 4
    assert "pass --overwrite to replace it, or --resume to continue it" in capsys.readouterr().err


@pytest.mark.slow
def test_an_interrupted_comparison_keeps_finished_methods_and_resumes(inputs, tmp_path):
    output = tmp_path / "cmp"
    args = [sys.executable, "-m", "adaconvert.cli", *_args(inputs, output, "--methods", "lora,lora-drop")]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while not (output / "lora" / METHOD_RECORD_NAME).exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)  # Ctrl-C while LoRA-Drop trains
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    finished = (output / "lora" / METHOD_RECORD_NAME).stat().st_mtime_ns
    assert not (output / COMPARE_JSON_NAME).exists()

    assert main(_args(inputs, output, "--methods", "lora,lora-drop")) == 4  # no silent reuse without --resume
    assert main(_args(inputs, output, "--methods", "lora,lora-drop", "--steps", "30", "--resume")) == 2  # not the same
    assert main(_args(inputs, output, "--methods", "lora,lora-drop", "--resume")) == 0
    assert (output / "lora" / METHOD_RECORD_NAME).stat().st_mtime_ns == finished  # kept, not trained again
    report = json.loads((output / COMPARE_JSON_NAME).read_text())
    assert [r["status"] for r in report["rows"]] == ["ok", "ok"]


@pytest.mark.slow
@pytest.mark.vllm
def test_compare_demo_through_vllm(tmp_path):
    """The new user's command: ``adaconvert compare --demo`` builds its inputs in its output directory, evaluates
    through one vLLM engine where installed, and prints one table."""
    with_vllm = expect_installed("vllm", purpose="compare's vLLM evaluation")
    output = tmp_path / "demo"
    cmd = [sys.executable, "-m", "adaconvert.cli", "compare", "--demo", "--output", str(output), "--steps", "40",
           "--quiet"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "| eval loss" in proc.stdout and "in this run, lowest held-out loss" in proc.stdout
    report = json.loads((output / COMPARE_JSON_NAME).read_text())
    assert report["quality"]["engine"] == ("vllm" if with_vllm else "hf")
    assert all(r["validated"] for r in report["rows"])
    assert (output / "demo-inputs" / "base" / "pretrain.json").is_file()


@pytest.mark.distributed
@pytest.mark.slow
def test_compare_under_torchrun_is_one_line_per_process_before_any_work(tmp_path):
    """``torchrun -m adaconvert.cli compare``: every process would run the whole comparison and race for its
    output (the second one found the first one's directory and failed half-way); each refuses in one line
    instead, before anything is read or written. torchrun stops the other process as soon as one exits with an
    error, so the other's line appears only when it got there first (on a loaded machine it may not)."""
    from tests.helpers.training_utils import torchrun

    # --rank: torchrun's own parser takes --r for one of its options
    args = ["--rank" if a == "--r" else a for a in _args(UNREAD, tmp_path / "cmp")]
    cmd = [torchrun(), "--standalone", "--nproc_per_node", "2", "-m", "adaconvert.cli", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode != 0
    refusals = [line for line in proc.stderr.splitlines() if line.startswith("error: compare runs in one process")]
    assert refusals and all("(2 processes here)" in line for line in refusals), proc.stderr[-3000:]
    assert "exitcode  : 2" in proc.stderr  # torchrun's account of the first failure: the CLI's refusal code
    assert "/adaconvert/" not in proc.stderr  # no traceback of ours (torchrun prints its own about the exit codes)
    assert not (tmp_path / "cmp").exists()
