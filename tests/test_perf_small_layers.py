"""Issue 16, small layers: the default method's cost rule at its boundaries, the folded error measurement against the
direct residual, CPU batching of same-shape layers against one at a time."""

from __future__ import annotations

import pytest
import torch

from lowrank_tools.extract import extract
from lowrank_tools.linalg import RankRule
from lowrank_tools.linalg import norms
from lowrank_tools.linalg.norms import FOLDED_MIN_REL, frobenius_error, frobenius_norm
from lowrank_tools.linalg.svd import Method, balanced_factors, resolve_method, truncated_svd


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize(("side", "k", "expected"), [
    (96, 14, Method.RANDOMIZED),  # l = 24 = 96 // 4: the boundary is inclusive
    (96, 15, Method.EXACT),  # l = 25 > 24
    (95, 1, Method.EXACT),  # below the floor of 96 whatever k
    (192, 8, Method.RANDOMIZED),  # a 135M model's k/v projection at rank 8 (exact before: the floor was 256)
    (576, 134, Method.RANDOMIZED), (576, 135, Method.EXACT),  # 144 = 576 // 4
])
def test_auto_cost_rule_boundaries(side, k, expected):
    assert resolve_method(Method.AUTO, side, k, 10) is expected
    M = torch.randn(side, side + 7, generator=_gen(side))
    assert truncated_svd(M, k).method is expected


def test_user_choices_keep_their_meaning():
    """The rule is the default's only: exact stays exact on a large matrix, randomized stays randomized on a small one
    (unless the sketch would be the whole matrix, as before)."""
    assert resolve_method(Method.EXACT, 4096, 8, 10) is Method.EXACT
    assert resolve_method(Method.RANDOMIZED, 64, 8, 10) is Method.RANDOMIZED
    assert resolve_method(Method.RANDOMIZED, 64, 54, 10) is Method.EXACT


def _decaying(m: int, n: int, seed: int, power: float = 1.0) -> torch.Tensor:
    k = min(m, n)
    s = 1.0 / torch.arange(1, k + 1, dtype=torch.float32) ** power
    g = _gen(seed)
    return (torch.randn(m, k, generator=g) * s) @ torch.randn(k, n, generator=g) / (m * n) ** 0.25


@pytest.mark.parametrize("shape", [(576, 576), (1536, 576), (192, 576), (300, 200)])
@pytest.mark.parametrize("kind", ["random", "decaying"])
def test_folded_error_matches_the_residual(shape, kind):
    M = torch.randn(*shape, generator=_gen(1)) if kind == "random" else _decaying(*shape, seed=2, power=0.5)
    svd = truncated_svd(M, 8)
    B, A = (t.bfloat16().float() for t in balanced_factors(svd, 8, scale=0.5))  # as written: cast, not optimal
    norm = frobenius_norm(M)
    direct = frobenius_error(M, B, A, scale=0.5)
    folded = norms._folded_error(M, B, A, 0.5, norm)
    assert direct >= FOLDED_MIN_REL * norm  # these take the folded path
    assert folded == pytest.approx(direct, rel=1e-5)
    assert frobenius_error(M, B, A, scale=0.5, norm=norm) == folded


def test_small_errors_are_measured_directly(monkeypatch):
    """Below FOLDED_MIN_REL (a planted rank recovered: error ~1e-7 of the norm) the residual is formed: the folded
    formula's cancellation would leave nothing of it."""
    g = _gen(3)
    M = torch.randn(200, 6, generator=g) @ torch.randn(6, 150, generator=g)
    svd = truncated_svd(M, 6)
    B, A = balanced_factors(svd, 6)
    direct = frobenius_error(M, B, A)
    calls = []
    monkeypatch.setattr(norms, "_folded_error", lambda *a: calls.append(a) or 0.0)
    assert frobenius_error(M, B, A, norm=frobenius_norm(M)) == direct < 1e-5 * frobenius_norm(M)
    assert len(calls) == 1  # tried, refused (0.0 < the floor), measured directly


def test_extract_rel_error_is_that_of_the_factors_as_written():
    g = _gen(4)
    shapes = {"m.q.weight": (576, 576), "m.k.weight": (192, 576), "m.up.weight": (1536, 576)}
    base = {n: torch.randn(*s, generator=g).bfloat16() for n, s in shapes.items()}
    tuned = {n: (base[n].float() + 0.01 * _decaying(*s, seed=i, power=0.5)).bfloat16()
             for i, (n, s) in enumerate(shapes.items())}
    result = extract(base, tuned, rule=RankRule(rank=8))
    for rec in result.report.layers:
        d = tuned[f"{rec.name}.weight"].double() - base[f"{rec.name}.weight"].double()
        true = float((result.adapter.modules[rec.name].delta().double() - d).norm() / d.norm())
        assert rec.rel_error == pytest.approx(true, rel=1e-5)
        assert rec.extra["method"] == "randomized"  # 192 x 576 included


@pytest.mark.parametrize("torch_ops", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_read_thread_delta_is_torchs_bit_for_bit(dtype, torch_ops, monkeypatch):
    """dW subtracted a chunk at a time, by numpy (the read-ahead thread) or by torch (a single-threaded worker),
    equals torch's float32 subtraction bit for bit, specials included (Inf, -0.0, subnormals of each dtype; NaN
    where it is NaN)."""
    from lowrank_tools.extract import reading

    monkeypatch.setattr(reading, "NUMPY_CHUNK", 7)  # many chunks and a ragged last one
    monkeypatch.setattr(reading, "TORCH_CHUNK", 7)
    g = _gen(5)
    W0 = torch.randn(13, 11, generator=g).to(dtype)
    W1 = (W0.float() + 1e-3 * torch.randn(13, 11, generator=g)).to(dtype)
    tiny = torch.finfo(dtype).smallest_normal / 4
    W1.view(-1)[:5] = torch.tensor([float("inf"), float("nan"), -0.0, tiny, -tiny]).to(dtype)
    W0.view(-1)[5:8] = torch.tensor([float("-inf"), tiny, 0.0]).to(dtype)
    expected = W1.float() - W0.float()
    got = reading.float32_delta(W1.clone(), W0.clone(), torch_ops=torch_ops)
    assert got.dtype == torch.float32 and got.shape == W1.shape
    nan = expected.isnan()  # a NaN's payload may differ (scalar and vectorised fp16 conversions); any NaN fails later
    assert torch.equal(got.isnan(), nan) and nan.any()
    assert torch.equal(got[~nan].view(torch.int32), expected[~nan].view(torch.int32))


def test_bf16_extract_unchanged_by_the_read_thread_subtraction(monkeypatch):
    """The same adapter, bit for bit, with the subtraction in the read-ahead thread (numpy) or in the consumer."""
    from lowrank_tools.extract import reading

    g = _gen(6)
    base = {f"m.{i}.weight": torch.randn(200, 120, generator=g).bfloat16() for i in range(3)}
    tuned = {n: (w.float() + 0.02 * torch.randn(200, 120, generator=g)).bfloat16() for n, w in base.items()}
    ours = extract(base, tuned, rule=RankRule(rank=8))
    monkeypatch.setattr(reading, "DELTA_DTYPES", ())
    theirs = extract(base, tuned, rule=RankRule(rank=8))
    for name, m in ours.adapter.modules.items():
        assert torch.equal(m.B, theirs.adapter.modules[name].B) and torch.equal(m.A, theirs.adapter.modules[name].A)
