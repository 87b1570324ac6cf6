"""Frobenius norms and errors: of a matrix, of its difference from a low-rank product, of low-rank products.

Accuracy without float64 copies of large matrices: row norms in float32 combined in float64
(:func:`frobenius_norm`), float64 sums of small chunks (:func:`frobenius_error`), and QR of the factors for
products never formed (:func:`lowrank_frobenius_norm`: ``||B A||_F = ||R_B R_A^T||_F``). Pure torch; never
touches files.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import NonFiniteWeight
from .svd import check_matrix, work_dtype, concat_factors, qr_core

__all__ = ["delta_stats", "check_finite", "frobenius_error", "frobenius_norm", "lowrank_frobenius_diff", "lowrank_frobenius_norm"]

_CHUNK_ELEMENTS = 1 << 20  # column chunk of frobenius_error: one 4 MiB float32 temporary at a time
_DEVICE_CHUNK_ELEMENTS = 1 << 24  # the same on a GPU: fewer, larger kernels
_CPU_NORM_CHUNK = 1 << 14  # float64 sums of squares, 16K values at a time on the CPU (see _sum_squares)
_MIN_FLOAT32_NORM = 1e-18  # below this, float32 squares of the entries (< ~1e-36) have lost digits to underflow


@torch.no_grad()
def frobenius_error(M: Tensor, B: Tensor, A: Tensor, *, scale: float = 1.0, norm: float | None = None) -> float:
    """``||M - scale * B @ A||_F`` for ``M (m, n)``, ``B (m, r)``, ``A (r, n)``.

    With ``norm`` (``||M||_F``, known already) and r small against the sides, first in one light pass
    (:func:`_folded_error`: the product ``B^T M``, no (m, n) residual); its answer is kept when the error is at least
    :data:`FOLDED_MIN_REL` of ``norm``, where cancellation leaves it within ~1e-5 relative of the direct one.
    Otherwise (and without ``norm``) the direct residual: float32 (float64 kept) with float64 accumulation, a chunk
    of columns at a time so the temporary stays small next to M."""
    check_matrix(M, "M")
    m, n = M.shape
    if B.shape[0] != m or A.shape[1] != n or B.shape[1] != A.shape[0]:
        raise ValueError(f"M {tuple(M.shape)}, B {tuple(B.shape)} and A {tuple(A.shape)} do not match")
    if norm is not None and math.isfinite(norm) and 0 < 4 * B.shape[1] <= min(m, n):
        err = _folded_error(M, B, A, scale, norm)
        if err >= FOLDED_MIN_REL * norm:
            return err
    work = work_dtype(M, B, A)
    B = B.detach().to(device=M.device, dtype=work)
    step = max(1, (_CHUNK_ELEMENTS if M.device.type == "cpu" else _DEVICE_CHUNK_ELEMENTS) // max(m, 1))
    buffer = torch.empty(m * min(step, n), dtype=work, device=M.device)  # one temporary for every chunk
    total = torch.zeros((), dtype=torch.float64, device=M.device)
    for j in range(0, n, step):
        A_j = A[:, j:j + step].to(device=M.device, dtype=work)  # (r, c)
        D = buffer[: m * A_j.shape[1]].view(m, A_j.shape[1])  # (m, c)
        torch.addmm(M[:, j:j + step].to(work), B, A_j, alpha=-scale, out=D)  # M_j - scale B A_j: one GEMM pass
        total += _sum_squares(D)
    return math.sqrt(float(total))


FOLDED_MIN_REL = 0.1  # _folded_error is trusted down to this relative error (its cancellation: see there)


def _folded_error(M: Tensor, B: Tensor, A: Tensor, scale: float, norm: float) -> float:
    """``||M - s B A||_F`` as ``sqrt(||M||^2 - 2 s <B^T M, A> + s^2 ||B A||^2)``: one GEMM ``B^T M`` (r, n) reads M
    once (the direct residual writes and re-reads an (m, n) temporary); the inner products and the Grams of
    ``||B A||^2 = tr((B^T B)(A A^T))`` in float64. The float32 product errs by ~u32 sqrt(m) ||B|| ||M|| per entry, so
    the squared error is off by ~1e-6 ||M||^2 at the sizes of real layers: relative ~1e-4 at rel_error 0.1, ~1e-6 at
    0.9 (fine-tune deltas at small ranks sit at 0.3-0.95). Measured against the direct residual on
    random and decaying spectra: tests/test_perf_small_layers.py."""
    work = work_dtype(M, B, A)
    Bw, Aw = B.detach().to(device=M.device, dtype=work), A.detach().to(device=M.device, dtype=work)
    cross = float(((Bw.mT @ M.to(work)).double() * Aw.double()).sum())  # <M, B A>
    Bd, Ad = Bw.double(), Aw.double()
    gram = float(((Bd.mT @ Bd) * (Ad @ Ad.mT)).sum())  # ||B A||^2 = tr((B^T B)(A A^T)); both Grams symmetric
    return math.sqrt(max(norm * norm - 2.0 * scale * cross + scale * scale * gram, 0.0))


@torch.no_grad()
def frobenius_norm(M: Tensor) -> float:
    """``||M||_F``; inf or nan when M holds Inf or NaN. float32 norms of the rows (short vectorised sums:
    ~1e-7 relative) combined in float64: within ~1e-8 of a float64 norm at a fifth of the cost of a chunked one
    (9 ms against 40 for 4096 x 11008 on 2 cores) and with no float64 copy of M. Squares that overflow or
    underflow float32 (a norm above ~1e19 or below ~1e-18, e.g. a delta of subnormals) are summed again in
    float64."""
    if M.numel() == 0:
        return 0.0
    X = M.detach()
    if X.ndim == 2 and not X.is_contiguous() and X.mT.is_contiguous():
        X = X.mT  # a transposed view (an embedding's (dim, vocab)): rows of the stored layout, 10x faster
    X = X.reshape(X.shape[0] if X.ndim else 1, -1)  # (out, in_flat); a 0-d or 1-d tensor as it comes
    rows = torch.linalg.vector_norm(X, dim=1, dtype=torch.float32)  # (out,): no copy of a float32 M
    value = float(torch.linalg.vector_norm(rows.double()))
    if math.isinf(value) and bool(torch.isfinite(X).all()):  # float32 squares overflowed, no Inf entry
        value = math.sqrt(float(_sum_squares(X)))  # X: no copy of a transposed view
    elif value < _MIN_FLOAT32_NORM and (value > 0 or bool(X.any())):  # squares lost to underflow
        value = math.sqrt(float(_sum_squares(X)))
    return value


def check_finite(t: Tensor, what: str) -> None:
    """Raise :class:`NonFiniteWeight` naming ``what`` and the count when ``t`` holds NaN or Inf."""
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise NonFiniteWeight(f"{what} holds {bad} NaN/Inf values: repair or re-export the checkpoint")


def _sum_squares(X: Tensor) -> Tensor:
    """``sum(X**2)`` accumulated in float64, a 0-d float64 tensor on X's device (one sync for the caller).

    On the CPU 16K values at a time: each chunk's float64 temporary (128 KiB) stays in cache and below
    malloc's mmap threshold (see memory.py), where 1M-value chunks cost a fresh 8 MiB mapping each, 4x the
    time. Elsewhere 16M values per kernel, summed on the device."""
    flat = X.detach().reshape(-1)
    step = _CPU_NORM_CHUNK if flat.device.type == "cpu" else _DEVICE_CHUNK_ELEMENTS
    total = torch.zeros((), dtype=torch.float64, device=flat.device)
    for chunk in flat.split(step):
        total += torch.linalg.vector_norm(chunk, dtype=torch.float64).square()
    return total


@torch.no_grad()
def lowrank_frobenius_norm(B: Tensor, A: Tensor, s: float = 1.0) -> float:
    """``||s * B @ A||_F`` for ``B (m, r)``, ``A (r, n)`` without forming the product.

    QR of both factors in float64: ``||B A||_F = ||R_B R_A^T||_F`` (orthonormal Q's drop out). Same
    cost as the Gram trick ``tr((B^T B)(A A^T))`` but no squaring, so small differences survive."""
    core = qr_core(B, A, dtype=torch.float64).core  # (p, q): R_B R_A^T, float64; (0, 0) when r = 0
    return abs(float(s)) * float(torch.linalg.matrix_norm(core)) if s != 0 else 0.0


@torch.no_grad()
def lowrank_frobenius_diff(B1: Tensor, A1: Tensor, s1: float, B2: Tensor, A2: Tensor, s2: float) -> float:
    """``||s1 B1 A1 - s2 B2 A2||_F`` without forming either product: the norm of the concatenation
    ``[s1 B1 | -s2 B2] [A1; A2]`` (see :func:`lowrank_frobenius_norm`)."""
    B, A = concat_factors([(B1.double(), A1, s1), (B2.double(), A2, -s2)])
    return lowrank_frobenius_norm(B, A)


_BLOCK_ELEMENTS = 1 << 20  # float64 working memory per block of delta_stats: 8 MiB


@torch.no_grad()
def delta_stats(W0: Tensor, W: Tensor) -> dict[str, float]:
    """``max_abs_delta``, ``delta_norm`` and ``base_norm`` of W - W0 (any equal shapes), in float64 a block of rows
    at a time (no full-size float64 copy)."""
    a, b = W0.reshape(W0.shape[0] if W0.dim() else 1, -1), W.reshape(W.shape[0] if W.dim() else 1, -1)  # (rows, cols)
    step = max(1, _BLOCK_ELEMENTS // max(1, a.shape[1]))
    peak, delta_sq, base_sq = 0.0, 0.0, 0.0
    for i in range(0, a.shape[0], step):
        w0 = a[i:i + step].to(torch.float64)
        d = b[i:i + step].to(torch.float64) - w0
        if d.numel():
            peak = max(peak, float(d.abs().max()))
        delta_sq += float((d * d).sum())
        base_sq += float((w0 * w0).sum())
    return {"max_abs_delta": peak, "delta_norm": delta_sq**0.5, "base_norm": base_sq**0.5}
