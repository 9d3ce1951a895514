"""`to-mlx`: real mlx-lm (mlx[cpu] on Linux) runs our export and computes what PEFT computes with the original."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from adaconvert.cli import main
from adaconvert.compat.runtimes import check_runtimes
from adaconvert.conversion.mlx_lm import to_mlx
from adaconvert.errors import InvalidConfigError
from tests.helpers.adapter_edits import edited_copy
from tests.helpers.needs import require_mlx_lm
from tests.helpers.peft_utils import adalora_config, base_logits, lora_config, peft_logits, prompt_ids, train_peft

pytestmark = pytest.mark.mlx

# float32 on both sides, but mlx and torch order their sums differently (and CPUs differ: AVX2, AVX-512, NEON).
# Measured max |Δlogit|: 2.0e-6 for the bases alone, 2.2e-6 with the adapters (9e-6 on another machine); 1e-4
# leaves room for other CPUs and is four orders below the adapters' own effect on the logits (> 1)
LOGIT_TOL = 1e-4


@pytest.fixture(scope="module")
def adaloras(adalora_llama, tiny_llama, tiny_qwen2, tmp_path_factory):
    """Real PEFT-trained AdaLoRAs with pruned, rank-varying modules, on llama (GQA) and qwen2 (biases, tied)."""
    out = tmp_path_factory.mktemp("mlx-adalora-qwen2")
    qwen2 = train_peft(tiny_qwen2, out, adalora_config("qwen2", total_step=30), steps=30, seed=0, adalora=True)
    return {"llama": (tiny_llama, adalora_llama), "qwen2": (tiny_qwen2, qwen2)}


@pytest.fixture(scope="module")
def mlx_bases(adaloras, tmp_path_factory):
    """The tiny bases as mlx-lm reads them: mlx-lm takes ``rope_theta`` from the top level of config.json, where
    transformers 5 writes it under ``rope_parameters`` (mlx-lm's qwen2 would fall back to its own 1e6)."""
    out = {}
    for arch, (base, _) in adaloras.items():
        copy = tmp_path_factory.mktemp(f"mlx-base-{arch}")
        shutil.copytree(base, copy, dirs_exist_ok=True)
        config = json.loads((copy / "config.json").read_text())
        config["rope_theta"] = config["rope_parameters"]["rope_theta"]
        (copy / "config.json").write_text(json.dumps(config))
        out[arch] = copy
    return out


def mlx_logits(base, adapter, ids: torch.Tensor) -> torch.Tensor:
    import mlx.core as mx

    model, _ = require_mlx_lm().load(str(base), adapter_path=str(adapter) if adapter else None)
    return torch.from_numpy(np.array(model(mx.array(ids.numpy())), dtype=np.float32))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_mlx_base_matches_transformers(arch, adaloras, mlx_bases):
    """First the base: mlx-lm and transformers compute the same tiny model, so the adapter test means something."""
    base, _ = adaloras[arch]
    ids = prompt_ids(base)
    assert (mlx_logits(mlx_bases[arch], None, ids) - base_logits(base, ids)).abs().max() <= LOGIT_TOL


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_mlx_export_matches_peft(arch, adaloras, mlx_bases, tmp_path):
    base, adalora = adaloras[arch]
    source = json.loads((adalora / "adapter_config.json").read_text())
    kept = [sum(v) for v in source["rank_pattern"].values()]
    assert 0 in kept and len(set(kept) - {0}) > 1, "the fixture must have pruned, rank-varying modules"
    report = to_mlx(adalora, tmp_path / "mlx", base=base)
    ids = prompt_ids(base)
    reference = peft_logits(base, adalora, ids)
    assert (reference - base_logits(base, ids)).abs().max() > 0.1, "adapter too weak for a meaningful test"
    assert (mlx_logits(mlx_bases[arch], tmp_path / "mlx", ids) - reference).abs().max() <= LOGIT_TOL
    assert report.layout == "mlx" and report.max_rel_error <= 1e-5
    # the portability check of the written directory: mlx-lm exact (just checked), nothing else reads it
    verdicts = check_runtimes(tmp_path / "mlx")
    assert verdicts["mlx-lm"].status == "exact"
    assert {v.status for k, v in verdicts.items() if k != "mlx-lm"} == {"refused"}
    assert report.runtimes["mlx-lm"]["status"] == "exact"


def test_mlx_files(adaloras, tmp_path):
    base, adalora = adaloras["llama"]
    report = to_mlx(adalora, tmp_path / "mlx")  # base from the adapter's base_model_name_or_path
    config = json.loads((tmp_path / "mlx" / "adapter_config.json").read_text())
    base_config = json.loads((base / "config.json").read_text())
    rank = report.max_rank
    keys = ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj", "self_attn.o_proj"]
    keys += ["self_attn.q_proj", "self_attn.v_proj"]
    assert config == {
        "fine_tune_type": "lora",
        "num_layers": base_config["num_hidden_layers"],
        "lora_parameters": {"rank": rank, "scale": 1.0, "dropout": 0.0, "keys": keys},
    }
    tensors = load_file(tmp_path / "mlx" / "adapters.safetensors")
    # every block and key present, pruned modules as zeros; lora_a (in, R), lora_b (R, out)
    assert len(tensors) == 2 * base_config["num_hidden_layers"] * len(keys)
    stored = load_file(adalora / "adapter_model.safetensors")
    for layer in range(base_config["num_hidden_layers"]):
        for key in keys:
            name = f"model.layers.{layer}.{key}"
            a, b = tensors[f"{name}.lora_a"], tensors[f"{name}.lora_b"]
            assert a.shape == (stored[f"base_model.model.{name}.lora_A"].shape[1], rank)
            assert b.shape == (rank, stored[f"base_model.model.{name}.lora_B"].shape[0])
            if stored[f"base_model.model.{name}.lora_A"].shape[0] == 0:
                assert not a.any() and not b.any()
    card = (tmp_path / "mlx" / "README.md").read_text()
    assert "library_name: mlx" in card and "mlx_lm.generate" in card and "adapter_path=" in card
    assert report.layout_overhead_params == sum(t.numel() for t in tensors.values()) - report.params_after


def test_push_checks_mlx_lm_rules_and_regenerates_the_mlx_card(adaloras, tmp_path):
    from adaconvert.hub import push

    to_mlx(adaloras["llama"][1], tmp_path / "mlx")
    result = push(tmp_path / "mlx", "me/tiny-mlx", dry_run=True)
    assert result.problems == []  # mlx-lm's rules, not vLLM's (which would refuse an mlx-lm directory)
    assert {name for name, _ in result.files} == {
        "README.md",
        "adapter_config.json",
        "adapters.safetensors",
        "conversion_report.json",
    }
    assert 'adapter_path="me/tiny-mlx"' in result.card and "library_name: mlx" in result.card
    base = json.loads((tmp_path / "mlx" / "conversion_report.json").read_text())["base_model"]
    assert base and f'load("{base}"' in result.card


def test_mlx_cli_json_dtype_and_compression(adaloras, tmp_path, capsys):
    base, adalora = adaloras["llama"]
    args = ["to-mlx", str(adalora), str(tmp_path / "mlx"), "--base", str(base), "--max-rank", "2"]
    assert main([*args, "--dtype", "bfloat16", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["max_rank"] == 2 and report["dtype"] == "bfloat16" and report["layout"] == "mlx"
    tensors = load_file(tmp_path / "mlx" / "adapters.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert {t.shape[1] for k, t in tensors.items() if k.endswith("lora_a")} == {2}
    assert main(args) == 4  # exists, no --overwrite
    assert "--overwrite" in capsys.readouterr().err


def test_modules_mlx_lm_cannot_represent_are_refused_by_name(tiny_llama, adalora_gpt2, tmp_path):
    """mlx-lm's keys are paths inside a block: a LoRA on lm_head has no place there; nor has a Conv1D base."""
    cfg = lora_config("llama", target_modules=["q_proj", "lm_head"])
    trained = train_peft(tiny_llama, tmp_path / "trained", cfg, steps=2)
    # as saved with save_embedding_layers=False: the LoRA of lm_head without a copy of lm_head itself
    with_head = edited_copy(
        trained, tmp_path / "head", tensors=lambda t: {k: v for k, v in t.items() if "base_layer" not in k}
    )
    with pytest.raises(InvalidConfigError, match=r"module lm_head: mlx-lm adapters only cover modules inside"):
        to_mlx(with_head, tmp_path / "out")
    with pytest.raises(InvalidConfigError, match="fan_in_fan_out"):
        to_mlx(adalora_gpt2, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_base_with_fewer_blocks_is_refused(adaloras, tmp_path):
    base, adalora = adaloras["llama"]
    shallow = tmp_path / "shallow"
    shutil.copytree(base, shallow)
    config = json.loads((shallow / "config.json").read_text())
    (shallow / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))
    with pytest.raises(InvalidConfigError, match="the adapter has block 1 but the base model has 1 blocks"):
        to_mlx(adalora, tmp_path / "out", base=shallow)
    assert not (tmp_path / "out").exists()
