"""A long run resumes from its checkpoints (``save_steps``, ``resume``) and ends with the adapter an uninterrupted
run writes: AdaLoRA with its budget mid-way, LoRA-Drop interrupted in its pilot and in its main run.

Equality is exact: one machine, one process, the same kernels on the same inputs in the same order; the
checkpoint restores every state the rest of the run reads (adapter tensors, AdamW moments, learning-rate schedule,
RNG — dropout is on —, data order, AdaLoRA's importance EMAs and schedule, LoRA-Drop's selection), so any
difference is a state that was not restored, not rounding.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from adaconvert.constants import CHECKPOINTS_SUFFIX, LORA_DROP_NAME, RANK_HISTORY_NAME
from adaconvert.errors import InvalidConfigError, OutputExistsError
from tests.helpers.training_utils import quick_train, write_jsonl

pytestmark = pytest.mark.slow


class Crash(Exception):
    """What the interrupted run dies of."""


class CrashAt(TrainerCallback):
    """Dies like a killed process at the start of optimizer step ``step + 1`` of phase ``phase`` (0: the first
    Trainer run of the training, 1: LoRA-Drop's main run), after the checkpoint of step ``step`` was written."""

    def __init__(self, step: int, phase: int = 0):
        self.step, self.phase, self.phases = step, phase, -1

    def on_train_begin(self, args, state, control, **kwargs):
        self.phases += 1

    def on_step_begin(self, args, state, control, **kwargs):
        if self.phases == self.phase and state.global_step == self.step:
            raise Crash


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("resume-data") / "data.jsonl")


def _interrupted_then_resumed(method, tiny_llama, data, out: Path, crash: CrashAt, **options):
    with pytest.raises(Crash):
        quick_train(method, tiny_llama, data, out, callbacks=[crash], **options)
    assert not out.exists() and (Path(f"{out}{CHECKPOINTS_SUFFIX}") / "run.json").is_file()
    result = quick_train(method, tiny_llama, data, out, resume="latest", **options)
    resumed = [p for p in (result.pilot, result.main) if p is not None][crash.phase]
    assert len(resumed.step_times) == resumed.optimizer_steps - crash.step  # the phase resumed: only its rest ran
    return result


def _assert_same_adapter(a: Path, b: Path) -> None:
    left, right = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert left.keys() == right.keys()
    for key, tensor in left.items():
        assert torch.equal(tensor, right[key]), key
    assert json.loads((a / "adapter_config.json").read_text()) == json.loads((b / "adapter_config.json").read_text())


def test_adalora_resumed_mid_budget_equals_the_uninterrupted_run(tiny_llama, data, tmp_path):
    """30 steps (budget from step 5 to 25), interrupted after step 12 with a checkpoint every 4 steps."""
    whole = quick_train("adalora", tiny_llama, data, tmp_path / "whole")
    resumed = _interrupted_then_resumed("adalora", tiny_llama, data, tmp_path / "resumed", CrashAt(12), save_steps=4)
    _assert_same_adapter(tmp_path / "whole", tmp_path / "resumed")
    assert resumed.rank_history == whole.rank_history  # every budget step, before and after the interruption
    saved = json.loads((tmp_path / "resumed" / RANK_HISTORY_NAME).read_text())
    assert saved["update_and_allocate_calls"] == 30 and saved["history"][-1]["total_rank"] == saved["target_budget"]


@pytest.mark.parametrize(("phase", "step"), [(0, 2), (1, 8)], ids=["in-the-pilot", "in-the-main-run"])
def test_lora_drop_resumed_equals_the_uninterrupted_run(tiny_llama, data, tmp_path, phase, step):
    """The pilot (5 of 20 steps) interrupted after step 2, or the main run after step 8 (the resume then takes
    the selection from the checkpoints and runs no pilot)."""
    options = {"granularity": "module", "keep_fraction": 0.4, "pilot_fraction": 0.25}
    whole = quick_train("lora-drop", tiny_llama, data, tmp_path / "whole", **options)
    resumed = _interrupted_then_resumed(
        "lora-drop", tiny_llama, data, tmp_path / "resumed", CrashAt(step, phase), save_steps=2, **options
    )
    _assert_same_adapter(tmp_path / "whole", tmp_path / "resumed")
    record = json.loads((tmp_path / "resumed" / LORA_DROP_NAME).read_text())
    assert record == json.loads((tmp_path / "whole" / LORA_DROP_NAME).read_text())
    assert resumed.lora_drop["kept"] == whole.lora_drop["kept"]


def test_resume_refuses_other_options_and_a_new_run_refuses_old_checkpoints(tiny_llama, data, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(Crash):
        quick_train("lora", tiny_llama, data, out, save_steps=2, callbacks=[CrashAt(2)])
    with pytest.raises(InvalidConfigError, match=r"options differ from the interrupted run's: lr 0.02 → 0.01"):
        quick_train("lora", tiny_llama, data, out, resume="latest", lr=1e-2)
    with pytest.raises(OutputExistsError, match="pass --resume to continue it, or --overwrite"):
        quick_train("lora", tiny_llama, data, out, save_steps=2)
    result = quick_train("lora", tiny_llama, data, out, resume="latest")
    assert result.main.optimizer_steps == 20 and out.is_dir()
