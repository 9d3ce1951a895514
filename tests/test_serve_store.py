"""``adaconvert serve BASE --adapter-store DIR``: one real server with 2 adapter slots and more adapters than that in
its store, asked in an interleaved order; adapters added and edited while it runs; bad adapters and hostile names;
vLLM's runtime loading routes kept closed; the API key rules of ``serve`` unchanged.

Every answer is compared with PEFT on the ORIGINAL adapter (greedy tokens identical, log-probs within LOGPROB_TOL,
docs/design.md §7)."""

from __future__ import annotations

import os
import shutil
import sys
import threading

import pytest
import torch

from adaconvert.cli import main
from adaconvert.serving.server import VllmServer, plan_serve
from adaconvert.serving.store import source_digest
from tests.helpers.adapter_edits import edited_copy, set_config, wrong_prefix
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

KEY = "sk-adaconvert-STORE-TEST-1a2b3c"


def _rank16(src, dst):
    """A LoRA of real rank 16 (random factors): above --max-lora-rank 8 however it is converted."""
    gen = torch.Generator().manual_seed(0)

    def tensors(t):
        return {
            k: torch.randn(16, v.shape[1], generator=gen) * 0.05
            if ".lora_A." in k
            else torch.randn(v.shape[0], 16, generator=gen) * 0.05
            for k, v in t.items()
        }

    return edited_copy(src, dst, tensors=tensors, config=set_config(r=16, lora_alpha=16))


@pytest.fixture(scope="module")
def originals(adalora_llama, adalora_llama_b, lora_variants, adalora_llama_no_pattern):
    """Store name → the adapter it holds (each kind to-lora reads: AdaLoRA, plain LoRA, rsLoRA, patterns)."""
    return {
        "ada": adalora_llama,
        "team/ada-b": adalora_llama_b,
        "plain": lora_variants["plain"],
        "patterns": lora_variants["patterns"],
        "nopattern": adalora_llama_no_pattern,
    }


@pytest.fixture(scope="module")
def store(originals, adalora_llama, lora_variants, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-store") / "store"
    for name, src in originals.items():
        shutil.copytree(src, root / name)
    _rank16(lora_variants["plain"], root / "big")
    wrong_prefix(adalora_llama, root / "wrong")
    return root


@pytest.fixture(scope="module")
def server(tiny_llama, store, lora_variants):
    """``adaconvert serve`` with the store, one preloaded adapter, 2 slots, an API key from VLLM_API_KEY."""
    require("vllm", purpose="the serve --adapter-store tests")
    work = store.parent
    port = free_port()
    argv = [sys.executable, "-m", "adaconvert.cli", "serve", str(tiny_llama), f"pre={lora_variants['rslora']}"]
    argv += ["--adapter-store", str(store), "--max-lora-rank", "8", "--max-loras", "2", "--max-cpu-loras", "2"]
    argv += ["--port", str(port), "--cache-dir", str(work / "cache"), "--log-file", str(work / "vllm.log")]
    argv += ["--", "--dtype", "float32", "--enforce-eager", "--max-model-len", "128", "--max-num-seqs", "8"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ADACONVERT_", "VLLM_LORA_RESOLVER"))}
    env |= {"VLLM_API_KEY": KEY, "VLLM_CPU_KVCACHE_SPACE": "1"}
    url = f"http://127.0.0.1:{port}"
    with running_server(argv, env=env, log_path=work / "cli.log", url=url):
        yield url


@pytest.fixture(scope="module")
def prompts(tiny_llama):
    return prompt_token_ids(tiny_llama)[:2]


def _expect(server, name, tiny_llama, original, prompts):
    assert_same_generation(served_greedy(server, name, prompts, key=KEY), peft_greedy(tiny_llama, original, prompts))


# --- the plan and the server's environment (no server) ------------------------------------------------------------


def test_plan_with_a_store(tiny_llama, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    plan = plan_serve(tiny_llama, {}, adapter_store=store, cache_dir=tmp_path)
    assert plan.adapters == [] and plan.max_lora_rank == 16 and plan.runtime_loading
    assert plan.command[-4:] == [
        "--middleware",
        "adaconvert.serving.middleware.AdapterStoreMiddleware",
        "--middleware",
        "adaconvert.serving.middleware.CloseRuntimeLoading",
    ]
    assert f"any other name: the adapter of that name in {store.resolve()}" in plan.table()
    opened = plan_serve(tiny_llama, {}, adapter_store=store, cache_dir=tmp_path, allow_runtime_load=True)
    assert "adaconvert.serving.middleware.CloseRuntimeLoading" not in opened.command
    small = plan_serve(tiny_llama, {}, adapter_store=store, cache_dir=tmp_path, max_lora_rank=8)
    assert small.max_lora_rank == 8


def test_the_store_servers_environment(tiny_llama, adalora_llama, tmp_path, monkeypatch):
    store = tmp_path / "store"
    store.mkdir()
    monkeypatch.setenv("VLLM_LORA_RESOLVER_CACHE_DIR", "/")  # vLLM's own resolvers would serve other places
    monkeypatch.setenv("VLLM_PLUGINS", "lora_filesystem_resolver")
    monkeypatch.setenv("ADACONVERT_ADAPTER_STORE", "/elsewhere")
    env = VllmServer(plan_serve(tiny_llama, {}, adapter_store=store, cache_dir=tmp_path)).server_env()
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "true" and "VLLM_LORA_RESOLVER_CACHE_DIR" not in env
    assert env["ADACONVERT_ADAPTER_STORE"] == str(store.resolve())
    assert env["ADACONVERT_ADAPTER_CACHE"] == str(tmp_path.resolve())
    assert env["VLLM_PLUGINS"] == "lora_filesystem_resolver,adaconvert"
    without = VllmServer(plan_serve(tiny_llama, {"a": adalora_llama}, cache_dir=tmp_path)).server_env()
    assert not {"VLLM_ALLOW_RUNTIME_LORA_UPDATING", "ADACONVERT_ADAPTER_STORE"} & set(without)


def test_cli_needs_adapters_or_a_store(tiny_llama, tmp_path, capsys):
    assert main(["serve", str(tiny_llama), "--dry-run", "-q"]) == 2
    assert "give at least one NAME=ADAPTER to serve, or an --adapter-store" in capsys.readouterr().err
    assert main(["serve", str(tiny_llama), "--adapter-store", str(tmp_path / "none"), "--dry-run", "-q"]) == 2
    assert capsys.readouterr().err == f"error: --adapter-store {tmp_path / 'none'}: no such directory\n"


# --- one real server ------------------------------------------------------------------------------------------------


def test_more_adapters_than_slots_in_interleaved_order_each_as_peft(
    server, originals, tiny_llama, lora_variants, prompts
):
    order = ["ada", "team/ada-b", "plain", "pre", "patterns", "ada", "nopattern", "team/ada-b", "plain", "ada"]
    expected = {name: peft_greedy(tiny_llama, src, prompts) for name, src in originals.items()}
    expected["pre"] = peft_greedy(tiny_llama, lora_variants["rslora"], prompts)
    for name in order:
        assert_same_generation(served_greedy(server, name, prompts, key=KEY), expected[name])


def test_concurrent_first_requests_convert_once(server, store, adalora_llama_unpruned, tiny_llama, prompts):
    shutil.copytree(adalora_llama_unpruned, store / "fresh")
    answers = []
    threads = [
        threading.Thread(target=lambda: answers.append(served_greedy(server, "fresh", prompts, key=KEY)))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(answers) == 3
    reference = peft_greedy(tiny_llama, adalora_llama_unpruned, prompts)
    for answer in answers:
        assert_same_generation(answer, reference)
    log = (store.parent / "vllm.log").read_text()
    assert log.count("adapter fresh: serving a new conversion") == 1


def test_an_adapter_added_while_running_is_served(server, store, lora_variants, tiny_llama, prompts):
    status, _ = http_json(f"{server}/v1/completions", {"model": "late", "prompt": "hi", "max_tokens": 1}, key=KEY)
    assert status == 404
    shutil.copytree(lora_variants["rslora"], store / "late")
    _expect(server, "late", tiny_llama, lora_variants["rslora"], prompts)


def test_an_edited_adapter_is_converted_again(server, store, adalora_llama, adalora_llama_b, tiny_llama, prompts):
    shutil.copytree(adalora_llama, store / "swap")
    _expect(server, "swap", tiny_llama, adalora_llama, prompts)
    edited = edited_copy(adalora_llama_b, store.parent / "edited", config=set_config(lora_alpha=12))
    shutil.rmtree(store / "swap")
    shutil.copytree(edited, store / "swap")
    _expect(server, "swap", tiny_llama, edited, prompts)
    assert (store.parent / "cache" / source_digest(edited)).is_dir()


def test_bad_adapters_get_400_with_the_reason_and_the_server_keeps_serving(server, originals, tiny_llama, prompts):
    reasons = {"big": "[max-lora-rank] LoRA rank 16 is greater than max_lora_rank 8", "wrong": "[unknown-module]"}
    for name, reason in reasons.items():
        status, body = http_json(f"{server}/v1/completions", {"model": name, "prompt": "hi", "max_tokens": 1}, key=KEY)
        assert status == 400, body
        assert body["error"]["message"].startswith(f"adapter {name!r} cannot be served: ") and reason in str(body)
    _expect(server, "ada", tiny_llama, originals["ada"], prompts)


def test_hostile_names_get_404(server, store):
    for name in ["../store/ada", str(store / "ada"), "team/ada-b/../../ada", "a/b/c", "ada\x00", ".."]:
        status, _ = http_json(f"{server}/v1/completions", {"model": name, "prompt": "hi", "max_tokens": 1}, key=KEY)
        assert status == 404, name


def test_runtime_loading_routes_are_closed_and_the_api_key_rules_hold(server, store, lora_variants):
    load = {"lora_name": "evil", "lora_path": str(lora_variants["plain"])}
    routes = [
        ("/v1/load_lora_adapter", load, "POST"),
        ("/v1/unload_lora_adapter", {"lora_name": "ada"}, "POST"),
        ("/adapters", {"name": "evil", "src": str(lora_variants["plain"])}, "POST"),
        ("/adapters/ada", None, "DELETE"),
        ("/v1/load_lora_adapter/", load, "POST"),
    ]
    for key in (KEY, None):
        for path, payload, method in routes:
            status, body = http_json(f"{server}{path}", payload, key=key, method=method)
            assert status == 403 and "disabled on this server" in str(body), (path, key, status, body)
    status, models = http_json(f"{server}/v1/models", key=KEY, method="GET")
    assert status == 200 and "evil" not in {m["id"] for m in models["data"]}
    completion = {"model": "ada", "prompt": "hi", "max_tokens": 1}
    assert http_json(f"{server}/v1/completions", completion)[0] == 401
    assert http_json(f"{server}/v1/completions", completion, key="sk-wrong")[0] == 401
    assert http_json(f"{server}/v1/completions", completion, key=KEY)[0] == 200
