"""FSDP at scale, on 2 CPU processes (``torchrun``, gloo): what a 70B-class run depends on, checked on the tiny
model by inspecting the real sharded model, the real collectives (torch's profiler) and the real loads.

One launch trains AdaLoRA (gradient checkpointing, parameters offloaded) and LoRA-Drop with ``--keep-layers``;
each process writes what it saw, and every test reads those records.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap

import pytest
from safetensors.torch import load_file

from tests.helpers.training_utils import torchrun, write_jsonl

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

SCRIPT = """
import json, os, sys
import torch
torch.set_num_threads(1)
from transformers import TrainerCallback
from adaconvert.training import train, trainer
from adaconvert.training.adalora import orthogonality_penalty
from adaconvert.training.sharding import full, is_sharded

base, data, out = sys.argv[1:4]
rank = int(os.environ["RANK"])
loads = []
load_base_model = trainer.load_base_model


def recording_load(*args, **kwargs):  # the real load, recorded: how much of the base this process holds
    model = load_base_model(*args, **kwargs)
    params = list(model.parameters())
    loads.append({"bytes": sum(p.numel() * p.element_size() for p in params),
                  "materialised": sum(p.numel() * p.element_size() for p in params if p.device.type != "meta"),
                  "nonzero": sum(int(p.count_nonzero()) for p in params if p.device.type != "meta")})
    return model


trainer.load_base_model = recording_load


class Inspect(TrainerCallback):
    # the wrapped model as the Trainer trains it, and how often decoder layer 0 runs its forward per micro-batch
    def __init__(self):
        self.model, self.forwards, self.per_step = None, 0, []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if self.model is None:
            self.model = model
            self.layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
            forward = self.layers[0].forward  # (checkpointing's recompute runs forward without module hooks)

            def counting_forward(*args, **kwargs):
                self.forwards += 1
                return forward(*args, **kwargs)

            self.layers[0].forward = counting_forward
        self.forwards = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.per_step.append(self.forwards)

    def record(self):
        return {"wrappers": sum(hasattr(m, "_checkpoint_wrapped_module") for m in self.model.modules()),
                "layers": len(self.layers), "checkpointing": [m.gradient_checkpointing for m in self.layers],
                "forwards_per_step": self.per_step,
                "offloaded": sorted({p.to_local().device.type for p in self.model.parameters() if is_sharded(p)})}


def collectives(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.name.startswith("gloo:") for e in prof.events())


common = dict(model=base, data=data, batch_size=4, lr=2e-2, max_length=16, lora_dropout=0.0, quiet=True,
              logging_steps=1000, fsdp=True)
inspect = Inspect()
ada = train("adalora", output=out + "/adalora", steps=6, init_r=6, target_r=2, tinit=1, tfinal=2, delta_t=1,
            gradient_checkpointing=True, fsdp_offload_params=True, callbacks=[inspect], **common)
lora_params = [p for n, p in ada.model.named_parameters() if ("lora_A" in n or "lora_B" in n)]
record = {"ada": inspect.record(), "ada_loads": list(loads), "lora_tensors": len(lora_params),
          "penalty_collectives": collectives(lambda: orthogonality_penalty(ada.model).backward()),
          "one_by_one_collectives": collectives(lambda: [full(p) for p in lora_params])}
loads.clear()
drop = train("lora-drop", output=out + "/lora-drop", steps=3, keep_layers=["1"], policy="drop", **common)
record.update(drop_loads=loads, drop_sharded=any(is_sharded(p) for p in drop.model.parameters()))
with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
    json.dump(record, f)
"""


@pytest.fixture(scope="module")
def run(tiny_llama, tmp_path_factory):
    """The launch's output directory and each process's record."""
    tmp = tmp_path_factory.mktemp("scale")
    data = write_jsonl(tmp / "data.jsonl")
    script = tmp / "scale_script.py"
    script.write_text(textwrap.dedent(SCRIPT))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # what torchrun sets itself
    cmd = [torchrun(), "--standalone", "--nproc_per_node", "2", str(script), str(tiny_llama), str(data), str(tmp)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    # what tells an abort during the run from one at exit (a record written): a SIGABRT at exit, "terminate called
    # without an active exception", was gloo's worker freeing a tensor during finalisation (sharding.released)
    written = sorted(p.name for p in tmp.glob("rank*.json"))
    output = f"{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}"
    assert proc.returncode == 0, f"exit {proc.returncode}, records {written}\n{output}"
    return tmp, [json.loads((tmp / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_only_the_main_process_holds_the_base_before_sharding(run):
    """The other processes build the base on the meta device; sharding broadcasts the main process's weights (the
    adapter trains to the budget below, which zeros could not)."""
    _, (main, other) = run
    (main_load,), (other_load,) = main["ada_loads"], other["ada_loads"]
    assert main_load["materialised"] == main_load["bytes"] > 0 and main_load["nonzero"] > 0
    assert other_load["bytes"] == main_load["bytes"] and other_load["materialised"] == 0


def test_offloaded_fsdp_trains_to_the_budget(run):
    out, records = run
    for record in records:
        assert record["ada"]["offloaded"] == ["cpu"]  # the shards live in CPU memory
    history = json.loads((out / "adalora" / "rank_history.json").read_text())
    assert history["update_and_allocate_calls"] == 6
    assert history["history"][-1]["total_rank"] == history["target_budget"]
    tensors = load_file(out / "adalora" / "adapter_model.safetensors")
    assert tensors and all(t.isfinite().all() for t in tensors.values())


def test_activation_checkpointing_is_applied_once(run):
    """The model's own checkpointing on every decoder layer, no FSDP checkpoint wrapper around it: layer 0 runs its
    forward twice per micro-batch (once, then once recomputed in the backward); nested, it would run three times."""
    _, records = run
    for record in records:
        ada = record["ada"]
        assert ada["wrappers"] == 0 and ada["checkpointing"] == [True] * ada["layers"]
        assert ada["forwards_per_step"] == [2] * 6


def test_orthogonality_penalty_gathers_every_factor_in_one_collective(run):
    """Counted by torch's profiler on the real gloo group: one all-gather for the 28 lora_A / lora_B (forward and
    backward together), where gathering them one by one issues 28."""
    _, records = run
    for record in records:
        assert record["lora_tensors"] == record["one_by_one_collectives"] == 28
        assert record["penalty_collectives"] == 1


def test_keep_layers_under_fsdp_loads_the_base_once(run):
    _, records = run
    for record in records:
        assert len(record["drop_loads"]) == 1 and record["drop_sharded"]
    assert records[1]["drop_loads"][0]["materialised"] == 0
