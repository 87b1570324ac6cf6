"""Top-k singular values of a large matrix, fast: a randomized subspace iteration whose products run in bfloat16.

Halko, Martinsson & Tropp 2011, "Finding structure with randomness": Alg. 4.4 (randomized subspace
iteration) for an orthonormal basis Z (n, l) of the dominant row space, then Alg. 5.1's projection: the
values are the singular values of ``M @ Z`` (m, l), computed in float32 from M itself. They are Ritz
values of M: each is at most the true one (interlacing) and as accurate as Z is.

Mixed precision (Connolly, Higham & Mary 2023, "Randomized low-rank approximation: rounding error
analysis and a mixed precision algorithm"): the range finder tolerates low-precision products, so the
sketch and power iterations multiply by ``bf16(M)`` where bf16 matrix products are fast (CUDA; CPUs with
AMX or AVX512-BF16), 5-10x the float32 rate, while the projection ``M @ Z`` stays float32. Rounding M to
bf16 (unit roundoff u = 2^-8) perturbs it by E with ``||E||_2 ~ u ||M||_F / sqrt(min(m, n))`` (random-sign
rounding); Z is then off by about ``||E||_2 / s_k`` and the Ritz values by its square. When that
estimate exceeds ``_BF16_MAX_NOISE`` of s_k (steep spectra: s_k / s_1 below ~1e-3), the sketch is redone in
float32. Pure torch; never touches files.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["top_singular_values", "fast_bf16"]

_BF16_UNIT_ROUNDOFF = 2.0**-8
_MAX_COND_INV = 1e-3  # 1 / cond(R) above which Y R^-1 is orthonormal enough for an intermediate basis
_BF16_MAX_NOISE = 0.01  # estimated ||E||_2 / s_k above this: Ritz values could be off by ~1e-4, redo in float32


def fast_bf16(device: torch.device) -> bool:
    """Whether bfloat16 matrix products beat float32 on ``device``: CUDA, or a CPU with AMX / AVX512-BF16."""
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def _orth(Y: Tensor, *, exact: bool = False) -> Tensor:
    """Orthonormal basis (float32) of the columns of Y (r, l).

    Inside the iteration a basis only has to span: ``Y R^-1`` with R from a Householder QR (forming Q
    costs three times as much) while R is well conditioned, its orthogonality error ~ eps * cond(R).
    ``exact``: Householder's Q, for the basis the values are read from."""
    Y = Y.float()
    if not exact:
        R = torch.linalg.qr(Y, mode="r").R  # (l, l)
        d = R.diagonal().abs()
        if float(d.min()) > _MAX_COND_INV * float(d.max()):
            return torch.linalg.solve_triangular(R, Y, upper=True, left=False)
    return torch.linalg.qr(Y).Q


def _row_basis(M: Tensor, Ms: Tensor, l: int, n_iter: int, seed: int) -> Tensor:
    """Z (n, l): orthonormal basis of the dominant row space of M, products by ``Ms`` (M in the sketch dtype)."""
    m, n = M.shape
    gen = torch.Generator().manual_seed(seed)  # CPU generator: the same test matrix on every device
    omega = torch.randn(m, l, generator=gen).to(device=M.device, dtype=Ms.dtype)  # (m, l)
    Z = _orth((omega.mT @ Ms).mT, exact=n_iter == 0)  # (n, l) = orth(M^T omega)
    for i in range(n_iter):  # re-orthonormalise after every product, else the small values are lost
        Q = _orth(Ms @ Z.to(Ms.dtype))  # (m, l)
        Z = _orth((Q.mT.to(Ms.dtype).contiguous() @ Ms).mT, exact=i == n_iter - 1)  # (n, l)
    return Z


def _ritz_values(M: Tensor, Z: Tensor, k: int) -> Tensor:
    B = M @ Z  # (m, l) float32: the exact projection onto span(Z)
    R = torch.linalg.qr(B, mode="r").R  # (l, l): the singular values of B, cheaper than svdvals of (m, l)
    return torch.linalg.svdvals(R)[:k]


@torch.no_grad()
def top_singular_values(M: Tensor, k: int, *, oversample: int | None = None, n_iter: int = 3, seed: int = 0,
                        bf16: bool | None = None, frobenius: float | None = None) -> tuple[Tensor, str]:
    """``(S (k,) descending float32, how)`` for ``M (m, n)`` float32; ``how`` is ``"randomized"`` or
    ``"randomized-bf16"`` (the sketch's precision).

    ``oversample`` extra sketch columns (default k: a sketch of 2k; with 3 power iterations the top k then
    come within ~1e-4 even on slowly decaying spectra such as s_i = 1/i), ``n_iter`` power iterations,
    ``seed`` for the Gaussian test matrix. ``bf16``: force the sketch precision (default: bf16 where fast,
    see :func:`fast_bf16`). ``frobenius``: ``||M||_F`` if known (for the bf16 noise check).
    """
    if M.ndim != 2 or M.dtype != torch.float32:
        raise ValueError(f"M must be a 2-D float32 tensor, got {tuple(M.shape)} {M.dtype}")
    side = min(M.shape)
    k = max(1, min(int(k), side))
    l = min(side, k + (k if oversample is None else max(0, int(oversample))))
    use_bf16 = fast_bf16(M.device) if bf16 is None else bf16
    if use_bf16:
        S = _ritz_values(M, _row_basis(M, M.to(torch.bfloat16), l, n_iter, seed), k)
        norm = float(torch.linalg.vector_norm(M)) if frobenius is None else frobenius
        noise = _BF16_UNIT_ROUNDOFF * norm / math.sqrt(side)  # estimated ||E||_2 of rounding M to bf16
        if float(S[-1]) > 0 and noise <= _BF16_MAX_NOISE * float(S[-1]):
            return S, "randomized-bf16"
    return _ritz_values(M, _row_basis(M, M, l, n_iter, seed), k), "randomized"
