"""Exact algebra of structured adapter deltas (LoHa, LoKr, Tucker) as plain low-rank factors. Pure torch.

Every structured delta ``M`` (out, in_flat) below is turned into plain factors ``M = B @ A`` or into its exact
SVD ``M = U diag(S) Vh``, never through the dense ``M`` unless that is the cheaper route.

LoHa (Hadamard product, Hyeon-Woo et al., "FedPara", 2022): with ``B1`` (out, r1), ``A1`` (r1, in), ``B2``
(out, r2), ``A2`` (r2, in),

    (B1 @ A1) * (B2 @ A2) = B @ A,   B = B1 (face-splitting) B2  (out, r1 r2),  B[o, i r2 + j] = B1[o, i] B2[o, j]
                                     A = A1 (Khatri-Rao) A2     (r1 r2, in),   A[i r2 + j, n] = A1[i, n] A2[j, n]

(Slyusar 1999; Kolda & Bader, SIAM Review 2009, section 2.6): entry (o, n) of B @ A is
sum_ij B1[o,i] A1[i,n] B2[o,j] A2[j,n] = (B1 A1)[o,n] (B2 A2)[o,n]. The exact SVD then comes from the QR core
of B and A in O((out + in) R^2 + R^3), R = r1 r2; only when R >= min(out, in) is the dense product cheaper.

LoKr (Kronecker product): ``kron(W1, W2)`` with ``W1 = U1 S1 V1^T``, ``W2 = U2 S2 V2^T`` has the SVD
``(U1 x U2)(S1 x S2)(V1 x V2)^T`` (Van Loan, "The ubiquitous Kronecker product", 2000): its singular values are
the products ``s1_i s2_j``, so the optimal rank-k truncation (Eckart-Young) keeps the k largest products and
their vector pairs ``kron(u1_i, u2_j)``, ``kron(v1_i, v2_j)``. Factored ``W = w_a @ w_b`` get their SVD from
their QR cores. A conv LoKr's matrix view is ``kron(W1, W2.reshape(c, -1))`` (LyCORIS' ``make_kron``).

Tucker (LyCORIS ``use_tucker``): a core ``t`` (r, r, kh, kw) between two 1x1 factors is absorbed into the down
factor, giving an exact rank-r LoRA whose A is a (r, in, kh, kw) kernel.

All math in float64: the spectra are then exact to far below the float32 rounding of what is written.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["ExactSVD", "face_splitting", "khatri_rao", "loha_factors", "tucker_down", "tucker_loha_pair",
           "tucker_locon_factors", "lokr_w2_tucker", "factor_svd", "lowrank_svd", "loha_svd", "kron_svd",
           "numerical_rank", "exact_rank", "top_svd", "dora_rescale_", "dora_row_norms"]

_EPS64 = torch.finfo(torch.float64).eps


@dataclass
class ExactSVD:
    """``M = U diag(S) Vh`` at M's numerical rank (float64): U (out, R), S (R,) descending > 0, Vh (R, in)."""

    U: Tensor
    S: Tensor
    Vh: Tensor

    @property
    def rank(self) -> int:
        return int(self.S.shape[0])

    def factors(self, k: int | None = None) -> tuple[Tensor, Tensor]:
        """Balanced factors of the top-k part: ``B = U_k sqrt(S_k)`` (out, k), ``A = sqrt(S_k) Vh_k`` (k, in)."""
        k = self.rank if k is None else min(int(k), self.rank)
        root = self.S[:k].sqrt()
        return self.U[:, :k] * root, root.unsqueeze(1) * self.Vh[:k]

    def top(self, k: int) -> "ExactSVD":
        """The leading k components: the optimal rank-k truncation (Eckart-Young)."""
        return ExactSVD(U=self.U[:, :k], S=self.S[:k], Vh=self.Vh[:k])

    def dense(self) -> Tensor:
        return (self.U * self.S) @ self.Vh

    def trimmed(self, eps: float) -> "ExactSVD":
        """The smallest leading part whose dropped tail is within ``eps`` of the whole (Frobenius): with ``eps`` the
        unit roundoff of the dtype written, the product is the original's to that rounding (see :func:`exact_rank`)."""
        r = exact_rank(self.S, eps)
        return ExactSVD(U=self.U[:, :r], S=self.S[:r], Vh=self.Vh[:r])


def numerical_rank(S: Tensor, shape: tuple[int, ...]) -> int:
    """Count of singular values above ``S_1 * max(shape) * eps64`` (numerically zero in float64 below it)."""
    if S.numel() == 0 or float(S[0]) == 0.0:
        return 0
    return int((S > float(S[0]) * max(shape) * _EPS64).sum())


def exact_rank(S: Tensor, eps: float) -> int:
    """Smallest r with ``sqrt(sum_{i > r} S_i^2) <= eps * sqrt(sum S_i^2)`` (S descending): the rank at which a
    product is its original's to relative rounding ``eps`` (e.g. float32's 1.2e-7)."""
    if S.numel() == 0:
        return 0
    energy = S.double() ** 2
    tail = energy.flip(0).cumsum(0).flip(0)  # tail[i] = sum_{j >= i} S_j^2
    limit = (eps**2) * float(tail[0])
    above = (tail > limit).nonzero()
    return int(above[-1]) + 1 if len(above) else 0


def fix_signs(U: Tensor, Vh: Tensor) -> tuple[Tensor, Tensor]:
    """Largest-|.| entry of each U column positive (flipping the Vh row), so results repeat."""
    if U.shape[1] == 0:
        return U, Vh
    signs = torch.sign(U.gather(0, U.abs().argmax(dim=0, keepdim=True))).squeeze(0)
    signs[signs == 0] = 1
    return U * signs, Vh * signs.unsqueeze(1)


def _trimmed(U: Tensor, S: Tensor, Vh: Tensor, shape: tuple[int, ...]) -> ExactSVD:
    r = numerical_rank(S, shape)
    U, Vh = fix_signs(U[:, :r], Vh[:r])
    return ExactSVD(U=U, S=S[:r], Vh=Vh)


def face_splitting(B1: Tensor, B2: Tensor) -> Tensor:
    """Row-wise Kronecker product: (out, r1), (out, r2) -> (out, r1 r2), column i r2 + j = B1[:, i] * B2[:, j]."""
    return (B1.unsqueeze(2) * B2.unsqueeze(1)).reshape(B1.shape[0], -1)


def khatri_rao(A1: Tensor, A2: Tensor) -> Tensor:
    """Column-wise Khatri-Rao product: (r1, n), (r2, n) -> (r1 r2, n), row i r2 + j = A1[i] * A2[j]."""
    return (A1.unsqueeze(1) * A2.unsqueeze(0)).reshape(-1, A1.shape[1])


def loha_factors(B1: Tensor, A1: Tensor, B2: Tensor, A2: Tensor) -> tuple[Tensor, Tensor]:
    """``B (out, r1 r2)``, ``A (r1 r2, in)`` with ``B @ A = (B1 @ A1) * (B2 @ A2)`` exactly (see module doc)."""
    return face_splitting(B1, B2), khatri_rao(A1, A2)


def tucker_down(core: Tensor, down: Tensor) -> Tensor:
    """Absorb a Tucker core into a down factor: ``core`` (r, q, *k), ``down`` (q, in) -> A (r, in * prod(k)),
    ``A[i, (c, *k)] = sum_j core[i, j, *k] down[j, c]`` (LyCORIS ``rebuild_tucker``; the kernel stays a kernel)."""
    A = torch.einsum("ij...,jc->ic...", core, down.reshape(down.shape[0], -1))  # (r, in, *k)
    return A.reshape(A.shape[0], -1)


def tucker_loha_pair(t: Tensor, w_a: Tensor, w_b: Tensor) -> tuple[Tensor, Tensor]:
    """One Tucker LoHa pair (``hada_t1`` (r, r, *k), ``hada_w1_a`` (r, out), ``hada_w1_b`` (r, in)) as plain
    factors ``B (out, r)``, ``A (r, in * prod(k))``: LyCORIS' ``einsum("i j ..., j r, i p -> p r ...")``."""
    return w_a.mT, tucker_down(t, w_b)


def tucker_locon_factors(up: Tensor, mid: Tensor, down: Tensor) -> tuple[Tensor, Tensor]:
    """LoCon with ``lora_mid``: up (out, r[, 1, 1]), mid (r, q, kh, kw), down (q, in[, 1, 1]) -> B (out, r),
    A (r, in * kh * kw) with ``B @ A`` the matrix view of the conv delta ``up o mid o down``."""
    return up.reshape(up.shape[0], -1), tucker_down(mid, down)


def lokr_w2_tucker(t2: Tensor, w2_a: Tensor, w2_b: Tensor) -> Tensor:
    """LoKr's Tucker ``W2`` (c, d * kh * kw): ``einsum("i j ..., i p, j r -> p r ...", t2, w2_a, w2_b)``,
    ``t2`` (r, r, kh, kw), ``w2_a`` (r, c), ``w2_b`` (r, d)."""
    W2 = torch.einsum("ij...,ip,jr->pr...", t2, w2_a, w2_b.reshape(w2_b.shape[0], -1))
    return W2.reshape(W2.shape[0], -1)


def lowrank_svd(B: Tensor, A: Tensor) -> ExactSVD:
    """Exact SVD of ``B @ A`` (B (m, R), A (R, n)) at its numerical rank, through the QR core
    ``R_B R_A^T = Uc S Vc^T``: ``U = Q_B Uc``, ``V = Q_A Vc`` in O((m + n) R^2 + R^3); densified (one
    (m, n) SVD) when R >= min(m, n), where that is the cheaper of the two."""
    B, A = B.double(), A.double()
    m, n, R = B.shape[0], A.shape[1], B.shape[1]
    if R >= min(m, n):
        U, S, Vh = torch.linalg.svd(B @ A, full_matrices=False)
        return _trimmed(U, S, Vh, (m, n, R))
    R_B = torch.linalg.qr(B, mode="r").R  # (R, R): no explicit Q (half the cost of a QR)
    R_A = torch.linalg.qr(A.mT, mode="r").R  # (R, R)
    Uc, S, Vhc = torch.linalg.svd(R_B @ R_A.mT, full_matrices=False)
    r = numerical_rank(S, (m, n, R))
    S = S[:r]
    # U S = B R_A^T Vc and S Vh = Uc^T R_B A (M V = U S with V = Q_A Vc, U^T M = S Vh with U = Q_B Uc): two skinny
    # products instead of forming Q_B, Q_A; S_i is above the rank tolerance, so the division is well conditioned
    U = (B @ (R_A.mT @ Vhc[:r].mT)) / S  # (m, r)
    Vh = ((Uc[:, :r].mT @ R_B) @ A) / S.unsqueeze(1)  # (r, n)
    U, Vh = fix_signs(U, Vh)
    return ExactSVD(U=U, S=S, Vh=Vh)


def factor_svd(W: Tensor | tuple[Tensor, Tensor]) -> ExactSVD:
    """Exact SVD of a full matrix ``W`` or of a factored ``(w_a, w_b)`` = ``w_a @ w_b`` (its QR core)."""
    if isinstance(W, tuple):
        return lowrank_svd(*W)
    W = W.double()
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    return _trimmed(U, S, Vh, tuple(W.shape))


def top_svd(W: Tensor, k: int) -> ExactSVD:
    """The top-k singular triplets of a full matrix ``W`` (m, n) from the eigen-decomposition of its smaller Gram
    (``W W^T`` or ``W^T W``, float64): O(m n min(m, n) + min(m, n)^3), no SVD of W. Exact to float64 rounding for
    every component above ``S_1 sqrt(max(m, n) eps64)`` (a Gram squares the spectrum: below that the eigenvalues are
    rounding noise, and such components, ~1e-7 of the norm or less, are dropped). The vectors of the small side come
    from ``eigh``, the other side's from ``W^T u / s`` (or ``W v / s``), so ``U_k S_k Vh_k`` is the projection of W
    on the top-k eigenvectors. ``k >= min(m, n)``: the full exact SVD (:func:`factor_svd`)."""
    W = W.double()
    m, n = W.shape
    if k >= min(m, n):
        return factor_svd(W)
    wide = m <= n
    evals, evecs = torch.linalg.eigh(W @ W.mT if wide else W.mT @ W)  # ascending
    S = evals.flip(0)[:k].clamp_min(0).sqrt()
    X = evecs.flip(1)[:, :k]  # (min side, k): U if wide else V
    r = int((S > float(S[0]) * (max(m, n) * _EPS64) ** 0.5).sum()) if len(S) and float(S[0]) > 0 else 0
    S, X = S[:r], X[:, :r]
    if wide:
        U, Vh = X, (X.mT @ W) / S.unsqueeze(1)
    else:
        U, Vh = (W @ X) / S, X.mT
    U, Vh = fix_signs(U, Vh)
    return ExactSVD(U=U, S=S, Vh=Vh)


def _top_factor_svd(W: Tensor | tuple[Tensor, Tensor], k: int | None) -> ExactSVD:
    """A Kronecker factor's exact SVD, or only its top-k triplets when ``k`` is given and W is a full matrix."""
    return factor_svd(W) if k is None or isinstance(W, tuple) else top_svd(W, k)


def loha_svd(B1: Tensor, A1: Tensor, B2: Tensor, A2: Tensor) -> ExactSVD:
    """Exact SVD of ``(B1 @ A1) * (B2 @ A2)`` via the Khatri-Rao factors (densified only when r1 r2 >= min side)."""
    return lowrank_svd(*loha_factors(B1.double(), A1.double(), B2.double(), A2.double()))


def kron_svd(W1: Tensor | tuple[Tensor, Tensor], W2: Tensor | tuple[Tensor, Tensor], k: int | None = None) -> ExactSVD:
    """Exact (``k`` None) or optimal rank-k SVD of ``kron(W1, W2)``, each a matrix or a ``(w_a, w_b)`` pair.

    Singular values: the products ``s1_i s2_j``, sorted; vectors ``kron(u1_i, u2_j)`` and ``kron(v1_i, v2_j)``,
    formed only for the pairs kept. Nothing of size (out, in) is formed. With ``k``, a full factor gives only its
    top-k triplets (:func:`top_svd`: the top-k products draw on at most k values of each factor)."""
    s1, s2 = _top_factor_svd(W1, k), _top_factor_svd(W2, k)
    products = torch.outer(s1.S, s2.S).reshape(-1)  # (R1 R2,), index i R2 + j
    order = torch.argsort(products, descending=True, stable=True)
    shape = (s1.U.shape[0] * s2.U.shape[0], s1.Vh.shape[1] * s2.Vh.shape[1])
    keep = numerical_rank(products[order], shape) if len(order) else 0
    order = order[: keep if k is None else min(int(k), keep)]
    i, j = order // s2.rank, order % s2.rank
    U = face_splitting(s1.U[:, i].mT, s2.U[:, j].mT).reshape(len(order), -1).mT  # (out, k): kron(u1_i, u2_j)
    Vh = face_splitting(s1.Vh[i], s2.Vh[j]).reshape(len(order), -1)  # (k, in): kron(v1_i, v2_j)
    return ExactSVD(U=U, S=products[order], Vh=Vh)


# ------------------------------------------------------------------------------------------------------ DoRA


def dora_rescale_(M: Tensor, magnitude: Tensor, axis: str = "out", weight: float = 1.0) -> Tensor:
    """DoRA in place on ``M = W0 + s B A`` (out, in_flat): each output row (``axis="out"``, PEFT and LyCORIS) or
    input channel (``"in"``, LyCORIS' legacy ``wd_on_out=False``; a channel spans in_flat / len(m) columns) scaled by
    ``w (m / ||.|| - 1) + 1``, i.e. ``m / ||.||`` at weight 1 (Liu et al., "DoRA", 2024, eq. 5; LyCORIS' multiplier
    rule otherwise). No epsilon (PEFT's choice; LyCORIS adds float eps, a difference below float32 rounding unless a
    norm is ~0); a zero norm is clamped to the smallest normal float, not divided by."""
    m = magnitude.to(M.device, M.dtype)
    tiny = torch.finfo(M.dtype).tiny
    if axis == "out":
        return M.mul_((weight * (m / M.norm(dim=1).clamp_min(tiny) - 1) + 1).unsqueeze(1))
    per = M.shape[1] // m.numel()
    norms = M.square().sum(0).reshape(m.numel(), per).sum(1).sqrt().clamp_min(tiny)  # (in,)
    return M.mul_((weight * (m / norms - 1) + 1).repeat_interleave(per).unsqueeze(0))


def dora_row_norms(W0: Tensor, B: Tensor, A: Tensor, scale: float, *, block: int = 1024) -> Tensor:
    """``||W0 + s B A||`` per output row without forming it: ``||w_i||^2 + 2 s b_i . (A w_i) + s^2 b_i G b_i``,
    ``G = A A^T`` (r, r); O(out in r) in row blocks of W0 (out, in_flat), float64."""
    A64 = A.double()
    G = A64 @ A64.mT  # (r, r)
    out = torch.empty(W0.shape[0], dtype=torch.float64)
    for i in range(0, W0.shape[0], block):
        w = W0[i:i + block].double()  # (b, in)
        b = B[i:i + block].double()  # (b, r)
        sq = w.square().sum(1) + 2 * scale * (b * (w @ A64.mT)).sum(1) + scale**2 * ((b @ G) * b).sum(1)
        out[i:i + block] = sq.clamp_min(0).sqrt()
    return out
