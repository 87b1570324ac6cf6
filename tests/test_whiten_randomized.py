"""The randomized whitened SVD (linalg.whiten): subspace iteration on dW C dW^T, no Cholesky, against the exact
SVD of dW L; the Hutchinson estimate of ||dW L||_F when computing it would cost more than the range finder."""

from __future__ import annotations

import pytest
import torch

from lowrank_tools.linalg.whiten import measured_output_error, whitened_balanced_factors, whitened_svd, whitener

OUT, IN = 60, 160


def _problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(OUT, OUT, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(IN, OUT, generator=g, dtype=torch.float64))
    dW = U @ torch.diag(0.7 ** torch.arange(OUT, dtype=torch.float64)) @ V.T  # decaying spectrum
    X = torch.randn(IN, 600, generator=g, dtype=torch.float64) * torch.logspace(0, 1.5, IN, dtype=torch.float64)[:, None]
    return dW, X


@pytest.mark.parametrize("n_iter,estimated", [(2, True), (8, False)])  # in = 160 > 2 (2 + 1) 12, <= 2 (8 + 1) 12
def test_randomized_matches_the_exact_whitened_svd(n_iter, estimated):
    dW, X = _problem()
    w = whitener(X @ X.T, damping=0.0)
    k, r = 4, 3
    fast = whitened_svd(dW, w, k, method="randomized", oversample=8, n_iter=n_iter)
    exact = whitened_svd(dW, whitener(X @ X.T, damping=0.0), k, method="exact")
    assert fast.method.value == "randomized" and exact.method.value == "exact"
    assert fast.total_estimated is estimated and not exact.total_estimated
    torch.testing.assert_close(fast.S, exact.S, rtol=1e-6, atol=0)
    B, A = whitened_balanced_factors(fast, r)
    Be, Ae = whitened_balanced_factors(exact, r)
    torch.testing.assert_close(B @ A, Be @ Ae, rtol=1e-5, atol=1e-8)
    measured = measured_output_error(dW, B, A, X)
    assert measured == pytest.approx(measured_output_error(dW, Be, Ae, X), rel=1e-6)
    true_total = float(torch.linalg.matrix_norm(dW @ w.L))
    assert exact.total == pytest.approx(true_total, rel=1e-9)
    assert fast.total == pytest.approx(true_total, rel=1e-9 if not estimated else 0.05)


def test_float32_deltas_stay_float32_and_the_cholesky_is_never_made():
    dW, X = _problem(1)
    w = whitener(X @ X.T)
    fast = whitened_svd(dW.float(), w, 4, method="randomized", oversample=8, n_iter=4)
    assert fast.U.dtype == fast.S.dtype == fast.rows.dtype == torch.float32
    assert w._L is None  # no in x in Cholesky on the randomized path
    exact = whitened_svd(dW, w, 4, method="exact")
    torch.testing.assert_close(fast.S.double(), exact.S, rtol=1e-4, atol=0)
