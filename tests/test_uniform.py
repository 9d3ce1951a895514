"""`to-lora --layout uniform`: every module zero-padded to rank R, no patterns; exact in PEFT like compact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import adaconvert
from adaconvert.cli import main
from adaconvert.errors import InvalidConfigError
from tests.helpers.peft_utils import DELTA_TOL, assert_matches_peft, max_rel_delta_error, peft_delta_weights


def _source_modules(adalora_dir) -> dict[str, int]:
    config = json.loads((adalora_dir / "adapter_config.json").read_text())
    return {k.removesuffix(".lora_E"): sum(v) for k, v in config["rank_pattern"].items()}


@pytest.mark.parametrize("fixture", ["adalora_llama", "adalora_gpt2"])
def test_uniform_matches_peft(fixture, request, tmp_path):
    original = request.getfixturevalue(fixture)
    base = request.getfixturevalue("tiny_gpt2" if "gpt2" in fixture else "tiny_llama")
    report = adaconvert.to_lora(original, tmp_path / "out", layout="uniform")
    assert_matches_peft(base, original, tmp_path / "out")
    assert report.max_rel_error <= DELTA_TOL


def test_uniform_files(adalora_llama, tmp_path):
    report = adaconvert.to_lora(adalora_llama, tmp_path / "out", layout="uniform")
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    source = _source_modules(adalora_llama)
    rank = max(source.values())
    # integer, not 6.0: Ollama parses lora_alpha as an unsigned integer
    assert type(config["r"]) is int and type(config["lora_alpha"]) is int
    assert config["r"] == config["lora_alpha"] == rank
    assert config["rank_pattern"] == config["alpha_pattern"] == {}
    # every module the source targeted, fully pruned ones included (as zeros)
    assert sorted(config["target_modules"]) == sorted(source)
    tensors = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert len(tensors) == 2 * len(source)
    for module, kept in source.items():
        a = tensors[f"base_model.model.{module}.lora_A.weight"]
        b = tensors[f"base_model.model.{module}.lora_B.weight"]
        assert a.shape[0] == b.shape[1] == rank
        # the padding is exactly zero: components beyond the module's own rank contribute nothing
        assert not a[kept:].any() and not b[:, kept:].any()
    # Σ (R − r_m)·(in + out), the widths from the AdaLoRA checkpoint itself
    stored = load_file(adalora_llama / "adapter_model.safetensors")
    width = {m: stored[f"base_model.model.{m}.lora_A"].shape[1] + stored[f"base_model.model.{m}.lora_B"].shape[0]
             for m in source}  # fmt: skip
    overhead = sum((rank - kept) * width[m] for m, kept in source.items())
    assert report.layout == "uniform"
    assert report.layout_overhead_params == overhead
    assert report.bytes_after == sum(t.numel() for t in tensors.values()) * 4
    card = (tmp_path / "out" / "README.md").read_text()
    assert "layout *uniform*" in card and f"+{overhead:,} zero parameters" in card
    assert report.runtimes["sglang"]["status"] == "exact"


def test_compact_is_still_the_default(adalora_llama, tmp_path):
    adaconvert.to_lora(adalora_llama, tmp_path / "default")
    report = adaconvert.to_lora(adalora_llama, tmp_path / "compact", layout="compact")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "default" / name).read_bytes() == (tmp_path / "compact" / name).read_bytes()
    assert report.layout == "compact" and report.layout_overhead_params == 0


def test_uniform_converts_back_to_the_same_compact_files(adalora_llama, tmp_path):
    """The padding is exact zeros, so reading a uniform adapter back strips it: compact from uniform is compact."""
    adaconvert.to_lora(adalora_llama, tmp_path / "compact")
    adaconvert.to_lora(adalora_llama, tmp_path / "uniform", layout="uniform")
    adaconvert.to_lora(tmp_path / "uniform", tmp_path / "again")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "compact" / name).read_bytes() == (tmp_path / "again" / name).read_bytes()


def test_uniform_with_compression_and_dtype(adalora_llama, tiny_llama, tmp_path):
    options = {"max_rank": 2, "dtype": "bfloat16"}
    compact = adaconvert.to_lora(adalora_llama, tmp_path / "compact", **options)
    uniform = adaconvert.to_lora(adalora_llama, tmp_path / "uniform", layout="uniform", **options)
    tensors = load_file(tmp_path / "uniform" / "adapter_model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert {t.shape[0] for k, t in tensors.items() if "lora_A" in k} == {2}
    assert uniform.max_rank == compact.max_rank == 2
    assert uniform.max_rel_error == compact.max_rel_error
    # the same bf16 factors, padded: PEFT's ΔW agree up to the float32 summation order of B @ A (1e-6 relative)
    same = max_rel_delta_error(
        peft_delta_weights(tiny_llama, tmp_path / "compact"),
        {k: v for k, v in peft_delta_weights(tiny_llama, tmp_path / "uniform").items() if v.any()},
    )
    assert same <= 1e-6


def test_uniform_cli_json_and_batch(adalora_llama, adalora_llama_b, tmp_path, capsys):
    assert main(["to-lora", str(adalora_llama), str(tmp_path / "one"), "--layout", "uniform", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["layout"] == "uniform" and report["layout_overhead_params"] > 0
    assert report["runtimes"]["llama.cpp"]["status"] == "exact"
    args = ["to-lora", str(adalora_llama), str(adalora_llama_b), "--output-dir", str(tmp_path / "many")]
    assert main([*args, "--layout", "uniform", "--json", "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["succeeded"] == 2
    for item in summary["items"]:
        config = json.loads((Path(item["destination"]) / "adapter_config.json").read_text())
        assert config["rank_pattern"] == {} and config["r"] == config["lora_alpha"] == item["max_rank"]


def test_unknown_layout_is_refused(adalora_llama, tmp_path, capsys):
    with pytest.raises(InvalidConfigError, match="--layout must be one of compact, uniform"):
        adaconvert.to_lora(adalora_llama, tmp_path / "out", layout="wide")
    assert not (tmp_path / "out").exists()
    assert main(["to-lora", str(adalora_llama), str(tmp_path / "out"), "--layout", "wide"]) == 2
    assert "wide" in capsys.readouterr().err
