"""The adapter store behind the vLLM resolver: names that are not paths, the content-addressed cache (reused,
rebuilt when edited or damaged, built once under concurrency), the resolver's answers (a LoRARequest, None for a
404, VLLMClientError for a 400) and the plugin, which changes nothing in a vLLM process unless configured."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from adaconvert.compat.layout import is_safe_layout
from adaconvert.constants import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, SERVE_MANIFEST_NAME
from adaconvert.serving.store import cached_conversion, manifest_problem, source_digest, store_path, store_signature
from tests.helpers.adapter_edits import edit_config, wrong_prefix
from tests.helpers.needs import require


@pytest.fixture
def store(tmp_path, adalora_llama, lora_variants):
    """STORE/ada, STORE/org/plain, and next to the store an adapter it must never reach, with symlinks to it."""
    root = tmp_path / "store"
    shutil.copytree(adalora_llama, root / "ada")
    shutil.copytree(lora_variants["plain"], root / "org" / "plain")
    outside = tmp_path / "outside"
    shutil.copytree(adalora_llama, outside / "secret")
    (root / "link").symlink_to(outside / "secret")
    (root / "org" / "link").symlink_to(outside / "secret")
    (root / "leaky").mkdir()
    for f in (outside / "secret").iterdir():
        (root / "leaky" / f.name).symlink_to(f)  # a directory inside, its files outside
    shutil.copytree(adalora_llama, root / "dir-file")
    (root / "dir-file" / ADAPTER_WEIGHTS_NAME).unlink()
    (root / "dir-file" / ADAPTER_WEIGHTS_NAME).mkdir()
    (root / ".hidden").mkdir()
    shutil.copytree(adalora_llama, root / ".hidden" / "x")
    return root


REFUSED = [
    "", "..", ".", "../outside/secret", "ada/..", "org/../ada", "org/./plain", "/ada", "ada/", "org//plain",
    "org/plain/extra", "org\\plain", "ada\n", "ada\x00", "ada\x1b[31m", "ada\t", " ada", ".hidden/x", ".hidden",
    "link", "org/link", "leaky", "dir-file", "org", "missing", "a" * 129, "ada%2F..",
]  # fmt: skip


@pytest.mark.parametrize("name", REFUSED)
def test_names_that_are_not_store_adapters_are_refused(store, name):
    assert store_path(store, name) is None
    assert store_path(store, str(store / "ada")) is None  # an absolute path is not a name either


def test_names_and_org_names_map_into_the_store(store):
    assert store_path(store, "ada") == (store / "ada").resolve()
    assert store_path(store, "org/plain") == (store / "org" / "plain").resolve()
    inner = store / "alias"
    inner.symlink_to(store / "ada")  # a symlink that stays inside the store is fine
    assert store_path(store, "alias") == (store / "ada").resolve()


def test_a_conversion_is_made_once_and_reused(adalora_llama, tmp_path):
    cache = tmp_path / "cache"
    entry, reused = cached_conversion(adalora_llama, cache)
    assert not reused and entry == cache / source_digest(adalora_llama) and is_safe_layout(entry)
    assert manifest_problem(entry) is None
    stamp = (entry / ADAPTER_WEIGHTS_NAME).stat().st_mtime_ns
    again, reused = cached_conversion(adalora_llama, cache)  # nothing held in memory: as after a restart
    assert (again, reused) == (entry, True) and (entry / ADAPTER_WEIGHTS_NAME).stat().st_mtime_ns == stamp


def test_an_edited_adapter_gets_a_new_conversion(adalora_llama, tmp_path):
    src = shutil.copytree(adalora_llama, tmp_path / "ada")
    first, _ = cached_conversion(src, tmp_path / "cache")
    edit_config(src, lambda cfg: {**cfg, "lora_alpha": cfg["lora_alpha"] * 2})
    second, reused = cached_conversion(src, tmp_path / "cache")
    assert not reused and second != first and manifest_problem(first) is None


def _truncate(entry: Path):
    weights = entry / ADAPTER_WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:-100])


def _flip_a_byte(entry: Path):
    data = bytearray((entry / ADAPTER_WEIGHTS_NAME).read_bytes())
    data[-5] ^= 0xFF
    (entry / ADAPTER_WEIGHTS_NAME).write_bytes(bytes(data))


DAMAGE = {
    "truncated weights": _truncate,
    "same size, other bytes": _flip_a_byte,
    "config edited": lambda e: edit_config(e, lambda cfg: {**cfg, "lora_alpha": 1}),
    "file added": lambda e: (e / "adapter_model.bin").write_bytes(b"x"),
    "file removed": lambda e: (e / ADAPTER_CONFIG_NAME).unlink(),
    "manifest removed": lambda e: (e / SERVE_MANIFEST_NAME).unlink(),
    "manifest garbled": lambda e: (e / SERVE_MANIFEST_NAME).write_text("{"),
}


@pytest.mark.parametrize("damage", DAMAGE.values(), ids=DAMAGE.keys())
def test_a_damaged_cache_entry_is_rebuilt_never_reused(damage, adalora_llama, tmp_path, caplog):
    entry, _ = cached_conversion(adalora_llama, tmp_path / "cache")
    good = {p.name: p.read_bytes() for p in entry.iterdir()}
    damage(entry)
    assert manifest_problem(entry) is not None
    again, reused = cached_conversion(adalora_llama, tmp_path / "cache")
    assert (again, reused) == (entry, False) and "is damaged" in caplog.text
    assert {p.name: p.read_bytes() for p in entry.iterdir()} == good


def test_concurrent_first_requests_convert_once(adalora_llama, tmp_path):
    results, barrier = [], threading.Barrier(4)

    def first_request():
        barrier.wait()
        results.append(cached_conversion(adalora_llama, tmp_path / "cache"))

    threads = [threading.Thread(target=first_request) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({entry for entry, _ in results}) == 1
    assert sorted(reused for _, reused in results) == [False, True, True, True]
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")] == [results[0][0].name]


def test_signature_changes_with_an_edit(adalora_llama, tmp_path):
    src = shutil.copytree(adalora_llama, tmp_path / "ada")
    before = store_signature(src)
    assert store_signature(src) == before
    edit_config(src, lambda cfg: {**cfg, "lora_alpha": 3})
    assert store_signature(src) != before


# --- the resolver, as vLLM's API server calls it (no engine needed) ----------------------------------------------


def _resolve(resolver, name, base, limits=None):
    from adaconvert.serving.resolver import ENGINE_LIMITS

    async def call():
        ENGINE_LIMITS.set(limits)
        return await resolver.resolve_lora(str(base), name)

    return asyncio.run(call())


@pytest.mark.vllm
def test_resolver_answers_a_request_for_a_request_a_404_or_a_400(store, tiny_llama, tmp_path):
    require("vllm", purpose="the resolver tests")
    from vllm.exceptions import VLLMClientError

    from adaconvert.serving.resolver import AdapterStoreResolver, EngineLimits

    resolver = AdapterStoreResolver(store, cache=tmp_path / "cache")
    request = _resolve(resolver, "ada", tiny_llama)
    assert request.lora_name == "ada" and Path(request.lora_path).parent == tmp_path / "cache"
    assert is_safe_layout(request.lora_path)
    assert _resolve(resolver, "org/plain", tiny_llama).lora_name == "org/plain"
    for name in ("../outside/secret", "link", "leaky", "missing", "ada\n"):
        assert _resolve(resolver, name, tiny_llama) is None, name

    wrong_prefix(store / "ada", store / "wrong")
    (store / "broken").mkdir()
    (store / "broken" / ADAPTER_CONFIG_NAME).write_text(json.dumps({"peft_type": "ADALORA"}))
    cases = {
        ("ada", EngineLimits(max_lora_rank=1)): r"'ada' cannot be served: .*\[max-lora-rank\]",
        ("wrong", None): r"'wrong' cannot be served: .*\[unknown-module\]",
        ("broken", None): r"'broken' cannot be served: ",
    }
    for (name, limits), match in cases.items():
        with pytest.raises(VLLMClientError, match=match) as caught:
            _resolve(resolver, name, tiny_llama, limits)
        assert "\n" not in str(caught.value) and str(store) not in str(caught.value)
    assert _resolve(resolver, "ada", tiny_llama, EngineLimits(max_lora_rank=8)).lora_name == "ada"


@pytest.mark.vllm
def test_resolver_knows_when_a_served_adapter_was_edited(store, tiny_llama, tmp_path):
    require("vllm", purpose="the resolver tests")
    from adaconvert.serving.resolver import AdapterStoreResolver

    resolver = AdapterStoreResolver(store, cache=tmp_path / "cache")
    assert not resolver.is_stale("ada")  # never resolved: vLLM will ask anyway
    _resolve(resolver, "ada", tiny_llama)
    assert not resolver.is_stale("ada")
    edit_config(store / "ada", lambda cfg: {**cfg, "lora_alpha": 3})
    assert resolver.is_stale("ada")
    resolver.forget("ada")
    assert not resolver.is_stale("ada")


_PLUGIN_PROBE = """
import json, sys
from vllm.plugins import load_general_plugins
from vllm.lora.resolver import LoRAResolverRegistry
load_general_plugins()
print(json.dumps({"resolvers": sorted(LoRAResolverRegistry.get_supported_resolvers()),
                  "modules": sorted(m for m in sys.modules if m.startswith("adaconvert"))}))
"""


def _load_plugins(env: dict) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("ADACONVERT_", "VLLM_LORA_RESOLVER"))}
    return subprocess.run(
        [sys.executable, "-c", _PLUGIN_PROBE], env={**clean, **env}, capture_output=True, text=True, timeout=300
    )


@pytest.mark.vllm
def test_the_plugin_changes_nothing_unless_configured(store, tmp_path):
    require("vllm", purpose="the plugin tests")
    from importlib.metadata import entry_points

    assert "adaconvert" in {e.name for e in entry_points(group="vllm.general_plugins")}
    unconfigured = _load_plugins({})
    assert unconfigured.returncode == 0, unconfigured.stderr
    seen = json.loads(unconfigured.stdout.splitlines()[-1])
    assert seen["resolvers"] == []
    # only the entry point's own module chain was imported, to find out there is nothing to do
    assert not {"adaconvert.conversion.peft_lora", "adaconvert.base.model"} & set(seen["modules"])
    configured = _load_plugins({"ADACONVERT_ADAPTER_STORE": str(store)})
    assert json.loads(configured.stdout.splitlines()[-1])["resolvers"] == ["adaconvert"]
    missing = _load_plugins({"ADACONVERT_ADAPTER_STORE": str(tmp_path / "nowhere")})
    assert missing.returncode != 0 and f"ADACONVERT_ADAPTER_STORE={tmp_path / 'nowhere'} is not a directory" in (
        missing.stderr
    )
