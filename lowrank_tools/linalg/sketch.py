"""Top-k singular values of a large matrix, fast: a randomized subspace iteration in bfloat16, values in float32.

Halko, Martinsson & Tropp 2011, "Finding structure with randomness", Alg. 4.4 (randomized subspace
iteration): ``W = M Z`` (m, l), ``l = k + oversample``, with Z (n, l) an orthonormal basis of the dominant
row space, so that W's columns span the dominant column space. The top k left singular vectors of W are
the Ritz vectors ``U`` (m, k); the values returned are the exact singular values of M on ``span(U)``
(Rayleigh-Ritz: the singular values of ``U^T M`` for orthonormal U), computed from M itself: one float32
product, then float64 Grams. Each is at most the true one (interlacing) and its error is quadratic in the
angle between span(U) and the true singular vectors.

Mixed precision (Connolly, Higham & Mary 2023, "Randomized low-rank approximation: rounding error analysis
and a mixed precision algorithm"): the subspace tolerates low-precision products, so the sketch and power
iterations multiply by ``bf16(M)`` where bf16 matrix products are fast (CUDA; CPUs with AMX or
AVX512-BF16), 5-7x the float32 rate; only the last product, ``U^T M`` with k rows, is float32. The values
therefore carry no bf16 rounding of M, only its effect on the subspace: rounding M to bf16 (u = 2^-8)
perturbs it by E with ``||E||_2 ~ u ||M||_F / sqrt(min(m, n))`` (random-sign rounding), which turns the
subspace by about ``||E||_2 / s_k``. When that estimate exceeds ``_BF16_MAX_NOISE`` (steep spectra: s_k / s_1
below ~1e-3) the sketch is redone in float32.

Cost on 2 CPU cores with AMX, 4096 x 4096, k = 64, 3 power iterations (benchmarks/bench_analyze.py): the
bf16 copy of M (~7 ms, one pass over M, in huge pages: 11 ms with 4 KiB pages), seven bf16 products with 128
columns (~2-3 ms each), six Cholesky-QR orthonormalisations (~1 ms each, against 3-5 ms for Householder QR)
and one float32 product with 64 rows (~8 ms): ~48 ms against 1.7 s for ``svdvals``. Pure torch; never
touches files.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from .svd import fast_bf16  # re-exported: the sketch's default precision
from .memory import empty_huge

__all__ = ["top_singular_values", "fast_bf16"]

_BF16_UNIT_ROUNDOFF = 2.0**-8
_MIN_PIVOT_RATIO = 1e-3  # Cholesky QR while min/max pivot of L exceeds this (a cheap stand-in for 1 / cond(Y))
_MIN_RITZ_PIVOT = 1e-4  # the final basis: float64 Cholesky while its pivots stay within 1e4 (orthogonality ~1e-8)
_BF16_MAX_NOISE = 0.01  # estimated ||E||_2 / s_k above this: the subspace could be off, redo in float32


def _orth_rows(Y: Tensor) -> Tensor:
    """(l, r) float32 with orthonormal rows spanning the rows of ``Y`` (l, r), any float dtype.

    Cholesky QR (``L L^T = Y Y^T``, rows of ``L^-1 Y``): a Gram and a product with an (l, l) matrix, about a
    third of a Householder QR. Its rows are orthonormal to ~eps * cond(Y)^2, plenty for a basis that only
    has to span (the values are computed on the final basis exactly, whatever its orthogonality). An
    ill-conditioned Y takes Householder QR instead: the Gram not positive definite, or the pivots of L spread
    by more than ``1 / _MIN_PIVOT_RATIO`` (their ratio bounds cond(Y) from below only: a heuristic, backed by
    the Gram failing when it is far off)."""
    Y = Y.float()
    L, info = torch.linalg.cholesky_ex(Y @ Y.mT)  # (l, l) lower
    if int(info) == 0:
        pivots = L.diagonal()
        if float(pivots.min()) > _MIN_PIVOT_RATIO * float(pivots.max()):
            eye = torch.eye(L.shape[0], dtype=L.dtype, device=L.device)
            return torch.linalg.solve_triangular(L, eye, upper=False) @ Y
    return torch.linalg.qr(Y.mT).Q.mT


@functools.lru_cache(maxsize=4)
def _test_matrix(l: int, n: int, seed: int, dtype: torch.dtype) -> Tensor:
    """The Gaussian test matrix, stored as its transpose (l, n), on the CPU (the same on every device; the
    caller moves it). Cached: analyze asks for the same one for every layer of a shape (1.5 ms for 128 x 4096);
    never written to, a few MiB of CPU memory at most."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(l, n, generator=gen).to(dtype)


def _sketch(Ms: Tensor, l: int, n_iter: int, seed: int) -> Tensor:
    """``(M Z)^T`` (l, m) float32, ``Z`` (n, l) an orthonormal basis of the dominant row space after ``n_iter``
    power iterations: its rows span the dominant column space, each scaled by about its singular value.
    Every product is by ``Ms`` (M in the sketch dtype) and re-orthonormalised (else the small values are
    lost). Four products ``Ms @ X`` and three ``X @ Ms`` for n_iter = 3: the first kind is ~30% faster with
    oneDNN's bf16 kernels, so the sketch starts and ends with it."""
    W = Ms @ _test_matrix(l, Ms.shape[1], seed, Ms.dtype).to(Ms.device).mT  # (m, l)
    for _ in range(n_iter):
        Qt = _orth_rows(W.mT).to(Ms.dtype)  # (l, m): the column space so far
        Zt = _orth_rows(Qt @ Ms).to(Ms.dtype)  # (l, n): the row space it maps to
        W = Ms @ Zt.mT  # (m, l)
    return W.mT.float()


def _ritz_values(M: Tensor, Y: Tensor, k: int, *, gram_dtype: torch.dtype) -> Tensor:
    """The singular values of ``M`` (float32) on ``span(U)``, U the top-k left singular vectors of the
    sketch ``Y^T`` (``Y``: (l, m), rows in the column space of M): the singular values of ``U^T M``.

    ``gram_dtype`` for ``Y Y^T``, whose eigenvalues are about s^2 and only choose U (float32 resolves s_k / s_1
    down to ~1e-3, enough where bf16 is used at all; float64 for the steep spectra of the float32 sketch)."""
    Yg = Y.to(gram_dtype)
    w, E = torch.linalg.eigh((Yg @ Yg.mT).double())  # (l,), (l, l) ascending
    w, E = w.flip(0)[:k], E.flip(1)[:, :k]  # (k,), (l, k)
    if not float(w[0]) > 0:  # the sketch is zero: so is M
        return torch.zeros(k, device=M.device)
    scale = w.clamp_min(float(w[0]) * 1e-30).rsqrt()  # U^T = diag(w^-1/2) E^T Y: rows of about unit norm
    return _projected_values(M, (E * scale).mT.float() @ Y)  # U^T: (k, m)


def _projected_values(M: Tensor, Ut: Tensor) -> Tensor:
    """The singular values of ``Q^T M`` (k,) descending, Q (m, k) an orthonormal basis of the rows of ``Ut``
    (k, m); float64 Grams, float32 result.

    Without forming Q: with ``U U^T = L L^T`` (U^T = Ut) and ``B = Ut M``, the squared values are the eigenvalues
    of ``L^-1 B B^T L^-T``, exact for U as computed, orthonormal or not. A rank-deficient or ill-conditioned U
    (M of rank below k: directions of the sketch that are noise) takes Householder's Q and ``Q^T M`` instead,
    whose values past rank(M) are zero (interlacing)."""
    Ud = Ut.double()
    L, info = torch.linalg.cholesky_ex(Ud @ Ud.mT)  # (k, k) lower
    pivots = L.diagonal().abs()
    if int(info) == 0 and float(pivots.min()) > _MIN_RITZ_PIVOT * float(pivots.max()):
        B = (Ut @ M).double()  # (k, n): the only float32 product by M itself
        C = torch.linalg.solve_triangular(L, B @ B.mT, upper=False)  # L^-1 B B^T
        C = torch.linalg.solve_triangular(L, C.mT, upper=False)  # L^-1 B B^T L^-T (symmetric)
    else:
        Q = torch.linalg.qr(Ut.mT).Q  # (m, k) orthonormal, completed arbitrarily where Ut has no rank
        B = (Q.mT @ M).double()  # (k, n)
        C = B @ B.mT
    S2 = torch.linalg.eigvalsh((C + C.mT) / 2).flip(0)
    return S2.clamp_min(0).sqrt().float()


@torch.no_grad()
def top_singular_values(M: Tensor, k: int, *, oversample: int | None = None, n_iter: int = 3, seed: int = 0,
                        bf16: bool | None = None, frobenius: float | None = None) -> tuple[Tensor, str]:
    """``(S (k,) descending float32, how)`` for ``M (m, n)`` float32; ``how`` is ``"randomized"`` or
    ``"randomized-bf16"`` (the sketch's precision).

    ``oversample`` extra sketch columns (default k: a sketch of 2k; with 3 power iterations the top 64 of a
    4096 x 4096 matrix with s_i = 1/i come within 4e-5; in a flat noise bulk a few % low, see README),
    ``n_iter`` power iterations, ``seed`` for the Gaussian test matrix. ``bf16``: force the sketch precision
    (default: bf16 where fast, see :func:`fast_bf16`). ``frobenius``: ``||M||_F`` if known (for the bf16 noise
    check). Past the rank of M the values are zero up to rounding (~1e-7 s_1).
    """
    if M.ndim != 2 or M.dtype != torch.float32:
        raise ValueError(f"M must be a 2-D float32 tensor, got {tuple(M.shape)} {M.dtype}")
    side = min(M.shape)
    k = max(1, min(int(k), side))
    l = min(side, k + (k if oversample is None else max(0, int(oversample))))
    use_bf16 = fast_bf16(M.device) if bf16 is None else bf16
    if use_bf16:
        Mb = empty_huge(M.shape, torch.bfloat16, M.device).copy_(M)  # (m, n): written once in full
        S = _ritz_values(M, _sketch(Mb, l, n_iter, seed), k, gram_dtype=torch.float32)
        del Mb
        norm = float(torch.linalg.vector_norm(M)) if frobenius is None else frobenius
        noise = _BF16_UNIT_ROUNDOFF * norm / math.sqrt(side)  # estimated ||E||_2 of rounding M to bf16
        if float(S[-1]) > 0 and noise <= _BF16_MAX_NOISE * float(S[-1]):
            return S, "randomized-bf16"
    return _ritz_values(M, _sketch(M, l, n_iter, seed), k, gram_dtype=torch.float64), "randomized"
