"""Hostile inputs: byte-edited configs, headers and weights files. Each gets its exit code and one line on stderr
naming the file and the problem; nothing is written; nothing is materialised that the file does not hold.

One table, ``CASES``: (id, make(tmp_path) -> argv, exit code, message fragment, file the message must name).
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from adaconvert.cli import main
from adaconvert.io.location import is_hub_id
from tests.helpers.adapter_edits import MODULES, edit_config, edit_tensors, write_adalora

DEEP = "[" * 100_000 + "]" * 100_000  # deeper than any recursion limit
HUGE = "1" + "0" * 5000  # longer than Python's int-string limit (4300 digits)
IN_F = OUT_F = 16


def write_lora(path: Path, **config) -> Path:
    """A rank-2 PEFT LoRA on ``MODULES`` (16 × 16), laid out as PEFT saves one."""
    path.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for module in MODULES:
        tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(2, IN_F, generator=g)
        tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(OUT_F, 2, generator=g)
    save_file(tensors, path / "adapter_model.safetensors")
    cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "down_proj"], **config}
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    return path


def write_raw_safetensors(path: Path, header: str | bytes, data: bytes = b"") -> None:
    raw = header.encode() if isinstance(header, str) else header
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def write_base(
    path: Path, *, header: str | None = None, data: int = 0, config: str | None = None, extra: dict | None = None
) -> Path:
    """A base holding the two modules of ``write_adalora`` (and ``extra`` tensors); ``header`` replaces its
    safetensors header, followed by ``data`` zero bytes; ``config`` replaces its config.json text."""
    path.mkdir(parents=True)
    names = [f"{m}.weight" for m in MODULES]
    if header is None:
        save_file({**{n: torch.ones(OUT_F, IN_F) for n in names}, **(extra or {})}, path / "model.safetensors")
    else:
        write_raw_safetensors(path / "model.safetensors", header, b"\0" * data)
    (path / "config.json").write_text(config or json.dumps({"model_type": "llama"}))
    return path


def _entry(shape, begin=0, end=None) -> dict:
    end = begin + 4 * int(torch.tensor(shape, dtype=torch.float64).prod().item()) if end is None else end
    return {"dtype": "F32", "shape": shape, "data_offsets": [begin, end]}


def zero_b(path: Path) -> Path:
    """``path`` with every lora_B set to zeros (PEFT's initialisation)."""
    edit_tensors(path, lambda t: [t[k].zero_() for k in t if "lora_B" in k])
    return path


def to_lora(breakage, *options):
    """argv of ``to-lora [options] SRC DST`` on an AdaLoRA broken by ``breakage(src)``."""

    def make(t: Path):
        src = write_adalora(t / "src", in_f=IN_F, out_f=OUT_F)
        breakage(src)
        return ["to-lora", *options, src, t / "dst"]

    return make


def to_lora_of(build):
    def make(t: Path):
        return ["to-lora", build(t / "src"), t / "dst"]

    return make


def merge(base=None, adapter=None, weight: str = ""):
    """argv of ``merge BASE ADAPTER[:weight] DST`` (defaults: a sound base, a sound AdaLoRA)."""

    def make(t: Path):
        b = (base or (lambda p: write_base(p)))(t / "base")
        a = (adapter or (lambda p: write_adalora(p, in_f=IN_F, out_f=OUT_F)))(t / "src")
        return ["merge", b, f"{a}{weight}", t / "dst"]

    return make


def set_field(**fields):
    return lambda p: edit_config(p, lambda c: c.update(fields))


def raw_config(text: str):
    return lambda p: (p / "adapter_config.json").write_text(text)


def weights_replaced_by(kind: str, name: str = "adapter_model.safetensors"):
    def breakage(directory: Path):
        target = directory / name
        target.unlink()
        if kind == "fifo":
            os.mkfifo(target)
        elif kind == "directory":
            target.mkdir()
        else:
            target.symlink_to(target)  # a loop

    return breakage


def stride_zero_bin(p: Path) -> None:
    """An AdaLoRA .bin whose lora_A is one float expanded (stride 0) to 3 × 2²⁴: 4 bytes on disk, 192 MiB in shape."""
    from safetensors.torch import load_file

    tensors = load_file(p / "adapter_model.safetensors")
    (p / "adapter_model.safetensors").unlink()
    key = f"base_model.model.{MODULES[0]}.lora_A"
    tensors[key] = torch.ones(1, 1).expand(tensors[key].shape[0], 2**24)
    torch.save(tensors, p / "adapter_model.bin")


def index_with(weight_map: dict):
    def build(p: Path) -> Path:
        write_base(p)
        (p / "model.safetensors").rename(p / "model-00001-of-00001.safetensors")
        (p / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        return p

    return build


Q_W = f"{MODULES[0]}.weight"
CASES = [
    # §2: wrong output with exit 0
    (
        "adalora-alpha-infinity",
        to_lora(set_field(lora_alpha=float("inf"))),
        2,
        "field 'lora_alpha' must be a finite number, got inf",
        "adapter_config.json",
    ),
    ("adalora-alpha-1e300", to_lora(set_field(lora_alpha=1e300)), 2, "overflows float32", "adapter_config.json"),
    (
        "float16-overflow",
        to_lora(set_field(lora_alpha=1e6), "--dtype", "float16"),
        2,
        "lora_B (scaling folded in) exceeds float16's largest value 6.55e+04",
        "src",
    ),
    ("lora-alpha-1e300", to_lora_of(lambda p: write_lora(p, lora_alpha=1e300)), 2, "overflows float32", ""),
    # B all zeros (untouched modules): 0 × the Inf scaling is NaN, although no element grew past float32
    ("lora-alpha-1e300-zero-B", to_lora_of(lambda p: zero_b(write_lora(p, lora_alpha=1e300))), 2, "overflows", ""),
    (
        "fan-in-fan-out-string",
        to_lora(set_field(fan_in_fan_out="false")),
        2,
        "field 'fan_in_fan_out' must be true or false, got 'false'",
        "adapter_config.json",
    ),
    (
        "fan-in-fan-out-string-merge",
        merge(adapter=lambda p: write_lora(p, fan_in_fan_out="false")),
        2,
        "field 'fan_in_fan_out' must be true or false",
        "adapter_config.json",
    ),
    (
        "base-shape-float",
        merge(base=lambda p: write_base(p, header=json.dumps({Q_W: _entry([4.5, 4], 0, 64)}), data=64)),
        2,
        "shape and data_offsets must be non-negative integers, got [4.5, 4]",
        "model.safetensors",
    ),
    # §3: tracebacks
    ("config-deep-nesting", to_lora(raw_config('{"a": ' + DEEP + "}")), 2, "nested too deeply", "adapter_config.json"),
    ("config-huge-int", to_lora(raw_config('{"init_r": ' + HUGE + "}")), 2, "number too long", "adapter_config.json"),
    (
        "base-config-deep-nesting",
        merge(base=lambda p: write_base(p, config='{"a": ' + DEEP + "}")),
        2,
        "nested too deeply",
        "config.json",
    ),
    (
        "base-config-huge-int",
        merge(base=lambda p: write_base(p, config='{"model_type": "llama", "x": ' + HUGE + "}")),
        2,
        "number too long",
        "config.json",
    ),
    (
        "header-deep-nesting",
        merge(base=lambda p: write_base(p, header='{"a": ' + DEEP + "}")),
        2,
        "nested too deeply",
        "model.safetensors",
    ),
    (
        "header-huge-int",
        merge(base=lambda p: write_base(p, header='{"w": {"dtype": "F32", "shape": [' + HUGE + "]}}")),
        2,
        "number too long",
        "model.safetensors",
    ),
    (
        "rank-pattern-bad-regex",
        to_lora_of(lambda p: write_lora(p, rank_pattern={"q_proj(": 2})),
        2,
        "field 'rank_pattern' key 'q_proj(' is not a valid regular expression",
        "adapter_config.json",
    ),
    (
        "rank-pattern-string",
        to_lora_of(lambda p: write_lora(p, rank_pattern="q_proj")),
        2,
        "field 'rank_pattern' must be an object, got 'q_proj'",
        "adapter_config.json",
    ),
    (
        "adalora-rank-pattern-string",
        to_lora(set_field(rank_pattern="all")),
        2,
        "field 'rank_pattern' must be an object",
        "adapter_config.json",
    ),
    (
        "pattern-value-abc",
        to_lora_of(lambda p: write_lora(p, rank_pattern={"q_proj": "abc"})),
        2,
        "field 'rank_pattern' entry 'q_proj' must be an integer, got 'abc'",
        "adapter_config.json",
    ),
    (
        "pattern-value-null",
        to_lora_of(lambda p: write_lora(p, alpha_pattern={"q_proj": None})),
        2,
        "field 'alpha_pattern' entry 'q_proj' must be a number, got None",
        "adapter_config.json",
    ),
    (
        "lora-module-rank-0",
        to_lora_of(lambda p: _rank_zero_lora(p)),
        2,
        "field 'rank_pattern' entry 'q_proj' must be at least 1, got 0",
        "adapter_config.json",
    ),
    (
        "base-tensor-4x0",
        merge(base=lambda p: write_base(p, extra={"model.norm.weight": torch.ones(4, 0)})),
        0,
        None,
        None,
    ),
    (
        "index-shard-not-a-string",
        merge(base=index_with({Q_W: 5})),
        2,
        f"weight_map['{Q_W}'] must be a shard file name, got 5",
        "model.safetensors.index.json",
    ),
    (
        "index-shard-is-a-path",
        merge(base=index_with({Q_W: "../../etc/passwd"})),
        2,
        "must be a shard file name, got '../../etc/passwd'",
        "model.safetensors.index.json",
    ),
    (
        "text-config-not-an-object",
        merge(base=lambda p: write_base(p, config=json.dumps({"model_type": "llama", "text_config": 5}))),
        2,
        "field 'text_config' must be an object",
        "config.json",
    ),
    ("merge-weight-1e40", merge(weight=":1e40"), 2, "adapter weight must be a finite number of at most", "src"),
    ("bin-stride-0", to_lora(stride_zero_bin), 2, "but its storage holds 4 bytes", "adapter_model.bin"),
    # §4: weights files that are not files
    ("weights-fifo", to_lora(weights_replaced_by("fifo")), 2, "is a FIFO (named pipe)", "adapter_model.safetensors"),
    ("weights-directory", to_lora(weights_replaced_by("directory")), 2, "is a directory", "adapter_model.safetensors"),
    (
        "weights-symlink-loop",
        to_lora(weights_replaced_by("loop")),
        2,
        "is a symlink loop",
        "adapter_model.safetensors",
    ),
    (
        "base-weights-fifo",
        merge(base=lambda p: (weights_replaced_by("fifo", "model.safetensors")(write_base(p)), p)[1]),
        2,
        "is a FIFO (named pipe), not a weights file",
        "model.safetensors",
    ),
]


def _rank_zero_lora(p: Path) -> Path:
    write_lora(p, rank_pattern={"q_proj": 0})
    from safetensors.torch import load_file

    tensors = load_file(p / "adapter_model.safetensors")
    q = f"base_model.model.{MODULES[0]}"
    tensors[f"{q}.lora_A.weight"] = torch.zeros(0, IN_F)
    tensors[f"{q}.lora_B.weight"] = torch.zeros(OUT_F, 0)
    save_file(tensors, p / "adapter_model.safetensors")
    return p


def shapes(path: Path) -> dict[str, list[int]]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {k: f.get_slice(k).get_shape() for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__


@pytest.mark.parametrize(("make", "code", "message", "names"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_input(tmp_path, capsys, make, code, message, names):
    argv = [str(a) for a in make(tmp_path)]
    dst = Path(argv[-1])
    assert main(argv) == code
    out, err = capsys.readouterr()
    if code == 0:  # a legal but odd input (an empty base tensor): merged, and the output holds it as it was
        assert "Traceback" not in err
        assert shapes(dst / "model.safetensors") == shapes(Path(argv[1]) / "model.safetensors")
        return
    assert out == "" and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: ") and message in err, err
    assert f"error: {tmp_path}/" in err and (names or "") in err.split(": ")[1], err  # the file, by its full path
    assert not os.path.lexists(dst)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".dst")] == []


@pytest.mark.slow  # a CLI subprocess or worker processes, each importing torch: seconds
def test_stride_zero_bin_is_refused_without_materialising_it(tmp_path):
    """The expanded tensor would take 192 MiB once copied; refusing it must cost no more than reading the file."""
    src = write_adalora(tmp_path / "src", in_f=IN_F, out_f=OUT_F)
    stride_zero_bin(src)
    assert (src / "adapter_model.bin").stat().st_size < 64 * 1024
    code = (
        "import sys, resource; from adaconvert.cli import main\n"
        "rc = main(['to-lora', sys.argv[1], sys.argv[2], '-q'])\n"
        "print(rc, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    run = subprocess.run(
        [sys.executable, "-c", code, str(src), str(tmp_path / "dst")],
        capture_output=True,
        text=True,
    )
    rc, peak_kib = map(int, run.stdout.split())
    assert rc == 2
    # importing torch alone takes some 300-500 MiB of RSS: the bound is what torch costs plus far less than 192 MiB
    baseline = subprocess.run(
        [sys.executable, "-c", "import resource, torch; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"],
        capture_output=True,
        text=True,
    )
    assert peak_kib - int(baseline.stdout) < 96 * 1024


# "Is this a Hub id or a local path?": one rule (io.location.is_hub_id) for every place that accepts either
HUB_ID_CASES = [
    ("gpt2", True),
    ("Qwen/Qwen2.5-0.5B", True),
    ("meta-llama/Llama-3.1-8B-Instruct", True),
    ("user_1/my.model-v2", True),
    ("./adapter", False),
    ("../adapter", False),
    ("/abs/adapter", False),
    ("~/adapter", False),
    ("runs/a/final", False),  # more than one slash
    ("runs\\a", False),
    ("user/", False),
    ("/", False),
    ("", False),
    ("user//repo", False),
    ("-user/repo", False),
    ("user/-repo", False),
    ("user/repo--x", False),
    ("user/re..po", False),
    ("data.jsonl", False),  # a file someone meant
    ("user/model.safetensors", False),
    ("a" * 97, False),
    ("user/repo name", False),
    ("user/repo\nx", False),
    (None, False),
]


@pytest.mark.parametrize(("text", "hub"), HUB_ID_CASES, ids=[repr(t)[:30] for t, _ in HUB_ID_CASES])
def test_hub_id_or_path(text, hub):
    assert is_hub_id(text) is hub


def test_hub_id_or_path_sees_the_disk(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert is_hub_id("runs/ada") and is_hub_id("gpt2")
    (tmp_path / "runs").mkdir()  # a local directory as first component: a path that is missing, not a repo
    assert not is_hub_id("runs/ada")
    (tmp_path / "gpt2").mkdir()
    assert not is_hub_id("gpt2")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    assert not is_hub_id("dangling")


def test_validate_missing_local_path_is_not_found_at_once(tmp_path, tiny_llama, capsys, monkeypatch):
    """``runs/missing`` beside a ``runs/`` directory: exit 3 before anything is loaded, no Hub round trip."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    conv = write_adalora(tmp_path / "runs" / "conv")
    assert main(["validate", str(tiny_llama), "runs/missing", str(conv)]) == 3
    out, err = capsys.readouterr()
    assert err.strip() == "error: runs/missing: no such file or directory" and out == ""


@pytest.mark.slow  # a CLI subprocess or worker processes, each importing torch: seconds
def test_quiet_silences_third_party_warnings(tmp_path, adalora_llama, tiny_llama):
    """A failing validate with -q: PEFT's warnings (zero-size tensors, unmatched rank_pattern keys) no longer
    reach stderr; the one error line does."""
    from tests.helpers.adapter_edits import misscaled

    assert main(["to-lora", str(adalora_llama), str(tmp_path / "conv"), "-q"]) == 0
    bad = misscaled(tmp_path / "conv", tmp_path / "bad", 2.0)
    run = subprocess.run(
        [sys.executable, "-m", "adaconvert.cli", "validate", str(tiny_llama), str(adalora_llama), str(bad), "-q"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 6
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: validation failed"), run.stderr


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"rank_pattern": "q_proj"}, "[rank-pattern] rank_pattern must be an object, got str"),
        ({"modules_to_save": 5}, "[modules-to-save] modules_to_save must be a list, got 5"),
    ],
    ids=["rank-pattern-string", "modules-to-save-int"],
)
def test_vllm_static_check_reports_malformed_fields(tmp_path, capsys, config, message):
    adapter = write_lora(tmp_path / "a", **config)
    assert main(["validate", "--vllm-static", str(adapter)]) == 6
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err and "Traceback" not in err
