"""`adaconvert eval` through one vLLM engine (multi-LoRA, prompt log-probabilities) agrees with the transformers +
PEFT engine: the same loss within float32 tolerance and the same greedy generations, on the tiny models."""

from __future__ import annotations

import pytest

from adaconvert.evaluation import evaluate
from tests.test_eval import write_qa

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

# vLLM's CPU kernels and PyTorch's sum the same float32 products in other orders: per-token log-probabilities agree
# within 1e-5 here (docs/design.md §7 allows 1e-3 per token); a mean over ~90 tokens, in nats
LOSS_ABS_TOL = 1e-4


@pytest.fixture(scope="module")
def eval_llm(tiny_llama, converted_llama):
    """One engine for this module, started as `eval` starts its own (LoRA restricted to the adapted module kinds:
    vLLM's prompt log-probabilities fail with its lm_head LoRA wrapper, so the shared session engine cannot score)."""
    from tests.helpers.needs import require

    require("vllm", purpose="the vLLM eval tests")
    from adaconvert.evaluation.engines import start_engine

    return start_engine(tiny_llama, [converted_llama], max_model_len=128, max_loras=4, quiet=True)


def test_vllm_and_hf_engines_agree(eval_llm, tiny_llama, adalora_llama, converted_llama, lora_variants, tmp_path):
    qa = write_qa(tmp_path / "qa.jsonl")
    adapters = [adalora_llama, converted_llama, lora_variants["plain"], lora_variants["rslora"]]
    options = {"data": qa, "split_on": "answer :", "reference_data": qa, "max_new_tokens": 6, "progress": False}
    vllm = evaluate(tiny_llama, adapters, engine="vllm", llm=eval_llm, **options)
    hf = evaluate(tiny_llama, adapters, engine="hf", **options)
    assert vllm.engine == "vllm" and hf.engine == "hf"
    for ours, theirs in zip(vllm.rows, hf.rows, strict=True):
        assert ours.label == theirs.label and ours.tokens == theirs.tokens
        assert ours.loss == pytest.approx(theirs.loss, abs=LOSS_ABS_TOL)
        assert ours.reference_loss == pytest.approx(theirs.reference_loss, abs=LOSS_ABS_TOL)
        if ours.kind == "base":
            # the untrained random base spreads its probability almost evenly over the vocabulary: its top two
            # tokens can lie closer than the float32 difference of the two engines, so only the trained subjects,
            # whose greedy choice has a margin, are held to identical generations
            continue
        assert ours.predictions == theirs.predictions, ours.label
        assert ours.rougeL == theirs.rougeL and ours.exact_match == theirs.exact_match
    # the adapters change the outputs, so agreeing means each one was applied
    assert vllm.row(adalora_llama.name).loss < vllm.row("base").loss - 0.1


def test_vllm_engine_started_by_eval(tiny_llama, adalora_llama, tmp_path):
    """Without an engine given, eval starts its own (AdaLoRA converted with to-lora on the way) and stops it. Run as a
    user runs it, in its own process: freeing an in-process engine tears down vLLM's per-process parallel state,
    which would break the module's engine."""
    import json
    import subprocess
    import sys

    from tests.helpers.needs import require

    require("vllm", purpose="the vLLM eval tests")
    qa = write_qa(tmp_path / "qa.jsonl")
    command = [sys.executable, "-m", "adaconvert.cli", "eval", str(tiny_llama), str(adalora_llama), "--data", str(qa)]
    command += ["--split-on", "answer :", "--engine", "vllm", "--max-new-tokens", "4", "--json", "--quiet"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {row["label"]: row for row in json.loads(proc.stdout)["rows"]}
    assert rows[adalora_llama.name]["loss"] < rows["base"]["loss"]


def test_merged_model_beside_the_vllm_engine(eval_llm, tiny_llama, converted_llama, tmp_path):
    """A merged model has other weights than the base: under vLLM, eval runs it through transformers (its row says
    so), and it scores what its adapter scores in vLLM."""
    from adaconvert import merge

    merged = tmp_path / "merged"
    merge(tiny_llama, [converted_llama], merged)
    qa = write_qa(tmp_path / "qa.jsonl")
    report = evaluate(tiny_llama, [converted_llama], merged=[merged], data=qa, split_on="answer :", engine="vllm",
                      llm=eval_llm, max_new_tokens=6, progress=False)  # fmt: skip
    assert report.row("merged").loss == pytest.approx(report.row(converted_llama.name).loss, abs=LOSS_ABS_TOL)
    assert report.row("merged").predictions == report.row(converted_llama.name).predictions
    assert report.row("merged").engine == "hf" and report.row(converted_llama.name).engine is None
