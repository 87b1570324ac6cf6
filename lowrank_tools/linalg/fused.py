"""Exact algebra of fused layers: one LoRA on a stacked weight <-> one LoRA per stacked part.

A fused layer stacks the weights of its parts by rows (Flux's ``img_attn.qkv`` = [to_q; to_k; to_v], its single
blocks' ``linear1`` = [to_q; to_k; to_v; proj_mlp]). A LoRA on it, ``s * B @ A`` with B (sum m_j, R), A (R, n),
is the same delta as one LoRA per part:

    split:  part j = s * B[rows_j] @ A, and only the columns of B[rows_j] that are not all zero matter, so a
            block-diagonal B (what :func:`fuse_rows` writes) gives each part back its own rank r_j, not R.
            The scale stays s: alpha_j = s * r_j (never alpha = R with rank r_j: sd-scripts #2204).
    fuse:   A = [A_1; ...; A_k] (sum r_j, n), B = blockdiag(s_1 B_1, ..., s_k B_k) (sum m_j, sum r_j), scale 1,
            exact; or with ``rank``, the optimal (Eckart-Young) rank-``rank`` truncation of that product through the
            QR core (:func:`~lowrank_tools.linalg.svd.qr_core_svd`), never forming the (sum m_j, n) matrix.

Pure torch; float32 work (float64 kept).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .svd import balanced_factors, qr_core_svd, work_dtype

__all__ = ["split_rows", "fuse_rows", "swap_halves"]


@torch.no_grad()
def split_rows(B: Tensor, A: Tensor, sizes: Sequence[int]) -> list[tuple[Tensor, Tensor]]:
    """``B (sum sizes, R)``, ``A (R, n)`` -> one ``(B_j (sizes[j], r_j), A_j (r_j, n))`` per part, where
    ``B_j @ A_j == B[rows_j] @ A`` exactly and r_j counts the columns of ``B[rows_j]`` that are not all zero
    (r_j = 0 for a part the LoRA leaves untouched). Same dtype as the inputs."""
    if B.ndim != 2 or A.ndim != 2 or B.shape[1] != A.shape[0] or sum(sizes) != B.shape[0]:
        raise ValueError(f"B {tuple(B.shape)} and A {tuple(A.shape)} do not split into row parts {list(sizes)}")
    parts, start = [], 0
    for size in sizes:
        rows = B[start:start + size]  # (m_j, R)
        used = rows.ne(0).any(dim=0)  # (R,)
        parts.append((rows[:, used].contiguous(), A[used].contiguous()))
        start += size
    return parts


@torch.no_grad()
def fuse_rows(parts: Sequence[tuple[Tensor, Tensor, float]], *, rank: int | None = None) -> tuple[Tensor, Tensor]:
    """``[(B_j (m_j, r_j), A_j (r_j, n), scale_j)]`` -> ``(B, A)`` of the stacked layer with scale 1:
    ``B @ A == [s_1 B_1 A_1; ...; s_k B_k A_k]``, B block-diagonal (sum m_j, sum r_j) and A (sum r_j, n).

    ``rank`` below sum r_j: the optimal rank-``rank`` approximation of that product instead (balanced factors of
    its exact SVD from the QR core). float32 (float64 kept)."""
    if not parts:
        raise ValueError("fuse_rows needs at least one (B, A, scale) part")
    work = work_dtype(*(t for B, A, _ in parts for t in (B, A)))
    n = parts[0][1].shape[1]
    for j, (B, A, _) in enumerate(parts):
        if B.ndim != 2 or A.ndim != 2 or B.shape[1] != A.shape[0] or A.shape[1] != n:
            raise ValueError(f"part {j}: B {tuple(B.shape)} and A {tuple(A.shape)} do not fit (m, r) and (r, {n})")
    B = torch.block_diag(*(b.detach().to(work) * float(s) for b, _, s in parts))  # (sum m_j, sum r_j)
    A = torch.cat([a.detach().to(work) for _, a, _ in parts], dim=0)  # (sum r_j, n)
    if rank is None or rank >= A.shape[0]:
        return B, A
    if rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    svd = qr_core_svd(B, A)
    return balanced_factors(svd, min(rank, svd.S.shape[0]))


def swap_halves(B: Tensor) -> Tensor:
    """Rows [first half; second half] -> [second half; first half]: BFL's final ``adaLN_modulation`` yields
    (shift, scale), diffusers' ``norm_out.linear`` (scale, shift). Its own inverse."""
    half = B.shape[0] // 2
    return torch.cat([B[half:], B[:half]], dim=0)
