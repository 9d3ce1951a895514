"""Library calls leave the process as they found it: environment variables, stderr."""

from __future__ import annotations

import os
import subprocess

import pytest

from adaconvert.process import env_defaults, stderr_to
from tests.helpers.needs import require


def test_env_defaults_sets_only_unset_names_and_removes_them_again(monkeypatch):
    monkeypatch.setenv("ADACONVERT_TEST_USER", "mine")
    monkeypatch.delenv("ADACONVERT_TEST_NEW", raising=False)
    before = dict(os.environ)
    with env_defaults({"ADACONVERT_TEST_USER": "ours", "ADACONVERT_TEST_NEW": "ours"}):
        assert os.environ["ADACONVERT_TEST_USER"] == "mine" and os.environ["ADACONVERT_TEST_NEW"] == "ours"
    assert dict(os.environ) == before
    with pytest.raises(RuntimeError), env_defaults({"ADACONVERT_TEST_NEW": "ours"}):
        raise RuntimeError
    assert dict(os.environ) == before


def test_stderr_to_catches_child_processes_and_restores_the_terminal(tmp_path, capfd):
    log = tmp_path / "third_party.log"
    with stderr_to(log):
        subprocess.run(["sh", "-c", "echo from-a-child >&2"], check=True)
        os.write(2, b"from-fd-2\n")
    os.write(2, b"after\n")
    assert log.read_text() == "from-a-child\nfrom-fd-2\n"
    assert capfd.readouterr().err == "after\n"


@pytest.mark.slow  # a CLI subprocess, or a model or file large enough to take seconds
def test_make_engine_leaves_the_environment_as_it_found_it(tmp_path):
    """vLLM's start-up settings are set for the engine's start only (here one that fails at once: no model)."""
    require("vllm", purpose="the vLLM tests")
    from adaconvert.validation.vllm_level import make_engine

    before = {k: v for k, v in os.environ.items() if k.startswith("VLLM_")}
    with pytest.raises(Exception):  # noqa: B017 - whatever vLLM raises for a missing model
        make_engine(tmp_path / "no-model", [], quiet=True)
    assert {k: v for k, v in os.environ.items() if k.startswith("VLLM_")} == before
