"""sketch: top-k singular values by a (mixed-precision) randomized subspace iteration, against svdvals."""

from __future__ import annotations

import pytest
import torch

from conftest import planted
from lowrank_tools.linalg.sketch import fast_bf16, top_singular_values


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("shape", [(600, 500), (300, 700)])
def test_slow_decay_within_a_tenth_of_a_percent(bf16, shape):
    M = planted([1.0 / (i + 1) for i in range(min(shape))], *shape)
    exact = torch.linalg.svdvals(M.double())[:16]
    S, how = top_singular_values(M, 16, bf16=bf16)
    assert how == ("randomized-bf16" if bf16 else "randomized")
    assert S.shape == (16,) and S.dtype == torch.float32
    assert float(((S.double() - exact).abs() / exact).max()) < 1e-3
    assert bool((S.double() <= exact * (1 + 1e-5)).all())  # Ritz values never exceed the true ones


def test_steep_spectrum_falls_back_to_float32():
    values = [10 ** (-4 * i / 16) for i in range(300)]  # s_16 / s_1 = 1e-4: below bf16's resolution of M
    M = planted(values, 400, 300)
    exact = torch.linalg.svdvals(M.double())[:16]
    S, how = top_singular_values(M, 16, bf16=True)
    assert how == "randomized"
    assert float(((S.double() - exact).abs() / exact).max()) < 1e-3


def test_rank_deficient_matrix():
    M = planted([5.0, 3.0, 1.0], 200, 150)
    S, _ = top_singular_values(M, 8)  # a sketch of 16 columns for a rank-3 matrix
    assert torch.isfinite(S).all()
    assert S[:3].tolist() == pytest.approx([5.0, 3.0, 1.0], rel=1e-5)
    assert float(S[3:].abs().max()) < 1e-4


def test_repeatable_and_clamped():
    M = planted([1.0 / (i + 1) for i in range(60)], 80, 60)
    a, _ = top_singular_values(M, 8, seed=3)
    b, _ = top_singular_values(M, 8, seed=3)
    assert torch.equal(a, b)
    full, _ = top_singular_values(M, 500, n_iter=1)  # k above the smaller side: every value
    assert full.shape == (60,)
    assert full.double().tolist() == pytest.approx(torch.linalg.svdvals(M.double()).tolist(), rel=1e-4, abs=1e-6)
    with pytest.raises(ValueError, match="float32"):
        top_singular_values(M.double(), 4)


def test_fast_bf16_flags():
    assert fast_bf16(torch.device("cuda")) is True
    assert isinstance(fast_bf16(torch.device("cpu")), bool)
    assert fast_bf16(torch.device("meta")) is False


def test_values_carry_no_bf16_rounding_of_the_matrix():
    """Every entry 1/3 rounds to bf16 the same way (+0.2%): Ritz values read from bf16(M) would be 0.2% high.
    The values come from float32 M on the bf16-found subspace, so they are exact here."""
    M = torch.full((300, 200), 1.0 / 3.0)
    exact = float(torch.linalg.svdvals(M.double())[0])
    bf16_value = float(torch.linalg.svdvals(M.bfloat16().double())[0])
    assert abs(bf16_value / exact - 1) > 1e-3  # the trap is real
    S, how = top_singular_values(M, 1, bf16=True)
    assert how == "randomized-bf16"
    assert float(S[0]) == pytest.approx(exact, rel=1e-6)


def test_wide_and_tall_agree_with_the_transpose():
    M = planted([1.0 / (i + 1) for i in range(120)], 400, 120)
    tall, _ = top_singular_values(M, 12, bf16=False)
    wide, _ = top_singular_values(M.T.contiguous(), 12, bf16=False)
    exact = torch.linalg.svdvals(M.double())[:12]
    for S in (tall, wide):
        assert float(((S.double() - exact).abs() / exact).max()) < 1e-4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    """The same code on the GPU (bf16 sketch there): the same test matrix (drawn on the CPU), the same values."""
    M = planted([1.0 / (i + 1) for i in range(500)], 600, 500)
    cpu, _ = top_singular_values(M, 16, bf16=False)
    gpu, how = top_singular_values(M.cuda(), 16)
    assert how == "randomized-bf16" and gpu.device.type == "cuda"
    exact = torch.linalg.svdvals(M.double())[:16]
    for S in (cpu, gpu.cpu()):
        assert float(((S.double() - exact).abs() / exact).max()) < 1e-3


@pytest.mark.parametrize("bf16", [False, True])
def test_rank_below_k_gives_zeros(bf16):
    """A delta touching 2 rows, and a constant matrix: the sketch has fewer directions than k."""
    M = torch.zeros(120, 90)
    g = torch.Generator().manual_seed(4)
    M[7], M[50] = torch.randn(90, generator=g), torch.randn(90, generator=g)
    exact = torch.linalg.svdvals(M.double())
    S, _ = top_singular_values(M, 8, bf16=bf16)
    assert S[:2].double().tolist() == pytest.approx(exact[:2].tolist(), rel=1e-5)
    assert float(S[2:].max()) < 1e-6 * float(S[0])  # zero up to float32 rounding
    S, _ = top_singular_values(torch.full((60, 40), 0.25), 2, bf16=bf16)
    assert float(S[0]) == pytest.approx(0.25 * (60 * 40) ** 0.5, rel=1e-6) and float(S[1]) < 1e-6 * float(S[0])
    S, _ = top_singular_values(torch.zeros(50, 30), 4, bf16=bf16)
    assert S.tolist() == [0.0] * 4
