"""Tests for lowrank_tools.linalg.norms: Frobenius norms and errors against float64 dense references."""

from __future__ import annotations

import math

import pytest
import torch

from lowrank_tools.linalg import norms
from lowrank_tools.errors import NonFiniteWeight
from lowrank_tools.linalg.norms import check_finite, frobenius_error, frobenius_norm, lowrank_frobenius_diff, lowrank_frobenius_norm


def test_frobenius_error_matches_dense_in_chunks(monkeypatch):
    g = torch.Generator().manual_seed(8)
    M, B, A = torch.randn(30, 70, generator=g), torch.randn(30, 4, generator=g), torch.randn(4, 70, generator=g)
    dense = float(torch.linalg.norm((M - 0.3 * B @ A).double()))
    assert frobenius_error(M, B, A, scale=0.3) == pytest.approx(dense, rel=1e-6)
    monkeypatch.setattr(norms, "_CHUNK_ELEMENTS", 90)  # 3 columns per chunk
    assert frobenius_error(M, B, A, scale=0.3) == pytest.approx(dense, rel=1e-6)
    assert frobenius_error(M, B[:, :0], A[:0]) == pytest.approx(float(torch.linalg.norm(M.double())), rel=1e-6)


def test_lowrank_norms_match_dense():
    g = torch.Generator().manual_seed(9)
    B1, A1 = torch.randn(40, 5, generator=g), torch.randn(5, 25, generator=g)
    B2, A2 = torch.randn(40, 3, generator=g), torch.randn(3, 25, generator=g)
    P1, P2 = B1.double() @ A1.double(), B2.double() @ A2.double()
    assert lowrank_frobenius_norm(B1, A1, 0.5) == pytest.approx(float(torch.linalg.norm(0.5 * P1)), rel=1e-6)
    assert lowrank_frobenius_norm(B1, A1, -2.0) == pytest.approx(float(torch.linalg.norm(2 * P1)), rel=1e-6)
    diff = lowrank_frobenius_diff(B1, A1, 0.5, B2, A2, 1.5)
    assert diff == pytest.approx(float(torch.linalg.norm(0.5 * P1 - 1.5 * P2)), rel=1e-6)
    assert lowrank_frobenius_diff(B1, A1, 1.0, B1, A1, 1.0) == pytest.approx(0.0, abs=1e-4)


def test_lowrank_diff_resolves_small_differences():
    g = torch.Generator().manual_seed(10)
    B, A = torch.randn(64, 8, generator=g, dtype=torch.float64), torch.randn(8, 48, generator=g, dtype=torch.float64)
    B2 = B + 1e-7 * torch.randn(64, 8, generator=g, dtype=torch.float64)
    exact = float(torch.linalg.norm(B @ A - B2 @ A))
    assert lowrank_frobenius_diff(B, A, 1.0, B2, A, 1.0) == pytest.approx(exact, rel=1e-5)


@pytest.mark.parametrize("scale", [1.0, 1e-40, 1e-20, 1e20, 3e37])  # normal, subnormal, underflowing, overflowing
def test_frobenius_norm_over_the_float32_range(scale):
    g = torch.Generator().manual_seed(3)
    M = (torch.randn(300, 7, 5, generator=g).double() * scale).float()  # a conv-shaped weight
    exact = float(torch.linalg.vector_norm(M.double()))
    assert exact > 0 and frobenius_norm(M) == pytest.approx(exact, rel=1e-6)
    assert frobenius_norm(torch.zeros(40, 30)) == 0.0 and frobenius_norm(torch.zeros(0, 3)) == 0.0
    M[3, 2, 1] = float("nan")
    assert math.isnan(frobenius_norm(M))


def test_frobenius_norm_of_bf16_and_scalars():
    M = torch.randn(64, 33, generator=torch.Generator().manual_seed(2)).bfloat16()
    assert frobenius_norm(M) == pytest.approx(float(torch.linalg.vector_norm(M.double())), rel=1e-6)
    assert frobenius_norm(torch.tensor(-3.0)) == 3.0 and frobenius_norm(torch.tensor([3.0, 4.0])) == 5.0


def test_frobenius_norm_of_a_transposed_view_is_that_of_its_stored_layout():
    """An embedding's (dim, vocab) delta is the transpose of the stored (vocab, dim): measured along the stored rows,
    the same value as the contiguous copy's, to the last bit of the float32 row sums' order."""
    W = torch.randn(3000, 48, generator=torch.Generator().manual_seed(4))
    exact = float(torch.linalg.vector_norm(W.double()))
    assert frobenius_norm(W.t()) == frobenius_norm(W) == pytest.approx(exact, rel=1e-7)
    assert frobenius_norm(W.t().contiguous()) == pytest.approx(exact, rel=1e-7)
    W[5, 7] = float("inf")
    assert math.isinf(frobenius_norm(W.t()))


def test_check_finite_names_and_counts():
    check_finite(torch.ones(3), "fine")
    with pytest.raises(NonFiniteWeight, match=r"^base tensor w holds 2 NaN/Inf values: repair or re-export"):
        check_finite(torch.tensor([1.0, float("nan"), float("-inf")]), "base tensor w")
