"""`adaconvert merge`: merged checkpoints equal PEFT's merge_and_unload, load in transformers and vLLM, stream with
bounded memory, and bad inputs fail before anything is written.

The exactness contract (docs/design.md §7):
- Our code against our code on one machine (direct merge vs merge of the `to-lora` conversion, any block size,
  any worker count): bit for bit.
- Against PEFT 0.21: both sides compute W' = W + Σ_k B_ik·A_kj in float32, but the BLAS kernel picks the summation
  order (it depends on the CPU's vector width and on the matrix shape; our row blocks are not PEFT's whole matrix),
  so each element may differ by the rounding of those r + 1 additions: |ours − PEFT| ≤ 2·(r + 1)·2⁻²⁴·(|W| + |B|·|A|)
  elementwise (twice the standard bound γ_{r+1} of one summation, one for each side). In ulp: at most 2(r + 1)
  float32 ulp of the largest term; measured 0-2 ulp (1.5e-8 on weights of ~0.1, Intel AVX-512; 0 on AMD AVX2).
  A bfloat16 result may in addition differ by one bfloat16 ulp where that float32 difference flips the final rounding.
- Scalings that are not powers of two (AdaLoRA's alpha / (init_r + 1e-5), rsLoRA, weights): PEFT multiplies the
  scaling in after the matmul, ``(B @ A) * s``; our Adapter has it folded into B, ``(s·B) @ A``: both are float32
  roundings of the same ΔW, tested as ‖ours − PEFT‖ / ‖ΔW‖ ≤ 1e-6 (measured ~2e-7).
- bfloat16 AdaLoRA: PEFT loads the AdaLoRA factors through the base dtype (they are rounded to bfloat16, a PEFT
  artefact checked below), so its merge is off by up to 2⁻⁸·|B||A|. We compare with PEFT's own float32 ΔW added to
  the bfloat16 base and rounded once: within one bfloat16 ulp (plus 1e-6·(|W| + |ΔW|) for the float32 differences
  above, which matter only where W ≈ −ΔW cancels to far below both).
- A wrong merge (scaling off, ΔW transposed, a module missed) is off by far more than any of these bounds: the tests
  that inject one (test_errors, test_validate) keep failing it.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import adaconvert
from adaconvert import Adapter, LowRankDelta, errors
from adaconvert.cli import main
from adaconvert.demo.tiny import build_tiny_model
from adaconvert.io.checkpoint import match_tensor
from adaconvert.merging import parse_adapter_spec
from adaconvert.writers import write_peft_lora
from adaconvert.writers.sharded import parse_size
from tests.helpers.needs import require
from tests.helpers.peft_utils import (
    TARGETS,
    adalora_config,
    load_base,
    lora_config,
    peft_delta_weights,
    peft_greedy,
    peft_model,
    prompt_ids,
    train_peft,
)

ARCHS = ("llama", "qwen2", "gpt2")
VARIANTS = ("float32", "float32-sharded", "bfloat16", "bfloat16-sharded")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
REL_TOL = 1e-6  # ‖ours − PEFT‖ / ‖ΔW‖ where the two differ only by where the scaling enters (see module docstring)
LOGIT_ATOL = 1e-4  # float32 logits of the merged model vs PEFT with the adapter applied on top of the base


# ---------------------------------------------------------------------------------------------- helpers


def read_checkpoint(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                assert key not in tensors, f"{key} in two shards"
                tensors[key] = f.get_tensor(key)
    return tensors


@dataclass
class PeftReference:
    """What PEFT computes for one base + adapter, from one load of the PeftModel."""

    base_logits: torch.Tensor  # adapter disabled
    applied: torch.Tensor  # adapter applied on top of the base
    merged_logits: torch.Tensor  # after merge_and_unload
    merged_state: dict[str, torch.Tensor]


@torch.no_grad()
def peft_reference(base_dir, adapter_dir, dtype, ids) -> PeftReference:
    model = peft_model(base_dir, adapter_dir, dtype)
    with model.disable_adapter():
        base_logits = model(ids).logits
    applied = model(ids).logits
    merged = model.merge_and_unload()
    state = {k: v.detach().clone() for k, v in merged.state_dict().items()}
    return PeftReference(base_logits, applied, merged(ids).logits, state)


@torch.no_grad()
def peft_merged_state(base_dir, adapter_dir, dtype) -> dict[str, torch.Tensor]:
    model = peft_model(base_dir, adapter_dir, dtype).merge_and_unload()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def reorder_bounds(adapter_dirs, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{weight key: the elementwise bound on |ours − PEFT| from summation order alone} (module docstring).

    |B|·|A| is taken from our reader's factors: it only sizes the bound (any rounding of it is far below the
    factor 2 of slack), the values compared come from PEFT and from our merge."""
    gamma = 2.0**-24
    magnitude: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for adapter_dir in adapter_dirs:
        adapter = adaconvert.read_adapter(adapter_dir)
        for module, delta in adapter.deltas.items():
            key = f"{module}.weight"
            term = delta.B.float().abs() @ delta.A.float().abs()
            term = term.T if adapter.fan_in_fan_out else term
            magnitude[key] = magnitude.get(key, 0) + term
            ranks[key] = ranks.get(key, 0) + delta.rank
    return {k: 2 * (ranks[k] + 1) * gamma * (base[k].float().abs() + m) for k, m in magnitude.items()}


def assert_matches_reference(ours: dict, ref: dict, base: dict, *, bounds: dict | None) -> int:
    """Every tensor of ``ours`` equals PEFT's: within ``bounds`` (summation order, see the module docstring; plus
    one bfloat16 ulp for bfloat16 tensors), or, with ``bounds=None``, within REL_TOL of the update; PEFT's extra
    keys are only tied aliases; untouched tensors are the base's bytes. Returns the number of tensors changed."""
    assert set(ours) == set(base)
    for key in set(ref) - set(ours):  # a tied head: state_dict lists the shared matrix twice
        assert any(ref[key].data_ptr() == ref[k].data_ptr() or torch.equal(ref[key], ref[k]) for k in ours), key
    changed = 0
    for key, got in ours.items():
        want = ref[key]
        assert got.dtype == want.dtype and got.shape == want.shape, key
        if torch.equal(want, base[key]):
            assert torch.equal(got, base[key]), f"{key}: an untouched tensor must keep the base's bytes"
        elif bounds is not None:
            bound = bounds[key] + (bf16_ulp(want) if want.dtype == torch.bfloat16 else 0)
            excess = (got.float() - want.float()).abs() - bound
            assert (excess <= 0).all(), f"{key}: {int((excess > 0).sum())} elements beyond the summation-order bound"
        else:
            update = (want.float() - base[key].float()).norm()
            assert (got.float() - want.float()).norm() <= REL_TOL * update, key
        changed += not torch.equal(got, base[key])
    return changed


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    x = x.to(torch.bfloat16).abs()
    return (torch.nextafter(x, torch.full_like(x, float("inf"))) - x).float()


def no_output(dst: Path) -> bool:
    """Nothing at ``dst`` and no temporary sibling left behind."""
    return not dst.exists() and not [p for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.")]


def untrained_lora(base_dir, out_dir, targets, *, seed: int = 0):
    """A LoRA with random (non-zero) A and B, as saved by PEFT, without training."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    get_peft_model(load_base(base_dir), config).save_pretrained(str(out_dir))
    return out_dir


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def bases(tiny_llama, tiny_gpt2, tiny_qwen2, tmp_path_factory):
    """bases(arch, variant) → a tiny base directory; float32 unsharded ones are the session's."""
    built = {("llama", "float32"): tiny_llama, ("gpt2", "float32"): tiny_gpt2, ("qwen2", "float32"): tiny_qwen2}

    def get(arch: str, variant: str = "float32") -> Path:
        if (arch, variant) not in built:
            path = tmp_path_factory.mktemp(f"base-{arch}-{variant}")
            dtype = DTYPES[variant.split("-")[0]]
            build_tiny_model(path, arch, dtype=dtype, max_shard_size="40KB" if "sharded" in variant else None)
            if "sharded" in variant:
                assert (path / "model.safetensors.index.json").is_file()
            built[arch, variant] = path
        return built[arch, variant]

    return get


@pytest.fixture(scope="module")
def loras(lora_variants, tiny_gpt2, tiny_qwen2, tiny_llama, tmp_path_factory):
    """Trained LoRAs (r=4, alpha=8: scaling 2, a power of two) per architecture."""
    root = tmp_path_factory.mktemp("merge-loras")
    return {
        "llama": lora_variants["plain"],
        "gpt2": train_peft(tiny_gpt2, root / "gpt2", lora_config("gpt2"), steps=6, seed=0),
        "qwen2": train_peft(tiny_qwen2, root / "qwen2", lora_config("qwen2"), steps=6, seed=0),
    }


@pytest.fixture(scope="module")
def adaloras(adalora_llama, adalora_gpt2, tiny_qwen2, tiny_llama, tmp_path_factory):
    """Trained AdaLoRAs (pruned, rank-varying) per architecture."""
    out = tmp_path_factory.mktemp("merge-adalora-qwen2")
    qwen2 = train_peft(tiny_qwen2, out, adalora_config("qwen2", total_step=30), steps=30, seed=0, adalora=True)
    return {"llama": adalora_llama, "gpt2": adalora_gpt2, "qwen2": qwen2}


@pytest.fixture(scope="module")
def ids(tiny_llama):
    return prompt_ids(tiny_llama)


# ---------------------------------------------------------------------------------------------- equality with PEFT


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("arch", ARCHS)
def test_lora_merge_is_bitwise_peft(arch, variant, bases, loras, ids, tmp_path):
    base = bases(arch, variant)
    dtype = DTYPES[variant.split("-")[0]]
    out = tmp_path / "merged"
    report = adaconvert.merge(base, [loras[arch]], out, max_shard_size="100KB" if "sharded" in variant else "5GB")

    ours, base_tensors = read_checkpoint(out), read_checkpoint(base)
    bounds = reorder_bounds([loras[arch]], base_tensors)
    ref = peft_reference(base, loras[arch], dtype, ids)
    changed = assert_matches_reference(ours, ref.merged_state, base_tensors, bounds=bounds)
    assert report.tensors_touched == len(adaconvert.read_adapter(loras[arch]).deltas) and changed > 0
    assert ((out / "model.safetensors.index.json").is_file()) == ("sharded" in variant)

    merged = load_base(out, dtype)
    with torch.no_grad():
        got = merged(ids).logits
    peft_merged, applied = ref.merged_logits, ref.applied
    if dtype == torch.float32:
        assert (got - peft_merged).abs().max() <= LOGIT_ATOL and (got - applied).abs().max() <= LOGIT_ATOL
    else:  # weights within one bf16 ulp of PEFT's: the logits as close to the applied adapter as PEFT's merge
        ours_err, peft_err = (got - applied).float().norm(), (peft_merged - applied).float().norm()
        assert ours_err <= 1.5 * peft_err


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("arch", ARCHS)
def test_adalora_merge_matches_peft(arch, variant, bases, adaloras, ids, tmp_path):
    base = bases(arch, variant)
    dtype = DTYPES[variant.split("-")[0]]
    out = tmp_path / "merged"
    adaconvert.merge(base, [adaloras[arch]], out)
    ours, base_tensors = read_checkpoint(out), read_checkpoint(base)
    ref = peft_reference(base, adaloras[arch], dtype, ids)

    if dtype == torch.float32:
        assert_matches_reference(ours, ref.merged_state, base_tensors, bounds=None)
    else:
        # PEFT's own float32 ΔW (computed from the unrounded factors), added to the bf16 base, rounded once
        deltas = peft_delta_weights(bases(arch), adaloras[arch])
        for key, got in ours.items():
            module = key.removesuffix(".weight")
            if module not in deltas:
                assert torch.equal(got, base_tensors[key]), key
                continue
            W, delta = base_tensors[key].float(), deltas[module]
            exact = W + delta
            # one bf16 ulp, plus float32 noise where W ≈ -ΔW cancels below bf16's resolution of ΔW's own rounding
            assert ((got.float() - exact).abs() <= bf16_ulp(exact) + REL_TOL * (W.abs() + delta.abs())).all(), key

    with torch.no_grad():
        got = load_base(out, dtype)(ids).logits.float()
    applied, base_logits, peft_merged = ref.applied.float(), ref.base_logits.float(), ref.merged_logits.float()
    assert (base_logits - applied).abs().max() > 100 * LOGIT_ATOL, "the adapter must change the logits"
    if dtype == torch.float32:
        assert (got - applied).abs().max() <= LOGIT_ATOL
    else:  # bf16 merging rounds W' to 8 bits: ours must be no further from the applied adapter than PEFT's merge
        ours_err, peft_err = (got - applied).norm(), (peft_merged - applied).norm()
        assert ours_err <= 1.5 * peft_err  # measured 1.04-1.12: both are bf16 rounding of W', PEFT's slightly more
        assert ours_err <= 0.05 * (applied - base_logits).norm()  # measured ~0.012 of the adapter's own effect


def test_peft_rounds_adalora_factors_to_a_bf16_base(bases, adaloras):
    """Why bf16 AdaLoRA is compared with PEFT's float32 ΔW above: PEFT 0.21 rounds the loaded AdaLoRA factors to
    the base dtype (the layers are resized for rank_pattern after the adapter dtype was upcast). If this fails, PEFT
    changed: compare test_adalora_merge_matches_peft's bf16 case with merge_and_unload directly."""
    from safetensors.torch import load_file

    model = peft_model(bases("llama", "bfloat16"), adaloras["llama"], torch.bfloat16)
    saved = load_file(str(adaloras["llama"] / "adapter_model.safetensors"))
    checked = 0
    for name, module in model.named_modules():
        if "default" in getattr(module, "lora_A", {}) and module.lora_A["default"].numel():
            loaded, original = module.lora_A["default"].data, saved[f"{name}.lora_A"]
            assert loaded.dtype == torch.float32 and not torch.equal(loaded, original)
            assert torch.equal(loaded, original.to(torch.bfloat16).float())
            checked += 1
    assert checked


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_adalora_merge_equals_its_to_lora_conversion(arch, bases, adaloras, tmp_path):
    """Merging an AdaLoRA directly = merging its `to-lora` conversion, bit for bit (our code on both sides); and that
    conversion (scaling 1) merged by PEFT is our merge up to summation order (module docstring)."""
    base = bases(arch)
    adaconvert.to_lora(adaloras[arch], tmp_path / "lora")
    adaconvert.merge(base, [adaloras[arch]], tmp_path / "direct")
    adaconvert.merge(base, [tmp_path / "lora"], tmp_path / "converted")
    direct, converted = read_checkpoint(tmp_path / "direct"), read_checkpoint(tmp_path / "converted")
    assert direct.keys() == converted.keys()
    assert all(torch.equal(direct[k], converted[k]) for k in direct)
    ref = peft_merged_state(base, tmp_path / "lora", torch.float32)
    base_tensors = read_checkpoint(base)
    bounds = reorder_bounds([tmp_path / "lora"], base_tensors)
    assert_matches_reference(converted, ref, base_tensors, bounds=bounds)


def test_weighted_adapters_match_peft_add_weighted_adapter(tiny_llama, lora_variants, tmp_path):
    """W + 0.5·ΔW_plain + 1.5·ΔW_rslora, against PEFT's own weighted combination ("cat" is exact) merged."""
    model = peft_model(tiny_llama, lora_variants["plain"])
    model.load_adapter(str(lora_variants["rslora"]), adapter_name="b")
    model.add_weighted_adapter(["default", "b"], [0.5, 1.5], "combo", combination_type="cat")
    model.set_adapter("combo")
    with torch.no_grad():
        ref = {k: v.detach() for k, v in model.merge_and_unload(adapter_names=["combo"]).state_dict().items()}

    specs = [f"{lora_variants['plain']}:0.5", (lora_variants["rslora"], 1.5)]
    report = adaconvert.merge(tiny_llama, specs, tmp_path / "merged")
    assert [a["weight"] for a in report.adapters] == [0.5, 1.5]
    changed = assert_matches_reference(
        read_checkpoint(tmp_path / "merged"), ref, read_checkpoint(tiny_llama), bounds=None
    )
    assert changed == report.tensors_touched == 14


# ---------------------------------------------------------------------------------------------- vLLM


@pytest.fixture(scope="module")
def vllm_available():
    require("vllm", purpose="the vLLM tests")


@pytest.mark.vllm
@pytest.mark.parametrize("arch", ARCHS)
def test_vllm_serves_the_merged_model_like_peft(arch, vllm_available, bases, adaloras, tiny_llama, tmp_path):
    """A plain vLLM engine (no LoRA) on the merged directory greedy-decodes what PEFT decodes with the adapter.

    The engine runs in-process beside the session's LoRA engine, if any (two in-process engines coexist)."""
    from tests.helpers.vllm_utils import assert_same_generation, greedy, make_engine, prompt_token_ids

    base = bases(arch)
    adaconvert.merge(base, [adaloras[arch]], tmp_path / "merged")
    prompts = prompt_token_ids(base)
    expected = peft_greedy(base, adaloras[arch], prompts)
    assert expected != peft_greedy(base, None, prompts), "the adapter must change the generation"

    llm = make_engine(tmp_path / "merged", lora=False)
    try:
        got = greedy(llm, prompts)
    finally:
        del llm
        gc.collect()
    assert_same_generation(got, expected)


# ---------------------------------------------------------------------------------------------- memory


def _merge_in_subprocess(base, adapter, dst) -> dict:
    cmd = [sys.executable, "-m", "adaconvert.cli", "merge", str(base), str(adapter), str(dst), "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.slow  # a CLI subprocess, or a model or file large enough to take seconds
def test_peak_memory_does_not_grow_with_the_model(tmp_path):
    """Merge a base of N and 4N layers, each in a fresh process: peak RSS differs by less than the largest tensor,
    while the bases differ by several times that."""
    from adaconvert.testing.synthetic import LlamaShape, write_synthetic_adalora, write_synthetic_llama

    dims = {"hidden": 512, "intermediate": 1536, "heads": 16, "kv_heads": 4, "vocab": 16384}
    peaks, sizes = {}, {}
    for layers in (2, 8):
        base = write_synthetic_llama(tmp_path / f"base{layers}", layers=layers, dtype=torch.float32, **dims)
        shape = LlamaShape(hidden=512, intermediate=1536, layers=layers, kv_dim=128)
        adapter = write_synthetic_adalora(tmp_path / f"adapter{layers}", shape=shape, init_r=4, target_r=2)
        report = _merge_in_subprocess(base, adapter, tmp_path / f"merged{layers}")
        assert report["tensors_touched"] == 7 * layers
        peaks[layers], sizes[layers] = report["peak_rss_bytes"], report["bytes_written"]
    largest = 16384 * 512 * 4  # embed_tokens / lm_head, float32: 32 MiB (run-to-run noise measured ≤ 11 MiB)
    assert sizes[8] - sizes[2] > 2 * largest
    assert abs(peaks[8] - peaks[2]) < largest, peaks


# ---------------------------------------------------------------------------------------------- bad inputs


def _truncated(bases, tmp_path):
    base = tmp_path / "truncated"
    shutil.copytree(bases("llama", "float32-sharded"), base)
    shard = sorted(base.glob("model-*.safetensors"))[2]
    shard.write_bytes(shard.read_bytes()[:-100])
    return base


def _missing_shard(bases, tmp_path):
    base = tmp_path / "missing-shard"
    shutil.copytree(bases("llama", "float32-sharded"), base)
    sorted(base.glob("model-*.safetensors"))[1].unlink()
    return base


def _nan_base(bases, tmp_path):
    """The llama base with one NaN in a projection the LoRA adapts."""
    from safetensors.torch import save_file

    base = tmp_path / "nan-base"
    shutil.copytree(bases("llama"), base)
    tensors = read_checkpoint(base)
    tensors["model.layers.1.self_attn.v_proj.weight"][3, 5] = float("nan")
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    return base


def _bin_only(bases, tmp_path):
    base = tmp_path / "bin-only"
    base.mkdir()
    shutil.copy(bases("llama") / "config.json", base)
    (base / "pytorch_model.bin").write_bytes(b"not really")
    return base


def _other_base_adapter(bases, tmp_path):
    """Same module names, other shapes: a LoRA for a llama with hidden size 96."""
    other = tmp_path / "wide-llama"
    build_tiny_model(other, "llama", hidden=96)
    return untrained_lora(other, tmp_path / "wide-lora", TARGETS["llama"])


def _one_layer_base(bases, tmp_path):
    base = tmp_path / "one-layer"
    build_tiny_model(base, "llama", layers=1)
    return base


def _tied_head_adapter(bases, tmp_path):
    """A LoRA on q_proj and the (tied) lm_head. Written with our writer: PEFT 0.21 also saves the whole tied
    lm_head.base_layer.weight in such an adapter, which the LoRA reader already refuses."""
    gen = torch.Generator().manual_seed(0)
    deltas = {
        name: LowRankDelta(A=torch.randn(4, 64, generator=gen), B=torch.randn(out, 4, generator=gen) * 0.01)
        for name, out in (("lm_head", 62), ("model.layers.0.self_attn.q_proj", 64))
    }
    (path := tmp_path / "head-lora").mkdir()
    write_peft_lora(Adapter(deltas=deltas, task_type="CAUSAL_LM"), path, dtype=torch.float32)
    return path


# id, base, adapters, options, error, match; base/adapters: "arch", an attribute of the fixtures, or a builder
BAD_INPUTS = [
    (
        "shape-mismatch",
        "llama",
        [_other_base_adapter],
        {},
        errors.AdapterShapeError,
        r"has shape \[\d+, \d+\] but .*another base",
    ),
    ("module-missing", _one_layer_base, ["lora:llama"], {}, errors.MissingTensorError, r"layers\.1\..*no tensor"),
    ("other-architecture", "llama", ["adalora:gpt2"], {}, errors.MissingTensorError, r"transformer\.h\.0.*no tensor"),
    ("truncated-shard", _truncated, ["lora:llama"], {}, errors.CorruptCheckpointError, r"truncated"),
    ("missing-shard", _missing_shard, ["lora:llama"], {}, errors.SourceNotFoundError, r"shard .* is missing"),
    ("bin-only-base", _bin_only, ["lora:llama"], {}, errors.SourceNotFoundError, r"pytorch_model\.bin.*safetensors"),
    ("no-such-base", "does/not/exist/", ["lora:llama"], {}, errors.SourceNotFoundError, r"no such directory"),
    ("tied-head", "qwen2", [_tied_head_adapter], {}, errors.InvalidConfigError, r"lm_head.*tie_word_embeddings"),
    ("overflow", "llama", ["lora:llama:1e30"], {"dtype": "float16"}, errors.NonFiniteError, r"overflows.*float16"),
    ("nan-weight", "llama", ["lora:llama:nan"], {}, errors.InvalidConfigError, r"finite number"),
    ("nan-in-base", _nan_base, ["lora:llama"], {}, errors.NonFiniteError, r"v_proj.*NaN or Inf \(rows 0-"),
    ("bad-shard-size", "llama", ["lora:llama"], {"max_shard_size": "5XB"}, errors.InvalidConfigError, r"5GB"),
    ("dst-exists", "llama", ["lora:llama"], {"exists": True}, errors.OutputExistsError, r"--overwrite"),
]


@pytest.mark.parametrize(
    ("base", "adapters", "options", "error", "match"),
    [case[1:] for case in BAD_INPUTS],
    ids=[case[0] for case in BAD_INPUTS],
)
def test_bad_inputs_fail_in_one_line_and_write_nothing(
    base, adapters, options, error, match, bases, loras, adaloras, tmp_path, capsys
):
    def resolve(spec):
        if callable(spec):
            return str(spec(bases, tmp_path))
        kind, _, rest = spec.partition(":")
        if kind in ("lora", "adalora"):
            arch, _, weight = rest.partition(":")
            path = (loras if kind == "lora" else adaloras)[arch]
            return f"{path}:{weight}" if weight else str(path)
        return str(bases(spec)) if spec in ARCHS else spec

    base, adapters, options = resolve(base), [resolve(a) for a in adapters], dict(options)
    dst = tmp_path / "out" / "merged"
    dst.parent.mkdir()
    if options.pop("exists", False):
        dst.mkdir()
        (dst / "keep.txt").write_text("mine")
    with pytest.raises(error, match=match):
        adaconvert.merge(base, adapters, dst, **options)

    flags = [f"--{k.replace('_', '-')}={v}" for k, v in options.items()]
    capsys.readouterr()  # drop what building the inputs printed
    assert main(["merge", base, *adapters, str(dst), *flags, "-q"]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    if error is errors.OutputExistsError:
        assert [p.name for p in dst.parent.iterdir()] == ["merged"] and (dst / "keep.txt").read_text() == "mine"
    else:
        assert no_output(dst)


# ---------------------------------------------------------------------------------------------- output and CLI


def test_output_shards_index_side_files_and_dtype(bases, loras, tmp_path):
    base = bases("llama")
    (base_copy := tmp_path / "base").mkdir()
    for path in base.iterdir():
        shutil.copy(path, base_copy)
    (base_copy / "pytorch_model.bin").write_bytes(b"stale weights that must not be copied")
    (base_copy / "chat_template.jinja").write_text("{{ messages }}")

    report = adaconvert.merge(base_copy, [loras["llama"]], tmp_path / "sharded", max_shard_size="60KB")
    out = tmp_path / "sharded"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*.safetensors"))
    assert report.shards == len(shards) > 1 and not (out / "pytorch_model.bin").exists()
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    assert (
        index["metadata"]["total_size"]
        == report.bytes_written
        == sum(t.numel() * t.element_size() for t in read_checkpoint(out).values())
    )
    for shard in shards:  # at most 60 kB of data, unless a single tensor is larger
        with safe_open(str(shard), framework="pt") as f:
            sizes = [f.get_tensor(k).numel() * 4 for k in f.keys()]  # noqa: SIM118
        assert sum(sizes) <= 60_000 or len(sizes) == 1
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (base / name).read_bytes()
    assert (out / "chat_template.jinja").is_file()
    assert json.loads((out / "merge_report.json").read_text())["tensors_touched"] == 14

    single = read_checkpoint(tmp_path / "sharded")
    adaconvert.merge(base, [loras["llama"]], tmp_path / "bf16", dtype="bfloat16")
    as_bf16 = read_checkpoint(tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    assert all(torch.equal(as_bf16[k], v.to(torch.bfloat16)) for k, v in single.items())
    assert (tmp_path / "bf16" / "model.safetensors").is_file()

    adaconvert.merge(base, [loras["llama"]], tmp_path / "bf16", overwrite=True)  # float32 again, replaced
    assert next(iter(read_checkpoint(tmp_path / "bf16").values())).dtype == torch.float32


def test_cli_json_summary_and_progress_bar(bases, loras, tmp_path, capsys):
    base = bases("gpt2", "float32-sharded")
    assert main(["merge", str(base), f"{loras['gpt2']}:0.5", str(tmp_path / "a"), "--json"]) == 0
    out, err = capsys.readouterr()
    summary = json.loads(out)
    assert summary["tensors_touched"] == 8 and summary["adapters"][0]["weight"] == 0.5
    assert summary["bytes_written"] > 0 and summary["seconds"] > 0 and summary["peak_rss_bytes"] > 2**20
    assert main(["merge", str(base), str(loras["gpt2"]), str(tmp_path / "b")]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"wrote {tmp_path / 'b'}: 8 of ") and "merge: 100%" in err


@pytest.mark.slow  # a CLI subprocess or worker processes, each importing torch: seconds
def test_hub_id_base_from_the_local_cache(tiny_llama, loras, tmp_path):
    """A Hub id resolves through huggingface_hub (here its offline cache: no network in tests)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "cache" / "models--acme--tiny-llama"
    shutil.copytree(tiny_llama, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "adaconvert.cli",
        "merge",
        "acme/tiny-llama",
        str(loras["llama"]),
        str(tmp_path / "m"),
    ]
    done = subprocess.run([*cmd, "-q"], capture_output=True, text=True, env=env, check=False, timeout=300)
    assert done.returncode == 0, done.stderr
    adaconvert.merge(tiny_llama, [loras["llama"]], tmp_path / "local")
    hub, local = read_checkpoint(tmp_path / "m"), read_checkpoint(tmp_path / "local")
    assert hub.keys() == local.keys() and all(torch.equal(hub[k], local[k]) for k in hub)
    cmd[4], cmd[6] = "acme/unknown", str(tmp_path / "m2")
    done = subprocess.run([*cmd, "-q"], capture_output=True, text=True, env=env, check=False, timeout=300)
    assert done.returncode == 3 and "acme/unknown: no such local directory" in done.stderr


@pytest.mark.parametrize(("arch", "variant", "dtype"), [("llama", "float32", None), ("gpt2", "bfloat16", "float32")])
def test_small_blocks_and_any_thread_count_give_the_same_bytes(
    arch, variant, dtype, bases, loras, tmp_path, monkeypatch
):
    """Tensors split into many row blocks (every worker's buffer ring wraps many times; GPT-2's transposed updates
    are cut along the input dimension), computed by one worker or by more workers than cores, so that blocks are
    written out of order: the same checkpoint, bit for bit."""
    import adaconvert.merging as merging

    base = bases(arch, variant)
    adaconvert.merge(base, [loras[arch]], tmp_path / "reference", dtype=dtype)
    reference = read_checkpoint(tmp_path / "reference")
    monkeypatch.setattr(merging, "BLOCK_BYTES", 1000)  # a few rows per block
    for threads in (1, 5):
        adaconvert.merge(base, [loras[arch]], tmp_path / f"blocks-{threads}", dtype=dtype, threads=threads)
        blocks = read_checkpoint(tmp_path / f"blocks-{threads}")
        assert reference.keys() == blocks.keys() and all(torch.equal(reference[k], blocks[k]) for k in reference)


# ---------------------------------------------------------------------------------------------- units


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_overflow_bound_is_where_the_cast_starts_giving_inf(dtype):
    from adaconvert.merging import _overflow_bound

    bound = _overflow_bound(dtype)
    if dtype == torch.float32:
        assert bound == float("inf")
        return
    at = torch.tensor([bound, -bound], dtype=torch.float32)
    below = torch.nextafter(at, torch.zeros(2))
    assert at.tolist() == [bound, -bound]  # the bound is itself a float32
    assert torch.isinf(at.to(dtype)).all() and torch.isfinite(below.to(dtype)).all()


def test_checkpoint_reader_reads_what_safetensors_reads(bases):
    from adaconvert.io.checkpoint import TensorReader, open_checkpoint

    base = bases("qwen2", "bfloat16-sharded")
    checkpoint = open_checkpoint(base)
    assert checkpoint.tie_word_embeddings and len(checkpoint.files) > 1
    expected = read_checkpoint(base)
    with TensorReader() as reader:
        got = {name: reader.read(info) for name, info in checkpoint.tensors.items()}
        rows = reader.read_rows(checkpoint.tensors["model.embed_tokens.weight"], 3, 7)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    assert torch.equal(rows, expected["model.embed_tokens.weight"][3:7])


@pytest.mark.parametrize(
    ("module", "names", "expected"),
    [
        ("model.layers.0.q", ["model.layers.0.q.weight", "x.model.layers.0.q.weight"], ["model.layers.0.q.weight"]),
        ("model.layers.0.q", ["language_model.model.layers.0.q.weight"], ["language_model.model.layers.0.q.weight"]),
        ("model.layers.0.q", ["layers.0.q.weight"], ["layers.0.q.weight"]),
        ("model.layers.0.q", ["a.model.layers.0.q.weight", "b.model.layers.0.q.weight"], None),
        ("model.layers.0.q", ["model.layers.0.q.bias", "model.layers.10.q.weight"], []),
    ],
)
def test_match_tensor(module, names, expected):
    found = match_tensor(module, set(names))
    assert found == (expected if expected is not None else sorted(names))


@pytest.mark.parametrize(
    ("spec", "source", "weight"),
    [("runs/a", "runs/a", 1.0), ("runs/a:0.5", "runs/a", 0.5), ("runs/a:-1", "runs/a", -1.0), ("a:b", "a:b", 1.0)],
)
def test_parse_adapter_spec(spec, source, weight):
    parsed = parse_adapter_spec(spec)
    assert (parsed.source, parsed.weight) == (source, weight)


@pytest.mark.parametrize(("text", "size"), [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("2GiB", 2**31), (123, 123)])
def test_parse_size(text, size):
    assert parse_size(text) == size


def test_merge_on_a_platform_without_positioned_io_is_one_clear_error(tiny_llama, loras, tmp_path, monkeypatch):
    """Windows has no os.preadv / os.pwrite: merge says so before reading anything (README: supported systems)."""
    monkeypatch.delattr(os, "preadv")
    with pytest.raises(errors.UnsupportedPlatformError, match=r"positioned file I/O \(os.preadv\)"):
        adaconvert.merge(tiny_llama, [loras["llama"]], tmp_path / "merged")
    assert no_output(tmp_path / "merged")
