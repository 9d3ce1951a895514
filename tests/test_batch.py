"""Batch conversion: many adapters in worker processes, past bad ones, one report each and a summary."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from adaconvert.cli import main
from adaconvert.conversion.batch import SUMMARY_JSON, SUMMARY_MD, expand_sources, output_names, to_lora_many
from adaconvert.conversion.peft_lora import to_lora
from adaconvert.errors import BatchConversionError, InvalidConfigError, OutputExistsError, SourceNotFoundError
from adaconvert.testing.synthetic import write_synthetic_adalora

N = 20
OUTPUT_FILES = {"adapter_config.json", "adapter_model.safetensors", "conversion_report.json", "README.md"}


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> list[Path]:
    """20 AdaLoRA runs laid out as teams do: runs/variant-XX/final (same leaf name everywhere)."""
    root = tmp_path_factory.mktemp("runs")
    return [write_synthetic_adalora(root / f"variant-{i:02d}" / "final", seed=i) for i in range(N)]


def _corrupt(sources: list[Path], tmp_path: Path) -> tuple[list[Path], list[Path]]:
    """Copies of ``sources`` in which #3 has a truncated weights file and #11 a config that is not JSON."""
    import shutil

    copies = []
    for src in sources:
        dst = tmp_path / "runs" / src.parent.name / "final"
        shutil.copytree(src, dst)
        copies.append(dst)
    bad = [copies[i] for i in (3, 11) if i < len(copies)]
    with open(bad[0] / "adapter_model.safetensors", "r+b") as f:
        f.truncate(4000)
    if len(bad) > 1:
        (bad[1] / "adapter_config.json").write_text("{ not json", encoding="utf-8")
    return copies, bad


@pytest.mark.slow  # a CLI subprocess or worker processes, each importing torch: seconds
def test_twenty_adapters_two_jobs(sources, tmp_path, capsys):
    out = tmp_path / "converted"
    code = main(["to-lora", *map(str, sources), "--output-dir", str(out), "--jobs", "2", "--quiet"])
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out

    names = [f"variant-{i:02d}--final" for i in range(N)]
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == names
    for name in names:
        assert {p.name for p in (out / name).iterdir()} == OUTPUT_FILES
    summary = json.loads((out / SUMMARY_JSON).read_text())
    assert (summary["succeeded"], summary["failed"], summary["jobs"]) == (N, 0, 2)
    assert [item["source"] for item in summary["items"]] == [str(s) for s in sources]
    assert all(item["max_rel_error"] < 1e-6 for item in summary["items"])
    table = (out / SUMMARY_MD).read_text()
    for src in sources:
        assert str(src) in printed and str(src) in table
    assert f"{N} of {N} converted" in printed
    # a worker's output is the same bytes as a conversion in this process
    single = to_lora(sources[7], tmp_path / "single")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (out / names[7] / name).read_bytes() == (tmp_path / "single" / name).read_bytes()
    assert summary["items"][7]["params_after"] == single.params_after


@pytest.mark.slow  # a CLI subprocess or worker processes, each importing torch: seconds
def test_bad_adapters_are_named_and_the_rest_converted(sources, tmp_path, capsys):
    copies, bad = _corrupt(sources, tmp_path)
    out = tmp_path / "converted"
    code = main(["to-lora", *map(str, copies), "--output-dir", str(out), "--jobs", "2", "--quiet"])
    err = capsys.readouterr().err
    assert code == 8
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "2 of 20 adapters failed" in err
    assert f"{bad[0]} (" in err and "truncated" in err
    assert f"{bad[1]} (" in err and "not valid JSON" in err

    assert len([p for p in out.iterdir() if p.is_dir()]) == N - 2
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no half-written outputs left behind
    summary = json.loads((out / SUMMARY_JSON).read_text())
    assert (summary["succeeded"], summary["failed"]) == (N - 2, 2)
    failed = {item["source"]: item for item in summary["items"] if not item["ok"]}
    assert set(failed) == {str(b) for b in bad}
    assert failed[str(bad[0])]["error_type"] == "CorruptCheckpointError"
    assert failed[str(bad[1])]["error_type"] == "InvalidConfigError"


def test_api_raises_naming_every_failure_or_returns(sources, tmp_path):
    copies, bad = _corrupt(sources[:6], tmp_path)  # the truncated one (index 3) only
    with pytest.raises(BatchConversionError, match=r"1 of 6 adapters failed") as info:
        to_lora_many(copies, tmp_path / "a", jobs=1)
    assert list(info.value.fields["failures"]) == [str(bad[0])]

    result = to_lora_many(copies, tmp_path / "b", jobs=1, raise_on_failure=False, max_rank=2)
    assert not result.ok and [f.source for f in result.failures] == [str(bad[0])]
    assert all(item.max_rank <= 2 for item in result.items if item.ok)


def test_existing_outputs_fail_per_adapter_without_overwrite(sources, tmp_path):
    out = tmp_path / "out"
    to_lora_many(sources[:3], out)
    with pytest.raises(OutputExistsError, match=SUMMARY_JSON):
        to_lora_many(sources[:3], out)
    (out / SUMMARY_JSON).unlink()
    (out / SUMMARY_MD).unlink()
    result = to_lora_many(sources[:3], out, raise_on_failure=False)
    assert [f.error_type for f in result.failures] == ["OutputExistsError"] * 3
    assert to_lora_many(sources[:3], out, overwrite=True).ok


def test_cli_refuses_to_replace_a_summary_before_any_work(sources, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["to-lora", *map(str, sources[:3]), "--output-dir", str(out), "-q"]
    assert main(argv) == 0
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    capsys.readouterr()
    assert main(argv) == 4
    captured = capsys.readouterr()
    assert captured.err == f"error: {out / SUMMARY_JSON}: output already exists; pass --overwrite to replace it\n"
    assert captured.out == "" and {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # nothing touched
    assert main([*argv, "--overwrite"]) == 0


@pytest.mark.slow  # a CLI subprocess or worker processes, each importing torch: seconds
def test_a_summary_appearing_during_the_run_is_kept(sources, tmp_path):
    """The summary is checked before the conversions and published without replacing one written meanwhile."""
    out, release = tmp_path / "out", tmp_path / "release"
    env = {**os.environ, "ADACONVERT_PAUSE_AT": "before-publish", "ADACONVERT_PAUSE_FILE": str(release)}
    argv = [sys.executable, "-m", "adaconvert.cli", "to-lora", str(sources[0]), "--output-dir", str(out), "-q"]
    proc = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob("release.*")) and time.monotonic() < deadline:  # paused at the first publish
        time.sleep(0.05)
    (out / SUMMARY_JSON).write_text("mine\n")
    release.touch()
    assert proc.wait(timeout=120) == 4
    assert (
        proc.stderr.read() == f"error: {out / SUMMARY_JSON}: output already exists; pass --overwrite to replace it\n"
    )
    assert (out / SUMMARY_JSON).read_text() == "mine\n" and not (out / SUMMARY_MD).exists()
    assert list(out.glob("*/adapter_config.json"))  # the conversion itself is done and kept


def test_sources_from_glob_and_list_file(sources, tmp_path, monkeypatch):
    root = sources[0].parent.parent
    listing = tmp_path / "list.txt"
    listing.write_text(f"# my runs\n{sources[2]}\n\n{sources[1]}\n{sources[2]}\n", encoding="utf-8")
    assert expand_sources([str(root / "variant-0*" / "final")]) == [str(s) for s in sources[:10]]
    assert expand_sources([f"@{listing}", str(sources[0])]) == [str(sources[2]), str(sources[1]), str(sources[0])]

    out = tmp_path / "out"
    code = main(["to-lora", str(root / "variant-1*" / "final"), "--output-dir", str(out), "--quiet", "--json"])
    assert code == 0
    assert json.loads((out / SUMMARY_JSON).read_text())["succeeded"] == 10


@pytest.mark.parametrize(
    ("sources", "expected"),
    [
        (["runs/a", "runs/b"], ["a", "b"]),
        (["runs/a/final", "runs/b/final", "runs/c"], ["a--final", "b--final", "c"]),
        (["x/a/final", "y/a/final"], ["x--a--final", "y--a--final"]),
        (["org/adapter"], ["adapter"]),
    ],
)
def test_output_names(sources, expected):
    assert output_names(sources) == expected


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda out: to_lora_many([], out), InvalidConfigError, "no sources"),
        (lambda out: to_lora_many(["a"], out, jobs=0), InvalidConfigError, "--jobs must be at least 1"),
        (lambda out: to_lora_many(["a", "a/"], out), InvalidConfigError, "would both be written to 'a'"),
        (lambda out: to_lora_many(["a"], out, energy=2.0), InvalidConfigError, "--energy"),
        (lambda out: to_lora_many(["a"], out, rank=3), InvalidConfigError, "unknown to-lora option"),
        (lambda out: expand_sources(["@missing.txt"]), SourceNotFoundError, "source list file not found"),
        (lambda out: expand_sources([str(out / "*" / "nothing")]), SourceNotFoundError, "matches nothing"),
    ],
)
def test_errors(tmp_path, call, error, match):
    with pytest.raises(error, match=match):
        call(tmp_path)
    assert not (tmp_path / SUMMARY_JSON).exists()


def test_single_form_unchanged_and_usage_errors(sources, tmp_path, capsys):
    dst = tmp_path / "one"
    assert main(["to-lora", str(sources[0]), str(dst)]) == 0
    assert f"wrote {dst}:" in capsys.readouterr().out
    assert main(["to-lora", str(sources[0]), str(sources[1]), str(tmp_path / "x")]) == 2
    assert "--output-dir" in capsys.readouterr().err
    assert main(["to-lora", str(sources[0]), str(tmp_path / "y"), "--jobs", "2"]) == 2
