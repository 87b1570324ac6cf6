"""Activation-whitened truncated SVD: LoRA factors that minimise the *output* error on calibration inputs.

Plain truncated SVD minimises ``||dW - B A||_F``, every input direction alike. A layer computes ``dW x`` for the
inputs x it sees; over calibration inputs ``X (in, tokens)`` the output error is ``||(dW - B A) X||_F``. Its
minimiser at rank r is known in closed form (SVD-LLM, arXiv 2403.07378; EoRA, arXiv 2410.21271)::

    C = X X^T + lambda I = L L^T           (in, in), Cholesky in float64; lambda = F * mean(diag(X X^T))
    dW L = U S V^T                          truncated SVD (exact or randomized) of the (out, in) matrix dW L
    B = U_r sqrt(S_r / scale)               (out, r)
    A = sqrt(S_r / scale) V_r^T L^{-1}      (r, in), a triangular solve: never an explicit inverse

Since ``||M X||_F^2 = tr(M X X^T M^T) = ||M L||_F^2`` (lambda = 0), the error ``||(dW - scale B A) L||_F`` equals
``sqrt(sum of the discarded S^2)``: ``output_rel_error = ||(dW - scale B A) L||_F / ||dW L||_F``. With a large
damping ``L ~ sqrt(lambda) I`` and the factors tend to plain SVD's. Pure torch; never touches files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import NumericalError, Warn
from .svd import Method, TruncatedSVD, check_matrix, truncated_svd, work_dtype

__all__ = ["DEFAULT_DAMPING", "Whitener", "WhitenedFactors", "whitener", "whitened_matrix", "whitened_svd",
           "whitened_balanced_factors", "unwhitened_rows", "output_rel_error", "measured_output_error", "whitened_factors"]

DEFAULT_DAMPING = 0.01  # F in lambda = F * mean(diag C): SVD-LLM / EoRA's choice, and the measured one
_MAX_TRIES = 8  # damping raised tenfold per failed Cholesky, from at least _FLOOR * mean(diag C)
_FLOOR = 1e-10


@dataclass(frozen=True)
class Whitener:
    """``C + lambda I = L L^T`` for one input's statistics ``C (in, in)``."""

    L: Tensor  # (in, in) float64, lower triangular
    damping: float  # lambda actually added (absolute, in C's units)
    mean_diag: float = 0.0  # mean(diag C) before damping: the input's mean squared activation times its tokens
    note: str | None = None  # set when lambda had to be raised (C + lambda I not positive definite) or C was zero


@torch.no_grad()
def whitener(C: Tensor, *, damping: float = DEFAULT_DAMPING, device: torch.device | str | None = None) -> Whitener:
    """The Cholesky factor of ``C + lambda I`` with ``lambda = damping * mean(diag C)``, in float64 on ``device``
    (C's by default). Not positive definite (damping 0 and rank-deficient C, or rounding): lambda is raised
    tenfold (from at least 1e-10 * mean(diag C)) until it is, and :attr:`Whitener.note` says so. An all-zero C
    (no tokens) gives ``L = I`` (plain SVD) with a note."""
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
        return Whitener(torch.eye(n, dtype=torch.float64, device=C.device), 0.0,
                        "input statistics are all zero (no tokens reached this input): plain SVD")
    lam = damping * mean_diag
    eye = torch.eye(n, dtype=torch.float64, device=C.device)
    for _ in range(_MAX_TRIES):
        L, info = torch.linalg.cholesky_ex(C + lam * eye)  # (n, n) lower
        if int(info) == 0:
            note = None if lam == damping * mean_diag else (
                f"C + lambda I was not positive definite at --damping {damping:g}: damping raised to "
                f"{lam / mean_diag:.3g} * mean(diag C)")
            return Whitener(L, lam, note, mean_diag)
        lam = max(lam * 10.0, _FLOOR * mean_diag)
    raise NumericalError(f"Cholesky of the {n} x {n} input statistics failed even with damping "
                         f"{lam / mean_diag:.3g} * mean(diag C): the statistics are not a Gram matrix X X^T")


@torch.no_grad()
def whitened_matrix(dW: Tensor, w: Whitener) -> Tensor:
    """``dW L`` (out, in), formed in float64, returned in dW's working dtype (float32 unless dW is float64) on dW's
    device: the matrix whose SVD gives the whitened factors; ``||dW L||_F^2`` is the output energy."""
    check_matrix(dW, "dW")
    if dW.shape[1] != w.L.shape[0]:
        raise ValueError(f"dW {tuple(dW.shape)} and the input statistics ({w.L.shape[0]} x {w.L.shape[0]}) "
                         f"do not fit: dW is (out, in), the statistics (in, in)")
    M = dW.detach().to(device=w.L.device, dtype=torch.float64) @ w.L  # (out, in)
    return M.to(device=dW.device, dtype=work_dtype(dW))


@torch.no_grad()
def whitened_svd(dW: Tensor, w: Whitener, k: int, *, method: Method | str = Method.AUTO, oversample: int = 10,
                 n_iter: int = 4, seed: int = 0, on_warning: Warn | None = None) -> TruncatedSVD:
    """Top-k SVD of :func:`whitened_matrix` ``dW L`` by :func:`~lowrank_tools.linalg.svd.truncated_svd` (exact or
    randomized, as a plain SVD would be). Its singular values are the output error's: ``sum(S^2) = ||dW L||_F^2``."""
    return truncated_svd(whitened_matrix(dW, w), k, method=method, oversample=oversample, n_iter=n_iter, seed=seed,
                         on_warning=on_warning)


@torch.no_grad()
def whitened_balanced_factors(svd: TruncatedSVD, w: Whitener, r: int, *, scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """``B = U_r sqrt(S_r / scale)`` (out, r) and ``A = sqrt(S_r / scale) V_r^T L^{-1}`` (r, in) from the SVD of
    ``dW L`` (:func:`whitened_svd`); A by a triangular solve ``A L = sqrt(S_r / scale) V_r^T`` in float64.
    Returned in the SVD's dtype, on its device."""
    if not 0 <= r <= svd.S.shape[0]:
        raise ValueError(f"r must be in [0, {svd.S.shape[0]}] (the computed components), got {r}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite number, got {scale}")
    root = torch.sqrt(svd.S[:r].clamp_min(0) / scale)  # (r,)
    B = svd.U[:, :r] * root  # (out, r)
    return B.contiguous(), unwhitened_rows(root.unsqueeze(1) * svd.Vh[:r], w)


@torch.no_grad()
def unwhitened_rows(Y: Tensor, w: Whitener) -> Tensor:
    """``Y L^{-1}`` for rows ``Y (k, in)`` (e.g. the right singular vectors of ``dW L``): the triangular solve
    ``Z L = Y`` in float64, returned in Y's dtype and on its device."""
    Z = torch.linalg.solve_triangular(w.L, Y.to(device=w.L.device, dtype=torch.float64), upper=False, left=False)
    return Z.to(device=Y.device, dtype=Y.dtype).contiguous()  # (k, in)


def output_rel_error(S_kept: Tensor, total_norm: float) -> float:
    """``||(dW - B A) L||_F / ||dW L||_F`` from the kept singular values of ``dW L`` and ``||dW L||_F``:
    ``sqrt(||dW L||^2 - sum S_r^2) / ||dW L||``. Exact for the exact SVD and for the randomized one alike (its
    factors are the projection of dW L on span(U_r), so Pythagoras holds); before any cast of the factors."""
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
    svd: TruncatedSVD  # of dW L
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
    B, A = whitened_balanced_factors(svd, w, r, scale=scale)
    norm = float(torch.linalg.matrix_norm(dW.double()))
    rel = float(torch.linalg.matrix_norm(dW.double() - scale * (B.double() @ A.double()))) / norm if norm else 0.0
    return WhitenedFactors(B, A, svd, rel, measured_output_error(dW, B, A, w.L, scale=scale))
