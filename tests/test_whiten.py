"""Activation-whitened SVD (linalg.whiten): the identities of issue 17, each against a known answer."""

from __future__ import annotations

import pytest
import torch

from lowrank_tools.errors import NumericalError
from lowrank_tools.linalg.svd import balanced_factors, truncated_svd
from lowrank_tools.linalg.whiten import (measured_output_error, output_rel_error, whitened_balanced_factors,
                                         whitened_factors, whitened_svd, whitener)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _plain_product(dW: torch.Tensor, r: int) -> torch.Tensor:
    B, A = balanced_factors(truncated_svd(dW, r, method="exact"), r)
    return B @ A


@pytest.mark.parametrize("shape", [(12, 9), (9, 12), (10, 10)])
def test_identity_statistics_reproduce_plain_svd(shape):
    dW = torch.randn(*shape, generator=_gen(1), dtype=torch.float64)
    out = whitened_factors(dW, torch.eye(shape[1], dtype=torch.float64), 4, damping=0.0, method="exact")
    B, A = balanced_factors(truncated_svd(dW, 4, method="exact"), 4)
    torch.testing.assert_close(out.B, B)  # L = I exactly: the same SVD, the same signs
    torch.testing.assert_close(out.A, A)
    assert out.output_rel_error == pytest.approx(out.rel_error, rel=1e-12)


@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_discarded_whitened_energy_is_the_measured_output_error(method):
    out_dim, in_dim, tokens, r = 30, 16, 64, 5
    X = torch.randn(in_dim, tokens, generator=_gen(2), dtype=torch.float64)  # full row rank
    X *= torch.logspace(0, 1.5, in_dim, dtype=torch.float64).unsqueeze(1)
    dW = torch.randn(out_dim, in_dim, generator=_gen(3), dtype=torch.float64)
    w = whitener(X @ X.T, damping=0.0)
    assert w.damping == 0.0 and w.note is None
    svd = whitened_svd(dW, w, r, method=method, oversample=4, n_iter=6)
    B, A = whitened_balanced_factors(svd, r)
    measured = float(torch.linalg.matrix_norm((dW - B @ A) @ X)) ** 2
    total = float(torch.linalg.matrix_norm(dW @ X))
    if method == "exact":
        assert float(torch.sum(svd.spectrum[r:] ** 2)) == pytest.approx(measured, rel=1e-9)
    # the formula from the kept values holds for both methods (the randomized factors are a projection)
    assert output_rel_error(svd.S[:r], total) == pytest.approx(measured**0.5 / total, rel=1e-6)
    assert measured_output_error(dW, B, A, X) == pytest.approx(measured**0.5 / total, rel=1e-9)


def test_whitened_wins_on_output_error_and_loses_on_weight_error():
    in_dim, tokens, r = 24, 400, 4
    g = _gen(4)
    X = torch.randn(in_dim, tokens, generator=g, dtype=torch.float64)
    X[: in_dim // 2] *= 0.01  # the layer hardly sees half of its input directions
    dW = torch.randn(20, in_dim, generator=g, dtype=torch.float64)
    out = whitened_factors(dW, X @ X.T, r, method="exact")
    plain = _plain_product(dW, r)
    plain_out = float(torch.linalg.matrix_norm((dW - plain) @ X) / torch.linalg.matrix_norm(dW @ X))
    plain_weight = float(torch.linalg.matrix_norm(dW - plain) / torch.linalg.matrix_norm(dW))
    whitened_out = measured_output_error(dW, out.B, out.A, X)
    assert whitened_out < 0.95 * plain_out
    assert out.rel_error > plain_weight  # Eckart-Young: plain SVD is the weight-space optimum
    assert out.output_rel_error == pytest.approx(  # the L-error with lambda = 1% is close to the X-error
        whitened_out, rel=0.1)


def test_damping_to_infinity_tends_to_plain_svd():
    g = _gen(5)
    X = torch.randn(10, 40, generator=g, dtype=torch.float64) * torch.logspace(0, 2, 10, dtype=torch.float64)[:, None]
    dW = torch.randn(14, 10, generator=g, dtype=torch.float64)
    plain = _plain_product(dW, 3)
    gaps = []
    for damping in (1e-2, 1e2, 1e8):
        out = whitened_factors(dW, X @ X.T, 3, damping=damping, method="exact")
        gaps.append(float(torch.linalg.matrix_norm(out.B @ out.A - plain) / torch.linalg.matrix_norm(plain)))
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-6


def test_dtypes_devices_and_rank_clamp():
    g = _gen(6)
    dW = torch.randn(7, 5, generator=g)  # float32
    X = torch.randn(5, 30, generator=g)
    out = whitened_factors(dW, X @ X.T, 50)  # r clamped to min(out, in) = 5: exact reconstruction
    assert out.B.dtype == out.A.dtype == torch.float32
    assert out.B.shape == (7, 5) and out.A.shape == (5, 5)
    assert out.rel_error < 1e-5 and out.output_rel_error < 1e-5
    assert whitener(X @ X.T).L.dtype == torch.float64
    half = whitened_factors(dW, X @ X.T, 2, scale=0.5)
    full = whitened_factors(dW, X @ X.T, 2)
    torch.testing.assert_close(0.5 * half.B @ half.A, full.B @ full.A)


def test_singular_statistics_raise_damping_with_a_note():
    X = torch.randn(8, 3, generator=_gen(7), dtype=torch.float64)  # rank 3 < 8: X X^T is singular
    w = whitener(X @ X.T, damping=0.0)
    assert w.damping == 0 and w.note is None  # the randomized method needs no Cholesky: nothing to raise
    w.L  # the exact method's Cholesky factor
    assert w.damping > 0 and "not positive definite" in w.note
    notes = []
    whitened_factors(torch.randn(4, 8, dtype=torch.float64), X @ X.T, 2, damping=0.0, on_warning=notes.append)
    assert notes and "damping raised" in notes[0]


def test_zero_statistics_fall_back_to_plain_with_a_note():
    w = whitener(torch.zeros(6, 6))
    torch.testing.assert_close(w.L, torch.eye(6, dtype=torch.float64))
    assert "all zero" in w.note


def test_bad_inputs_are_errors():
    with pytest.raises(ValueError, match="square"):
        whitener(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="damping"):
        whitener(torch.eye(3), damping=-1.0)
    with pytest.raises(NumericalError, match="NaN or Inf"):
        whitener(torch.full((3, 3), float("nan")))
    with pytest.raises(ValueError, match="do not fit"):
        whitened_svd(torch.zeros(4, 5), whitener(torch.eye(3)), 2)
    with pytest.raises(ValueError, match="r must be"):
        w = whitener(torch.eye(3))
        whitened_balanced_factors(whitened_svd(torch.randn(4, 3), w, 2), 3)
