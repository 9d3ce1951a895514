"""Outputs never destroy a user's files: no output over an input, races with exactly one winner, crash-safe
replacement (real ``kill -9`` at the controlled points of ``io.atomic``), stale temporaries cleaned, umask modes,
symlinked DSTs, and a full or read-only disk reported against DST with nothing left behind.

The CLI runs in real subprocesses where a process must die or race; elsewhere in-process through ``main``.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from adaconvert.cli import main
from adaconvert.io import atomic
from tests.helpers.adapter_edits import write_adalora


def env(**extra) -> dict:
    return {**os.environ, **extra}


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "adaconvert.cli", *map(str, args)]


def tree_digest(path: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under ``path`` (or of ``path`` itself)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def leftovers(dst: Path) -> list[str]:
    return sorted(p.name for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}."))


def converted_from(dst: Path) -> str:
    return json.loads((dst / "conversion_report.json").read_text())["source"]


@pytest.fixture
def src(tmp_path):
    path = write_adalora(tmp_path / "ada")
    (path / "data.jsonl").write_text('{"text": "hello"}\n')
    return path


# --- outputs over inputs -------------------------------------------------------------------------------------------


def _merge_base(tmp_path: Path) -> Path:
    """A base with the two modules of ``write_adalora`` (16 × 16)."""
    import torch
    from safetensors.torch import save_file

    base = tmp_path / "base"
    base.mkdir()
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight"]
    save_file({n: torch.ones(16, 16) for n in names}, base / "model.safetensors")
    (base / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return base


OVERLAPS = [
    # (id, argv given tmp_path and the adapter, the input that must survive, how the message says it)
    ("to-lora-same", lambda t, s: ["to-lora", s, s, "--overwrite"], "is"),
    ("to-lora-ancestor", lambda t, s: ["to-lora", s, t, "--overwrite"], "contains"),
    ("to-lora-inside", lambda t, s: ["to-lora", s, s / "out"], "lies inside"),
    ("to-lora-symlink", lambda t, s: ["to-lora", s, _link(t / "link", s), "--overwrite"], "is"),
    ("batch-same", lambda t, s: ["to-lora", s, "--output-dir", t, "--overwrite"], "is"),
    ("batch-inside", lambda t, s: ["to-lora", s, "--output-dir", s / "converted"], "lies inside"),
    ("merge-over-base", lambda t, s: ["merge", _merge_base(t), s, t / "base", "--overwrite"], "is"),
    ("merge-over-adapter", lambda t, s: ["merge", _merge_base(t), s, s, "--overwrite"], "is"),
    ("inspect-plot", lambda t, s: ["inspect", s, "--plot", s / "adapter_model.safetensors"], "lies inside"),
    ("validate-report", lambda t, s: ["validate", t, s, s, "--report", s / "report.json"], "lies inside"),
    (
        "train-output-holds-data",
        lambda t, s: ["train", "lora", "--model", t / "m", "--data", s / "data.jsonl", "--output", s, "-q"],
        "contains",
    ),
]


def _link(link: Path, target: Path) -> Path:
    link.symlink_to(target, target_is_directory=True)
    return link


@pytest.mark.parametrize(("argv", "how"), [c[1:] for c in OVERLAPS], ids=[c[0] for c in OVERLAPS])
def test_output_overlapping_an_input_is_refused_before_anything(tmp_path, src, capsys, argv, how):
    args = argv(tmp_path, src)
    before = tree_digest(tmp_path)
    assert main([str(a) for a in args]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert f"output {how} the input" in err and "Traceback" not in err
    assert tree_digest(tmp_path) == before  # every input intact, nothing written
    assert [p for p in tmp_path.rglob(".*tmp-*")] == []


# --- races and crashes at the controlled points --------------------------------------------------------------------


def _wait_for(predicate, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.mark.slow  # a CLI subprocess, or a model or file large enough to take seconds
def test_two_runs_racing_for_one_dst_exactly_one_wins(tmp_path, src):
    other = write_adalora(tmp_path / "ada2", seed=1)
    dst, release = tmp_path / "dst", tmp_path / "release"
    hold = env(ADACONVERT_PAUSE_AT="before-publish", ADACONVERT_PAUSE_FILE=str(release))
    procs = [
        subprocess.Popen(cli("to-lora", s, dst, "-q"), env=hold, stderr=subprocess.PIPE, text=True)
        for s in (src, other)
    ]
    # both have finished their work and checked that DST is free; only the publishing step is left
    _wait_for(lambda: len(list(tmp_path.glob("release.*"))) == 2, "both runs to reach the publishing step")
    release.touch()
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in results) == [0, 4], results
    winner = next(s for s, (code, _) in zip((src, other), results, strict=True) if code == 0)
    loser_err = next(err for code, err in results if code == 4)
    assert loser_err.strip() == f"error: {dst}: output appeared while this run was writing it; left untouched"
    assert converted_from(dst) == str(winner)
    assert leftovers(dst) == []


def _gguf_base(tmp_path: Path) -> Path:
    """A llama config that ``write_adalora``'s 16 × 16 modules fit (to-gguf reads only config.json)."""
    base = tmp_path / "gguf-base"
    base.mkdir()
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 16, "vocab_size": 32}
    config |= {"intermediate_size": 16, "num_attention_heads": 2, "num_key_value_heads": 2, "num_hidden_layers": 1}
    (base / "config.json").write_text(json.dumps(config))
    return base


@pytest.mark.slow  # a CLI subprocess or worker processes, each importing torch: seconds
@pytest.mark.parametrize("overwrite", [False, True], ids=["first-wins", "overwrite"])
def test_two_to_gguf_runs_into_one_directory_never_mix_their_files(tmp_path, src, overwrite):
    """A GGUF and its side files (NAME.report.json, NAME.README.md) are published as one group: racing runs leave
    the three files of one run, never a GGUF of one and a report or card of the other."""
    other, base = write_adalora(tmp_path / "ada2", seed=1), _gguf_base(tmp_path)
    files = ("x.gguf", "x.report.json", "x.README.md")

    def written(directory: Path) -> tuple:
        """What tells the runs apart: the GGUF's and the card's bytes, the source the report names."""
        report = json.loads((directory / "x.report.json").read_text())
        return (directory / "x.gguf").read_bytes(), (directory / "x.README.md").read_bytes(), report["source"]

    expected = {}
    for source in (src, other):  # what each run writes alone
        alone = tmp_path / f"alone-{source.name}"
        assert main(["to-gguf", str(source), str(alone / "x.gguf"), "--base", str(base), "-q"]) == 0
        expected[str(source)] = written(alone)
    assert expected[str(src)][0] != expected[str(other)][0]
    race, release = tmp_path / "race", tmp_path / "release"
    hold = env(ADACONVERT_PAUSE_AT="before-publish", ADACONVERT_PAUSE_FILE=str(release))
    argv = [["to-gguf", s, race / "x.gguf", "--base", base, "-q", *(["--overwrite"] if overwrite else [])]
            for s in (src, other)]  # fmt: skip
    procs = [subprocess.Popen(cli(*a), env=hold, stderr=subprocess.PIPE, text=True) for a in argv]
    _wait_for(lambda: len(list(tmp_path.glob("release.*"))) == 2, "both runs to reach the publishing step")
    release.touch()
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in results) == ([0, 0] if overwrite else [0, 4]), results
    published = written(race)
    assert published in expected.values()  # all three from one run
    if not overwrite:
        winner = next(str(s) for s, (code, _) in zip((src, other), results, strict=True) if code == 0)
        assert published == expected[winner]
        loser_err = next(err for code, err in results if code == 4)
        assert (
            loser_err.strip()
            == f"error: {race / 'x.gguf'}: output appeared while this run was writing it; left untouched"
        )
    assert sorted(p.name for p in race.iterdir()) == sorted(files)  # no temporary left


@pytest.mark.slow  # a CLI subprocess, or a model or file large enough to take seconds
def test_a_directory_appearing_at_dst_during_the_run_is_kept(tmp_path, src):
    dst, release = tmp_path / "dst", tmp_path / "release"
    hold = env(ADACONVERT_PAUSE_AT="before-publish", ADACONVERT_PAUSE_FILE=str(release))
    proc = subprocess.Popen(cli("to-lora", src, dst, "-q"), env=hold, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: list(tmp_path.glob("release.*")), "the run to reach the publishing step")
    dst.mkdir()
    (dst / "mine.txt").write_text("precious")
    release.touch()
    assert proc.wait(timeout=120) == 4
    assert "output appeared while this run was writing it" in proc.stderr.read()
    assert (dst / "mine.txt").read_text() == "precious" and len(list(dst.iterdir())) == 1
    assert leftovers(dst) == []


@pytest.mark.parametrize(
    ("step", "survivor"), [("before-exchange", "old"), ("after-exchange", "new")], ids=["before", "after"]
)
@pytest.mark.slow  # a CLI subprocess, or a model or file large enough to take seconds
def test_kill_9_during_overwrite_leaves_a_complete_dst_and_the_next_run_cleans_up(
    tmp_path, src, caplog, step, survivor
):
    other = write_adalora(tmp_path / "ada2", seed=1)
    dst = tmp_path / "dst"
    assert main(["to-lora", str(src), str(dst), "-q"]) == 0
    old = tree_digest(dst)
    run = subprocess.run(
        cli("to-lora", other, dst, "--overwrite", "-q"), env=env(ADACONVERT_KILL_AT=step), capture_output=True
    )
    assert run.returncode == -9  # SIGKILL, at exactly that step
    assert converted_from(dst) == str(src if survivor == "old" else other)
    assert (tree_digest(dst) == old) == (survivor == "old")
    stale = leftovers(dst)
    assert len(stale) == 1 and stale[0].startswith(".dst.tmp-")  # the killed run's (the old DST, after exchange)
    # a later run for the same DST removes what the killed one left, and says so
    assert main(["to-lora", str(src), str(dst), "--overwrite"]) == 0
    assert leftovers(dst) == []
    assert any("left by an interrupted run" in r.getMessage() and stale[0] in r.getMessage() for r in caplog.records)


@pytest.mark.slow  # a CLI subprocess, or a model or file large enough to take seconds
def test_kill_9_before_publishing_leaves_no_dst_and_a_temporary_the_next_run_removes(tmp_path, src, caplog):
    dst = tmp_path / "dst"
    run = subprocess.run(cli("to-lora", src, dst), env=env(ADACONVERT_KILL_AT="before-publish"), capture_output=True)
    assert run.returncode == -9
    assert not os.path.lexists(dst)
    (stale,) = leftovers(dst)
    assert stale.startswith(".dst.tmp-")
    assert main(["to-lora", str(src), str(dst)]) == 0
    assert leftovers(dst) == [] and converted_from(dst) == str(src)
    assert any(stale in r.getMessage() for r in caplog.records if r.levelname == "WARNING")


def test_a_temporary_of_a_live_run_is_left_alone(tmp_path):
    dst = tmp_path / "dst"
    code = (
        "import sys, time; from pathlib import Path; from adaconvert.io import atomic\n"
        "tmp, lock = atomic._make_dir(Path(sys.argv[1])); print(tmp, flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(dst)], env=env(), stdout=subprocess.PIPE, text=True)
    try:
        tmp = Path(proc.stdout.readline().strip())
        assert tmp.is_dir()
        assert atomic.remove_stale(dst) == [] and tmp.is_dir()
    finally:
        proc.kill()
        proc.wait()
    assert atomic.remove_stale(dst) == [tmp] and not tmp.exists()


def test_an_unlocked_temporary_of_a_reused_pid_is_stale_once_old(tmp_path):
    """Its PID is alive (reused by an unrelated process) but nobody holds its lock: stale after the grace period."""
    dst = tmp_path / "dst"
    tmp = tmp_path / f".dst.tmp-{os.getppid()}-0123abcd"
    tmp.mkdir()
    assert atomic.remove_stale(dst) == [] and tmp.is_dir()  # fresh: it may be a run between mkdir and flock
    past = time.time() - 2 * atomic._UNLOCKED_GRACE_S
    os.utime(tmp, (past, past))
    assert atomic.remove_stale(dst) == [tmp] and not tmp.exists()


# --- modes and symlinked DSTs --------------------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_outputs_follow_the_umask(tmp_path, src, umask):
    old = os.umask(umask)
    try:
        assert main(["to-lora", str(src), str(tmp_path / "a" / "dst"), "-q"]) == 0
    finally:
        os.umask(old)
    for path in (tmp_path / "a", tmp_path / "a" / "dst"):
        assert path.stat().st_mode & 0o777 == 0o777 & ~umask
    assert (tmp_path / "a" / "dst" / "adapter_config.json").stat().st_mode & 0o777 == 0o666 & ~umask


def test_dangling_symlink_dst(tmp_path, src, capsys):
    dst = tmp_path / "dst"
    dst.symlink_to(tmp_path / "nowhere")
    assert main(["to-lora", str(src), str(dst)]) == 4
    assert (
        capsys.readouterr().err.strip()
        == f"error: {dst}: output is a dangling symlink; pass --overwrite to replace it"
    )
    assert dst.is_symlink() and leftovers(dst) == []
    assert main(["to-lora", str(src), str(dst), "--overwrite", "-q"]) == 0
    assert not dst.is_symlink() and converted_from(dst) == str(src)
    assert not (tmp_path / "nowhere").exists() and leftovers(dst) == []


def test_overwriting_a_symlink_dst_replaces_the_link_not_its_target(tmp_path, src):
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep.txt").write_text("precious")
    dst = tmp_path / "dst"
    dst.symlink_to(target, target_is_directory=True)
    assert main(["to-lora", str(src), str(dst), "--overwrite", "-q"]) == 0
    assert not dst.is_symlink() and converted_from(dst) == str(src)
    assert (target / "keep.txt").read_text() == "precious"
    assert leftovers(dst) == []


# --- full and read-only disks --------------------------------------------------------------------------------------


def _unshare_works() -> bool:
    probe = ["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=4k tmpfs /mnt"]
    return shutil.which("unshare") is not None and subprocess.run(probe, capture_output=True).returncode == 0


needs_mounts = pytest.mark.skipif(not _unshare_works(), reason="no user namespaces to mount a small tmpfs in")


def _in_small_tmpfs(mount: Path, argv: list[str], *, read_only: bool = False) -> subprocess.CompletedProcess:
    """Run ``argv`` in a private mount namespace where ``mount`` is a 16 KiB tmpfs (read-only if asked)."""
    remount = f" && mount -o remount,ro {mount}" if read_only else ""
    script = f'mount -t tmpfs -o size=16k tmpfs {mount}{remount} && exec "$@"'
    return subprocess.run(
        ["unshare", "-rm", "sh", "-c", script, "sh", *argv], env=env(), capture_output=True, text=True
    )


@pytest.mark.slow  # a CLI subprocess, or a model or file large enough to take seconds
@needs_mounts
def test_full_disk_names_dst_and_leaves_nothing(tmp_path):
    big = write_adalora(tmp_path / "big", in_f=512, out_f=512)
    mount = tmp_path / "disk"
    mount.mkdir()
    dst = mount / "nested" / "deeper" / "dst"
    check = f"{sys.executable} -m adaconvert.cli to-lora {big} {dst}; echo rc=$?; ls -A {mount}"
    run = _in_small_tmpfs(mount, ["sh", "-c", check])
    out = run.stdout.split()
    assert out == ["rc=1"], run.stdout + run.stderr  # nothing left in the tmpfs, not even the parents
    assert run.stderr.strip() == f"error: {dst}: cannot write the output (No space left on device)"


@pytest.mark.slow  # a CLI subprocess, or a model or file large enough to take seconds
@needs_mounts
def test_read_only_dst_names_dst(tmp_path, src):
    mount = tmp_path / "ro"
    mount.mkdir()
    dst = mount / "dst"
    run = _in_small_tmpfs(mount, cli("to-lora", src, dst), read_only=True)
    assert run.returncode == 1
    assert run.stderr.strip() == f"error: {dst}: cannot write the output (Read-only file system)"


@pytest.mark.slow  # a CLI subprocess, or a model or file large enough to take seconds
def test_file_size_limit_names_dst_and_leaves_nothing(tmp_path):
    """``RLIMIT_FSIZE`` makes writes past 8 KiB fail with EFBIG: a stand-in for a full disk that needs no mount."""
    big = write_adalora(tmp_path / "big", in_f=512, out_f=512)
    dst = tmp_path / "out" / "nested" / "dst"

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))

    run = subprocess.run(cli("to-lora", big, dst), env=env(), capture_output=True, text=True, preexec_fn=limit)
    assert run.returncode == 1, run.stderr
    assert run.stderr.strip() == f"error: {dst}: cannot write the output (File too large)"
    assert not (tmp_path / "out").exists()  # the parents this run created are gone too


def test_validate_report_over_an_adapter_file_is_refused(tmp_path, tiny_llama, capsys):
    """With a real base, validation runs to its end; the report must still not replace the adapter's config."""
    src = write_adalora(tmp_path / "ada", in_f=64, out_f=64)
    before = tree_digest(src)
    assert main(["validate", str(tiny_llama), str(src), str(src), "--report", str(src / "adapter_config.json")]) == 2
    err = capsys.readouterr().err
    report = src / "adapter_config.json"
    assert err.strip() == f"error: {report}: output lies inside the input {src}; choose an output outside every input"
    assert tree_digest(src) == before
