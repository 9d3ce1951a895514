"""`adaconvert demo` end to end, as a user runs it (a fresh process), in a smaller setting."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from adaconvert.constants import DEMO_SUMMARY_NAME, THIRD_PARTY_LOG_NAME, VALIDATION_REPORT_NAME
from adaconvert.demo.demo import OWNER_MARK, run_demo
from adaconvert.errors import OutputExistsError
from tests.helpers.needs import expect_installed
from tests.helpers.vllm_utils import user_env


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    with_vllm = expect_installed("vllm", purpose="the demo's vLLM part")
    directory = tmp_path / "demo"
    cmd = [sys.executable, "-m", "adaconvert.cli", "demo", "--dir", str(directory), "--steps", "40"]
    # a user's environment: the installed package, no VLLM_* setting
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=user_env(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    story = proc.stdout
    # third-party logs (vLLM start-up, PEFT's warnings) go to a file in the demo directory, not to the terminal
    assert not proc.stderr.strip(), proc.stderr[-2000:]
    assert (directory / THIRD_PARTY_LOG_NAME).stat().st_size > 0 and str(directory / THIRD_PARTY_LOG_NAME) in story
    assert len(story.splitlines()) < 80, story
    for expected in ("AdaLoRA rank allocation", "LoRA-Drop layer importance", "PASSED", "artefacts in"):
        assert expected in story, story

    summary = json.loads((directory / DEMO_SUMMARY_NAME).read_text())
    assert summary["validation"]["passed"]
    assert summary["adalora"]["params"] < summary["adalora"]["lora_params"]  # parameter savings
    assert summary["lora_drop"]["main_params"] < summary["lora_drop"]["pilot_params"]
    for name in ("base", "adalora", "lora-drop", "adalora-lora", "lora-drop-lora"):
        assert (directory / name).is_dir()
    assert (directory / "adalora" / "rank_history.json").is_file()
    assert (directory / "lora-drop" / "lora_drop.json").is_file()
    if with_vllm:
        assert set(summary["generations"]) == {"adalora", "lora-drop"}, "vLLM must serve both adapters"
        assert "vllm" in {c["level"] for c in json.loads((directory / VALIDATION_REPORT_NAME).read_text())["checks"]}
        assert "vLLM serves both converted adapters at once" in story
    else:
        assert summary["generations"] is None


def test_demo_refuses_a_directory_it_did_not_make(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "precious.txt").write_text("keep me")
    with pytest.raises(OutputExistsError, match="was not made by the demo; pass --overwrite"):
        run_demo(tmp_path / "mine", vllm=False)
    assert (tmp_path / "mine" / "precious.txt").read_text() == "keep me"
    assert not (tmp_path / "mine" / OWNER_MARK).exists()


def test_demo_overwrite_never_replaces_the_working_directory_or_home(tmp_path, monkeypatch):
    work = tmp_path / "project"
    (work / "src").mkdir(parents=True)
    (work / "src" / "keep.py").write_text("keep me")
    monkeypatch.chdir(work / "src")
    for target in (work, work / "src", Path.home()):
        with pytest.raises(OutputExistsError, match="holds the working directory"):
            run_demo(target, vllm=False, overwrite=True)
    assert (work / "src" / "keep.py").read_text() == "keep me"
