"""`adaconvert inspect` and the CLI's machine-readable output, on a real PEFT-trained AdaLoRA."""

from __future__ import annotations

import json

from adaconvert.cli import main


def test_inspect_json_matches_the_checkpoint(adalora_llama, capsys):
    assert main(["inspect", str(adalora_llama), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    config = json.loads((adalora_llama / "adapter_config.json").read_text())
    kept = {k.removesuffix(".lora_E"): sum(v) for k, v in config["rank_pattern"].items()}
    assert report["ranks"] == kept
    assert report["total_rank"] == sum(kept.values())
    assert report["max_rank"] == max(kept.values())
    assert report["modules"] == len(kept)
    assert report["modules_with_weights"] == sum(1 for r in kept.values() if r)
    assert report["vllm_max_lora_rank"] == 8  # max rank ≤ init_r = 8
    # equal budget: params / Σ(in + out); tiny llama: hidden 64, intermediate 128, 1 kv head of 32
    widths = {
        "q_proj": 128,
        "k_proj": 96,
        "v_proj": 96,
        "o_proj": 128,
        "gate_proj": 192,
        "up_proj": 192,
        "down_proj": 192,
    }
    params = sum(r * widths[m.rsplit(".", 1)[-1]] for m, r in kept.items())
    assert report["params"] == params
    assert abs(report["equal_budget_rank"] - params / (2 * sum(widths.values()))) < 1e-9


def test_inspect_text_table_and_plot(adalora_llama, tmp_path, capsys):
    plot = tmp_path / "ranks.png"
    assert main(["inspect", str(adalora_llama), "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["layer", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert lines[1].split()[0] == "0" and lines[2].split()[0] == "1"
    assert "vLLM --max-lora-rank: 8" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_to_lora_json_output(adalora_llama, tmp_path, capsys):
    assert main(["to-lora", str(adalora_llama), str(tmp_path / "out"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["vllm_max_lora_rank"] in (1, 8)
    assert report == json.loads((tmp_path / "out" / "conversion_report.json").read_text())
    assert {"name", "rank_before", "rank_after", "params_before", "params_after", "rel_error"} <= set(
        report["modules"][0]
    )


def test_hub_repo_id_resolves_from_the_offline_cache(adalora_llama, tmp_path, monkeypatch, capsys):
    """A Hub id is resolved by huggingface_hub; with HF_HUB_OFFLINE=1 the local cache serves it."""
    snapshot = tmp_path / "hub" / "models--acme--tiny-adalora" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (snapshot / name).write_bytes((adalora_llama / name).read_bytes())
    (tmp_path / "hub" / "models--acme--tiny-adalora" / "refs").mkdir()
    (tmp_path / "hub" / "models--acme--tiny-adalora" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    assert main(["to-lora", "acme/tiny-adalora", str(tmp_path / "out"), "--quiet"]) == 0
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()
    assert main(["to-lora", "acme/missing", str(tmp_path / "out2")]) == 3
    err = capsys.readouterr().err
    assert err.startswith("error: acme/missing: no such local directory, and the Hub could not provide it")
    assert len(err.strip().splitlines()) == 1


def test_plot_never_replaces_an_existing_file_without_overwrite(adalora_llama, tmp_path, capsys):
    """--plot is an output like any other: an existing file is refused before any work, and kept."""
    plot = tmp_path / "ranks.png"
    plot.write_bytes(b"mine")
    assert main(["inspect", str(adalora_llama), "--plot", str(plot), "--quiet"]) == 4
    assert "pass --overwrite" in capsys.readouterr().err and plot.read_bytes() == b"mine"
    assert main(["inspect", str(adalora_llama), "--lora-drop-plan", "--plot", str(plot), "--quiet"]) == 4
    assert plot.read_bytes() == b"mine"
    assert main(["inspect", str(adalora_llama), "--plot", str(plot), "--overwrite", "--quiet"]) == 0
    assert plot.read_bytes().startswith(b"\x89PNG")
