"""What `adaconvert train` writes converts with `to-lora`, and vLLM then generates exactly what PEFT generates."""

from __future__ import annotations

from pathlib import Path

import pytest

import adaconvert
from tests.helpers.peft_utils import peft_greedy
from tests.helpers.vllm_utils import assert_same_generation, greedy, prompt_token_ids

pytestmark = pytest.mark.vllm


@pytest.mark.parametrize("name", ["lora", "adalora", "lora-drop-share", "lora-drop-drop"])
def test_trained_then_converted_serves_like_peft(name, trained, vllm_engine, tiny_llama, tmp_path):
    original = Path(trained.get(name).output)
    report = adaconvert.to_lora(original, tmp_path / "converted")
    assert report.max_rank <= 16  # the session engine's max_lora_rank
    prompts = prompt_token_ids(tiny_llama)
    expected = peft_greedy(tiny_llama, original, prompts)  # PEFT on the adapter as trained
    assert expected != peft_greedy(tiny_llama, None, prompts), "the adapter must change the generation"
    served = greedy(vllm_engine, prompts, tmp_path / "converted", name=name)
    assert_same_generation(served, expected)
