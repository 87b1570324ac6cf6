"""Exact algebra of LoHa / LoKr / Tucker deltas (lowrank_tools.linalg.structured) against dense products."""

import pytest
import torch

from lowrank_tools.linalg.structured import (face_splitting, khatri_rao, kron_svd, loha_factors, loha_svd, lokr_w2_tucker,
                                      lowrank_svd, numerical_rank, tucker_locon_factors, tucker_loha_pair)

# (out, in_flat, r1, r2): square, wide, tall, conv-flattened, ranks above a side
SHAPES = [(12, 12, 3, 4), (8, 30, 2, 5), (40, 9, 4, 4), (16, 6 * 9, 3, 3), (5, 7, 4, 4), (6, 50, 8, 8)]


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=_g(seed), dtype=torch.float64)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("out,inp,r1,r2", SHAPES)
def test_loha_khatri_rao_identity(out, inp, r1, r2):
    B1, A1, B2, A2 = _rand(out, r1, seed=1), _rand(r1, inp, seed=2), _rand(out, r2, seed=3), _rand(r2, inp, seed=4)
    B, A = loha_factors(B1, A1, B2, A2)
    assert B.shape == (out, r1 * r2) and A.shape == (r1 * r2, inp)
    assert _rel(B @ A, (B1 @ A1) * (B2 @ A2)) < 1e-13


def test_face_splitting_and_khatri_rao_index_layout():
    B1, B2 = _rand(3, 2, seed=5), _rand(3, 4, seed=6)
    assert torch.equal(face_splitting(B1, B2)[:, 1 * 4 + 3], B1[:, 1] * B2[:, 3])
    A1, A2 = _rand(2, 5, seed=7), _rand(3, 5, seed=8)
    assert torch.equal(khatri_rao(A1, A2)[1 * 3 + 2], A1[1] * A2[2])


@pytest.mark.parametrize("out,inp,r1,r2", SHAPES)
def test_loha_svd_is_the_dense_svd(out, inp, r1, r2):
    B1, A1, B2, A2 = _rand(out, r1, seed=1), _rand(r1, inp, seed=2), _rand(out, r2, seed=3), _rand(r2, inp, seed=4)
    M = (B1 @ A1) * (B2 @ A2)
    dense_S = torch.linalg.svdvals(M)
    svd = loha_svd(B1, A1, B2, A2)
    assert svd.rank == min(out, inp, r1 * r2) == numerical_rank(dense_S, M.shape)  # exact rank
    assert _rel(svd.dense(), M) < 1e-12
    assert torch.allclose(svd.S, dense_S[: svd.rank], rtol=1e-10)
    for k in (1, 3):  # optimal truncation = dense truncation (Eckart-Young)
        B, A = svd.factors(k)
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
        assert _rel(B @ A, (U[:, :k] * S[:k]) @ Vh[:k]) < 1e-5


def test_loha_exact_rank_below_r1_r2():
    """A zero component in the second pair: R = r1 r2 = 3 but the exact rank is 2."""
    b, a = _rand(10, 1, seed=1), _rand(1, 12, seed=2)
    B2, A2 = _rand(10, 3, seed=3), _rand(3, 12, seed=4)
    B2[:, 2], A2[2] = B2[:, 1], A2[1] * 0  # third component is zero: true rank 2
    assert loha_svd(b, a, B2, A2).rank == 2


def test_tucker_loha_pair_matches_lycoris_einsum():
    r, out, inp, k = 3, 6, 4, 3
    t, w_a, w_b = _rand(r, r, k, k, seed=1), _rand(r, out, seed=2), _rand(r, inp, seed=3)
    dense = torch.einsum("i j k l, j r, i p -> p r k l", t, w_b, w_a)  # LyCORIS rebuild, (out, in, k, k)
    B, A = tucker_loha_pair(t, w_a, w_b)
    assert B.shape == (out, r) and A.shape == (r, inp * k * k)
    assert _rel(B @ A, dense.reshape(out, -1)) < 1e-13


def test_tucker_locon_is_the_conv_composition():
    """up o mid o down as convolutions equals one conv with the rank-r kernel A and 1x1 B."""
    out, inp, r, k = 5, 4, 3, 3
    down, mid, up = _rand(r, inp, 1, 1, seed=1), _rand(r, r, k, k, seed=2), _rand(out, r, 1, 1, seed=3)
    x = _rand(2, inp, 7, 7, seed=4)
    composed = torch.nn.functional.conv2d(
        torch.nn.functional.conv2d(torch.nn.functional.conv2d(x, down), mid, padding=1), up)
    B, A = tucker_locon_factors(up, mid, down)
    weight = (B @ A).reshape(out, inp, k, k)
    assert _rel(torch.nn.functional.conv2d(x, weight, padding=1), composed) < 1e-12


def test_lokr_tucker_w2_matches_lycoris_einsum():
    r, c, d, k = 2, 4, 3, 3
    t2, w2_a, w2_b = _rand(r, r, k, k, seed=1), _rand(r, c, seed=2), _rand(r, d, seed=3)
    dense = torch.einsum("i j k l, i p, j r -> p r k l", t2, w2_a, w2_b)
    assert _rel(lokr_w2_tucker(t2, w2_a, w2_b), dense.reshape(c, -1)) < 1e-13


KRON = [((4, 4), (6, 6), None), ((2, 8), (12, 3), None), ((3, 2), (5, 9), 2), ((4, 4), (8, 9 * 4), 3),
        ((8, 8), (2, 2), None)]


def _w(shape, rank, seed):
    if rank is None:
        return _rand(*shape, seed=seed)
    return _rand(shape[0], rank, seed=seed), _rand(rank, shape[1], seed=seed + 100)


def _dense(w):
    return w[0] @ w[1] if isinstance(w, tuple) else w


@pytest.mark.parametrize("s1,s2,r2", KRON)
def test_kron_svd_exact_and_truncated(s1, s2, r2):
    W1, W2 = _w(s1, None, 1), _w(s2, r2, 2)
    M = torch.kron(_dense(W1), _dense(W2))
    dense_S = torch.linalg.svdvals(M)
    full = kron_svd(W1, W2)
    assert full.rank == numerical_rank(dense_S, M.shape) == min(s1) * (r2 or min(s2))
    assert _rel(full.dense(), M) < 1e-12
    assert torch.allclose(full.S, dense_S[: full.rank], rtol=1e-10)
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    for k in (1, 5):
        if S[k - 1] - S[k] < 1e-8 * S[0]:
            continue  # a tie at the cut: the truncation is not unique
        top = kron_svd(W1, W2, k)
        assert top.rank == k
        assert _rel(top.dense(), (U[:, :k] * S[:k]) @ Vh[:k]) < 1e-5
        assert torch.allclose(top.U.mT @ top.U, torch.eye(k, dtype=torch.float64), atol=1e-12)


def test_kron_both_factored():
    W1, W2 = _w((6, 5), 2, 3), _w((7, 4), 3, 4)
    M = torch.kron(_dense(W1), _dense(W2))
    svd = kron_svd(W1, W2)
    assert svd.rank == 6
    assert _rel(svd.dense(), M) < 1e-12


def test_lowrank_svd_zero_and_rank_deficient():
    B, A = torch.zeros(5, 2, dtype=torch.float64), _rand(2, 6, seed=1)
    assert lowrank_svd(B, A).rank == 0
    B = _rand(9, 1, seed=2).repeat(1, 3)  # three equal columns: rank 1
    svd = lowrank_svd(B, _rand(3, 8, seed=3))
    assert svd.rank == 1 and _rel(svd.dense(), B @ _rand(3, 8, seed=3)) < 1e-12
