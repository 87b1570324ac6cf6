"""Activation-whitened truncated SVD: LoRA factors that minimise the *output* error on calibration inputs.

Plain truncated SVD minimises ``||dW - B A||_F``, every input direction alike. A layer computes ``dW x`` for the
inputs x it sees; over calibration inputs ``X (in, tokens)`` the output error is ``||(dW - B A) X||_F``. Its
minimiser at rank r is known in closed form (SVD-LLM, arXiv 2403.07378; EoRA, arXiv 2410.21271)::

    C = X X^T + lambda I = L L^T           (in, in); lambda = F * mean(diag(X X^T))
    dW L = U S V^T                          truncated SVD of the (out, in) matrix M = dW L
    B = U_r sqrt(S_r / scale)               (out, r)
    A = sqrt(S_r / scale) V_r^T L^{-1}  =  (U_r^T dW) / sqrt(S_r scale)      (r, in)

The second form of A (``V_r^T L^{-1} = S_r^{-1} U_r^T M L^{-1} = S_r^{-1} U_r^T dW``) needs only U and S of M, and
those are the eigenvectors and values of ``M M^T = dW C dW^T``: the randomized method never factors C nor forms M.
Its range finder (Halko et al. 2011, Alg. 4.4) applies ``M M^T`` as ``dW (C (dW^T Y))``, starting from
``dW (C Omega)``; then U, S come from the eigenpairs of the small ``Q^T M M^T Q = Z^T C Z`` (``Z = dW^T Q``, float64).
Cost per layer: the plain range finder's products plus one ``C @ (in, l)`` per power iteration, with C shared by the
layers of one input; no ``in^3`` Cholesky, no ``out * in^2`` product. The exact method factors ``C = L L^T``
(Cholesky, float64; lambda raised tenfold with a note when not positive definite) and takes the exact SVD of M.

``scale B A = U_r U_r^T dW`` (a projection), so ``||(dW - scale B A) L||_F^2 = ||dW L||_F^2 - sum S_r^2`` exactly:
``output_rel_error = sqrt(||dW L||^2 - sum S_r^2) / ||dW L||``. ``||dW L||_F^2 = <dW C, dW>`` costs ``out * in^2``:
the randomized method computes it when ``in <= 2 (n_iter + 1) l`` (no dearer than its range finder), and otherwise
estimates the part its sketch missed, ``||(I - Q Q^T) M||_F^2``, from 16 Gaussian probes (Hutchinson; unbiased,
``WhitenedSVD.total_estimated``). With a large damping ``C ~ lambda I`` and the factors tend to plain SVD's.
Pure torch; never touches files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import NumericalError, Warn
from .svd import Method, check_matrix, fix_signs, resolve_method, truncated_svd, work_dtype

__all__ = ["DEFAULT_DAMPING", "Whitener", "WhitenedSVD", "WhitenedFactors", "whitener", "whitened_matrix",
           "whitened_svd", "whitened_balanced_factors", "output_rel_error", "measured_output_error",
           "whitened_factors"]

DEFAULT_DAMPING = 0.01  # F in lambda = F * mean(diag C): SVD-LLM / EoRA's choice, and the measured one
_MAX_TRIES = 8  # damping raised tenfold per failed Cholesky, from at least _FLOOR * mean(diag C)
_FLOOR = 1e-10
_PROBES = 16  # Gaussian probes of the estimated ||dW L||_F^2 (large layers, randomized method)


class Whitener:
    """``C + lambda I`` for one input's statistics ``C (in, in)`` (float64), with its float32 copy for the
    randomized products and, when the exact method asks, its Cholesky factor ``L`` (computed once, then kept)."""

    def __init__(self, C: Tensor, damping: float, mean_diag: float, note: str | None = None):
        self.C = C  # (in, in) float64, damped
        self.damping = damping  # lambda added (absolute, in C's units); raised by L if C + lambda I is not PD
        self.mean_diag = mean_diag  # mean(diag C) before damping
        self.note = note  # set when C was zero, or lambda had to be raised
        self._L: Tensor | None = None
        self._C32: Tensor | None = None

    @property
    def size(self) -> int:
        return int(self.C.shape[0])

    def C_as(self, dtype: torch.dtype) -> Tensor:
        """C in ``dtype`` (float32 kept for the next layer of this input)."""
        if dtype == torch.float64:
            return self.C
        if self._C32 is None:
            self._C32 = self.C.float()
        return self._C32

    @property
    def L(self) -> Tensor:
        """Lower Cholesky factor of C (float64); lambda raised tenfold until C is positive definite (noted)."""
        if self._L is None:
            self._L = self._cholesky()
        return self._L

    def _cholesky(self) -> Tensor:
        if self.mean_diag <= 0.0:
            return torch.eye(self.size, dtype=torch.float64, device=self.C.device)
        eye = torch.eye(self.size, dtype=torch.float64, device=self.C.device)
        asked, extra = self.damping, 0.0
        for _ in range(_MAX_TRIES):
            L, info = torch.linalg.cholesky_ex(self.C + extra * eye)  # (n, n) lower
            if int(info) == 0:
                if extra:
                    self.C, self._C32, self.damping = self.C + extra * eye, None, self.damping + extra
                    self.note = (f"C + lambda I was not positive definite at damping {asked / self.mean_diag:g}: "
                                 f"damping raised to {self.damping / self.mean_diag:.3g} * mean(diag C)")
                return L
            extra = max((self.damping + extra) * 10.0, _FLOOR * self.mean_diag) - self.damping
        raise NumericalError(f"Cholesky of the {self.size} x {self.size} input statistics failed even with damping "
                             f"{(self.damping + extra) / self.mean_diag:.3g} * mean(diag C): the statistics are not "
                             f"a Gram matrix X X^T")


@torch.no_grad()
def whitener(C: Tensor, *, damping: float = DEFAULT_DAMPING, device: torch.device | str | None = None) -> Whitener:
    """``C + lambda I`` with ``lambda = damping * mean(diag C)``, in float64 on ``device`` (C's by default). An
    all-zero C (no tokens) gives ``C = I`` (plain SVD) with a note."""
    check_matrix(C, "C")
    if C.shape[0] != C.shape[1]:
        raise ValueError(f"C must be square (in, in), got {tuple(C.shape)}")
    if not (isinstance(damping, (int, float)) and math.isfinite(damping) and damping >= 0):
        raise ValueError(f"damping must be a finite number >= 0, got {damping!r}")
    C = C.detach().to(device=device or C.device, dtype=torch.float64)
    if not bool(torch.isfinite(C).all()):
        raise NumericalError(f"input statistics ({C.shape[0]} x {C.shape[1]}) hold NaN or Inf: recompute them")
    n = C.shape[0]
    mean_diag = float(C.diagonal().mean()) if n else 0.0
    if mean_diag <= 0.0:
        return Whitener(torch.eye(n, dtype=torch.float64, device=C.device), 0.0, 0.0,
                        "input statistics are all zero (no tokens reached this input): plain SVD")
    lam = damping * mean_diag
    return Whitener(C + lam * torch.eye(n, dtype=torch.float64, device=C.device), lam, mean_diag)


@torch.no_grad()
def whitened_matrix(dW: Tensor, w: Whitener) -> Tensor:
    """``dW L`` (out, in), formed in float64, returned in dW's working dtype (float32 unless dW is float64) on dW's
    device: the matrix whose SVD gives the whitened factors; ``||dW L||_F^2`` is the output energy."""
    _check_fit(dW, w)
    M = dW.detach().to(device=w.C.device, dtype=torch.float64) @ w.L  # (out, in)
    return M.to(device=dW.device, dtype=work_dtype(dW))


def _check_fit(dW: Tensor, w: Whitener) -> None:
    check_matrix(dW, "dW")
    if dW.shape[1] != w.size:
        raise ValueError(f"dW {tuple(dW.shape)} and the input statistics ({w.size} x {w.size}) "
                         f"do not fit: dW is (out, in), the statistics (in, in)")


@dataclass
class WhitenedSVD:
    """Top-k SVD of ``M = dW L``: U (out, k), S (k,) descending, and ``rows = V^T L^{-1} = U^T dW / S`` (k, in), the
    rows of A before the split; ``total = ||dW L||_F`` (estimated when ``total_estimated``)."""

    U: Tensor
    S: Tensor
    rows: Tensor
    total: float
    method: Method
    spectrum: Tensor | None = None  # every singular value of M (exact method)
    total_estimated: bool = False


@torch.no_grad()
def whitened_svd(dW: Tensor, w: Whitener, k: int, *, method: Method | str = Method.AUTO, oversample: int = 10,
                 n_iter: int = 4, seed: int = 0, on_warning: Warn | None = None) -> WhitenedSVD:
    """Top-k SVD of ``dW L`` (module docstring): exact (Cholesky, then ``truncated_svd`` of ``dW L``) or
    randomized on ``dW C dW^T`` (no Cholesky), as :func:`~lowrank_tools.linalg.svd.resolve_method` decides for
    a plain SVD of that shape. k is clamped to min(out, in). Results in dW's working dtype, on dW's device."""
    _check_fit(dW, w)
    k = min(int(k), *dW.shape)
    chosen = resolve_method(Method(method), min(dW.shape), k, oversample)
    if chosen is Method.RANDOMIZED:
        return _randomized(dW, w, k, oversample, n_iter, seed)
    note = w.note
    M = whitened_matrix(dW, w)  # the Cholesky factor, once per input: it may raise lambda (a new note)
    if w.note != note and on_warning is not None:
        on_warning(w.note)
    svd = truncated_svd(M, k, method=Method.EXACT, on_warning=on_warning)
    rows = _rows_from_vh(svd.Vh, w)
    return WhitenedSVD(svd.U, svd.S, rows, float(torch.linalg.matrix_norm(M.double())), svd.method, svd.spectrum)


def _rows_from_vh(Vh: Tensor, w: Whitener) -> Tensor:
    """``Vh L^{-1}``: the triangular solve ``Z L = Vh`` in float64, back in Vh's dtype and device."""
    Z = torch.linalg.solve_triangular(w.L, Vh.to(device=w.C.device, dtype=torch.float64), upper=False, left=False)
    return Z.to(device=Vh.device, dtype=Vh.dtype).contiguous()


def _randomized(dW: Tensor, w: Whitener, k: int, oversample: int, n_iter: int, seed: int) -> WhitenedSVD:
    """Subspace iteration on ``M M^T = dW C dW^T`` (module docstring); Q re-orthonormalised after each product."""
    dtype = work_dtype(dW)
    D = dW.detach().to(dtype)
    C = w.C_as(dtype).to(D.device)
    l = min(k + oversample, *D.shape)
    gen = torch.Generator().manual_seed(seed)
    omega = torch.randn(D.shape[1], l, generator=gen, dtype=dtype).to(D.device)  # (in, l)
    Q = torch.linalg.qr(D @ (C @ omega)).Q  # (out, l)
    for _ in range(n_iter):
        Q = torch.linalg.qr(D @ (C @ (D.mT @ Q))).Q
    Z = (D.mT @ Q).double()  # (in, l) = (Q^T dW)^T
    C64 = w.C.to(D.device)
    core = Z.mT @ (C64 @ Z)  # (l, l) = Q^T M M^T Q
    values, vectors = torch.linalg.eigh((core + core.mT) / 2)  # ascending
    captured = float(torch.sum(values.clamp_min(0)))  # ||Q^T M||_F^2
    values, vectors = values.flip(0)[:k], vectors.flip(1)[:, :k]
    S = values.clamp_min(0).sqrt()  # (k,)
    U = Q.double() @ vectors  # (out, k)
    P = vectors.mT @ Z.mT  # (k, in) = U^T dW
    rows = torch.where(S[:, None] > 0, P / S.clamp_min(torch.finfo(torch.float64).tiny)[:, None], 0.0)
    U, rows = fix_signs(U.to(dtype), rows.to(dtype))
    total2, estimated = _total_energy(D, C64, Q, captured, l, n_iter, gen)
    return WhitenedSVD(U.contiguous(), S.to(dtype), rows, math.sqrt(max(total2, captured)), Method.RANDOMIZED,
                       total_estimated=estimated)


def _total_energy(D: Tensor, C64: Tensor, Q: Tensor, captured: float, l: int, n_iter: int,
                  gen: torch.Generator) -> tuple[float, bool]:
    """``||dW L||_F^2 = <dW C, dW>`` exactly when ``in <= 2 (n_iter + 1) l``, else ``captured`` (the sketch's
    ``||Q^T M||^2``) plus a Hutchinson estimate of ``||(I - Q Q^T) M||_F^2`` from Gaussian probes z: the mean of
    ``(dW^T z')^T C (dW^T z')`` over ``z' = (I - Q Q^T) z``. Returns (value, estimated)."""
    if D.shape[1] <= 2 * (n_iter + 1) * l:
        return float(torch.sum((D.double() @ C64) * D.double())), False
    z = torch.randn(D.shape[0], _PROBES, generator=gen, dtype=D.dtype).to(D.device)  # (out, p)
    z = z - Q @ (Q.mT @ z)
    Y = (D.mT @ z).double()  # (in, p)
    return captured + float(torch.sum(Y * (C64 @ Y))) / _PROBES, True


@torch.no_grad()
def whitened_balanced_factors(svd: WhitenedSVD, r: int, *, scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """``B = U_r sqrt(S_r / scale)`` (out, r) and ``A = sqrt(S_r / scale) rows_r`` (r, in) (``rows = V^T L^-1``),
    so that ``scale B A = U_r U_r^T dW``. Returned in the SVD's dtype, on its device."""
    if not 0 <= r <= svd.S.shape[0]:
        raise ValueError(f"r must be in [0, {svd.S.shape[0]}] (the computed components), got {r}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite number, got {scale}")
    root = torch.sqrt(svd.S[:r].clamp_min(0) / scale)  # (r,)
    return (svd.U[:, :r] * root).contiguous(), (root.unsqueeze(1) * svd.rows[:r]).contiguous()


def output_rel_error(S_kept: Tensor, total_norm: float) -> float:
    """``||(dW - B A) L||_F / ||dW L||_F`` from the kept singular values of ``dW L`` and ``||dW L||_F``:
    ``sqrt(||dW L||^2 - sum S_r^2) / ||dW L||``. Exact for both methods (the factors project dW on span(U_r),
    so Pythagoras holds); before any cast of the factors."""
    if total_norm == 0.0:
        return 0.0
    kept = float(torch.sum(S_kept.double() ** 2))
    return math.sqrt(max(total_norm**2 - kept, 0.0)) / total_norm


@torch.no_grad()
def measured_output_error(dW: Tensor, B: Tensor, A: Tensor, L: Tensor, *, scale: float = 1.0) -> float:
    """``||(dW - scale B A) L||_F / ||dW L||_F`` measured (float64); L may be any (in, k) matrix, e.g. the
    calibration inputs X themselves. 0 for a zero ``dW L``."""
    L = L.to(torch.float64)
    ref = dW.to(torch.float64) @ L  # (out, k)
    total = float(torch.linalg.matrix_norm(ref))
    if total == 0.0:
        return 0.0
    err = ref - scale * (B.to(torch.float64) @ (A.to(torch.float64) @ L))
    return float(torch.linalg.matrix_norm(err)) / total


@dataclass
class WhitenedFactors:
    """:func:`whitened_factors`' result: ``dW ~= scale * B @ A`` optimal for the output error at rank r."""

    B: Tensor  # (out, r)
    A: Tensor  # (r, in)
    svd: WhitenedSVD  # of dW L
    rel_error: float  # ||dW - scale B A||_F / ||dW||_F (weight space)
    output_rel_error: float  # ||(dW - scale B A) L||_F / ||dW L||_F


@torch.no_grad()
def whitened_factors(dW: Tensor, C_or_whitener: Tensor | Whitener, r: int, *, damping: float = DEFAULT_DAMPING,
                     scale: float = 1.0, method: Method | str = Method.AUTO, oversample: int = 10, n_iter: int = 4,
                     seed: int = 0, on_warning: Warn | None = None) -> WhitenedFactors:
    """Rank-r whitened factors of ``dW (out, in)`` for the statistics ``C = X X^T (in, in)`` (or a prepared
    :class:`Whitener`, which ignores ``damping``); r is clamped to min(out, in). Both errors are measured."""
    w = C_or_whitener if isinstance(C_or_whitener, Whitener) else whitener(C_or_whitener, damping=damping)
    if w.note and on_warning is not None:
        on_warning(w.note)
    svd = whitened_svd(dW, w, r, method=method, oversample=oversample, n_iter=n_iter, seed=seed,
                       on_warning=on_warning)
    r = min(r, svd.S.shape[0])
    B, A = whitened_balanced_factors(svd, r, scale=scale)
    norm = float(torch.linalg.matrix_norm(dW.double()))
    rel = float(torch.linalg.matrix_norm(dW.double() - scale * (B.double() @ A.double()))) / norm if norm else 0.0
    return WhitenedFactors(B, A, svd, rel, measured_output_error(dW, B, A, w.L, scale=scale))
