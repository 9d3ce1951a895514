"""Training on 2 CPU processes (``torchrun``, gloo), under DDP and under FSDP2, against the same run on 1 process.

The same seed and data: one process with batch 8 sees, at every optimizer step, the same 8 examples as two
processes with batch 4 each (the Trainer shards one shuffled order), and the loss is normalised by the tokens of
the whole step on every path. Each launch trains the three methods once and every check reads its outputs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from adaconvert.constants import LORA_DROP_NAME, RANK_HISTORY_NAME
from tests.helpers.needs import require
from tests.helpers.peft_utils import peft_model, prompt_ids
from tests.helpers.training_utils import torchrun, write_jsonl

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

SCRIPT = """
import json, os, sys
import torch
torch.set_num_threads(1)
from adaconvert.training import train
from adaconvert.training.sharding import is_sharded
base, data, out, mode = sys.argv[1:5]
world = int(os.environ.get("WORLD_SIZE", "1"))
common = dict(model=base, data=data, batch_size=8 // world, lr=2e-2, max_length=16, lora_dropout=0.0, quiet=True,
              logging_steps=1000, fsdp=mode == "fsdp")
ada = train("adalora", output=out + "/adalora", steps=16, init_r=6, target_r=2, tinit=3, tfinal=4, delta_t=2,
            **common)
drop = train("lora-drop", output=out + "/lora-drop", steps=6, keep_fraction=0.5, pilot_fraction=0.5,
             granularity="module", policy="drop", **common)
lora = train("lora", output=out + "/lora", steps=4, gradient_checkpointing=True, **common)  # the 70B recipe's mix
rank = int(os.environ.get("RANK", "0"))
extra = {}
if mode != "single":  # LoRA-Drop's default policy: 6 of 14 modules kept, the rest share one LoRA per module kind
    # (scored by the pilot's weights: the other importance, whose FSDP shards are gathered in one collective)
    share = train("lora-drop", output=out + "/lora-drop-share", steps=6, keep_fraction=0.4, pilot_fraction=0.5,
                  granularity="module", importance="weight-l1", **common)
    extra["share"] = share.lora_drop
if mode == "fsdp":  # the mixed-precision policy each FSDP unit got from accelerate, in a bf16 run
    from torch.distributed.fsdp import FSDPModule
    from transformers import TrainerCallback

    class Policies(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            groups = [m._get_fsdp_state()._fsdp_param_group for m in model.modules() if isinstance(m, FSDPModule)]
            extra["policies"] = sorted({(str(g.mp_policy.param_dtype), str(g.mp_policy.reduce_dtype))
                                        for g in groups if g is not None})
            extra["units"] = sum(g is not None for g in groups)

    train("lora", output=out + "/lora-bf16", steps=2, precision="bf16", callbacks=[Policies()], **common)
# (saving strips the adapter name from the pattern's keys in place on rank 0: compare without it)
pattern = {k.removesuffix(".default"): v for k, v in ada.model.peft_config["default"].rank_pattern.items()}
with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
    json.dump({"world_size": ada.world_size, "written": [r.written for r in (ada, drop, lora)], "pattern": pattern,
               "sharded": [any(is_sharded(p) for p in r.model.parameters()) for r in (ada, drop, lora)],
               "history": ada.rank_history, "drop": drop.lora_drop, **extra}, f)
"""


def _launch(tmp: Path, base: Path, data: Path, mode: str) -> Path:
    """Run SCRIPT as ``mode`` (single, ddp, fsdp); returns its output directory."""
    out = tmp / mode
    out.mkdir()
    script = tmp / "train_script.py"
    script.write_text(textwrap.dedent(SCRIPT))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # what torchrun sets itself; the single process the same
    args = [str(script), str(base), str(data), str(out), mode]
    cmd = [sys.executable, *args] if mode == "single" else [torchrun(), "--standalone", "--nproc_per_node", "2", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return out


@pytest.fixture(scope="module")
def runs(tiny_llama, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("distributed")
    data = write_jsonl(tmp / "data.jsonl")
    return {mode: _launch(tmp, tiny_llama, data, mode) for mode in ("single", "ddp", "fsdp")}


def _record(out: Path, rank: int = 0) -> dict:
    return json.loads((out / f"rank{rank}.json").read_text())


def _saved_pattern(adapter: Path) -> dict:
    return json.loads((adapter / "adapter_config.json").read_text())["rank_pattern"]


def test_every_process_agrees_and_only_the_main_one_writes(runs):
    for mode in ("ddp", "fsdp"):
        r0, r1 = _record(runs[mode], 0), _record(runs[mode], 1)
        assert r0["world_size"] == r1["world_size"] == 2
        assert r0["sharded"] == r1["sharded"] == [mode == "fsdp"] * 3  # FSDP really sharded, DDP did not
        assert r0["written"] == [True] * 3 and r1["written"] == [False] * 3
        assert r0["pattern"] == r1["pattern"] and len(r0["pattern"]) == 14
        assert r0["history"] == r1["history"]
        assert r0["drop"]["kept"] == r1["drop"]["kept"] and r0["drop"]["scores"] == r1["drop"]["scores"]


def test_adalora_budget_is_the_same_on_one_process_ddp_and_fsdp(runs):
    single, ddp, fsdp = (_record(runs[m]) for m in ("single", "ddp", "fsdp"))
    assert single["pattern"] == ddp["pattern"] == fsdp["pattern"]
    # the whole allocation over time, budget steps and per-module ranks, not only the end
    assert single["history"]["history"] == ddp["history"]["history"] == fsdp["history"]["history"]
    history = fsdp["history"]
    assert history["update_and_allocate_calls"] == history["total_step"] == 16
    ranks = history["history"][-1]["ranks"]
    assert sum(ranks.values()) == history["target_budget"] and len(set(ranks.values())) > 1
    for mode in ("single", "ddp", "fsdp"):  # what was saved is what was trained
        assert _saved_pattern(runs[mode] / "adalora") == single["pattern"]
        saved = json.loads((runs[mode] / "adalora" / RANK_HISTORY_NAME).read_text())
        assert saved["history"] == single["history"]["history"]


def test_lora_drop_scores_and_kept_modules_match_under_fsdp(runs):
    single, fsdp = _record(runs["single"])["drop"], _record(runs["fsdp"])["drop"]
    # float32 sums over the same tokens, in another order (batches of 4 per process vs 8, sharded matmuls): the
    # scores agree to float32 precision of the pilot's weights, far below the gaps between modules
    assert fsdp["module_scores"] == pytest.approx(single["module_scores"], rel=1e-4)
    assert fsdp["kept_modules"] == single["kept_modules"] and fsdp["dropped_modules"] == single["dropped_modules"]
    saved = json.loads((runs["fsdp"] / "lora-drop" / LORA_DROP_NAME).read_text())
    assert saved["kept_modules"] == single["kept_modules"]


def test_lora_drop_shared_lora_trains_under_fsdp(runs):
    ddp, fsdp = _record(runs["ddp"])["share"], _record(runs["fsdp"])["share"]
    assert fsdp["policy"] == "share" and fsdp["kept_modules"] == ddp["kept_modules"]
    assert fsdp["shared_groups"] == ddp["shared_groups"]
    assert max(len(group) for group in fsdp["shared_groups"].values()) > 1  # one LoRA really serves several layers
    # the saved adapter holds one copy per layer of each group's one LoRA
    from safetensors.torch import load_file

    tensors = load_file(runs["fsdp"] / "lora-drop-share" / "adapter_model.safetensors")
    for group in fsdp["shared_groups"].values():
        for factor in ("lora_A", "lora_B"):
            first, *others = (tensors[f"base_model.model.{m}.{factor}.weight"] for m in group)
            assert all(torch.equal(first, other) for other in others)


def test_fsdp_reduces_gradients_in_float32_in_a_bf16_run(runs):
    """accelerate's own policy for bf16 reduces in bf16; every FSDP unit must have been given float32."""
    for rank in (0, 1):
        record = _record(runs["fsdp"], rank)
        assert record["units"] >= 3  # the decoder layers, the embedding / head units and the root
        assert record["policies"] == [["torch.bfloat16", "torch.float32"]]


@pytest.mark.parametrize("method", ["adalora", "lora-drop", "lora", "lora-drop-share"])
def test_fsdp_adapter_reloads_in_peft_and_matches_ddp(runs, tiny_llama, method):
    from safetensors.torch import load_file

    fsdp_dir, ddp_dir = runs["fsdp"] / method, runs["ddp"] / method
    fsdp_tensors = load_file(fsdp_dir / "adapter_model.safetensors")
    ddp_tensors = load_file(ddp_dir / "adapter_model.safetensors")
    assert fsdp_tensors.keys() == ddp_tensors.keys()  # whole tensors, full shapes: no shard was saved
    for key, tensor in ddp_tensors.items():
        assert fsdp_tensors[key].shape == tensor.shape, key
    ids = prompt_ids(tiny_llama)
    with torch.no_grad():
        from_fsdp = peft_model(tiny_llama, fsdp_dir)(ids).logits
        from_ddp = peft_model(tiny_llama, ddp_dir)(ids).logits
    # the same training, reduced in another order (reduce-scatter of shards vs all-reduce, float32): a few ulp per
    # step, grown over the steps by Adam at lr 2e-2; the adapters' own effect on these logits is ~1
    torch.testing.assert_close(from_fsdp, from_ddp, rtol=0, atol=2e-3)


def test_fsdp_adalora_converts_and_validates(runs, tiny_llama, tmp_path):
    from adaconvert import to_lora, validate

    src = runs["fsdp"] / "adalora"
    to_lora(src, tmp_path / "lora")
    report = validate(tiny_llama, src, tmp_path / "lora")
    assert report.passed


def test_a_refusal_on_the_main_process_stops_every_process(tiny_llama, tmp_path):
    """The output exists: rank 0 refuses, and rank 1 must refuse too, with the same line. (Only rank 0 checked:
    torchrun's agent then killed rank 1; other launchers left it waiting in a collective until the timeout.)"""
    (tmp_path / "out").mkdir()
    data = write_jsonl(tmp_path / "d.jsonl")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # what torchrun sets itself
    cmd = [torchrun(), "--standalone", "--nproc_per_node", "2", "-m", "adaconvert.cli", "train", "lora",
           "--model", str(tiny_llama), "--data", str(data), "--output", str(tmp_path / "out"), "--quiet"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.count("output already exists; pass --overwrite to replace it") == 2, proc.stderr[-3000:]


# SCRIPT's runs through the CLI, as a user types them after `accelerate launch` (2 processes: batch 4 each)
COMMON_CLI = ["--batch-size", "4", "--lr", "2e-2", "--max-length", "16", "--lora-dropout", "0", "--logging-steps",
              "1000", "--quiet"]  # fmt: skip
CLI_RUNS = {
    "adalora": ["adalora", "--steps", "16", "--init-r", "6", "--target-r", "2", "--tinit", "3", "--tfinal", "4",
                "--delta-t", "2"],
    "lora-drop-share": ["lora-drop", "--steps", "6", "--keep-fraction", "0.4", "--pilot-fraction", "0.5",
                        "--granularity", "module", "--importance", "weight-l1"],
}  # fmt: skip


def _accelerate(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """``accelerate launch ARGS`` as a user runs it: the environment as it is (no accelerate config was written
    here), the package as installed."""
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
    assert accelerate, "accelerate must be installed"
    return subprocess.run([accelerate, "launch", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(("mode", "run"), [("ddp", "adalora"), ("fsdp", "adalora"), ("fsdp", "lora-drop-share")])
def test_accelerate_launch_trains_what_torchrun_trains(runs, tiny_llama, tmp_path, mode, run):
    """``accelerate launch --multi_gpu`` (DDP) and ``--use_fsdp`` against torchrun's DDP and FSDP runs: the same
    data, seed, steps and examples per step. Under --use_fsdp, transformers loads the real base on the main process
    only (accelerate's fsdp_cpu_ram_efficient_loading) and FSDP must broadcast it: without that the other process
    trained on zeros (AdaLoRA: another rank pattern, loss 4.4702 against 4.4597 here). LoRA-Drop loads the base
    twice (pilot, then main run)."""
    data = runs["ddp"].parent / "data.jsonl"
    out = tmp_path / run
    launcher = {"ddp": "--multi_gpu", "fsdp": "--use_fsdp"}[mode]
    cli = ["-m", "adaconvert.cli", "train", *CLI_RUNS[run], *COMMON_CLI, "--model", str(tiny_llama), "--data",
           str(data), "--output", str(out)]  # fmt: skip
    proc = _accelerate(launcher, "--num_processes", "2", *cli)
    assert proc.returncode == 0, proc.stderr[-6000:]
    reference = runs[mode] / run
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["world_size"] == 2
    assert _saved_pattern(out) == _saved_pattern(reference)
    from safetensors.torch import load_file

    ours, theirs = load_file(out / "adapter_model.safetensors"), load_file(reference / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys()
    # the same code, processes and kernels: equal up to a change of summation order, should a launcher run the
    # BLAS kernels on another number of threads (a few float32 ulp per step, carried by 16 Adam steps; FSDP's
    # reduce-scatter against DDP's all-reduce differs by 1.4e-7 to 6e-7 here). A base left at zero on one process
    # moves the adapter by orders of magnitude more.
    for key, tensor in theirs.items():
        torch.testing.assert_close(ours[key], tensor, rtol=1e-5, atol=1e-6, msg=key)


def test_accelerate_launch_that_starts_one_process_of_two_is_refused(tiny_llama, tmp_path):
    """Without an accelerate config and without GPUs, `accelerate launch --num_processes 2` starts one process (its
    single-process launcher), which trained alone on half the batch and wrote a world-size-1 adapter."""
    data = write_jsonl(tmp_path / "d.jsonl")
    cli = ["-m", "adaconvert.cli", "train", "lora", "--model", str(tiny_llama), "--data", str(data),
           "--output", str(tmp_path / "out"), "--quiet"]  # fmt: skip
    proc = _accelerate("--num_processes", "2", *cli, timeout=120)
    assert proc.returncode != 0
    assert "error: accelerate launch started a single process, not the several asked for" in proc.stderr
    assert "--multi_gpu" in proc.stderr and not (tmp_path / "out").exists()


# an accelerate config as `accelerate config` writes it for ZeRO-3; or one that names a DeepSpeed config file
ZERO3_CONFIGS = {
    "zero_stage": "deepspeed_config:\n  zero_stage: 3\n",
    "deepspeed_config_file": "deepspeed_config:\n  deepspeed_config_file: {tmp}/ds.json\n  zero3_init_flag: false\n",
}
# ZeRO-3 that partitions every parameter (the default threshold leaves this tiny model's whole): the adapter was
# saved as 28 tensors of shape (0,), "0 trainable parameters", exit 0
DEEPSPEED_JSON = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
                  "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto"}  # fmt: skip


@pytest.mark.parametrize(("method", "style"), [("lora", "zero_stage"), ("lora-drop", "deepspeed_config_file")])
def test_deepspeed_zero3_is_refused_before_any_work(tiny_llama, tmp_path, method, style):
    """DeepSpeed ZeRO-3 through `accelerate launch --config_file`: every process refuses with one line before
    loading anything (ZeRO-3 partitions the adapter's weights, and the saved adapter held none of them)."""
    require("deepspeed", purpose="the DeepSpeed launch test (accelerate launches DeepSpeed only when installed)")
    (tmp_path / "ds.json").write_text(json.dumps(DEEPSPEED_JSON))
    config = tmp_path / "ds3.yaml"
    config.write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\n"
        + ZERO3_CONFIGS[style].format(tmp=tmp_path)
        + "num_machines: 1\nnum_processes: 2\nmixed_precision: 'no'\n"
    )
    data = write_jsonl(tmp_path / "d.jsonl")
    cli = ["-m", "adaconvert.cli", "train", method, "--model", str(tiny_llama), "--data", str(data),
           "--output", str(tmp_path / "out"), "--quiet"]  # fmt: skip
    proc = _accelerate("--config_file", str(config), *cli, timeout=180)
    assert proc.returncode != 0
    assert "error: DeepSpeed ZeRO-3 is not supported" in proc.stderr, proc.stderr[-3000:]
    assert "exitcode  : 2" in proc.stderr  # the CLI's exit code for a refused configuration
    assert not (tmp_path / "out").exists()
