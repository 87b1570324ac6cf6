"""Tests for lowrank_tools.linalg: fixtures that know the answer (planted rank-k deltas)."""

from __future__ import annotations

import math

import pytest
import torch

from lowrank_tools.linalg import svd as linalg
from lowrank_tools.errors import InvalidOption, NumericalError
from lowrank_tools.linalg.norms import frobenius_error
from lowrank_tools.linalg import (
    Method,
    RankRule,
    TruncatedSVD,
    balanced_factors,
    concat_factors,
    qr_core_svd,
    resolve_device,
    singular_values,
    truncated_svd,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _planted(m: int, n: int, k: int, seed: int = 0) -> torch.Tensor:
    """A rank-k matrix B @ C, (m, n)."""
    g = _gen(seed)
    return torch.randn(m, k, generator=g) @ torch.randn(k, n, generator=g)


def _orthonormal(m: int, k: int, g: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64)).Q.float()  # (m, k)


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float(torch.linalg.norm((x - ref).double()) / torch.linalg.norm(ref.double()))


SHAPES = [(64, 64), (32, 200), (300, 40), (1, 50), (50, 1)]


# --------------------------------------------------------------------------- truncated_svd


@pytest.mark.parametrize("method", ["exact", "randomized"])
@pytest.mark.parametrize("k", [1, 3, 8])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_planted_rank_recovered(shape, k, method):
    m, n = shape
    k = min(k, m, n)
    M = _planted(m, n, k)
    for r in (k, k + 2, min(m, n) + 5):
        svd = truncated_svd(M, r, method=method)
        kept = min(r, m, n)
        assert svd.U.shape == (m, kept) and svd.S.shape == (kept,) and svd.Vh.shape == (kept, n)
        B, A = balanced_factors(svd, kept, scale=2.0)
        assert _rel(2.0 * B @ A, M) < 1e-5
        assert frobenius_error(M, B, A, scale=2.0) < 1e-5 * float(torch.linalg.norm(M))


def test_rank_above_min_side_is_clamped():
    M = _planted(6, 40, 6)
    svd = truncated_svd(M, 100, method="randomized")
    assert svd.S.shape == (6,) and svd.method is Method.EXACT
    assert _rel(svd.U * svd.S @ svd.Vh, M) < 1e-5


def test_outputs_are_orthonormal_and_descending():
    svd = truncated_svd(torch.randn(300, 280, generator=_gen(1)), 20, method="randomized")
    eye = torch.eye(20)
    assert torch.allclose(svd.U.T @ svd.U, eye, atol=1e-5)
    assert torch.allclose(svd.Vh @ svd.Vh.T, eye, atol=1e-5)
    assert bool((svd.S[:-1] >= svd.S[1:]).all())


def test_randomized_within_one_percent_of_exact_on_slow_decay():
    g = _gen(0)
    U, V = _orthonormal(512, 384, g), _orthonormal(384, 384, g)
    s = 1.0 / torch.arange(1, 385, dtype=torch.float32)  # s_i = 1 / i
    M = (U * s) @ V.T  # (512, 384)
    exact = truncated_svd(M, 32, method="exact")
    rand = truncated_svd(M, 32, method="randomized")
    assert rand.method is Method.RANDOMIZED
    err_exact = frobenius_error(M, *balanced_factors(exact, 32))
    err_rand = frobenius_error(M, *balanced_factors(rand, 32))
    assert err_exact == pytest.approx(float(s[32:].double().pow(2).sum().sqrt()), rel=1e-4)
    assert err_rand <= 1.01 * err_exact


def test_same_seed_is_bitwise_deterministic():
    M = torch.randn(400, 300, generator=_gen(2))
    a = truncated_svd(M, 16, method="randomized", seed=7)
    b = truncated_svd(M, 16, method="randomized", seed=7)
    assert torch.equal(a.U, b.U) and torch.equal(a.S, b.S) and torch.equal(a.Vh, b.Vh)


@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_sign_convention(method):
    M = _planted(300, 260, 12, seed=3)
    svd = truncated_svd(M, 12, method=method)
    idx = svd.U.abs().argmax(dim=0)
    assert bool((svd.U[idx, torch.arange(12)] > 0).all())
    flipped = truncated_svd(-M, 12, method=method)  # same U up to the fixed sign, Vh flips
    assert torch.allclose(flipped.U, svd.U, atol=1e-4)
    assert torch.allclose(flipped.Vh, -svd.Vh, atol=1e-4)


@pytest.mark.parametrize(
    ("shape", "k", "expected"),
    [
        ((512, 384), 32, Method.RANDOMIZED),  # 42 <= 96
        ((512, 384), 86, Method.RANDOMIZED),  # 96 <= 96: the boundary is inclusive
        ((512, 384), 87, Method.EXACT),  # 97 > 96
        ((90, 90), 4, Method.EXACT),  # below the cost rule's floor of 96 (see svd._AUTO_MIN_SIDE)
        ((256, 1024), 10, Method.RANDOMIZED),  # wide, min side exactly 256
    ],
)
def test_auto_picks_method(shape, k, expected):
    assert truncated_svd(torch.randn(*shape, generator=_gen(4)), k).method is expected


def test_dtypes_float32_unless_float64():
    M = _planted(40, 30, 3)
    assert truncated_svd(M.to(torch.bfloat16), 3).S.dtype == torch.float32
    assert truncated_svd(M.double(), 3).U.dtype == torch.float64
    assert singular_values(M.half()).dtype == torch.float32
    assert torch.allclose(singular_values(M), torch.linalg.svdvals(M), rtol=1e-5, atol=1e-4)


def test_bad_arguments():
    with pytest.raises(InvalidOption, match="--method 'fast' is not one of auto, exact, randomized"):
        truncated_svd(torch.randn(4, 4), 2, method="fast")
    with pytest.raises(ValueError, match="2-D"):
        truncated_svd(torch.randn(4, 4, 4), 2)
    with pytest.raises(ValueError, match="k must be"):
        truncated_svd(torch.randn(4, 4), 0)


# --------------------------------------------------------------------------- fallback


def _fail_first(monkeypatch, n_failures: int) -> list[int]:
    real = torch.linalg.svd
    calls = [0]

    def flaky(*args, **kwargs):
        calls[0] += 1
        if calls[0] <= n_failures:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", flaky)
    return calls


@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_svd_failure_retried_in_float64(monkeypatch, method):
    M = _planted(300, 280, 5)
    _fail_first(monkeypatch, 1)
    warnings: list[str] = []
    svd = truncated_svd(M, 5, method=method, on_warning=warnings.append)
    assert len(warnings) == 1 and warnings[0].startswith("SVD did not converge")
    assert "failed to converge" in warnings[0] and warnings[0].endswith("retried in float64")
    assert svd.S.dtype == torch.float32
    assert _rel(svd.U * svd.S @ svd.Vh, M) < 1e-5


def test_svd_second_failure_goes_exact_on_cpu(monkeypatch):
    M = _planted(300, 280, 5)
    _fail_first(monkeypatch, 2)
    warnings: list[str] = []
    svd = truncated_svd(M, 5, method="randomized", on_warning=warnings.append)
    assert len(warnings) == 2 and "exact method on CPU" in warnings[1]
    assert svd.method is Method.EXACT and _rel(svd.U * svd.S @ svd.Vh, M) < 1e-5


def test_svd_final_failure_is_numerical_error(monkeypatch):
    _fail_first(monkeypatch, 10)
    M = torch.randn(20, 10)
    M[0, 0] = math.nan
    with pytest.raises(NumericalError, match="20 x 10 matrix failed.*NaN or Inf"):
        truncated_svd(M, 3, method="exact")


def test_out_of_memory_is_not_retried(monkeypatch):
    def oom(*args, **kwargs):
        raise linalg.OutOfMemory("out of memory")

    monkeypatch.setattr(torch.linalg, "svd", oom)
    with pytest.raises(linalg.OutOfMemory):
        truncated_svd(torch.randn(8, 8), 2, method="exact", on_warning=pytest.fail)


# --------------------------------------------------------------------------- rank rules

S321 = torch.tensor([3.0, 2.0, 1.0])  # energies 9, 4, 1; total 14


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        (RankRule(energy=9 / 14), 1),  # exactly reached at r = 1
        (RankRule(energy=13 / 14), 2),  # exactly reached at r = 2
        (RankRule(energy=13 / 14 + 1e-9), 3),
        (RankRule(energy=1.0), 3),
        (RankRule(energy=1e-9), 1),
        (RankRule(sv_ratio=1.5), 2),  # keep S_i >= 2: equality kept
        (RankRule(sv_ratio=1.4999), 1),
        (RankRule(sv_ratio=3.0), 3),  # 1 >= 3 / 3 kept
        (RankRule(sv_ratio=1.0), 1),
        (RankRule(threshold=2.0), 1),  # keep S_i > 2: equality not kept
        (RankRule(threshold=1.999), 2),
        (RankRule(threshold=0.0), 3),
        (RankRule(threshold=3.0), 0),  # excludes everything
        (RankRule(rank=2), 2),
        (RankRule(rank=7), 3),  # capped by len(S)
        (RankRule(rank=2, energy=1.0), 2),  # the rank caps the dynamic rule
        (RankRule(rank=2, threshold=0.0), 2),
        (RankRule(rank=5, sv_ratio=10.0), 3),
    ],
)
def test_rule_boundaries(rule, expected):
    assert rule.choose(S321) == expected
    assert rule.choose([3.0, 2.0, 1.0]) == expected  # plain sequences too
    assert rule.choose(S321.double()) == expected


def test_energy_exact_on_uniform_spectrum():
    S = torch.ones(4)
    assert [RankRule(energy=e).choose(S) for e in (0.25, 0.5, 0.75, 1.0)] == [1, 2, 3, 4]


def test_threshold_equal_to_a_float32_value_is_not_kept():
    assert RankRule(threshold=0.1).choose(torch.tensor([0.5, 0.1, 0.05])) == 1
    assert RankRule(sv_ratio=5.0).choose(torch.tensor([0.5, 0.1, 0.05])) == 2


def test_truncated_spectrum_uses_total_energy():
    S = torch.tensor([3.0, 2.0, 1.0])  # top 3 of [3, 2, 1, 1, 1]: total 16
    assert RankRule(energy=0.85).choose(S) == 2  # 13/14 of the truncated sum
    assert RankRule(energy=0.85).choose(S, total_energy=16.0) == 3  # 14/16 >= 0.85 > 13/16
    assert RankRule(energy=13 / 16).choose(S, total_energy=16.0) == 2
    assert RankRule(energy=0.95).choose(S, total_energy=16.0) == 3  # unreachable: all computed
    assert RankRule(energy=0.95).choose(S, total_energy=16.0, max_rank=2) == 2
    assert RankRule(energy=0.5).choose(S, total_energy=1.0) == 1  # smaller than sum(S^2): clamped


@pytest.mark.parametrize("rule", [RankRule(rank=3), RankRule(energy=0.5), RankRule(sv_ratio=2.0),
                                  RankRule(threshold=0.0)])
def test_all_zero_or_empty_spectrum_gives_zero(rule):
    assert rule.choose(torch.zeros(5)) == 0
    assert rule.choose(torch.zeros(0)) == 0
    assert rule.choose(torch.zeros(5), total_energy=0.0) == 0


def test_unsorted_spectrum_and_max_rank():
    assert RankRule(energy=13 / 14).choose(torch.tensor([1.0, 3.0, 2.0])) == 2
    assert RankRule(rank=3).choose(S321, max_rank=1) == 1
    assert RankRule(rank=3).choose(S321, max_rank=0) == 0


def test_rule_properties_and_needed_k():
    assert not RankRule(rank=4).dynamic and RankRule(rank=4).cap == 4
    assert RankRule(energy=0.9).dynamic and RankRule(energy=0.9).cap is None
    assert RankRule(rank=8).needed_k((64, 4)) == 4
    assert RankRule(rank=8).needed_k((64, 100)) == 8
    assert RankRule(energy=0.9).needed_k((64, 100)) == 64
    assert RankRule(threshold=0.1).needed_k((64, 27)) == 27  # conv: the (out, in*kh*kw) view


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rank": 0}, r"--rank 0 is outside \[1, inf\)"),
        ({"rank": -1}, r"--rank -1 is outside"),
        ({"rank": 2.5}, r"--rank 2.5 is outside"),
        ({"energy": 0.0}, r"--energy 0.0 is outside \(0, 1\]"),
        ({"energy": 1.5}, r"--energy 1.5 is outside \(0, 1\]"),
        ({"energy": math.nan}, r"--energy nan is outside"),
        ({"sv_ratio": 0.5}, r"--sv-ratio 0.5 is outside \[1, inf\)"),
        ({"threshold": -1.0}, r"--threshold -1.0 is outside \[0, inf\)"),
        ({"energy": 0.9, "threshold": 0.1}, r"--energy 0.9 and --threshold 0.1 exclude each other"),
        ({"energy": 0.9, "sv_ratio": 2.0, "rank": 4}, r"exclude each other"),
        ({}, r"no rank rule: pass --rank, --energy, --sv-ratio or --threshold"),
    ],
)
def test_invalid_rules(kwargs, match):
    with pytest.raises(InvalidOption, match=match):
        RankRule(**kwargs)


# --------------------------------------------------------------------------- re-factorisation


@pytest.mark.parametrize(("m", "n", "r"), [(40, 30, 5), (6, 50, 10), (50, 6, 10), (20, 20, 30), (1, 9, 3)])
def test_qr_core_svd_matches_dense(m, n, r):
    g = _gen(5)
    B, A = torch.randn(m, r, generator=g), torch.randn(r, n, generator=g)
    svd = qr_core_svd(B, A, scale=0.5)
    dense = 0.5 * B.double() @ A.double()
    p = min(m, n, r)
    S_ref = torch.linalg.svdvals(dense)[:p]
    assert svd.S.shape == (p,) and svd.U.shape == (m, p) and svd.Vh.shape == (p, n)
    assert _rel(svd.S.double(), S_ref) < 1e-5
    assert _rel((svd.U * svd.S @ svd.Vh).double(), dense) < 1e-5
    idx = svd.U.abs().argmax(dim=0)
    assert bool((svd.U[idx, torch.arange(p)] > 0).all())


def test_qr_core_svd_rank_deficient_and_float64():
    g = _gen(6)
    B = torch.randn(30, 3, generator=g, dtype=torch.float64)
    B = torch.cat([B, B[:, :2]], dim=1)  # (30, 5) of rank 3
    A = torch.randn(5, 20, generator=g, dtype=torch.float64)
    svd = qr_core_svd(B, A)
    assert svd.S.dtype == torch.float64 and float(svd.S[3:].abs().max()) < 1e-10 * float(svd.S[0])
    assert _rel(svd.U * svd.S @ svd.Vh, B @ A) < 1e-12
    with pytest.raises(ValueError, match="do not chain"):
        qr_core_svd(B, A.T)


def test_balanced_factors_keep_the_product():
    M = _planted(50, 30, 6)
    svd = truncated_svd(M, 10)
    B, A = balanced_factors(svd, 6, scale=0.25)  # (50, 6), (6, 30)
    assert B.shape == (50, 6) and A.shape == (6, 30)
    assert _rel(0.25 * B @ A, M) < 1e-5
    assert torch.allclose(B.norm(dim=0), A.norm(dim=1), rtol=1e-5)  # balanced: equal component norms
    B0, A0 = balanced_factors(svd, 0)
    assert B0.shape == (50, 0) and A0.shape == (0, 30)
    with pytest.raises(ValueError, match="r must be in"):
        balanced_factors(svd, 11)


def test_concat_factors_is_exact():
    g = _gen(7)
    parts = [(torch.randn(12, r, generator=g, dtype=torch.float64), torch.randn(r, 9, generator=g,
                                                                               dtype=torch.float64), c)
             for r, c in ((2, 0.5), (3, -1.25), (1, 2.0))]
    B, A = concat_factors(parts)
    assert B.shape == (12, 6) and A.shape == (6, 9)
    expected = sum(c * Bi @ Ai for Bi, Ai, c in parts)
    assert torch.allclose(B @ A, expected, rtol=1e-13, atol=1e-13)
    with pytest.raises(ValueError, match="part 1"):
        concat_factors([parts[0], (torch.randn(11, 2), torch.randn(2, 9), 1.0)])
    with pytest.raises(ValueError, match="at least one"):
        concat_factors([])


def test_truncated_svd_is_a_dataclass_with_method():
    svd = truncated_svd(torch.eye(3), 2, method=Method.EXACT)
    assert isinstance(svd, TruncatedSVD) and svd.method is Method.EXACT
    assert torch.allclose(svd.S, torch.ones(2))


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in {"cpu", "cuda"}
    with pytest.raises(InvalidOption, match="--device 'potato' is not a device"):
        resolve_device("potato")
    if not torch.cuda.is_available():
        with pytest.raises(InvalidOption, match="CUDA is not available"):
            resolve_device("cuda")
