"""The adaptive power iterations of the randomized SVD (linalg.sketch.PowerStop): ``n_iter`` is the most, the loop
ends once the rank-k error improves by at most POWER_TOL per iteration. A planted exact rank still comes out exact
(the full count), the count never passes the maximum, the error stays within a stated bound of the full count's on
decaying spectra, the results repeat bit for bit, and extract reports the count per layer."""

from __future__ import annotations

import math

import pytest
import torch

from lowrank_tools.extract import extract
from lowrank_tools.linalg import POWER_TOL, PowerStop, RankRule, truncated_svd


def _orthonormal(m: int, r: int, gen: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(m, r, generator=gen, dtype=torch.float64)).Q


def _spectrum_matrix(m: int, n: int, s: torch.Tensor, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return ((_orthonormal(m, len(s), gen) * s.double()) @ _orthonormal(n, len(s), gen).T).float()


def _error(M: torch.Tensor, svd) -> float:
    """||M - U S Vh||_F in float64."""
    return float(torch.linalg.matrix_norm(M.double() - (svd.U.double() * svd.S.double()) @ svd.Vh.double()))


def _decaying(m: int, n: int, seed: int) -> torch.Tensor:
    """s_i ~ 1/i over 256 values plus a noise floor (llama_stack.py's delta, with its bf16 rounding's share)."""
    gen = torch.Generator().manual_seed(seed + 1)
    s = 1.0 / torch.arange(1, 257, dtype=torch.float64)
    noise = 2e-3 * float(s.norm()) / math.sqrt(m * n)
    return _spectrum_matrix(m, n, s, seed) + noise * torch.randn(m, n, generator=gen)


@pytest.mark.parametrize("n_iter", [2, 4, 6])
def test_planted_exact_rank_stays_exact_with_the_full_count(n_iter):
    M = _spectrum_matrix(600, 400, torch.linspace(3.0, 1.0, 6))  # rank 6, k = 6: nothing left out
    svd = truncated_svd(M, 6, method="randomized", n_iter=n_iter)
    assert svd.power_iters == n_iter  # the residual is below 1% of ||M||: no early stop
    assert _error(M, svd) <= 1e-5 * float(M.norm())
    torch.testing.assert_close(svd.S, torch.linspace(3.0, 1.0, 6), rtol=1e-5, atol=0)


@pytest.mark.parametrize("n_iter", [0, 1, 2, 3, 4, 7])
@pytest.mark.parametrize("kind", ["decaying", "noise", "planted"])
def test_never_more_than_the_maximum(n_iter, kind):
    gen = torch.Generator().manual_seed(3)
    M = {"decaying": lambda: _decaying(500, 300, 1), "noise": lambda: torch.randn(500, 300, generator=gen),
         "planted": lambda: _spectrum_matrix(500, 300, torch.ones(4))}[kind]()
    svd = truncated_svd(M, 8, method="randomized", n_iter=n_iter)
    assert svd.power_iters <= n_iter
    if n_iter <= 2:  # the first comparison is at 2 iterations: stopping there is the full count
        assert svd.power_iters == n_iter
    else:
        assert svd.power_iters >= 2
    assert truncated_svd(M, 8, method="randomized", n_iter=n_iter, power_tol=None).power_iters == n_iter


def test_noise_stops_early_and_the_exact_method_reports_no_count():
    M = torch.randn(800, 600, generator=torch.Generator().manual_seed(5))
    assert truncated_svd(M, 8, method="randomized", n_iter=6).power_iters < 6  # flat: iterations gain little
    assert truncated_svd(M, 8, method="exact").power_iters is None


@pytest.mark.parametrize("k", [8, 32])
@pytest.mark.parametrize("shape", [(576, 576), (1536, 576), (384, 1024)])
def test_error_within_the_stated_bound_on_decaying_spectra(shape, k):
    """The stated bound: the adaptive rank-k error is within POWER_TOL (relative) of the full count's; and the
    stop does save iterations here (else the test would not test the stop)."""
    M = _decaying(*shape, seed=k)
    full = truncated_svd(M, k, method="randomized", n_iter=4, power_tol=None)
    adaptive = truncated_svd(M, k, method="randomized", n_iter=4)
    assert adaptive.power_iters < 4
    assert _error(M, adaptive) <= (1 + POWER_TOL) * _error(M, full)


def test_same_seed_same_factors_and_count():
    M = _decaying(700, 500, seed=2)
    a, b = (truncated_svd(M, 16, method="randomized", seed=7) for _ in range(2))
    assert a.power_iters == b.power_iters
    for x, y in [(a.U, b.U), (a.S, b.S), (a.Vh, b.Vh)]:
        assert torch.equal(x, y)


def test_count_independent_of_thread_count():
    M = _decaying(1024, 768, seed=4)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = truncated_svd(M, 8, method="randomized")
        torch.set_num_threads(2)
        two = truncated_svd(M, 8, method="randomized")
    finally:
        torch.set_num_threads(threads)
    assert one.power_iters == two.power_iters
    torch.testing.assert_close(one.S, two.S, rtol=1e-5, atol=0)


def test_stop_reads_the_exact_rank_k_error_of_the_basis():
    """PowerStop's e_i is the rank-k error within span(Q): for Q the exact top-l singular vectors, the optimum."""
    M = _decaying(400, 300, seed=6).double()
    U, S, _ = torch.linalg.svd(M, full_matrices=False)
    stop = PowerStop(float(M.norm()), k=5, tol=POWER_TOL)
    Qt = U[:, :12].T
    stop.settled(Qt, Qt @ M, done=1)
    assert stop.errors[-1] == pytest.approx(float(S[5:].norm()), rel=1e-9)


def test_extract_reports_the_count_per_layer():
    shapes = {"model.layers.0.mlp.up_proj.weight": (768, 512), "model.layers.0.self_attn.q_proj.weight": (512, 512)}
    base = {name: torch.zeros(shape) for name, shape in shapes.items()}
    tuned = {name: _decaying(*shape, seed=i) for i, (name, shape) in enumerate(shapes.items())}
    report = extract(base, tuned, rule=RankRule(rank=8), n_iter=5).report
    counts = [rec.extra["power_iters"] for rec in report.layers]
    assert len(counts) == 2 and all(2 <= c <= 5 for c in counts)
    assert all(row["power_iters"] == c for row, c in zip(report.to_dict()["layers"], counts))


def test_a_stop_at_i_iterations_is_the_i_iteration_svd_bit_for_bit():
    """Stopping early finishes from the basis at hand and its product: exactly the SVD with n_iter = i."""
    M = _decaying(640, 480, seed=8)
    stopped = truncated_svd(M, 8, method="randomized", n_iter=5, power_tol=1.0)  # any change counts as small
    assert stopped.power_iters == 2
    plain = truncated_svd(M, 8, method="randomized", n_iter=2, power_tol=None)
    for x, y in [(stopped.U, plain.U), (stopped.S, plain.S), (stopped.Vh, plain.Vh)]:
        assert torch.equal(x, y)
