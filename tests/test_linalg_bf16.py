"""The mixed-precision range finder of truncated_svd (bf16 products where the CPU has AMX / AVX512-BF16): used
only when its estimated error excess is negligible, else the float32 run, bit for bit."""

from __future__ import annotations

from unittest import mock

import pytest
import torch

from conftest import planted_delta
from lowrank_tools.linalg import svd as linalg
from lowrank_tools.linalg.svd import _bf16_close, randomized_svd, truncated_svd


def _decaying(m: int, n: int, seed: int = 0) -> torch.Tensor:
    """(m, n) with singular values 1/i and random singular vectors: an optimal rank-8 error of ~25%."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U = torch.linalg.qr(torch.randn(m, k, generator=g)).Q
    V = torch.linalg.qr(torch.randn(n, k, generator=g)).Q
    return (U / torch.arange(1, k + 1, dtype=torch.float32)) @ V.T


def _error(M, svd) -> float:
    return float((M - (svd.U * svd.S) @ svd.Vh).norm() / M.norm())


@pytest.fixture
def bf16_cpu(monkeypatch):
    """Pretend the CPU has fast bf16 products (the path is then taken whatever this machine has)."""
    monkeypatch.setattr(linalg, "_bf16_fast", lambda device_type: device_type == "cpu")


def test_planted_low_rank_goes_to_float32_bit_for_bit(bf16_cpu):
    M = planted_delta(300, 280, 5, seed=3)  # exactly rank 5: tail ~ 0, bf16 rounding would be all the error
    _, S, _ = randomized_svd(M, 8, 10, 4, 0, bf16=True)
    assert not _bf16_close(M, S)
    got = truncated_svd(M, 8, method="randomized")
    with mock.patch.object(linalg, "_bf16_fast", lambda device_type: False):
        ref = truncated_svd(M, 8, method="randomized")
    assert torch.equal(got.U, ref.U) and torch.equal(got.S, ref.S) and torch.equal(got.Vh, ref.Vh)
    assert _error(M, got) < 1e-5


@pytest.mark.parametrize("shape", [(320, 256), (256, 320)])
def test_decaying_spectrum_uses_bf16_within_a_tenth_of_a_percent(bf16_cpu, shape):
    M = _decaying(*shape)
    S_opt = torch.linalg.svdvals(M).double()
    optimal = float(S_opt[8:].square().sum().sqrt() / S_opt.square().sum().sqrt())
    _, S, _ = randomized_svd(M, 8, 10, 4, 0, bf16=True)
    assert _bf16_close(M, S)
    with mock.patch.object(linalg, "randomized_svd", wraps=linalg.randomized_svd) as spy:
        got = truncated_svd(M, 8, method="randomized")
    assert [c.kwargs.get("bf16", False) for c in spy.call_args_list] == [True]  # one run, in bf16
    with mock.patch.object(linalg, "_bf16_fast", lambda device_type: False):
        ref = truncated_svd(M, 8, method="randomized")
    assert _error(M, got) <= _error(M, ref) * 1.001
    assert _error(M, got) <= optimal * 1.01
    assert torch.allclose(got.S, ref.S, rtol=2e-3)


def test_float64_and_other_devices_never_use_bf16(bf16_cpu):
    M = _decaying(300, 260).double()
    with mock.patch.object(linalg, "randomized_svd", wraps=linalg.randomized_svd) as spy:
        truncated_svd(M, 8, method="randomized")
    assert [c.kwargs.get("bf16", False) for c in spy.call_args_list] == [False]


def test_bf16_fast_is_false_off_the_cpu():
    assert linalg._bf16_fast("cuda") is False
    assert linalg._bf16_fast("meta") is False
