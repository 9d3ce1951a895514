"""push: the real huggingface_hub client against a fake Hub on 127.0.0.1 (tests/helpers/fake_hub.py), through
HF_ENDPOINT."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from pathlib import Path

import pytest

import adaconvert
from adaconvert.cli import main
from adaconvert.conversion.peft_lora import to_lora
from adaconvert.hub import push
from adaconvert.testing.synthetic import write_synthetic_adalora
from tests.helpers.fake_hub import FakeHub
from tests.helpers.needs import require

TOKEN = "hf_FAKEtoken0123456789abcdefSECRET"
REPO = "team/adalora-lora"


def upload_path(monkeypatch, *, xet: bool) -> None:
    """Choose the client's upload path for weights as a user does: ``HF_HUB_DISABLE_XET=1`` for git-LFS, unset for
    the default (Xet whenever ``hf_xet`` is installed). huggingface_hub reads it at import: set in its constants
    too."""
    import huggingface_hub.constants

    if xet:
        monkeypatch.delenv("HF_HUB_DISABLE_XET", raising=False)
    else:
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", not xet)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """The fake Hub, with the client on its default path for the packages installed here (what users get).

    Each test gets a fresh Xet client session and cache: hf_xet remembers the chunks it uploaded (in its
    process-wide session and in HF_XET_CACHE) and would not send them again to the next test's fake Hub, which
    never received them (the real Hub's storage is one service, so there they would be found).
    """
    import importlib

    from huggingface_hub.utils._xet import abort_xet_session

    hf_tqdm = importlib.import_module("huggingface_hub.utils.tqdm")  # the module: `utils.tqdm` is also a class
    monkeypatch.setenv("HF_XET_CACHE", str(tmp_path / "xet-cache"))
    abort_xet_session()  # drops the session; the next upload starts a new one
    with FakeHub(TOKEN) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        monkeypatch.setattr(hf_tqdm, "HF_HUB_DISABLE_PROGRESS_BARS", True)  # read at import
        upload_path(monkeypatch, xet=True)
        yield server
    abort_xet_session()


@pytest.fixture
def lfs_hub(hub, monkeypatch) -> FakeHub:
    """The fake Hub, with the client on the git-LFS path (``HF_HUB_DISABLE_XET=1``)."""
    upload_path(monkeypatch, xet=False)
    return hub


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    src = write_synthetic_adalora(tmp_path_factory.mktemp("adalora") / "run", seed=5)
    dst = tmp_path_factory.mktemp("converted") / "adalora-lora"
    to_lora(src, dst)
    return dst


@pytest.fixture
def adapter(converted, tmp_path) -> Path:
    """A private copy of the converted adapter, next to nothing else (so stray files would show)."""
    return Path(shutil.copytree(converted, tmp_path / "work" / "adapter"))


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def run_cli(args, capsys, caplog) -> tuple[int, str, str]:
    caplog.set_level(logging.DEBUG)  # the token must not show even in debug logs (ours and huggingface_hub's)
    code = main(args)
    out, err = capsys.readouterr()
    for text in (out, err, caplog.text):
        assert TOKEN not in text
    return code, out, err


def test_push_uploads_exact_files_and_card(hub, adapter, capsys, caplog):
    from huggingface_hub import ModelCard

    before = tree(adapter)
    code, out, err = run_cli(["push", str(adapter), REPO, "--private"], capsys, caplog)
    assert code == 0, err

    received = hub.files(REPO)
    assert set(received) == set(before)  # every local file, README.md replaced by the card
    for name, data in before.items():
        if name != "README.md":
            assert received[name] == data, name
    card = ModelCard(received["README.md"].decode())
    assert card.data.library_name == "peft"
    assert card.data.base_model == "tiny-llama"
    assert card.data.pipeline_tag == "text-generation"
    assert {"lora", "adalora", "converted"} <= set(card.data.tags)
    report = json.loads(before["conversion_report.json"])
    assert f"--max-lora-rank {report['vllm_max_lora_rank']}" in card.text
    assert f"--lora-modules adalora-lora={REPO}" in card.text
    assert f'PeftModel.from_pretrained(model, "{REPO}")' in card.text

    repo = hub.repos[REPO]
    assert (
        repo.private
        and len(repo.commits) == 1
        and repo.commits[0]["summary"] == "Upload adapter converted by adaconvert"
    )
    # the Hub's API gets the token; storage (signed LFS URLs, or Xet's CAS with its own token) never sees it
    to_hub = [r.path.startswith("/api/") or ".git/info/lfs/" in r.path for r in hub.requests]
    assert {r.authorization for r, api in zip(hub.requests, to_hub, strict=True) if api} == {f"Bearer {TOKEN}"}
    assert f"Bearer {TOKEN}" not in {r.authorization for r, api in zip(hub.requests, to_hub, strict=True) if not api}
    assert hub.lfs_files(REPO) == {"adapter_model.safetensors"}  # stored outside git, as the Hub does for weights
    assert tree(adapter) == before  # the local README.md is left as it was
    assert f"pushed {len(before)} files to {REPO}@main (private)" in out
    assert hub.url in out


def test_branch_commit_message_and_token_option(hub, adapter, capsys, caplog, monkeypatch):
    assert push(adapter, REPO).commit_url.startswith(hub.url)
    monkeypatch.delenv("HF_TOKEN")
    args = ["push", str(adapter), REPO, "--branch", "v2", "--commit-message", "second try", "--token", TOKEN]
    code, _, err = run_cli(args, capsys, caplog)
    assert code == 0, err
    repo = hub.repos[REPO]
    assert set(repo.branches) == {"main", "v2"}
    assert repo.commits[-1]["summary"] == "second try" and repo.commits[-1]["branch"] == "v2"
    assert hub.files(REPO, "v2")["adapter_model.safetensors"] == (adapter / "adapter_model.safetensors").read_bytes()
    assert [r.path for r in hub.requests if "/branch/" in r.path] == [f"/api/models/{REPO}/branch/v2"]


def test_dry_run_lists_files_and_card_and_sends_nothing(hub, adapter, capsys, caplog, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")  # a dry run needs no token
    code, out, _ = run_cli(["push", str(adapter), REPO, "--dry-run"], capsys, caplog)
    assert code == 0
    assert hub.requests == []
    listed = [line.split()[-1] for line in out.split("--- README.md")[0].splitlines()[1:] if line.strip()]
    assert listed == sorted(tree(adapter))
    result = adaconvert.push(adapter, REPO, dry_run=True)
    assert result.card in out and result.commit_url is None
    assert [name for name, _ in result.files] == listed
    assert dict(result.files)["README.md"] == len(result.card.encode())


@pytest.mark.parametrize(
    ("path", "failure", "match"),
    [
        ("/commit/", "500", r"uploading the files failed: the Hub answered HTTP 500 \(Internal Error"),
        ("/commit/", "reset", r"uploading the files failed: ReadError: .*Connection reset"),
        ("/api/repos/create", "500", r"creating the repo failed: the Hub answered HTTP 500"),
        ("/api/repos/create", "reset", r"creating the repo failed: .*Connection reset"),
    ],
)
def test_server_failure_gives_one_clear_line_and_no_partial_state(hub, adapter, capsys, caplog, path, failure, match):
    import re

    before = tree(adapter)
    around = sorted(p.name for p in adapter.parent.iterdir())
    hub.fail(path, failure)
    code, out, err = run_cli(["push", str(adapter), REPO], capsys, caplog)
    assert code == 7
    assert out == "" and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"error: push to {REPO}: ") and re.search(match, err), err
    assert "nothing was changed locally" in err
    assert tree(adapter) == before and sorted(p.name for p in adapter.parent.iterdir()) == around
    assert REPO not in hub.repos or hub.repos[REPO].commits == []
    # nothing half-done remains on our side: the same push then goes through
    assert push(adapter, REPO).commit_url
    assert set(hub.files(REPO)) == set(before)


@pytest.mark.slow  # waits for huggingface_hub's retry backoff (seconds between attempts)
def test_transient_errors_are_retried_by_huggingface_hub(hub, adapter):
    hub.fail("/preupload/", "500", "reset")
    push(adapter, REPO, progress=False)
    assert len([r for r in hub.requests if "/preupload/" in r.path]) == 3
    assert len(hub.repos[REPO].commits) == 1


def test_bad_token_and_no_token(hub, adapter, capsys, caplog, monkeypatch, tmp_path):
    import huggingface_hub.constants

    wrong = "hf_WRONGtoken9876543210"
    monkeypatch.setenv("HF_TOKEN", wrong)
    code, out, err = run_cli(["push", str(adapter), REPO], capsys, caplog)
    assert code == 7 and "HTTP 401" in err and "check the token" in err
    assert wrong not in err + out + caplog.text

    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    code, _, err = run_cli(["push", str(adapter), REPO], capsys, caplog)
    assert code == 7 and "no Hugging Face token; pass --token, set HF_TOKEN" in err


def _no_report(adapter: Path) -> Path:
    (adapter / "conversion_report.json").unlink()
    return adapter


def _dora(adapter: Path) -> Path:
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    return adapter


def _raw_adalora(adapter: Path) -> Path:
    shutil.rmtree(adapter)
    return write_synthetic_adalora(adapter, seed=1)


def _empty(adapter: Path) -> Path:
    shutil.rmtree(adapter)
    adapter.mkdir()
    return adapter


@pytest.mark.parametrize(
    ("breakage", "code", "match"),
    [
        (_no_report, 2, r"refusing to push: no conversion_report.json: convert it with adaconvert to-lora first"),
        (_dora, 2, r"refusing to push: \[feature\] DoRA is not supported"),
        (_raw_adalora, 2, r"no conversion_report.json.*\[rank-pattern\].*raw AdaLoRA mask.*and \d+ more"),
        (_empty, 2, r"neither an adapter \(adapter_config.json\) nor a model \(config.json\)"),
        (lambda a: a / "missing", 3, r"missing: no such directory"),
    ],
)
def test_refusals_send_nothing(hub, adapter, capsys, caplog, breakage, code, match):
    import re

    target = breakage(adapter)
    got, _, err = run_cli(["push", str(target), REPO], capsys, caplog)
    assert got == code and re.search(match, err), err
    assert len(err.strip().splitlines()) == 1
    assert hub.requests == []


def test_bad_repo_id(hub, adapter, capsys, caplog):
    code, _, err = run_cli(["push", str(adapter), "team//x y"], capsys, caplog)
    assert code == 2 and "invalid Hub repo id 'team//x y'" in err
    assert hub.requests == []


def test_force_pushes_anyway_with_the_local_readme(hub, adapter, capsys, caplog):
    _no_report(adapter)
    (adapter / "README.md").write_text("my own card\n")
    code, _, err = run_cli(["push", str(adapter), REPO, "--force"], capsys, caplog)
    assert code == 0, err
    assert "pushing despite: no conversion_report.json" in caplog.text
    assert hub.files(REPO) == tree(adapter)


def test_merged_model_gets_a_merged_card(hub, tmp_path):
    from huggingface_hub import ModelCard

    model = tmp_path / "merged"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (model / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    adapters = [{"source": "team/adalora-lora", "weight": 1.0, "kind": "adalora", "modules": 14}]
    report = {"base": "org/base-7b", "destination": str(model), "adapters": adapters, "dtype": "bfloat16", "shards": 1}
    (model / "merge_report.json").write_text(json.dumps(report))  # the fields adaconvert.merging.MergeReport writes
    result = push(model, "team/merged")
    assert result.kind == "merged"
    card = ModelCard(hub.files("team/merged")["README.md"].decode())
    assert card.data.library_name == "transformers" and card.data.base_model == "org/base-7b"
    assert {"merged", "adalora"} <= set(card.data.tags)
    assert "vllm serve team/merged" in card.text and "| dtype | bfloat16 |" in card.text
    assert "`org/base-7b` with `team/adalora-lora (weight 1.0)` merged" in card.text
    assert str(tmp_path) not in card.text  # no local paths in a public card
    assert hub.files("team/merged")["model.safetensors"] == (model / "model.safetensors").read_bytes()


def test_card_of_a_real_conversion(adalora_llama, tiny_llama, tmp_path):
    """A PEFT-trained AdaLoRA, converted: the card (from to_lora and regenerated by push) parses and says what
    the report says; the static vLLM check runs against the local base model."""
    from huggingface_hub import ModelCard

    from adaconvert.conversion.card import markdown_rank_table

    report = to_lora(adalora_llama, tmp_path / "conv")
    ranks = {m.name: m.rank_after for m in report.modules if m.rank_after}
    written = ModelCard((tmp_path / "conv" / "README.md").read_text())
    assert written.data.library_name == "peft"
    assert written.data.base_model is None  # a local path is not a Hub id: kept out of the metadata

    result = push(tmp_path / "conv", "me/tiny-adalora", dry_run=True)
    assert result.problems == []
    card = ModelCard(result.card)
    assert card.data.library_name == "peft" and {"lora", "adalora", "converted"} <= set(card.data.tags)
    assert markdown_rank_table(ranks) in card.text
    assert f"| this adapter (rank per module) | {report.params_after:,} |" in card.text
    widths = sum(m.params_after // m.rank_after for m in report.modules if m.rank_after)
    assert (
        f"| fixed-rank LoRA, r = {report.max_rank} on the same modules | {report.max_rank * widths:,} |" in card.text
    )
    assert f"{report.max_rel_error:.2e}" in card.text
    assert f"vllm serve {tiny_llama} --enable-lora --max-lora-rank {report.vllm_max_lora_rank}" in card.text
    assert "--lora-modules tiny-adalora=me/tiny-adalora" in card.text


def test_card_shows_heatmap_and_validation_when_present(adapter):
    from huggingface_hub import ModelCard

    from adaconvert.inspection import plot_rank_heatmap

    report = json.loads((adapter / "conversion_report.json").read_text())
    plot_rank_heatmap({m["name"]: m["rank_after"] for m in report["modules"]}, adapter / "rank_heatmap.png")
    checks = [
        {"level": "weights", "subject": "lora", "metric": "max rel. ΔW error", "value": 3e-8, "limit": 1e-5,
         "passed": True, "higher_is_better": False},
        {"level": "logits", "subject": "lora", "metric": "top-1 agreement", "value": 1.0, "limit": 0.99,
         "passed": True, "higher_is_better": True},
    ]  # fmt: skip
    (adapter / "validation_report.json").write_text(json.dumps({"checks": checks, "passed": True}))
    result = push(adapter, REPO, dry_run=True)
    card = ModelCard(result.card)
    assert "![rank per layer and module](rank_heatmap.png)" in card.text
    assert "| weights | lora | max rel. ΔW error | 3e-08 | ≤ 1e-05 | ok |" in card.text
    assert "| logits | lora | top-1 agreement | 1 | ≥ 0.99 | ok |" in card.text and "**PASSED**" in card.text
    assert {"rank_heatmap.png", "validation_report.json"} <= {name for name, _ in result.files}


# --- the Hub's upload path for weights: LFS batch API, basic and multipart transfers, faults mid-upload ----------


def lfs_requests(hub: FakeHub, kind: str) -> list:
    """The recorded requests of one LFS step: ``batch``, ``put`` (a whole object), ``part``, ``complete``."""
    match = {
        "batch": lambda r: r.path.endswith(".git/info/lfs/objects/batch"),
        "put": lambda r: re.fullmatch(r"/lfs-storage/[0-9a-f]{64}", r.path),
        "part": lambda r: re.fullmatch(r"/lfs-storage/[0-9a-f]{64}/\w+/\d+", r.path),
        "complete": lambda r: r.path.startswith("/api/complete_multipart/"),
    }[kind]
    return [r for r in hub.requests if match(r)]


@pytest.mark.slow  # waits for huggingface_hub's retry backoff (seconds between attempts)
def test_adapter_weights_go_through_lfs_and_survive_a_reset_and_a_500_mid_upload(lfs_hub, adapter):
    hub = lfs_hub
    weights = (adapter / "adapter_model.safetensors").read_bytes()
    hub.fail("^/lfs-storage/", "reset", "500")  # the first PUT is cut off half-way, the second gets a 500
    push(adapter, REPO, progress=False)
    assert hub.files(REPO)["adapter_model.safetensors"] == weights  # byte for byte, as the storage holds it
    assert hub.lfs_files(REPO) == {"adapter_model.safetensors"}
    (batch,) = lfs_requests(hub, "batch")
    (announced,) = json.loads(batch.body)["objects"]
    assert announced == {"oid": hashlib.sha256(weights).hexdigest(), "size": len(weights)}
    puts = lfs_requests(hub, "put")
    assert len(puts) == 3 and puts[-1].body == weights  # retried by huggingface_hub's http_backoff, from byte 0
    assert len(hub.repos[REPO].commits) == 1


@pytest.mark.slow
def test_sharded_merged_model_goes_through_multipart_with_faults(adalora_llama, tiny_llama, tmp_path, monkeypatch):

    from adaconvert.merging import merge

    model = tmp_path / "merged"
    report = merge(tiny_llama, adalora_llama, model, max_shard_size="100KB")
    assert report.shards >= 2
    before = tree(model)
    shards = sorted(name for name in before if name.endswith(".safetensors"))
    part_size = 32 * 2**10
    assert all(len(before[name]) > part_size for name in shards)
    with FakeHub(TOKEN, part_size=part_size) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        upload_path(monkeypatch, xet=False)
        # a part cut off half-way, then a 500 on the next part; a 500 on one completion request
        server.fail(r"^/lfs-storage/[0-9a-f]{64}/\w+/2$", "reset", "500")
        server.fail("^/api/complete_multipart/", "500")
        result = push(model, "team/merged", token=TOKEN, progress=False)
        assert result.kind == "merged" and not result.problems
        received = server.files("team/merged")
        assert set(received) == {*before, "README.md"}  # and the card
        for name, data in before.items():
            if name != "README.md":
                assert received[name] == data, name  # every shard and the index, byte for byte
        assert set(shards) <= server.lfs_files("team/merged")
        parts = lfs_requests(server, "part")
        expected_parts = sum(-(-len(before[name]) // part_size) for name in shards)
        assert len(parts) == expected_parts + 2  # the two failed tries were sent again
        assert all(len(r.body) <= part_size for r in parts)
        assert len(lfs_requests(server, "complete")) == len(shards) + 1
        assert lfs_requests(server, "put") == []  # multipart only: every shard is above the part size
        assert {r.authorization for r in parts} == {None}  # signed storage URLs: the token stays with the API
    assert tree(model) == before


@pytest.mark.slow  # waits for huggingface_hub's retry backoff (seconds between attempts)
def test_lfs_upload_failing_for_good_is_one_line_and_commits_nothing(lfs_hub, adapter, capsys, caplog):
    hub = lfs_hub
    before = tree(adapter)
    hub.fail("^/lfs-storage/", *["503"] * 6)  # one try and huggingface_hub's 5 retries (Retry-After: 0)
    code, out, err = run_cli(["push", str(adapter), REPO], capsys, caplog)
    assert code == 7 and out == "" and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(
        f"error: push to {REPO}: uploading adapter_model.safetensors failed: the Hub answered HTTP 503"
    ), err
    assert len(lfs_requests(hub, "put")) == 6
    assert hub.repos[REPO].commits == [] and hub.lfs_objects == {}
    assert tree(adapter) == before


def test_commit_naming_an_object_that_was_never_stored_is_refused(hub, adapter, capsys, caplog):
    """The fake Hub checks what it is told: an lfsFile whose bytes never arrived gets the Hub's 422."""
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(endpoint=hub.url, token=TOKEN)
    api.create_repo(REPO)
    operation = CommitOperationAdd("adapter_model.safetensors", str(adapter / "adapter_model.safetensors"))
    operation._upload_mode, operation._is_uploaded = "lfs", True  # as if uploaded: the commit alone is sent
    from huggingface_hub.errors import HfHubHTTPError

    with pytest.raises(HfHubHTTPError, match="422"):
        api.create_commit(REPO, [operation], commit_message="no bytes")
    assert hub.repos[REPO].commits == []


@pytest.fixture
def xet_hub(hub, monkeypatch) -> FakeHub:
    """The fake Hub, with the client on the path a user of the pinned versions gets: huggingface_hub 2.4 uploads
    weights through Xet whenever ``hf_xet`` is importable (a dependency of it on x86_64 and arm64) and
    HF_HUB_DISABLE_XET is unset (``is_xet_available()``; no negotiation with the server)."""
    from huggingface_hub.utils._runtime import is_xet_available

    require("hf_xet", purpose="the Xet upload tests")  # installed with huggingface_hub on every CI platform
    assert is_xet_available()
    return hub


def cas_requests(hub: FakeHub, route: str) -> list:
    return [r for r in hub.requests if r.path.startswith(f"/cas/v1/{route}")]


@pytest.mark.slow  # waits for huggingface_hub's retry backoff (seconds between attempts)
def test_adapter_weights_go_through_xet_and_survive_resets_and_500s(xet_hub, adapter, capsys, caplog):
    hub = xet_hub
    weights = (adapter / "adapter_model.safetensors").read_bytes()
    hub.fail("^/cas/v1/xorbs/", "reset", "500")  # the xorb cut off half-way, then a 500
    hub.fail("^/cas/v1/shards$", "500")
    code, _, err = run_cli(["push", str(adapter), REPO], capsys, caplog)
    assert code == 0, err
    assert hub.files(REPO)["adapter_model.safetensors"] == weights  # rebuilt from the chunks the CAS received
    assert hub.lfs_files(REPO) == {"adapter_model.safetensors"}
    assert [r.path for r in hub.requests if "/xet-" in r.path] == [f"/api/models/{REPO}/xet-write-token/main"]
    assert lfs_requests(hub, "batch") == [] and lfs_requests(hub, "put") == []  # Xet, not LFS
    assert len(cas_requests(hub, "xorbs/")) == 3 and len(cas_requests(hub, "shards")) == 2  # retried by hf_xet
    cas = [r for r in hub.requests if r.path.startswith("/cas/")]
    assert {r.authorization for r in cas} == {f"Bearer {hub.xet_token}"}  # the Hub token never reaches the CAS
    assert len(hub.repos[REPO].commits) == 1


@pytest.mark.slow  # a CLI subprocess, or a model or file large enough to take seconds
def test_sharded_merged_model_goes_through_xet(adalora_llama, tiny_llama, xet_hub, tmp_path):
    from adaconvert.merging import merge

    hub = xet_hub
    model = tmp_path / "merged"
    report = merge(tiny_llama, adalora_llama, model, max_shard_size="100KB")
    assert report.shards >= 2
    before = tree(model)
    shards = sorted(name for name in before if name.endswith(".safetensors"))
    hub.fail("^/cas/v1/shards$", "reset")
    push(model, "team/merged", progress=False)
    received = hub.files("team/merged")
    assert set(received) == {*before, "README.md"}
    for name, data in before.items():
        assert received[name] == data, name
    assert hub.lfs_files("team/merged") == set(shards)
    chunks = sum(len(chunks) for chunks in hub.xorbs.values())
    assert chunks >= len(shards) and sum(len(c) for x in hub.xorbs.values() for c in x) >= sum(
        len(before[name]) for name in shards
    )  # every byte of every shard reached the CAS (deduplicated chunks would only lower the count of chunks)
    assert tree(model) == before


def test_xet_upload_refused_is_one_line_and_commits_nothing(xet_hub, adapter, capsys, caplog):
    hub = xet_hub
    before = tree(adapter)
    hub.fail("^/cas/v1/xorbs/", "403")  # not retried: a token without write scope
    code, out, err = run_cli(["push", str(adapter), REPO], capsys, caplog)
    assert code == 7 and out == "" and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"error: push to {REPO}: uploading the files failed: ") and "403" in err, err
    assert hub.xet_token not in err + caplog.text
    assert hub.repos[REPO].commits == [] and hub.lfs_objects == {}
    assert tree(adapter) == before


def _link_to_outside_file(adapter: Path) -> str:
    secret = adapter.parent / "secret.txt"
    secret.write_text("not for the Hub\n")
    (adapter / "notes.txt").symlink_to(secret)
    return "notes.txt"


def _link_to_outside_dir(adapter: Path) -> str:
    outside = adapter.parent / "private"
    outside.mkdir()
    (outside / "id_ed25519").write_text("key\n")
    (adapter / "extra").symlink_to(outside, target_is_directory=True)
    return "extra"


def _link_to_etc_passwd(adapter: Path) -> str:
    (adapter / "passwd").symlink_to("/etc/passwd")
    return "passwd"


@pytest.mark.parametrize("link", [_link_to_etc_passwd, _link_to_outside_file, _link_to_outside_dir])
@pytest.mark.parametrize("flags", [[], ["--force"], ["--dry-run"]])
def test_symlink_out_of_the_directory_is_refused_and_nothing_sent(hub, adapter, capsys, caplog, link, flags):
    name = link(adapter)
    code, out, err = run_cli(["push", str(adapter), REPO, *flags], capsys, caplog)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert f"refusing to push: {name} is a symlink to " in err and "outside the directory" in err
    assert hub.requests == []


def test_symlink_inside_the_directory_is_uploaded_as_its_content(hub, adapter):
    (adapter / "weights-link.safetensors").symlink_to("adapter_model.safetensors")
    push(adapter, REPO, progress=False)
    weights = (adapter / "adapter_model.safetensors").read_bytes()
    assert hub.files(REPO)["weights-link.safetensors"] == weights


@pytest.mark.parametrize("base", ["org/base\nrm -rf ~", 'org/base") ; import os #', "my model`s base", "a b"])
def test_base_model_that_would_break_the_card_is_refused(hub, adapter, capsys, caplog, base):
    from huggingface_hub import ModelCard

    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": base}))
    code, _, err = run_cli(["push", str(adapter), REPO], capsys, caplog)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "base_model_name_or_path" in err and "neither a Hub id nor a plain path" in err
    assert hub.requests == []
    # forced, the card shows a placeholder: its code blocks stay intact and nothing of the value leaks in
    card = push(adapter, REPO, dry_run=True, force=True).card
    assert base not in card
    assert 'AutoModelForCausalLM.from_pretrained("BASE_MODEL")' in card and "vllm serve BASE_MODEL --enable" in card
    assert card.count("```") % 2 == 0 and ModelCard(card).data.base_model is None


def test_merged_card_keeps_bad_names_out_of_its_code(hub, tmp_path):
    model = tmp_path / "merged"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama"}))
    adapters = [{"source": "runs/x`\n```\nrm -rf ~", "weight": 1.0, "kind": "lora"}]
    (model / "merge_report.json").write_text(json.dumps({"base": "org/base\n```", "adapters": adapters}))
    card = push(model, "team/merged", dry_run=True).card
    assert "rm -rf" not in card and "org/base" not in card and card.count("```") % 2 == 0
    assert "`the base model` with `an adapter (weight 1.0)` merged" in card


def test_local_base_path_stays_in_the_snippets(adapter, tmp_path):
    base = tmp_path / "models" / "base-7b"
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": str(base)}))
    result = push(adapter, REPO, dry_run=True)
    assert not any("base_model_name_or_path" in p for p in result.problems)
    assert f'from_pretrained("{base}")' in result.card


def test_local_card_and_pushed_card_agree_on_the_pipeline_tag(lora_variants, tmp_path):
    """to-lora's README and the card push regenerates both follow the adapter's task_type."""
    from adaconvert import to_lora
    from adaconvert.hub import _card

    src = tmp_path / "feature-extraction"
    shutil.copytree(lora_variants["plain"], src)
    config = json.loads((src / "adapter_config.json").read_text())
    (src / "adapter_config.json").write_text(json.dumps({**config, "task_type": "FEATURE_EXTRACTION"}))
    to_lora(src, tmp_path / "out")

    def tag(card: str) -> str:
        return re.search(r"^pipeline_tag: (.+)$", card, re.M).group(1)

    local = (tmp_path / "out" / "README.md").read_text()
    assert tag(local) == tag(_card(tmp_path / "out", "adapter", "me/x")) == "feature-extraction"


def test_gguf_output_is_pushed_with_its_report_and_card(hub, adalora_llama, tiny_llama, tmp_path, capsys, caplog):
    """`push NAME.gguf`: the GGUF under its own name (stored outside git), NAME.report.json as the repo's
    conversion_report.json and NAME.README.md as its card; no vLLM check (llama.cpp reads it, not vLLM)."""
    from adaconvert import to_gguf

    gguf = tmp_path / "models" / "ada.gguf"
    to_gguf(adalora_llama, gguf, base=tiny_llama)
    code, _, err = run_cli(["push", str(gguf), REPO], capsys, caplog)
    assert code == 0, err
    received = hub.files(REPO)
    assert set(received) == {"ada.gguf", "conversion_report.json", "README.md"}
    assert received["ada.gguf"] == gguf.read_bytes()
    assert received["conversion_report.json"] == (tmp_path / "models" / "ada.report.json").read_bytes()
    assert received["README.md"] == (tmp_path / "models" / "ada.README.md").read_bytes()
    assert "llama-server" in received["README.md"].decode()
    assert "ada.gguf" in hub.lfs_files(REPO)

    (tmp_path / "models" / "ada.report.json").unlink()
    code, _, err = run_cli(["push", str(gguf), REPO], capsys, caplog)
    assert code == 2 and "no ada.report.json: convert it with adaconvert to-gguf first" in err


@pytest.mark.parametrize(
    "tag", ["lora", "yes", "No", "null", "1e3", "0x10", "a: b", "#x", "- x", "it's", 'say "hi"', "ünï", "*ref", "x\ny"]
)
def test_card_metadata_reads_back_as_written(tag):
    """The card header is written without a YAML library: huggingface_hub's ModelCard reads every value back as the
    same string, whatever a tag holds (YAML booleans, numbers, indicators, quotes, newlines)."""
    from huggingface_hub import ModelCard

    from adaconvert.conversion.card import card_metadata

    data = ModelCard(card_metadata(base_model="org/x-1.5", library_name="peft", tags=[tag, "peft"]) + "\nbody\n").data
    assert data.tags == [tag, "peft"]
    assert (data.base_model, data.library_name, data.pipeline_tag) == ("org/x-1.5", "peft", "text-generation")
