"""relative_error against the dense ΔW difference in float64, in each of its paths."""

import math

import pytest
import torch

from adaconvert.adapter import LowRankDelta
from adaconvert.metrics import frobenius_norm, relative_error


def _dense_error(ref: LowRankDelta, other: LowRankDelta) -> float:
    want = ref.B.double() @ ref.A.double()
    return float((want - other.B.double() @ other.A.double()).norm() / want.norm())


@pytest.fixture
def ref():
    g = torch.Generator().manual_seed(0)
    return LowRankDelta(A=torch.randn(12, 300, generator=g) * 0.02, B=torch.randn(500, 12, generator=g) * 0.02)


def test_cast_to_bfloat16(ref):
    """Same shapes, float32 path: within 1e-5 relative of the dense float64 error (about 2e-3)."""
    other = LowRankDelta(A=ref.A.bfloat16().float(), B=ref.B.bfloat16().float())
    assert relative_error(ref, other) == pytest.approx(_dense_error(ref, other), rel=1e-5)


def test_other_rank(ref):
    """A truncated SVD (another rank): the concatenated form, whose terms cancel, in float64."""
    U, S, Vh = torch.linalg.svd(ref.B.double() @ ref.A.double(), full_matrices=False)
    other = LowRankDelta(A=Vh[:9].float(), B=(U[:, :9] * S[:9]).float())
    assert relative_error(ref, other) == pytest.approx(_dense_error(ref, other), rel=1e-6)


def test_same_shapes_whose_terms_cancel(ref):
    """Another factorisation of nearly the same ΔW (B Q, Qᵀ A plus noise of 1e-6): (B₁ − B₂)A₁ and B₂(A₁ − A₂)
    are large and cancel, so float32 would lose the result; the float64 fallback keeps it to 1e-4."""
    Q, _ = torch.linalg.qr(torch.randn(12, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    noise = torch.randn(12, 300, generator=torch.Generator().manual_seed(2)) * 1e-6
    other = LowRankDelta(A=(Q.T @ ref.A.double()).float() + noise, B=(ref.B.double() @ Q).float())
    want = _dense_error(ref, other)
    assert 1e-6 < want < 1e-3
    assert relative_error(ref, other) == pytest.approx(want, rel=1e-4)


def test_identical_zero_and_inf(ref):
    zero = LowRankDelta(A=torch.zeros(12, 300), B=torch.zeros(500, 12))
    assert relative_error(ref, LowRankDelta(A=ref.A.clone(), B=ref.B.clone())) == 0.0
    assert relative_error(zero, zero) == 0.0 and frobenius_norm(zero) == 0.0
    assert relative_error(zero, ref) == math.inf
    assert relative_error(ref, zero) == pytest.approx(1.0, rel=1e-6)
