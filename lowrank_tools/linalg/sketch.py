"""The randomized range finder (the one: :func:`range_finder`, also that of ``linalg.truncated_svd``), its bf16
acceptance rule (:func:`bf16_accepts`), and top-k singular values of a large matrix, fast: the range finder in
bfloat16 with Cholesky QR, values in float32 (:func:`top_singular_values`, for ``analyze --top``).

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
therefore carry no bf16 rounding of M, only its effect on the subspace, which
:func:`bf16_accepts` bounds (the rule the randomized SVD of extract uses too); where it
does not accept (steep spectra, a matrix of rank below k), the sketch is redone in float32.

Cost on 2 CPU cores with AMX, 4096 x 4096, k = 64, 3 power iterations (benchmarks/bench_analyze.py): the
bf16 copy of M (~7 ms, one pass over M, in huge pages: 11 ms with 4 KiB pages), seven bf16 products with 128
columns (~2-3 ms each), six Cholesky-QR orthonormalisations (~1 ms each, against 3-5 ms for Householder QR)
and one float32 product with 64 rows (~8 ms): ~48 ms against 1.7 s for ``svdvals``. Pure torch; never
touches files.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .memory import empty_huge

__all__ = ["top_singular_values", "range_finder", "bf16_accepts", "fast_bf16", "PowerStop", "POWER_TOL"]

_BF16_ROUNDOFF = 2.0**-8  # unit roundoff of bfloat16
_BF16_TOLERANCE = 0.03  # bf16 rounding may move at most this share (squared) of the energy a result is measured by

_MIN_PIVOT_RATIO = 1e-3  # Cholesky QR while min/max pivot of L exceeds this (a cheap stand-in for 1 / cond(Y))
_MIN_RITZ_PIVOT = 1e-4  # the final basis: float64 Cholesky while its pivots stay within 1e4 (orthogonality ~1e-8)


# ------------------------------------------------------------------ the range finder (also truncated_svd's)


@functools.lru_cache(maxsize=4)
def _test_matrix(n: int, l: int, seed: int, dtype: torch.dtype) -> Tensor:
    """The Gaussian test matrix Omega (n, l) of ``seed``, drawn on the CPU (the same on every device; the caller
    moves it) in float32 (float64 for float64 products), then cast to ``dtype``. Stored column-major (as the
    transpose of an (l, n) matrix): the first product ``M @ Omega`` is then the faster oneDNN kind for bf16.
    Cached: analyze asks for the same one for every layer of a shape; never written to, a few MiB at most."""
    gen = torch.Generator().manual_seed(seed)
    drawn = torch.randn(n, l, generator=gen, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    return drawn.to(dtype).mT.contiguous().mT


def range_finder(Ms: Tensor, l: int, n_iter: int, seed: int, orth_rows: Callable[[Tensor], Tensor],
                 stop: PowerStop | None = None) -> Tensor:
    """Randomized subspace iteration (Halko, Martinsson & Tropp 2011, Alg. 4.4), the one range finder (the
    randomized SVD of :func:`~lowrank_tools.linalg.truncated_svd`, the values-only sketch here): ``W = Ms Z``
    (..., m, l), Z (n, l) an orthonormal basis of the dominant row space after ``n_iter`` power iterations, from
    the Gaussian test matrix of ``seed``; W's columns span the dominant column space, each scaled by about its
    singular value.

    ``Ms`` (m, n) or a stack (b, m, n), in the product dtype (bf16 for the mixed-precision runs). Every product
    is re-orthonormalised (else the small values are lost) by ``orth_rows(Y)``: rows orthonormal spanning the
    rows of Y (..., l, r) (Householder QR in the randomized SVD; Cholesky QR in the sketch). The products are
    ``Ms @ X`` and ``X @ Ms``, 2 n_iter + 1 in all, and W is returned in Ms's dtype, not orthonormalised.

    ``stop`` (one matrix only): ``n_iter`` is then the most. Each iteration starts from the basis Q of the column
    space so far and its image ``B = Q^T Ms`` (needed anyway); :meth:`PowerStop.settled` reads it and may end the
    loop there, keeping (Q^T, B) in ``stop.basis`` for the caller's last step (``stop.used``: the count)."""
    W = Ms @ _test_matrix(Ms.shape[-1], l, seed, Ms.dtype).to(Ms.device)  # (..., m, l)
    for done in range(n_iter):
        Qt = orth_rows(W.mT).to(Ms.dtype)  # (..., l, m): the column space after ``done`` iterations
        B = Qt @ Ms  # (..., l, n): what that basis captures of Ms (the row space it maps to)
        if stop is not None and stop.settled(Qt, B, done):
            return W
        Zt = orth_rows(B).to(Ms.dtype)  # (..., l, n)
        W = Ms @ Zt.mT  # (..., m, l)
    if stop is not None:
        stop.used = n_iter
    return W


POWER_TOL = 3e-3  # the adaptive stop: the rank-k error improved by at most this (relative) in the last iteration
POWER_MIN = 2  # power iterations always done when stopping early is allowed (the first change is measured at 2)
_TINY_RESIDUAL = 0.01  # below this share of ||M||_F the matrix is nearly exactly low rank: always the full count


class PowerStop:
    """The adaptive end of :func:`range_finder`'s power iterations for one matrix ``M`` (``frobenius`` =
    ``||M||_F``) and its top ``k``: ``n_iter`` becomes the most, not the count.

    Each iteration starts from an orthonormal basis Q (m, l) of the column space found so far and its image
    ``B = Q^T M`` (l, n), which the iteration needs anyway. The best rank-k error within span(Q) is then exact and
    cheap: ``e_i^2 = ||M||_F^2 - sum of the top k eigenvalues of B B^T`` (an (l, l) float64 Gram: ~l^2 n flops,
    against the 2 m n l of each product), i the iterations behind Q; it is the error the SVD gives if Q is the
    final basis. From i = :data:`POWER_MIN` on, the loop ends at Q once ``e_{i-1} - e_i <= tol e_{i-1}`` (the
    last iteration gained at most ``tol`` of the error; the next gains less on a decaying spectrum), and the
    caller finishes from ``basis`` = (Q^T, B): the final QR and product are spared too. Never when
    ``e_i < 1% ||M||_F`` (nearly exactly low rank: relative changes there are rounding noise, and the full count
    drives a planted rank to machine precision). ``tol`` None: the full count always.

    Decided on float64 sums of float32 products: the same seed gives the same count, run after run; the products of
    1 and 2 threads agree to ~1e-6, so the count could differ between thread counts only when the improvement falls
    that close to ``tol``."""

    def __init__(self, frobenius: float, k: int, tol: float | None = POWER_TOL) -> None:
        self.norm2 = float(frobenius) ** 2
        self.k = int(k)
        self.tol = tol
        self.used = 0  # power iterations done
        self.errors: list[float] = []  # e_{POWER_MIN - 1}, e_{POWER_MIN}, ...: the rank-k error of each basis
        self.basis: tuple[Tensor, Tensor] | None = None  # (Q^T (l, m), B (l, n)) where the loop stopped early

    def settled(self, Qt: Tensor, B: Tensor, done: int) -> bool:
        """Whether the basis rows ``Qt`` (l, m) after ``done`` iterations, with ``B = Qt M`` (l, n), are final."""
        self.used = done
        if self.tol is None or done < POWER_MIN - 1:  # e_i is compared from i = POWER_MIN on, with e_{i-1}
            return False
        Bd = B.double()
        top = torch.linalg.eigvalsh(Bd @ Bd.mT)[-self.k:]  # (k,) ascending: the squared top-k values within span(Q)
        err = math.sqrt(max(self.norm2 - float(top.sum()), 0.0))
        self.errors.append(err)
        if done < POWER_MIN or err < _TINY_RESIDUAL * math.sqrt(self.norm2):
            return False
        last = self.errors[-2]
        if last - err > self.tol * last:
            return False
        self.basis = (Qt, B)
        return True


def fast_bf16(device: torch.device) -> bool:
    """Whether bfloat16 matrix products beat float32 on ``device``: CUDA, or a CPU with AMX / AVX512-BF16
    (3-5x the float32 rate for 4096 x 11008 by 74 columns on 2 cores)."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and _cpu_bf16_fast()


@functools.lru_cache(maxsize=None)
def _cpu_bf16_fast() -> bool:
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def bf16_accepts(S: Tensor, frobenius: float, shape: Sequence[int]) -> bool:
    """Whether the top-k ``S`` (k,) found through ``bf16(M)`` (M of ``shape`` (m, n), ``||M||_F = frobenius``) are
    as good as float32's: the one acceptance rule of the bf16 range finder (extract's factors, analyze's values).

    Mixed precision (Connolly, Higham & Mary 2023, "Randomized low-rank approximation: rounding error analysis
    and a mixed precision algorithm"): rounding M to bf16 (u = 2^-8) perturbs it by E, ``||E||_2 <= 2 u ||M||_F /
    sqrt(min(m, n))`` for random-sign rounding (x2 margin); the found subspace turns by ~||E||_2 / s_i in direction
    i, which moves ~||E||_2^2 of energy out of it per direction. Accepted when that is at most 0.03^2 of what the
    results are measured against: each value (``||E||_2 <= 0.03 s_k``, which also keeps the first-order estimate
    valid) and the tail the k leave out (``k ||E||_2^2 <= 0.03^2 tail^2``, ``tail^2 = ||M||_F^2 - sum S^2``: the
    rank-k error grows by ~0.05%). Fine-tune deltas (optimal error 10-60%) pass; a planted low-rank matrix
    (tail ~ 0) or a steep spectrum (s_k far below the RMS singular value) is redone in float32."""
    k = S.shape[-1]
    if k == 0 or not math.isfinite(frobenius):
        return False
    noise = 2 * _BF16_ROUNDOFF * frobenius / math.sqrt(min(int(d) for d in shape[-2:]))  # estimated ||E||_2
    tail2 = frobenius**2 - float((S.double() ** 2).sum())
    s_k = float(S[..., -1].min())
    return tail2 > 0 and noise <= _BF16_TOLERANCE * s_k and k * noise**2 <= _BF16_TOLERANCE**2 * tail2


# ------------------------------------------------------------------ the values-only sketch


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


def _sketch(Ms: Tensor, l: int, n_iter: int, seed: int) -> Tensor:
    """``(M Z)^T`` (l, m) float32: the :func:`~lowrank_tools.linalg.range_finder` with Cholesky QR
    (:func:`_orth_rows`). Four products ``Ms @ X`` and three ``X @ Ms`` for n_iter = 3: the first kind is ~30%
    faster with oneDNN's bf16 kernels, and the range finder starts and ends with it."""
    return range_finder(Ms, l, n_iter, seed, _orth_rows).mT.float()


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
        if bf16_accepts(S, norm, M.shape):
            return S, "randomized-bf16"
    return _ritz_values(M, _sketch(M, l, n_iter, seed), k, gram_dtype=torch.float64), "randomized"
