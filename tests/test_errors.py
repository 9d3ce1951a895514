"""Bad input: one line naming the file and the problem, a non-zero exit, no traceback, nothing left at DST."""

from __future__ import annotations

import json
import os
import pickle
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from adaconvert.cli import main
from tests.helpers.adapter_edits import MODULES, edit_config, edit_tensors, write_adalora

Q = "base_model.model.model.layers.0.self_attn.q_proj"


def _truncate(p):
    data = (p / "adapter_model.safetensors").read_bytes()
    (p / "adapter_model.safetensors").write_bytes(data[: len(data) - 20])


def _garbage(p):
    (p / "adapter_model.safetensors").write_bytes(b"\xff" * 64)


def _pickle_bomb(p):
    (p / "adapter_model.safetensors").unlink()

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch /tmp/adaconvert-pwned",))

    (p / "adapter_model.bin").write_bytes(pickle.dumps({"x": Evil()}))


ERROR_CASES = [
    # (id, breakage, extra CLI args, exit code, message fragment, file the message must name)
    ("missing-dir", lambda p: shutil.rmtree(p), [], 3, "no such directory", ""),
    ("missing-config", lambda p: (p / "adapter_config.json").unlink(), [], 3, "missing file", "adapter_config.json"),
    (
        "invalid-json",
        lambda p: (p / "adapter_config.json").write_text("{nope"),
        [],
        2,
        "not valid JSON",
        "adapter_config.json",
    ),
    (
        "not-an-object",
        lambda p: (p / "adapter_config.json").write_text("[1]"),
        [],
        2,
        "JSON object",
        "adapter_config.json",
    ),
    (
        "unknown-peft-type",
        lambda p: edit_config(p, lambda c: c.update(peft_type="IA3")),
        [],
        2,
        "unknown peft_type 'IA3'; supported: ADALORA, LORA",
        "adapter_config.json",
    ),
    (
        "missing-init-r",
        lambda p: edit_config(p, lambda c: c.pop("init_r")),
        [],
        2,
        "missing required field 'init_r'",
        "adapter_config.json",
    ),
    ("no-weights", lambda p: (p / "adapter_model.safetensors").unlink(), [], 3, "no adapter weights", ""),
    ("truncated", _truncate, [], 2, "corrupt or truncated safetensors", "adapter_model.safetensors"),
    ("garbage", _garbage, [], 2, "corrupt or truncated safetensors", "adapter_model.safetensors"),
    ("pickle-code", _pickle_bomb, [], 2, "refused by weights-only loading", "adapter_model.bin"),
    (
        "missing-lora-E",
        lambda p: edit_tensors(p, lambda t: t.pop(f"{Q}.lora_E")),
        [],
        2,
        "missing lora_E",
        "adapter_model.safetensors",
    ),
    (
        "missing-lora-B",
        lambda p: edit_tensors(p, lambda t: t.pop(f"{Q}.lora_B")),
        [],
        2,
        "missing lora_B",
        "adapter_model.safetensors",
    ),
    (
        "shape-mismatch",
        lambda p: edit_tensors(p, lambda t: t.update({f"{Q}.lora_E": torch.ones(2, 1)})),
        [],
        2,
        "rank mismatch",
        "adapter_model.safetensors",
    ),
    (
        "pattern-disagrees",
        lambda p: edit_config(
            p, lambda c: c["rank_pattern"].update({"model.layers.0.self_attn.q_proj.lora_E": [True] * 4})
        ),
        [],
        2,
        "rank_pattern keeps 4 entries but the tensors have rank 3",
        "adapter_model.safetensors",
    ),
    (
        "nan",
        lambda p: edit_tensors(p, lambda t: t[f"{Q}.lora_A"].__setitem__((0, 0), float("nan"))),
        [],
        2,
        "lora_A holds NaN or Inf",
        "adapter_model.safetensors",
    ),
    (
        "inf",
        lambda p: edit_tensors(p, lambda t: t[f"{Q}.lora_B"].__setitem__((1, 0), float("inf"))),
        [],
        2,
        "lora_B holds NaN or Inf",
        "adapter_model.safetensors",
    ),
    (
        "unexpected-key",
        lambda p: edit_tensors(p, lambda t: t.update({"lm_head.weight": torch.ones(2)})),
        [],
        2,
        "unexpected tensor 'lm_head.weight'",
        "adapter_model.safetensors",
    ),
    ("rank-above-vllm-limit", lambda p: None, ["--vllm-max-lora-rank", "1"], 5, "exceed vLLM max_lora_rank 1", ""),
    (
        "invalid-vllm-bucket",
        lambda p: None,
        ["--vllm-max-lora-rank", "12"],
        2,
        "max_lora_rank must be one of 1, 8, 16, 32, 64, 128, 256, 320, 512; got 12",
        None,
    ),
    ("bad-energy", lambda p: None, ["--energy", "1.5"], 2, "--energy must be in (0, 1]", None),
]


@pytest.mark.parametrize(
    ("breakage", "args", "code", "message", "names"), [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES]
)
def test_bad_input_gives_one_line_and_writes_nothing(tmp_path, capsys, breakage, args, code, message, names):
    src = write_adalora(tmp_path / "src")
    breakage(src)
    dst = tmp_path / "dst"
    assert main(["to-lora", str(src), str(dst), *args]) == code
    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: ") and message in err
    if names is not None:
        assert str(src / names).rstrip("/") in err
    assert "Traceback" not in err
    assert not dst.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".dst")] == []
    assert not os.path.exists("/tmp/adaconvert-pwned")


def test_existing_output_is_kept_without_overwrite(tmp_path, capsys):
    src = write_adalora(tmp_path / "src")
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("precious")
    assert main(["to-lora", str(src), str(dst)]) == 4
    err = capsys.readouterr().err
    assert err.strip() == f"error: {dst}: output already exists; pass --overwrite to replace it"
    assert (dst / "keep.txt").read_text() == "precious"
    assert main(["to-lora", str(src), str(dst), "--overwrite", "--quiet"]) == 0
    assert not (dst / "keep.txt").exists() and (dst / "adapter_model.safetensors").exists()


def test_failed_overwrite_keeps_the_old_output(tmp_path, capsys):
    src = write_adalora(tmp_path / "src")
    dst = tmp_path / "dst"
    assert main(["to-lora", str(src), str(dst), "--quiet"]) == 0
    before = (dst / "adapter_model.safetensors").read_bytes()
    _truncate(src)
    assert main(["to-lora", str(src), str(dst), "--overwrite"]) == 2
    assert (dst / "adapter_model.safetensors").read_bytes() == before


def test_debug_shows_the_traceback(tmp_path):
    from adaconvert.errors import SourceNotFoundError

    with pytest.raises(SourceNotFoundError):
        main(["to-lora", str(tmp_path / "nope"), str(tmp_path / "dst"), "--debug"])


def test_unsupported_lora_features_are_named(tmp_path, capsys):
    src = tmp_path / "dora"
    src.mkdir()
    save_file(
        {f"{Q}.lora_A.weight": torch.ones(2, 4), f"{Q}.lora_B.weight": torch.ones(4, 2)},
        src / "adapter_model.safetensors",
    )
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "use_dora": True, "bias": "all"}
    (src / "adapter_config.json").write_text(json.dumps(config))
    assert main(["to-lora", str(src), str(tmp_path / "dst")]) == 2
    err = capsys.readouterr().err
    assert "unsupported LoRA feature(s): DoRA (magnitude vectors); bias='all'" in err


def test_float16_range_is_checked_on_the_folded_factors_not_on_the_readers_bound(tmp_path):
    """The reader's bound (max|B| · max|scale|) only lets the check be skipped: a large B column with a small scale
    and a small column with a large scale pass the bound's 65504 but not one folded entry does, so float16 is
    written, equal to the float32 output cast."""
    src = write_adalora(tmp_path / "src")

    def uneven(tensors):
        p = f"base_model.model.{MODULES[0]}"
        tensors[f"{p}.lora_B"][:, 0], tensors[f"{p}.lora_B"][:, 1:] = 1.0, 300.0
        tensors[f"{p}.lora_E"][:] = torch.tensor([[300.0], [1.0], [1.0]])

    edit_tensors(src, uneven)
    assert main(["to-lora", str(src), str(tmp_path / "f32"), "--quiet"]) == 0
    assert main(["to-lora", str(src), str(tmp_path / "f16"), "--dtype", "float16", "--quiet"]) == 0
    f32, f16 = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("f32", "f16"))
    b = next(k for k in f32 if k.endswith("lora_B.weight"))
    assert 300.0**2 > 65504 > f32[b].abs().max()  # the bound would refuse it
    assert torch.equal(f16[b], f32[b].half())


@pytest.mark.parametrize(
    ("tensor", "where"),
    [
        ("lora_A", (1, 0)),  # the masked component: lora_E is 0 there, and PEFT computes 0 · NaN = NaN
        ("lora_E", (3, 0)),
        ("lora_B", (5, 3)),
    ],
)
def test_nan_anywhere_in_the_file_is_named(tmp_path, tensor, where):
    """The reader checks all of a file's data in one reduction (``finite_magnitude``); when that finds NaN, each
    module is checked on its own and the tensor is named: also lora_E, and a component rank_pattern null masks."""
    from adaconvert import read_adapter
    from adaconvert.errors import NonFiniteError
    from adaconvert.io.source import load_tensors
    from adaconvert.readers._common import finite_magnitude

    src = write_adalora(tmp_path / "a", kept=(4, 4))
    edit_config(src, lambda c: c.update(rank_pattern=None))
    edit_tensors(src, lambda t: t[f"{Q}.lora_E"].__setitem__((1, 0), 0.0))  # masked, as rank_pattern null saves it
    clean = load_tensors(src / "adapter_model.safetensors")
    assert finite_magnitude(clean) == max(float(t.abs().max()) for t in clean.values())
    assert read_adapter(src).ranks[Q.removeprefix("base_model.model.")] == 3
    edit_tensors(src, lambda t: t[f"{Q}.{tensor}"].__setitem__(where, float("nan")))
    assert finite_magnitude(load_tensors(src / "adapter_model.safetensors")) is None
    with pytest.raises(NonFiniteError, match=f"{tensor} holds NaN or Inf"):
        read_adapter(src)


def test_finite_magnitude_needs_one_dtype_back_to_back():
    """Tensors that are not one dtype laid back to back in one storage get None: the reader then checks each."""
    from adaconvert.readers._common import finite_magnitude

    flat = torch.arange(12, dtype=torch.float32) - 20
    assert finite_magnitude({"a": flat[:4], "b": flat[4:]}) == 20.0  # a view of part of a storage: its own span
    assert finite_magnitude({"a": flat[:4], "b": flat[5:]}) is None  # a gap
    assert finite_magnitude({"a": flat[:4], "b": flat[2:]}) is None  # an overlap
    assert finite_magnitude({"a": torch.ones(2), "b": torch.ones(2)}) is None  # two storages
    assert finite_magnitude({"a": flat[:4], "b": flat[4:].to(torch.float64)}) is None
    assert finite_magnitude({"a": flat.view(3, 4).t()}) is None  # not contiguous
    assert finite_magnitude({"a": torch.zeros(2, dtype=torch.int64)}) is None
    assert finite_magnitude({}) is None


def test_deferred_checks_raise_on_verify_every_time(tmp_path):
    """``read_adapter(defer_checks=True)`` returns while the value checks run; ``verify`` raises their error, and
    raises it again when called again (an export calls it once, but nothing may ever pass it)."""
    from adaconvert import read_adapter
    from adaconvert.errors import NonFiniteError

    src = write_adalora(tmp_path / "a", kept=(4, 4))
    adapter = read_adapter(src, defer_checks=True)
    adapter.verify()
    assert all(d.bound is not None for d in adapter.deltas.values())  # set by the checks: float16's range check
    edit_tensors(src, lambda t: t[f"{Q}.lora_B"].__setitem__((2, 1), float("-inf")))
    with pytest.raises(NonFiniteError, match="lora_B holds NaN or Inf"):
        read_adapter(src)
    adapter = read_adapter(src, defer_checks=True)
    for _ in range(2):
        with pytest.raises(NonFiniteError, match="lora_B holds NaN or Inf"):
            adapter.verify()


def _first_kept(src):
    """(PEFT key prefix, component index) of a component kept in a real AdaLoRA (lora_E non-zero)."""
    tensors = load_file(src / "adapter_model.safetensors")
    key = next(k for k, t in sorted(tensors.items()) if k.endswith("lora_E") and t.count_nonzero())
    return key.removesuffix(".lora_E"), int(tensors[key].flatten().nonzero()[0])


def _first_masked(src):
    """(PEFT key prefix, component index) of a component rank_pattern null masks (lora_E zero, A and B kept)."""
    tensors = load_file(src / "adapter_model.safetensors")
    key = next(k for k, t in sorted(tensors.items()) if k.endswith("lora_E") and (t == 0).any() and t.any())
    return key.removesuffix(".lora_E"), int((tensors[key].flatten() == 0).nonzero()[0])


def _nan_in_a(find):
    def breakage(src):
        prefix, component = find(src)
        edit_tensors(src, lambda t: t[f"{prefix}.lora_A"].__setitem__((component, 0), float("nan")))

    return breakage


VALUE_CASES = {
    # (source fixture, breakage, message fragment, file the message names)
    "nan-kept": ("adalora_llama", _nan_in_a(_first_kept), "lora_A holds NaN or Inf", "adapter_model.safetensors"),
    # dropped from the output, but PEFT computes 0 · NaN = NaN through it: refused all the same
    "nan-masked": (
        "adalora_llama_no_pattern",
        _nan_in_a(_first_masked),
        "lora_A holds NaN or Inf",
        "adapter_model.safetensors",
    ),
    "overflow": (
        "adalora_llama",
        lambda src: edit_config(src, lambda c: c.update(lora_alpha=1e300)),
        "overflows float32",
        "adapter_config.json",
    ),
}
EXPORTS = {
    # the value checks run while these write (float32 out, nothing compressed) ...
    "to-lora": ["to-lora", "{src}", "{dst}"],
    "to-lora-uniform": ["to-lora", "{src}", "{dst}", "--layout", "uniform"],
    "to-mlx": ["to-mlx", "{src}", "{dst}", "--base", "{base}"],
    "to-gguf": ["to-gguf", "{src}", "{dst}.gguf", "--base", "{base}"],
    # ... and before, when a cast's range check or the compression's SVD reads the values
    "to-lora-float16": ["to-lora", "{src}", "{dst}", "--dtype", "float16"],
    "to-gguf-bf16": ["to-gguf", "{src}", "{dst}.gguf", "--base", "{base}", "--outtype", "bf16"],
    "to-lora-compressed": ["to-lora", "{src}", "{dst}", "--max-rank", "1"],
}


@pytest.mark.parametrize("export", EXPORTS)
@pytest.mark.parametrize("case", VALUE_CASES)
def test_bad_values_refused_by_every_export_leaving_nothing(request, tiny_llama, tmp_path, capsys, case, export):
    """NaN in a kept or a masked component, or a scaling that overflows float32, whether the value checks run
    while the output is written or before: one line naming the file, exit 2, nothing published, no temporary
    left (the checks end before the rename, ``Prepared.verify``)."""
    fixture, breakage, message, names = VALUE_CASES[case]
    src = tmp_path / "src"
    shutil.copytree(request.getfixturevalue(fixture), src)
    breakage(src)
    out = tmp_path / "out"
    out.mkdir()
    args = [a.format(src=src, dst=out / "x", base=tiny_llama) for a in EXPORTS[export]]
    capsys.readouterr()  # what building the fixture printed
    assert main(args) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert message in err and str(src / names) in err and "Traceback" not in err
    assert list(out.iterdir()) == []
