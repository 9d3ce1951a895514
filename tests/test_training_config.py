"""Training options, recipes and data: what is accepted, and one-line errors for everything else."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adaconvert import errors
from adaconvert.cli import cli, main
from adaconvert.training.config import (
    FIELDS,
    REQUIRED,
    TrainOptions,
    adalora_schedule,
    flag,
    load_options,
    optimizer_steps,
    option_kind,
)
from adaconvert.training.data import CausalCollator, load_texts, tokenize
from tests.helpers.training_utils import quick_train, write_jsonl

# train's recipes (compare's, compare*.yaml, are checked in tests/test_compare.py)
RECIPES = sorted(p for p in (Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml") if p.stem != "compare")


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_shipped_recipes_are_valid(recipe):
    options = load_options(config=recipe, output="runs/x")
    assert recipe.stem in (options.method, f"{options.method}-70b-fsdp", f"{options.method}-qlora")
    assert options.precision == "auto" and options.gradient_checkpointing
    assert options.fsdp == recipe.stem.endswith("-fsdp")
    assert (options.quantize == "nf4") == recipe.stem.endswith("-qlora")
    if options.method == "adalora":
        schedule = adalora_schedule(options, optimizer_steps(options, 9846))
        assert schedule.tinit + schedule.tfinal < schedule.total_step


def test_recipe_then_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "method: adalora\nmodel: m\ndata: d.jsonl\nmax-length: 64\ninit_r: 10\ntarget_modules: q_proj,v_proj\n"
    )
    options = load_options("adalora", config=recipe, output="o", init_r=16, target_r=None)
    assert (options.max_length, options.init_r, options.target_r) == (64, 16, 8)  # None leaves the recipe/default
    assert options.target_modules == ["q_proj", "v_proj"]
    assert options.alpha == 32  # default 2 × init_r


def _other_value(name: str):
    """A valid value of option ``name`` that is not its default, as a recipe would spell it."""
    f = FIELDS[name]
    if f.metadata["choices"]:
        return next(c for c in f.metadata["choices"] if c != f.default)
    return {
        bool: not f.default,
        int: 3 if f.default != 3 else 4,
        float: 0.25 if f.default != 0.25 else 0.5,
        str: "x-value",
        list: ["q_proj", "v_proj"],
    }[option_kind(name)]


def test_every_option_is_settable_from_the_cli_and_a_recipe(tmp_path):
    """The dataclass is the one list: each field has a command-line spelling and a recipe key, both reaching it."""
    import yaml

    command = cli.commands["train"]
    spellings = {opt: param.name for param in command.params for opt in [*param.opts, *param.secondary_opts]}
    spellings["METHOD"] = "method"  # the argument
    for name in FIELDS:
        assert spellings.get(flag(name)) == name, f"{name} has no command-line flag {flag(name)}"
        assert FIELDS[name].metadata["help"], f"{name} has no help text"

    values = {name: _other_value(name) for name in FIELDS}
    # a consistent set (checkpoints are refused with --fsdp)
    values.update(
        method="adalora", init_r=6, target_r=3, epochs=None, keep_fraction=0.5, fsdp=False, eval_fraction=None
    )
    values.update(fsdp_offload_params=False)
    recipe = tmp_path / "all.yaml"
    recipe.write_text(yaml.safe_dump({k.replace("_", "-"): v for k, v in values.items()}))
    from_recipe = load_options(config=recipe)
    for name, value in values.items():
        assert getattr(from_recipe, name) == value, name

    # the same values through the command line: click parses them into the keyword options train() gets
    args = ["adalora"]
    for name, value in values.items():
        if name == "method" or value is None:
            continue
        if option_kind(name) is bool:
            args.append(flag(name) if value else f"--no-{flag(name)[2:]}")
        else:
            args += [flag(name), ",".join(value) if isinstance(value, list) else str(value)]
    ctx = command.make_context("train", args)
    parsed = dict(ctx.params)
    parsed["precision"] = parsed.pop("precision_flag") or parsed["precision"]
    for name in ("as_json", "debug", "config"):
        parsed.pop(name)
    method = parsed.pop("method")
    assert load_options(method, **parsed) == from_recipe
    assert set(REQUIRED) <= set(FIELDS)


def test_optimizer_steps_like_the_trainer():
    opts = TrainOptions(method="lora", model="m", data="d", output="o", batch_size=4, grad_accum=3, epochs=2)
    # 50 examples on 2 processes: 25 each -> 7 micro-batches -> 3 optimizer steps per epoch (last one partial)
    assert optimizer_steps(opts, 50, world_size=2) == 6
    assert optimizer_steps(TrainOptions(method="lora", model="m", data="d", output="o", steps=7), 50) == 7


def test_texts_from_jsonl_text_and_json(tmp_path):
    (tmp_path / "a.txt").write_text("one line\n\n  \nanother line\n")
    assert load_texts(tmp_path / "a.txt") == ["one line", "another line"]
    write_jsonl(tmp_path / "b.jsonl", ["x y", "z"], column="content")
    assert load_texts(tmp_path / "b.jsonl", text_column="content") == ["x y", "z"]
    (tmp_path / "c.json").write_text(json.dumps([{"text": "p q"}, {"text": "r"}]))
    assert load_texts(tmp_path / "c.json") == ["p q", "r"]
    (tmp_path / "d.csv").write_text("text,other\nhello world,1\nbye,2\n")
    assert load_texts(tmp_path / "d.csv") == ["hello world", "bye"]


def test_texts_from_a_multi_column_tsv(tmp_path):
    # commas inside the text and a tab-separated header: read as CSV this has one column named "id\ttext\tlabel"
    (tmp_path / "d.tsv").write_text("id\ttext\tlabel\n1\thello, world\tgood\n2\tbye, then\tbad\n")
    assert load_texts(tmp_path / "d.tsv") == ["hello, world", "bye, then"]
    assert load_texts(tmp_path / "d.tsv", text_column="label") == ["good", "bad"]


def test_tokenize_and_collate(tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    data = tokenize(["the quick brown fox jumps over the lazy dog", "the", ""], tok, max_length=5)
    assert len(data) == 2  # "" has only the EOS: no next-token loss
    assert all(ids[-1] == tok.eos_token_id for ids in data.examples)
    assert max(len(ids) for ids in data.examples) == 5
    batch = CausalCollator(tok.pad_token_id)([data[0], data[1]])
    assert batch["input_ids"].shape == (2, 5)
    assert batch["labels"][1].tolist() == [*data.examples[1], -100, -100, -100]


ERROR_CASES = [
    # (arguments after `train`, files to write {name: text}, expected error line)
    (["adalora", "--init-r", "4", "--target-r", "4"], {}, r"--init-r \(4\) must be larger than --target-r \(4\)"),
    (["adalora", "--steps", "10", "--tinit", "5", "--tfinal", "5"], {}, r"tinit=5 \+ tfinal=5 >= 10 optimizer steps"),
    (["adalora", "--steps", "10", "--tfinal", "0"], {}, r"--tfinal must be at least 1"),
    (["lora", "--steps", "5", "--epochs", "1"], {}, r"give --steps or --epochs, not both"),
    (["lora", "--lr", "-1", "--batch-size", "0"], {}, r"--batch-size must be at least 1.*--lr must be positive"),
    (["lora-drop", "--threshold", "0.8", "--keep-fraction", "0.5"], {}, r"--threshold or --keep-fraction, not both"),
    (["lora-drop", "--pilot-fraction", "1.5"], {}, r"--pilot-fraction must be in \(0, 1\]"),
    (["lora", "--precision", "fp16", "--steps", "2"], {}, r"--fp16 needs a CUDA GPU"),
    (["lora", "--data", "{tmp}/empty.jsonl"], {"empty.jsonl": ""}, r"empty.jsonl: no training text"),
    (["lora", "--data", "{tmp}/blank.txt"], {"blank.txt": "\n  \n"}, r"blank.txt: no training text"),
    (
        ["lora", "--data", "{tmp}/cols.jsonl"],
        {"cols.jsonl": '{"prompt": "a"}\n'},
        r"cols.jsonl: record 1 has no column 'text' \(it has: prompt\); choose one with --text-column",
    ),
    (["lora", "--data", "{tmp}/bad.jsonl"], {"bad.jsonl": '{"text": "a"}\n{"text": \n'}, r"line 2: not valid JSON"),
    (["lora", "--data", "{tmp}/num.jsonl"], {"num.jsonl": '{"text": 3}\n'}, r"column 'text' holds int, not text"),
    (
        ["lora", "--data", "{tmp}/deep.jsonl"],
        {"deep.jsonl": '{"text": "a"}\n{"text": ' + "[" * 100_000 + "]" * 100_000 + "}\n"},
        r"deep.jsonl: line 2: JSON nested too deeply to parse",
    ),
    (
        ["lora", "--data", "{tmp}/big.json"],
        {"big.json": "[" + "9" * 5000 + "]"},
        r"big.json: JSON holds a number too long",
    ),
    (["lora", "--data", "{tmp}/missing.jsonl"], {}, r"missing.jsonl: no such data file"),
    (["lora", "--data", "{tmp}/bin.txt"], {"bin.txt": b"\xff\xfe\x00"}, r"bin.txt: not UTF-8 text"),
    (["lora", "--data", "{tmp}/x.xml"], {"x.xml": "<a/>"}, r"unknown data file type '.xml'"),
    (["lora", "--model", "{tmp}/no-model"], {}, r"no-model: no such model directory"),
    (["lora", "--target-modules", "nope_proj", "--steps", "1"], {}, r"cannot apply the adapter \(Target modules"),
    (["lora", "--config", "{tmp}/r.yaml"], {"r.yaml": "lr: 1e-4\nbogus: 1\n"}, r"r.yaml: unknown option\(s\) bogus"),
    (["lora", "--config", "{tmp}/r.yaml"], {"r.yaml": "method: adalora\n"}, r"recipe is for method 'adalora'"),
    (["lora", "--config", "{tmp}/r.yaml"], {"r.yaml": "steps: many\n"}, r"option 'steps' must be int, got 'many'"),
    (["lora", "--config", "{tmp}/r.yaml"], {"r.yaml": "lr: -2e-4\n"}, r"--lr must be positive, got -0.0002"),
    (["lora", "--config", "{tmp}/r.yaml"], {"r.yaml": "lr: nan\n"}, r"option 'lr' must be float, got 'nan'"),
    (["lora", "--config", "{tmp}/none.yaml"], {}, r"none.yaml: no such recipe file"),
    (["lora", "--fsdp"], {}, r"--fsdp needs a distributed launch of at least 2 processes"),
    (["lora", "--fsdp-offload-params", "--save-steps", "0"], {}, r"--save-steps must be at least 1.*needs --fsdp"),
    (["lora", "--resume"], {}, r"out.checkpoints: no checkpoints to resume from \(train with --save-steps\)"),
    (["lora", "--resume", "{tmp}/elsewhere", "--quiet"], {}, r"elsewhere: no checkpoints to resume from"),
    (["lora", "--config", "{tmp}/r.yaml"], {"r.yaml": "fsdp: true\n"}, r"--fsdp needs a distributed launch"),
]


@pytest.mark.parametrize(("args", "files", "message"), ERROR_CASES, ids=[c[2][:40] for c in ERROR_CASES])
def test_bad_settings_and_data_give_one_line_errors(args, files, message, tiny_llama, tmp_path, capsys):
    for name, content in files.items():
        path = tmp_path / name
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    good = write_jsonl(tmp_path / "good.jsonl")
    defaults = {"--model": str(tiny_llama), "--data": str(good), "--output": str(tmp_path / "out")}
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    args += [item for flag, value in defaults.items() if flag not in args for item in (flag, value)]
    code = main(["train", *args, "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert re.search(message, err[0]), err[0]
    assert not (tmp_path / "out").exists()


def test_a_recipe_with_lr_2e_4_trains(tiny_llama, tmp_path, capsys):
    """PyYAML reads ``2e-4`` (no dot) as a string: the recipe must still give lr 0.0002, as the flag does."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("lr: 2e-4\nwarmup-ratio: 1e-1\nsteps: 1\nbatch-size: 8\nmax-length: 16\n")
    data = write_jsonl(tmp_path / "d.jsonl")
    out = tmp_path / "out"
    args = ["train", "lora", "--config", str(recipe), "--model", str(tiny_llama), "--data", str(data)]
    assert main([*args, "--output", str(out), "--quiet", "--json"]) == 0, capsys.readouterr().err
    options = json.loads(capsys.readouterr().out)["options"]
    assert options["lr"] == 2e-4 and options["warmup_ratio"] == 0.1


def test_existing_output_is_refused_before_any_work(tiny_llama, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    code = main(
        ["train", "lora", "--model", str(tmp_path / "nope"), "--data", "x.jsonl", "--output", str(tmp_path / "out")]
    )
    assert code == 4
    assert "pass --overwrite" in capsys.readouterr().err


def test_missing_options_are_named(capsys):
    assert main(["train", "lora", "--steps", "3"]) == 2
    assert "missing training option(s): --model, --data, --output" in capsys.readouterr().err


def test_error_types():
    with pytest.raises(errors.InvalidConfigError):
        load_options("adalora", model="m", data="d", output="o", init_r=2, target_r=3)
    with pytest.raises(errors.InvalidConfigError, match="unknown training option"):
        load_options("lora", model="m", data="d", output="o", rank=3)


@pytest.mark.slow  # two CLI subprocesses
def test_cli_train_json_is_the_only_stdout(tiny_llama, tmp_path):
    """As a user runs it: a fresh process, where DeepSpeed (installed with the test extra, as in many training
    environments) is first imported by the Trainer and warns on its own stdout handler when there is no GPU."""
    data = write_jsonl(tmp_path / "d.jsonl")
    out = tmp_path / "out"
    args = [sys.executable, "-m", "adaconvert.cli", "train", "lora", "--model", tiny_llama, "--data", data]
    args = [str(a) for a in (*args, "--output", out, "--steps", "3", "--max-length", "16")]
    assert importlib.util.find_spec("deepspeed") is not None  # the case this test is for
    run = subprocess.run([*args, "--batch-size", "8", "--json"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)  # Trainer and DeepSpeed logs must not leak onto stdout
    assert result["method"] == "lora" and result["main"]["optimizer_steps"] == 3 and result["written"]
    assert json.loads((out / "training_summary.json").read_text())["main"]["trainable_params"] > 0
    run = subprocess.run([*args, "--output", str(tmp_path / "text")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("wrote ")  # the human summary, nothing before it: library logs are on stderr
    assert main([str(a) for a in args[3:]]) == 4  # exists: refused without --overwrite


@pytest.mark.parametrize(
    ("capability", "expected"),
    [(None, "fp32"), ((6, 1), "fp16"), ((7, 0), "fp16"), ((7, 5), "fp16"), ((8, 0), "bf16"), ((8, 6), "bf16"),
     ((9, 0), "bf16"), ((10, 0), "bf16")],
)  # fmt: skip
def test_auto_precision_is_fp16_before_ampere(capability, expected):
    """V100 (7.0) and T4 (7.5) report bf16 support (emulated, far slower than fp16): auto must pick fp16 there."""
    from adaconvert.training.trainer import auto_precision

    assert auto_precision(capability) == expected


LAUNCH_ERRORS = [
    # (method, options, environment, expected message)
    ("adalora", {}, {"ACCELERATE_USE_DEEPSPEED": "true"}, r"AdaLoRA under DeepSpeed is not supported"),
    ("lora", {"fsdp": True}, {"WORLD_SIZE": "1"}, r"--fsdp needs a distributed launch"),
    ("lora", {"fsdp": True}, {"WORLD_SIZE": "2", "ACCELERATE_USE_DEEPSPEED": "true"}, r"exclude each other"),
    ("lora", {}, {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, r"ZeRO-3 is not sup"),
    # accelerate's single-process launcher, asked for 2 processes (without --multi_gpu on CPU)
    (
        "lora",
        {},
        {"ACCELERATE_USE_CPU": "False", "MASTER_ADDR": "127.0.0.1"},
        r"started a single process.*MASTER_ADDR.*unset it",
    ),
]


@pytest.mark.parametrize(
    ("method", "options", "env", "message"), LAUNCH_ERRORS, ids=[c[3][:30] for c in LAUNCH_ERRORS]
)
def test_launches_that_cannot_train_are_refused_before_any_work(method, options, env, message, monkeypatch):
    from adaconvert.training.trainer import check_launch

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    opts = load_options(method, model="m", data="d", output="o", **options)
    with pytest.raises(errors.InvalidConfigError, match=message):
        check_launch(opts)
    if method != "lora" or options:  # what the same launch can train passes
        check_launch(load_options("lora", model="m", data="d", output="o"))


def test_deepspeed_zero_stage_comes_from_the_accelerate_config_or_its_deepspeed_file(tmp_path, monkeypatch):
    from adaconvert.training.trainer import check_launch, deepspeed_zero_stage

    assert deepspeed_zero_stage() is None  # no DeepSpeed
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert deepspeed_zero_stage() == 2  # accelerate's default
    check_launch(load_options("lora-drop", model="m", data="d", output="o"))  # ZeRO-2 trains LoRA and LoRA-Drop
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto"}))
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(config))
    assert deepspeed_zero_stage() == 3
    with pytest.raises(errors.InvalidConfigError, match="DeepSpeed ZeRO-3 is not supported"):
        check_launch(load_options("lora-drop", model="m", data="d", output="o"))


def test_lora_drop_share_is_accepted_under_fsdp(monkeypatch):
    from adaconvert.training.trainer import check_launch

    monkeypatch.setenv("WORLD_SIZE", "2")
    check_launch(load_options("lora-drop", model="m", data="d", output="o", fsdp=True, policy="share"))


def test_accelerate_launch_with_fsdp_is_an_fsdp_run(tiny_llama, tmp_path, monkeypatch, capsys):
    """``accelerate launch --use_fsdp`` without --fsdp gets the same checks (here: a single process)."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    data = write_jsonl(tmp_path / "d.jsonl")
    args = ["train", "lora", "--model", str(tiny_llama), "--data", str(data), "--output", str(tmp_path / "o")]
    assert main([*args, "--quiet"]) == 2
    assert "--fsdp needs a distributed launch" in capsys.readouterr().err


def test_the_launchers_mixed_precision_does_not_override_precision(tiny_llama, tmp_path, monkeypatch):
    """``accelerate launch --mixed_precision bf16`` (or an accelerate config) passes ACCELERATE_MIXED_PRECISION,
    which the Trainer adopted when neither bf16 nor fp16 was asked for: an fp32 run trained under bf16 autocast."""
    data = write_jsonl(tmp_path / "d.jsonl")
    plain = quick_train("lora", tiny_llama, data, tmp_path / "plain", steps=2, precision="fp32")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    launched = quick_train("lora", tiny_llama, data, tmp_path / "launched", steps=2, precision="fp32")
    assert launched.main.train_loss == plain.main.train_loss


def test_a_world_that_the_data_cannot_feed_is_refused():
    from adaconvert.training.trainer import check_world_fits

    opts = load_options("lora", model="m", data="d.jsonl", output="o", batch_size=4)
    check_world_fits(opts, 8, world=2)
    check_world_fits(opts, 3, world=1)  # one process: a short last batch is fine
    with pytest.raises(errors.InvalidConfigError, match=r"d.jsonl: 7 training examples cannot feed 2 processes"):
        check_world_fits(opts, 7, world=2)


def test_step_clock_waits_for_the_device_only_when_timing_is_asked():
    from adaconvert.training.phase import StepClock

    assert not StepClock().sync
    assert StepClock(sync=True).sync == torch.cuda.is_available()
    assert not load_options("lora", model="m", data="d", output="o").time_steps
