"""The held-out loss under a 2-process launch (``torchrun``, gloo): every rank computes the same curve, rank 0
writes it, and it is the token-weighted loss of the saved adapter in PEFT — although 3 held-out examples split
over 2 processes make the Trainer repeat one to even the batches out (``gather_for_metrics`` drops it)."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap

import pytest

from adaconvert.constants import TRAINING_SUMMARY_NAME
from tests.helpers.peft_utils import EVAL_TEXTS, peft_token_loss
from tests.helpers.training_utils import torchrun, write_jsonl

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

SCRIPT = """
import json, os, sys
import torch
torch.set_num_threads(1)
from adaconvert.training import train
base, data, held, out, mode = sys.argv[1:6]
result = train("adalora", model=base, data=data, output=out + "/adapter", eval_data=held, eval_steps=4, steps=12,
               init_r=6, target_r=2, tinit=2, tfinal=4, delta_t=2, batch_size=4, lr=2e-2, max_length=16,
               quiet=True, logging_steps=1000, fsdp=mode == "fsdp")
with open(os.path.join(out, f"rank{os.environ['RANK']}.json"), "w") as f:
    json.dump({"written": result.written, "eval": result.eval}, f)
"""


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_every_rank_agrees_on_the_heldout_curve_and_rank0_writes_it(tiny_llama, tmp_path, mode):
    data = write_jsonl(tmp_path / "data.jsonl")
    held = write_jsonl(tmp_path / "eval.jsonl", EVAL_TEXTS)
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(SCRIPT))
    out = tmp_path / mode
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # what torchrun sets itself
    cmd = [torchrun(), "--standalone", "--nproc_per_node", "2", str(script), str(tiny_llama), str(data), str(held)]
    proc = subprocess.run([*cmd, str(out), mode], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["written"] for r in ranks] == [True, False]
    assert ranks[0]["eval"] == ranks[1]["eval"]  # the same numbers, bit for bit: one gather, one division
    summary = json.loads((out / "adapter" / TRAINING_SUMMARY_NAME).read_text())
    curve = summary["eval"]["curve"]
    assert curve == ranks[0]["eval"]["curve"]
    assert [p["step"] for p in curve] == [4, 8, 12]
    assert summary["eval"]["examples"] == 3
    # float32 sums in another order than PEFT's one-example passes: 1e-5 relative
    assert curve[-1]["loss"] == pytest.approx(peft_token_loss(tiny_llama, out / "adapter", EVAL_TEXTS), rel=1e-5)
