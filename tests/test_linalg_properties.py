"""Property tests for lowrank_tools.linalg (hypothesis)."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowrank_tools.linalg import (
    RankRule,
    balanced_factors,
    concat_factors,
    qr_core_svd,
    truncated_svd,
)
from lowrank_tools.linalg.norms import frobenius_error

PROPS = settings(max_examples=25, deadline=None)
sides = st.integers(min_value=1, max_value=24)
seeds = st.integers(min_value=0, max_value=2**16)
scales = st.floats(min_value=0.05, max_value=8.0)
spectra = st.lists(st.floats(min_value=0.0, max_value=100.0), min_size=1, max_size=12)


def _randn(*shape: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@PROPS
@given(m=sides, n=sides, seed=seeds, data=st.data())
def test_truncation_error_is_the_tail_energy(m, n, seed, data):
    M = _randn(m, n, seed=seed, dtype=torch.float32)
    r = data.draw(st.integers(min_value=1, max_value=min(m, n)))
    svd = truncated_svd(M, r, method="exact")
    S_all = torch.linalg.svdvals(M.double())
    tail = math.sqrt(float((S_all[r:] ** 2).sum()))
    err = frobenius_error(M, *balanced_factors(svd, r))
    assert math.isclose(err, tail, rel_tol=1e-4, abs_tol=1e-5 * float(S_all.norm()))


@PROPS
@given(m=sides, n=sides, r=st.integers(min_value=1, max_value=30), seed=seeds, scale=scales)
def test_qr_core_svd_equals_dense_truncation(m, n, r, seed, scale):
    B, A = _randn(m, r, seed=seed), _randn(r, n, seed=seed + 1)
    svd = qr_core_svd(B, A, scale=scale)
    dense = scale * B @ A  # (m, n)
    ref = truncated_svd(dense, min(m, n, r), method="exact")
    tol = 1e-10 * float(ref.S[0])
    assert torch.allclose(svd.S, ref.S, atol=tol, rtol=1e-10)
    assert torch.allclose(svd.U * svd.S @ svd.Vh, dense, atol=tol)
    S = ref.S.tolist() + [0.0]
    for k in range(1, len(ref.S) + 1):  # every truncation that is unique (a gap after S_k) agrees
        if S[k - 1] - S[k] > 1e-6 * S[0]:
            ours = svd.U[:, :k] * svd.S[:k] @ svd.Vh[:k]
            assert torch.allclose(ours, ref.U[:, :k] * ref.S[:k] @ ref.Vh[:k], atol=1e-6 * S[0])


@PROPS
@given(m=sides, n=sides, ranks=st.lists(st.integers(0, 6), min_size=1, max_size=4), seed=seeds,
       coefs=st.lists(st.floats(min_value=-4.0, max_value=4.0), min_size=4, max_size=4))
def test_concatenation_equals_weighted_sum(m, n, ranks, seed, coefs):
    parts = [(_randn(m, r, seed=seed + 2 * i), _randn(r, n, seed=seed + 2 * i + 1), c)
             for i, (r, c) in enumerate(zip(ranks, coefs))]
    B, A = concat_factors(parts)
    assert B.shape == (m, sum(ranks)) and A.shape == (sum(ranks), n)
    expected = sum((c * Bi @ Ai for Bi, Ai, c in parts), torch.zeros(m, n, dtype=torch.float64))
    assert torch.allclose(B @ A, expected, rtol=1e-12, atol=1e-12)


@PROPS
@given(S=spectra, a=st.floats(min_value=1e-6, max_value=1.0), b=st.floats(min_value=1e-6, max_value=1.0))
def test_choose_is_monotone_in_energy(S, a, b):
    lo, hi = sorted((a, b))
    assert RankRule(energy=lo).choose(S) <= RankRule(energy=hi).choose(S)


@PROPS
@given(S=spectra, a=st.floats(min_value=1.0, max_value=1e6), b=st.floats(min_value=1.0, max_value=1e6))
def test_choose_is_monotone_in_sv_ratio(S, a, b):
    lo, hi = sorted((a, b))
    assert RankRule(sv_ratio=lo).choose(S) <= RankRule(sv_ratio=hi).choose(S)


@PROPS
@given(S=spectra, a=st.floats(min_value=0.0, max_value=120.0), b=st.floats(min_value=0.0, max_value=120.0),
       cap=st.none() | st.integers(min_value=1, max_value=12))
def test_choose_is_monotone_in_threshold(S, a, b, cap):
    lo, hi = sorted((a, b))
    r_lo, r_hi = RankRule(rank=cap, threshold=lo).choose(S), RankRule(rank=cap, threshold=hi).choose(S)
    assert r_lo >= r_hi
    assert r_lo == min(sum(1 for s in S if s > lo), cap or len(S))  # exactly the values above it


@PROPS
@given(m=sides, n=sides, seed=seeds, scale=scales, data=st.data())
def test_balanced_split_keeps_the_product(m, n, seed, scale, data):
    M = _randn(m, n, seed=seed, dtype=torch.float32)
    k = min(m, n)
    r = data.draw(st.integers(min_value=0, max_value=k))
    svd = truncated_svd(M, k)
    B, A = balanced_factors(svd, r, scale=scale)  # (m, r), (r, n)
    expected = svd.U[:, :r] * svd.S[:r] @ svd.Vh[:r]
    assert torch.allclose(scale * B @ A, expected, atol=1e-5 * float(svd.S[0]))


# ------------------------------------------------------------------ the operations built on the linear algebra
# (extensions: resize and merge as users call them, every scale convention, and the rank cap)

alphas = st.floats(min_value=0.1, max_value=32.0)


def _module(m: int, n: int, R: int, seed: int, alpha: float, rslora: bool):
    from lowrank_tools import LoraModule

    B = _randn(m, R, seed=seed, dtype=torch.float32)  # (m, R)
    A = _randn(R, n, seed=seed + 1, dtype=torch.float32)  # (R, n)
    return LoraModule(B=B, A=A, alpha=alpha, rslora=rslora)


@PROPS
@given(m=sides, n=sides, R=st.integers(min_value=1, max_value=12), seed=seeds, alpha=alphas, rslora=st.booleans(),
       data=st.data())
def test_resize_through_the_qr_core_equals_dense_truncation(m, n, R, seed, alpha, rslora, data):
    """resize(rank r) of scale B A gives the Eckart-Young truncation of the dense product, its reported error is the
    tail of the exact spectrum, and every scale convention (alpha / r, alpha / sqrt(r)) is honoured."""
    from lowrank_tools import Adapter, resize

    mod = _module(m, n, R, seed, alpha, rslora)
    dense = mod.delta_matrix().double()  # (m, n)
    S = torch.linalg.svdvals(dense)
    r = data.draw(st.integers(min_value=1, max_value=max(1, min(m, n, R))))
    done = resize(Adapter(modules={"x": mod}), rule=RankRule(rank=r))
    if float(S[0]) <= 1e-12:
        return
    new = done.adapter.modules["x"]
    tail = math.sqrt(float((S[r:] ** 2).sum()))
    norm = float(S.norm())
    assert math.isclose(done.report.layers[0].rel_error, tail / norm, rel_tol=1e-3, abs_tol=1e-5)
    err = float((new.delta_matrix().double() - dense).norm())
    assert math.isclose(err, tail, rel_tol=1e-3, abs_tol=1e-5 * norm)
    if r < len(S) and float(S[r - 1] - S[r]) > 1e-3 * float(S[0]):  # unique truncation: the same matrix
        U, Sd, Vh = torch.linalg.svd(dense, full_matrices=False)
        best = U[:, :r] * Sd[:r] @ Vh[:r]
        assert torch.allclose(new.delta_matrix().double(), best, atol=1e-4 * float(S[0]))


@PROPS
@given(m=sides, n=sides, ranks=st.lists(st.integers(1, 5), min_size=1, max_size=3), seed=seeds,
       weights=st.lists(st.floats(min_value=-3.0, max_value=3.0), min_size=3, max_size=3),
       alphas_=st.lists(alphas, min_size=3, max_size=3), rslora=st.lists(st.booleans(), min_size=3, max_size=3))
def test_merge_concatenation_equals_weighted_sum(m, n, ranks, seed, weights, alphas_, rslora):
    """merge without a rank option: one module whose product is sum_i w_i scale_i B_i A_i, rank sum r_i."""
    from lowrank_tools import Adapter, merge

    mods = [_module(m, n, R, seed + 3 * i, a, rs) for i, (R, a, rs) in enumerate(zip(ranks, alphas_, rslora))]
    done = merge([(Adapter(modules={"x": mod}), w) for mod, w in zip(mods, weights)])
    out = done.adapter.modules["x"]
    expected = sum(w * mod.delta_matrix().double() for mod, w in zip(mods, weights))
    assert out.rank == sum(ranks)
    scale_norm = sum(abs(w) * float(mod.delta_matrix().norm()) for mod, w in zip(mods, weights)) + 1e-12
    assert float((out.delta_matrix().double() - expected).norm()) <= 1e-5 * scale_norm


@PROPS
@given(S=spectra, a=st.integers(min_value=1, max_value=12), b=st.integers(min_value=1, max_value=12),
       rule=st.sampled_from(["rank", "energy", "sv_ratio", "threshold"]))
def test_choose_is_monotone_in_the_rank_cap(S, a, b, rule):
    """A larger --rank never keeps fewer values, whichever dynamic rule it caps; and never more than the cap."""
    lo, hi = sorted((a, b))
    extra = {"rank": {}, "energy": {"energy": 0.9}, "sv_ratio": {"sv_ratio": 10.0}, "threshold": {"threshold": 1.0}}
    r_lo = RankRule(rank=lo, **extra[rule]).choose(S)
    r_hi = RankRule(rank=hi, **extra[rule]).choose(S)
    assert r_lo <= r_hi and r_lo <= lo and r_hi <= hi
