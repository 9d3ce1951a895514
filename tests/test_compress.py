"""Rank compression: exact when nothing is truncated, optimal (Eckart–Young) when it is, error reported honestly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import adaconvert
import adaconvert.errors
from adaconvert.adapter import Adapter, LowRankDelta
from adaconvert.metrics import relative_error
from adaconvert.transforms import compress_ranks, low_rank_svd
from adaconvert.transforms.compress import choose_rank
from tests.helpers.peft_utils import max_rel_delta_error, peft_delta_weights


def random_delta(m=48, n=40, r=6, true_rank=None, seed=0) -> LowRankDelta:
    g = torch.Generator().manual_seed(seed)
    true_rank = true_rank or r
    B = torch.randn(m, true_rank, generator=g) @ torch.randn(true_rank, r, generator=g)
    return LowRankDelta(A=torch.randn(r, n, generator=g), B=B)


def test_low_rank_svd_matches_dense_svd():
    delta = random_delta()
    svd = low_rank_svd(delta)
    W = delta.B.double() @ delta.A.double()
    dense = torch.linalg.svdvals(W)
    assert torch.allclose(svd.S, dense[: len(svd.S)], rtol=1e-10)
    assert torch.allclose(svd.U @ torch.diag(svd.S) @ svd.Vh, W, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_truncation_is_optimal_and_error_is_reported_exactly(k):
    delta = random_delta(r=6)
    adapter = Adapter(deltas={"m": delta})
    out = compress_ranks(adapter, max_rank=k)
    W = delta.delta_weight().double()
    W_k = out.deltas["m"].delta_weight().double()
    measured = float((W - W_k).norm() / W.norm())
    # best rank-k approximation from a dense SVD (small case: fine to form it here)
    U, S, Vh = torch.linalg.svd(W)
    best = float((W - U[:, :k] @ torch.diag(S[:k]) @ Vh[:k]).norm() / W.norm())
    assert out.deltas["m"].rank == k
    assert measured == pytest.approx(best, rel=1e-5)
    assert out.provenance["compression"]["m"]["truncation_error"] == pytest.approx(measured, rel=1e-5)
    assert relative_error(delta, out.deltas["m"]) == pytest.approx(measured, rel=1e-5)


def test_requested_rank_above_true_rank_is_exact():
    delta = random_delta(r=8, true_rank=3)
    out = compress_ranks(Adapter(deltas={"m": delta}), max_rank=5)
    assert out.deltas["m"].rank == 5
    assert relative_error(delta, out.deltas["m"]) < 1e-6


def test_module_within_max_rank_is_untouched():
    delta = random_delta(r=4)
    out = compress_ranks(Adapter(deltas={"m": delta}), max_rank=4)
    assert out.deltas["m"] is delta


def test_energy_and_tol_choose_the_smallest_sufficient_rank():
    delta = LowRankDelta(A=torch.eye(4, 10), B=torch.diag(torch.tensor([4.0, 2.0, 1.0, 0.5])).repeat(2, 1))
    svd = low_rank_svd(delta)
    s2 = torch.tensor([16.0, 4.0, 1.0, 0.25])
    # energy 0.9: 16/21.25 = 0.75 < 0.9, 20/21.25 = 0.94 ≥ 0.9 → rank 2
    assert choose_rank(svd, energy=0.9) == 2
    assert choose_rank(svd, energy=1.0) == 4
    # tol: error of rank 2 = sqrt(1.25/21.25) = 0.2425; of rank 3 = sqrt(0.25/21.25) = 0.108
    assert choose_rank(svd, tol=0.25) == 2
    assert choose_rank(svd, tol=0.2) == 3
    assert choose_rank(svd, tol=0.0) == 4
    assert choose_rank(svd, tol=0.25, max_rank=1) == 1
    assert svd.truncation_error(2) == pytest.approx(float((s2[2:].sum() / s2.sum()).sqrt()))


def test_cli_compression_report_matches_peft(adalora_llama, converted_llama, tiny_llama, tmp_path):
    k = json.loads((converted_llama / "adapter_config.json").read_text())["r"] - 2
    report = adaconvert.to_lora(adalora_llama, tmp_path / "small", max_rank=k)
    config = json.loads((tmp_path / "small" / "adapter_config.json").read_text())
    assert config["r"] == max(config["rank_pattern"].values()) == k
    ref = peft_delta_weights(tiny_llama, adalora_llama)
    ours = peft_delta_weights(tiny_llama, tmp_path / "small")
    for m in report.modules:
        if m.rank_after:
            measured = float((ref[m.name] - ours[m.name]).norm() / ref[m.name].norm())
            assert m.rel_error == pytest.approx(measured, rel=1e-3, abs=1e-6)
    assert report.max_rel_error > 0
    assert max_rel_delta_error(ref, ours) == pytest.approx(report.max_rel_error, rel=1e-3)


def test_vllm_rank_limit_compresses_only_when_asked(adalora_llama, converted_llama, tmp_path):
    assert json.loads((converted_llama / "adapter_config.json").read_text())["r"] > 1
    with pytest.raises(adaconvert.errors.RankLimitError, match="exceed vLLM max_lora_rank 1"):
        adaconvert.to_lora(adalora_llama, tmp_path / "fail", vllm_max_lora_rank=1)
    assert not (tmp_path / "fail").exists()
    report = adaconvert.to_lora(adalora_llama, tmp_path / "fit", vllm_max_lora_rank=1, energy=1.0)
    assert report.max_rank == 1 and report.vllm_max_lora_rank == 1
    tensors = load_file(tmp_path / "fit" / "adapter_model.safetensors")
    assert all(t.shape[0] == 1 for k, t in tensors.items() if k.endswith("lora_A.weight"))
