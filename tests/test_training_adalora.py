"""AdaLoRA trained through the HF Trainer: the budget really moves, once per optimizer step, also under DDP."""

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
from transformers import TrainerCallback

from adaconvert.readers import read_adapter
from adaconvert.readers.adalora import RANK_HISTORY_FILE
from adaconvert.runtime import torch_threads
from adaconvert.training.config import adalora_schedule, load_options
from tests.peft_utils import peft_model, prompt_ids
from tests.training_utils import ADALORA, QUICK, quick_train, write_jsonl


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("adalora-data") / "data.jsonl")


def test_trainer_adalora_prunes_to_the_budget(trained, tiny_llama):
    result = trained.get("adalora")
    out = Path(result.output)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADALORA" and config["rank_pattern"] is not None
    ranks = {key.removesuffix(".lora_E"): sum(mask) for key, mask in config["rank_pattern"].items()}
    assert len(set(ranks.values())) > 1, "AdaLoRA should give modules different ranks"
    assert sum(ranks.values()) == config["target_r"] * len(ranks)  # the total budget is exactly the target
    assert ranks == result.ranks

    history = json.loads((out / RANK_HISTORY_FILE).read_text())
    assert history["target_budget"] == sum(ranks.values())
    assert history["update_and_allocate_calls"] == history["total_step"] == 30
    steps = [entry["step"] for entry in history["history"]]
    assert steps == sorted(steps) and steps[-1] == history["total_step"] - history["tfinal"]
    assert history["history"][0]["total_rank"] > history["history"][-1]["total_rank"]
    assert history["history"][-1]["ranks"] == ranks
    assert read_adapter(out).provenance["rank_history"] == history  # the converter reads it

    # PEFT reloads the checkpoint and computes what the trained model computed
    ids = prompt_ids(tiny_llama)
    with torch.no_grad():
        expected = result.model.eval()(ids).logits
        reloaded = peft_model(tiny_llama, out)(ids).logits
    torch.testing.assert_close(reloaded, expected, rtol=1e-5, atol=1e-5)


def test_without_the_callback_peft_never_prunes(tiny_llama, data, tmp_path):
    """The bug we prevent: HF Trainer does not call update_and_allocate, so AdaLoRA trains as a fixed-rank LoRA."""
    from adaconvert.training.adalora import adalora_config
    from adaconvert.training.data import load_texts, tokenize
    from adaconvert.training.phase import run_phase
    from adaconvert.training.trainer import _peft, load_base_model, load_tokenizer

    opts = load_options(
        "adalora",
        model=str(tiny_llama),
        data=str(data),
        output=str(tmp_path / "x"),
        **QUICK,
        **ADALORA,
    )
    tokenizer = load_tokenizer(opts.model)
    dataset = tokenize(load_texts(data), tokenizer, max_length=opts.max_length)
    model = _peft(load_base_model(opts.model, "fp32"), adalora_config(opts, adalora_schedule(opts, 30), "all-linear"))
    with torch_threads(1):
        run_phase(model, dataset, tokenizer, opts, precision="fp32", callbacks=[])
    assert model.peft_config["default"].rank_pattern is None
    E = [p for n, p in model.named_parameters() if "lora_E" in n]
    assert all(bool((e != 0).all()) for e in E), "no singular value was pruned"
    model.save_pretrained(str(tmp_path / "saved"))
    saved = read_adapter(tmp_path / "saved")
    assert set(saved.ranks.values()) == {8}  # every module still at init_r


class Spy(TrainerCallback):
    """Counts micro-batch forwards and update_and_allocate calls, and checks that the gradients are still there."""

    def __init__(self):
        self.steps: list[int] = []
        self.forwards = 0
        self.grads_present: list[bool] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        base = model.base_model
        real = base.update_and_allocate

        def counting(global_step):
            self.steps.append(global_step)
            grads = [p.grad for n, p in model.named_parameters() if "lora_" in n and p.requires_grad]
            self.grads_present.append(all(g is not None and bool(g.abs().sum() > 0) for g in grads))
            return real(global_step)

        base.update_and_allocate = counting
        model.register_forward_pre_hook(lambda *_: setattr(self, "forwards", self.forwards + 1))


def test_grad_accumulation_calls_update_once_per_optimizer_step(tiny_llama, data, tmp_path):
    spy = Spy()
    result = quick_train(
        "adalora", tiny_llama, data, tmp_path / "out", grad_accum=2, steps=12, tinit=2, tfinal=2, callbacks=[spy]
    )
    assert spy.steps == list(range(12))  # one call per optimizer step, with that step's index
    assert spy.forwards == 24  # two micro-batches per optimizer step
    assert all(spy.grads_present), "update_and_allocate must run before the gradients are cleared"
    assert result.rank_history["update_and_allocate_calls"] == 12


def test_total_step_counts_epochs_and_accumulation(tiny_llama, data, tmp_path):
    # 32 examples, batch 4 -> 8 micro-batches per epoch, accumulation 2 -> 4 optimizer steps, 3 epochs -> 12
    result = quick_train(
        "adalora",
        tiny_llama,
        data,
        tmp_path / "out",
        steps=None,
        epochs=3,
        batch_size=4,
        grad_accum=2,
        tinit=None,
        tfinal=None,
        delta_t=None,
    )
    assert result.main.optimizer_steps == 12
    history = result.rank_history
    assert history["total_step"] == 12 and history["update_and_allocate_calls"] == 12
    assert (history["tinit"], history["tfinal"], history["delta_t"]) == (1, 2, 1)  # 10 % / 20 % / 1 % defaults
    assert sum(result.ranks.values()) == history["target_budget"]


def test_orthogonality_loss_is_added(tiny_llama):
    """PEFT adds orth_reg_weight · R(A, B) only when the model computes the loss (labels given), as our collator
    makes the Trainer do."""
    from peft import get_peft_model

    from adaconvert.training.adalora import adalora_config
    from adaconvert.training.data import CausalCollator
    from tests.peft_utils import load_base

    opts = load_options("adalora", model="m", data="d", output="o", steps=30)
    batch = CausalCollator(0)([{"input_ids": [4, 5, 6, 7]}, {"input_ids": [5, 6]}])
    assert (batch["labels"][1, 2:] == -100).all()
    losses = []
    for weight in (0.0, 0.5):
        opts.orth_reg_weight = weight
        torch.manual_seed(0)
        model = get_peft_model(load_base(tiny_llama), adalora_config(opts, adalora_schedule(opts, 30), "all-linear"))
        losses.append(float(model(**batch).loss))
    assert losses[1] > losses[0] + 1e-4


DDP_SCRIPT = """
import json, os, sys
import torch
torch.set_num_threads(1)
from adaconvert.training import train
base, data, out = sys.argv[1:4]
result = train("adalora", model=base, data=data, output=out, steps=16, batch_size=4, lr=2e-2, max_length=16,
               init_r=6, target_r=2, tinit=3, tfinal=4, delta_t=2, quiet=True, logging_steps=1000)
drop = train("lora-drop", model=base, data=data, output=out + "-drop", steps=6, batch_size=4, lr=2e-2,
             max_length=16, keep_fraction=0.5, pilot_fraction=0.5, quiet=True, logging_steps=1000)
rank = int(os.environ["RANK"])
with open(os.path.join(os.path.dirname(out), f"rank{rank}.json"), "w") as f:
    json.dump({"world_size": result.world_size, "ranks": result.ranks, "written": result.written,
               "pattern": result.model.peft_config["default"].rank_pattern, "history": result.rank_history,
               "drop_kept": drop.lora_drop["kept"], "drop_scores": drop.lora_drop["scores"],
               "drop_B": float(sum(p.abs().sum() for n, p in drop.model.named_parameters() if "lora_B" in n))}, f)
"""


@pytest.mark.slow
def test_ddp_two_processes_agree(tiny_llama, data, tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    assert torchrun, "torchrun (from torch) must be installed"
    script = tmp_path / "ddp_train.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", str(script), str(tiny_llama), str(data),
           str(tmp_path / "adapter")]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world_size"] == r1["world_size"] == 2
    # (saving strips the adapter name from the keys in place on rank 0: compare without it)
    p0, p1 = ({k.removesuffix(".default"): v for k, v in r["pattern"].items()} for r in (r0, r1))
    assert p0 == p1 and len(p0) == 14
    assert r0["history"]["history"] == r1["history"]["history"]
    assert r0["history"]["total_step"] == 16 and r0["history"]["update_and_allocate_calls"] == 16
    assert (r0["written"], r1["written"]) == (True, False)  # only rank 0 writes
    # LoRA-Drop under DDP: both processes select the same layers and end with the same weights
    assert r0["drop_kept"] == r1["drop_kept"] and r0["drop_scores"] == r1["drop_scores"]
    assert r0["drop_B"] == pytest.approx(r1["drop_B"], rel=1e-6) and r0["drop_B"] > 0
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["rank_pattern"]
    assert {k.removesuffix(".lora_E"): sum(v) for k, v in saved.items()} == r0["ranks"]
