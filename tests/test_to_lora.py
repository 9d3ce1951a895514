"""to-lora is exact: checked against PEFT running the original adapter, never against our own formulas."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import adaconvert
from tests.helpers.peft_utils import (
    DELTA_TOL,
    LOGIT_TOL,
    assert_matches_peft,
    max_rel_delta_error,
    peft_delta_weights,
    peft_logits,
    prompt_ids,
)


def test_fixture_is_a_real_dynamic_rank_adapter(adalora_llama):
    config = json.loads((adalora_llama / "adapter_config.json").read_text())
    ranks = {k: sum(v) for k, v in config["rank_pattern"].items()}
    assert len(set(ranks.values())) > 2, "ranks should differ per module"
    assert min(ranks.values()) == 0, "some module should be pruned to rank 0"
    assert sum(ranks.values()) == config["target_r"] * len(ranks), "AdaLoRA keeps exactly the target budget"


@pytest.mark.parametrize(
    "fixture",
    ["adalora_llama", "adalora_llama_b", "adalora_llama_no_pattern", "adalora_llama_unpruned", "adalora_gpt2"],
)
def test_adalora_conversion_matches_peft(fixture, request, tmp_path):
    original = request.getfixturevalue(fixture)
    base = request.getfixturevalue("tiny_gpt2" if "gpt2" in fixture else "tiny_llama")
    report = adaconvert.to_lora(original, tmp_path / "out")
    assert_matches_peft(base, original, tmp_path / "out")
    assert report.max_rel_error <= DELTA_TOL


def test_non_positive_alpha_matches_the_trained_model(tiny_llama, tmp_path):
    """lora_alpha ≤ 0: PEFT trains with scaling init_r / (init_r + 1e-5). Its own reload of such a checkpoint
    (peft 0.21.2) rescales each module by kept_rank / (init_r + 1e-5) instead, computing another function than the
    model that was trained. The conversion follows the trained model, which is what the user evaluated."""
    from tests.helpers.peft_utils import adalora_config, peft_model, train_peft

    cfg = adalora_config("llama", total_step=30, lora_alpha=0)
    original, trained = train_peft(tiny_llama, tmp_path / "ada", cfg, steps=30, seed=3, adalora=True, keep=True)
    ids = prompt_ids(tiny_llama)
    with torch.no_grad():
        trained_logits = trained(ids).logits
    adaconvert.to_lora(original, tmp_path / "out")
    with torch.no_grad():
        assert (trained_logits - peft_model(tiny_llama, tmp_path / "out")(ids).logits).abs().max() <= LOGIT_TOL
        # PEFT's reload discrepancy, pinned so that a fix upstream shows up here
        assert (trained_logits - peft_logits(tiny_llama, original, ids)).abs().max() > 1e-2
    trained_deltas = {
        n.removeprefix("base_model.model."): m.get_delta_weight("default").detach()
        for n, m in trained.named_modules()
        if hasattr(m, "get_delta_weight") and "default" in getattr(m, "lora_A", {})
    }
    assert max_rel_delta_error(trained_deltas, peft_delta_weights(tiny_llama, tmp_path / "out")) <= DELTA_TOL


def test_safe_export_layout(adalora_llama, tmp_path):
    report = adaconvert.to_lora(adalora_llama, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    source = json.loads((adalora_llama / "adapter_config.json").read_text())
    kept = {k.removesuffix(".lora_E"): sum(v) for k, v in source["rank_pattern"].items() if sum(v)}
    assert config["peft_type"] == "LORA"
    assert config["rank_pattern"] == config["alpha_pattern"] == kept
    assert config["r"] == config["lora_alpha"] == max(kept.values())
    assert sorted(config["target_modules"]) == sorted(kept)
    assert config["base_model_name_or_path"] == source["base_model_name_or_path"]
    assert config["task_type"] == source["task_type"] == "CAUSAL_LM"
    tensors = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert all(k.endswith(("lora_A.weight", "lora_B.weight")) for k in tensors)
    assert len(tensors) == 2 * len(kept)
    pruned = {k.removesuffix(".lora_E") for k, v in source["rank_pattern"].items() if not sum(v)}
    assert set(report.removed_modules) == pruned
    assert {p.name for p in (tmp_path / "out").iterdir()} == {
        "adapter_config.json",
        "adapter_model.safetensors",
        "README.md",
        "conversion_report.json",
    }


def test_no_pattern_source_strips_pruned_entries(adalora_llama_no_pattern, tmp_path):
    """rank_pattern null: tensors are full init_r, pruned entries are zeros in lora_E; the output drops them."""
    source = json.loads((adalora_llama_no_pattern / "adapter_config.json").read_text())
    assert source["rank_pattern"] is None
    e = {k: v for k, v in load_file(adalora_llama_no_pattern / "adapter_model.safetensors").items() if "lora_E" in k}
    zeros = sum(int((t == 0).sum()) for t in e.values())
    assert zeros > 0, "budgeting should have masked some entries"
    report = adaconvert.to_lora(adalora_llama_no_pattern, tmp_path / "out")
    assert sum(m.rank_after for m in report.modules) == sum(int((t != 0).sum()) for t in e.values())


@pytest.mark.parametrize("variant", ["plain", "rslora", "patterns"])
def test_lora_normalisation_matches_peft(variant, lora_variants, tiny_llama, tmp_path):
    adaconvert.to_lora(lora_variants[variant], tmp_path / "out")
    assert_matches_peft(tiny_llama, lora_variants[variant], tmp_path / "out")


def test_conversion_is_idempotent(adalora_llama, tmp_path):
    adaconvert.to_lora(adalora_llama, tmp_path / "once")
    adaconvert.to_lora(tmp_path / "once", tmp_path / "twice")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "once" / name).read_bytes() == (tmp_path / "twice" / name).read_bytes()


def test_bin_source_gives_the_same_result(adalora_llama, tmp_path):
    src = tmp_path / "bin"
    src.mkdir()
    (src / "adapter_config.json").write_bytes((adalora_llama / "adapter_config.json").read_bytes())
    torch.save(load_file(adalora_llama / "adapter_model.safetensors"), src / "adapter_model.bin")
    adaconvert.to_lora(adalora_llama, tmp_path / "from_st")
    adaconvert.to_lora(src, tmp_path / "from_bin")
    st = load_file(tmp_path / "from_st" / "adapter_model.safetensors")
    bn = load_file(tmp_path / "from_bin" / "adapter_model.safetensors")
    assert st.keys() == bn.keys() and all(torch.equal(st[k], bn[k]) for k in st)


def test_dtype_option_and_source_dtype(adalora_llama, tiny_llama, tmp_path):
    report = adaconvert.to_lora(adalora_llama, tmp_path / "bf16", dtype="bfloat16")
    tensors = load_file(tmp_path / "bf16" / "adapter_model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert report.dtype == "bfloat16"
    # bf16 has 8 mantissa bits: one rounding of A and B each
    assert 0 < report.max_rel_error < 1e-2
    assert (
        max_rel_delta_error(
            peft_delta_weights(tiny_llama, adalora_llama), peft_delta_weights(tiny_llama, tmp_path / "bf16")
        )
        < 1e-2
    )
    # and a bf16 source stays bf16 by default
    adaconvert.to_lora(tmp_path / "bf16", tmp_path / "bf16-again")
    again = load_file(tmp_path / "bf16-again" / "adapter_model.safetensors")
    assert all(torch.equal(again[k], tensors[k]) for k in tensors)


def test_misscaled_conversion_is_caught(adalora_llama, tiny_llama, tmp_path, monkeypatch):
    """The classic bug, dividing by target_r instead of init_r + 1e-5, must fail the exactness checks."""
    import adaconvert.readers.adalora as reader

    target_r = json.loads((adalora_llama / "adapter_config.json").read_text())["target_r"]
    monkeypatch.setattr(reader, "adalora_scaling", lambda alpha, init_r: alpha / target_r)
    adaconvert.to_lora(adalora_llama, tmp_path / "wrong")
    with pytest.raises(AssertionError):
        assert_matches_peft(tiny_llama, adalora_llama, tmp_path / "wrong")


def test_lora_on_a_tied_lm_head(tiny_qwen2, tmp_path):
    """PEFT saves ``lm_head.base_layer.weight`` (the tied embedding matrix) beside a LoRA on a tied head, and ignores
    it when loading: so do we. The conversion computes what PEFT computes with the original."""
    from peft import LoraConfig

    from tests.helpers.peft_utils import train_peft

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"], init_lora_weights=False)
    original = train_peft(tiny_qwen2, tmp_path / "tied-head", config, steps=3)
    assert "base_model.model.lm_head.base_layer.weight" in load_file(original / "adapter_model.safetensors")
    adaconvert.to_lora(original, tmp_path / "out")
    written = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert "base_model.model.lm_head.lora_B.weight" in written and not any("base_layer" in k for k in written)
    assert_matches_peft(tiny_qwen2, original, tmp_path / "out")


@pytest.mark.parametrize("bucket", [None, 16])
def test_the_static_vllm_check_runs_once(bucket, tmp_path, monkeypatch):
    """to-lora checks the files it wrote against vLLM's rules once: that one check both guards the output and gives
    the report's vLLM verdict, which is the verdict a fresh portability check of the output gives."""
    from adaconvert.cli.main import main
    from adaconvert.compat import vllm
    from adaconvert.compat.runtimes import check_runtimes, runtimes_dict
    from adaconvert.testing.synthetic import write_synthetic_adalora

    src = write_synthetic_adalora(tmp_path / "adalora", init_r=8, target_r=4)
    checked = []
    real = vllm.check_vllm_compat

    def spy(adapter_dir, **options):
        checked.append(adapter_dir)
        return real(adapter_dir, **options)

    monkeypatch.setattr(vllm, "check_vllm_compat", spy)
    argv = ["to-lora", str(src), str(tmp_path / "lora"), "-q"]
    assert main(argv + ([] if bucket is None else ["--vllm-max-lora-rank", str(bucket)])) == 0
    assert len(checked) == 1
    monkeypatch.undo()
    report = json.loads((tmp_path / "lora" / "conversion_report.json").read_text())
    fresh = json.loads(json.dumps(runtimes_dict(check_runtimes(tmp_path / "lora"))))  # tuples become lists
    assert report["runtimes"] == fresh
    assert report["runtimes"]["vllm"]["status"] == "exact"
