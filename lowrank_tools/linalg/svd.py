"""Truncated SVD, rank rules and exact low-rank re-factorisation. Pure torch; never touches files.

Notation (DESIGN.md): a matrix ``M`` of shape ``(m, n) = (out, in)``, its SVD ``M = U S Vh``, and
LoRA factors ``B (m, r)``, ``A (r, n)`` with ``M ~= scale * B @ A``.

Precision: every factorisation runs in float32 unless an input is float64. float32 is enough for
the top singular values of deltas stored in bf16/fp16 (their storage rounding, ~1e-3 relative, is
far above float32's ~1e-7); float64 is used on request (float64 input) or as the fallback when an
SVD fails to converge. Results come back float32 (float64 kept); callers cast at the boundary.
"""

from __future__ import annotations

import contextlib
import functools
import math
import numbers
from dataclasses import dataclass
from enum import Enum
from typing import Callable, Sequence

import torch
from torch import Tensor

from ..errors import InvalidOption, NumericalError, Warn
from .sketch import POWER_TOL, PowerStop, bf16_accepts, fast_bf16, range_finder  # the range finder, its bf16 rule
from .rank_rules import RankRule  # re-exported: the rules live beside the SVDs they truncate

__all__ = [
    "Device", "Method", "OutOfMemory", "QRCore", "RankRule", "TruncatedSVD", "truncated_svd", "singular_values",
    "balanced_factors",
    "qr_core", "qr_core_svd",
    "concat_factors", "fast_bf16", "bf16_accepts", "range_finder", "resolve_device",
]

# The default method's cost rule (resolve_method): randomized when l = k + oversample <= side // 4 and the smaller side
# is at least _AUTO_MIN_SIDE, else exact. Set by CPU time on one thread (process_time, best of 3, 4 power iterations,
# benchmarks/bench_small_layers.py; torch 2.13 CPU, 2-core Xeon, a loaded machine): exact / randomized =
#   k=8:  96x96 1.5, 128x128 2.4, 192x576 4.5, 256x256 5.6, 576x576 13.7, 576x1536 15.1
#   k=32: 96x96 0.8 (l/side 0.44), 128x128 1.1 (0.33), 192x576 1.9 (0.22), 256x256 2.5 (0.16), 576x576 7.3
#   k=64: 128x128 0.5 (0.58), 192x192 0.9 (0.39), 256x256 1.5 (0.29), 384x384 2.1 (0.19), 576x576 3.6 (0.13)
# The break-even is l/side ~ 0.35 at every size from 96 up; at l/side <= 0.25 randomized wins by >= 1.4x. The old
# floor of 256 sent a 135M model's 192 x 576 k/v projections at rank 8 to the 4.5x dearer exact SVD.
_AUTO_MIN_SIDE = 96  # the smallest side measured; below it both take about a millisecond
_AUTO_MAX_SKETCH = 4  # randomized when side >= _AUTO_MAX_SKETCH * (k + oversample)
OutOfMemory = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)  # never retried: more memory is no help


class Device(str, Enum):
    """``--device`` by name (:func:`resolve_device` also takes ``"cuda:N"`` and ``torch.device``)."""

    CPU = "cpu"
    CUDA = "cuda"
    AUTO = "auto"


class Method(str, Enum):
    """How :func:`truncated_svd` computes the top-k SVD."""

    AUTO = "auto"
    EXACT = "exact"
    RANDOMIZED = "randomized"


# --------------------------------------------------------------------------- SVD


@dataclass
class TruncatedSVD:
    """Top-k SVD ``M ~= U @ diag(S) @ Vh``; float32 unless the input was float64."""

    U: Tensor  # (m, k), orthonormal columns
    S: Tensor  # (k,), descending, >= 0
    Vh: Tensor  # (k, n), orthonormal rows
    method: Method  # the method actually used (EXACT after a fallback)
    spectrum: Tensor | None = None  # every singular value computed: exact gives the full spectrum (for reports)
    power_iters: int | None = None  # randomized: the power iterations actually done (n_iter is the most)


def work_dtype(*tensors: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def fix_signs(U: Tensor, Vh: Tensor) -> tuple[Tensor, Tensor]:
    """Make the largest-|.| entry of each U column positive, flipping the matching Vh row."""
    if U.shape[1] == 0:
        return U, Vh
    idx = U.abs().argmax(dim=0, keepdim=True)  # (1, k)
    signs = torch.sign(U.gather(0, idx)).squeeze(0)  # (k,)
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return (U * signs).contiguous(), (Vh * signs.unsqueeze(1)).contiguous()


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device):
    """Run the body on one CPU thread (a no-op off the CPU). MKL's blocked SVD splits its products by the thread
    count, so 1 and 2 threads differ in the last bits; on one thread the exact factors are the same bits on every
    machine. The price: a 2048 x 2048 float32 SVD takes 2.1 s instead of 1.3 s on 2 threads."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _exact(M: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    with _one_cpu_thread(M.device):  # the exact method repeats bit for bit whatever the thread count
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)  # (m, p), (p,), (p, n); p = min(m, n)
    return U[:, :k], S, Vh[:k]  # the full S is kept: truncated_svd reports it as .spectrum


def _householder_rows(Y: Tensor, dtype: torch.dtype) -> Tensor:
    """Orthonormal rows (..., l, r) in ``dtype`` spanning the rows of ``Y``: Householder QR of ``Y^T``."""
    return torch.linalg.qr(Y.mT.to(dtype)).Q.mT


def randomized_svd(M: Tensor, k: int, oversample: int, n_iter: int, seed: int, *, bf16: bool = False,
                   stop: PowerStop | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Halko, Martinsson & Tropp 2011: Alg. 4.4 (:func:`range_finder`, Householder QR) then Alg. 5.1 (direct SVD).

    ``M`` is (m, n), or a stack (b, m, n) of equal shapes (:mod:`~lowrank_tools.extract.pipeline` batches layers on
    CUDA); every matrix gets the same test matrix, so a stacked layer sees what it would alone. ``bf16``: the
    range finder's products by bf16(M) (see :func:`bf16_accepts`); the projection ``Q^T M`` stays in M's dtype.
    ``stop``: the adaptive count of power iterations (:class:`~lowrank_tools.linalg.sketch.PowerStop`; one matrix)."""
    transpose = M.shape[-2] < M.shape[-1]  # work on the tall problem: QR of (m, l) with m >= n, like torch
    X = M.mT if transpose else M  # (..., m, n), m >= n
    Xs = X.to(torch.bfloat16) if bf16 else X  # what the range finder multiplies by
    l = min(k + oversample, X.shape[-1])
    orth = functools.partial(_householder_rows, dtype=X.dtype)
    stop = None if bf16 else stop  # the bf16 range finder keeps the full count (its B carries bf16 rounding)
    W = range_finder(Xs, l, n_iter, seed, orth, stop)  # (..., m, l)
    del Xs
    if stop is not None and stop.basis is not None:  # stopped early: the basis and its product are at hand
        Qt, B = stop.basis  # (l, m), (l, n)
    else:
        Qt = orth(W.mT)  # (..., l, m) orthonormal rows
        B = Qt @ X  # (..., l, n)
    del W
    Q = Qt.mT  # (..., m, l)
    Ub, S, Vh = torch.linalg.svd(B, full_matrices=False)  # (..., l, l), (..., l), (..., l, n)
    U, S, Vh = Q @ Ub[..., :k], S[..., :k], Vh[..., :k, :]  # (..., m, k), (..., k), (..., k, n)
    return (Vh.mT, S, U.mT) if transpose else (U, S, Vh)


def _bf16_fast(device_type: str) -> bool:
    """The range finder of :func:`truncated_svd` in bf16: on the CPUs of :func:`fast_bf16` only. GPUs keep
    float32 (with TF32 off unless asked): there the SVD is never what extract waits for."""
    return device_type == "cpu" and fast_bf16(torch.device("cpu"))


def resolve_method(method: Method, side: int, k: int, oversample: int) -> Method:
    if method is Method.AUTO:
        small_k = k + oversample <= side // _AUTO_MAX_SKETCH
        return Method.RANDOMIZED if side >= _AUTO_MIN_SIDE and small_k else Method.EXACT
    if method is Method.RANDOMIZED and k + oversample >= side:
        return Method.EXACT  # the sketch would be the whole matrix: exact is cheaper and better
    return method


def _as_method(method: Method | str) -> Method:
    try:
        return Method(method)
    except ValueError:
        choices = ", ".join(m.value for m in Method)
        raise InvalidOption(f"--method {method!r} is not one of {choices}") from None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0][:200] if text else type(exc).__name__)


def _with_fallback(compute: Callable[[Tensor, bool], tuple[Tensor, ...]], M: Tensor, on_warning: Warn | None,
                   ) -> tuple[tuple[Tensor, ...], bool]:
    """Run ``compute(X, exact)`` on M in its working dtype; if the SVD fails retry in float64, then
    exactly in float64 on CPU. Returns the results (working dtype, M's device) and whether the last
    (exact) attempt was the one that succeeded."""
    work = work_dtype(M)
    cpu = torch.device("cpu")
    attempts = [(work, M.device, False, "")]
    if work != torch.float64:
        attempts.append((torch.float64, M.device, False, "in float64"))
    attempts.append((torch.float64, cpu, True, "in float64 with the exact method on CPU"))
    error: BaseException | None = None
    for dtype, device, exact, how in attempts:
        if error is not None and on_warning is not None:
            on_warning(f"SVD did not converge ({_one_line(error)}), retried {how}")
        try:
            out = compute(M.to(device=device, dtype=dtype), exact)
        except OutOfMemory:  # float64 needs more memory
            raise
        except RuntimeError as exc:  # includes torch.linalg.LinAlgError ("failed to converge")
            error = exc
            continue
        return tuple(t.to(device=M.device, dtype=work) for t in out), exact
    hint = "" if bool(torch.isfinite(M).all()) else ": the matrix holds NaN or Inf"
    raise NumericalError(f"SVD of a {M.shape[0]} x {M.shape[1]} matrix failed after the float64 and exact CPU "
                         f"fallbacks ({_one_line(error)}){hint}") from error


def check_matrix(M: Tensor, what: str) -> None:
    if not isinstance(M, Tensor) or M.ndim != 2:
        raise ValueError(f"{what} must be a 2-D tensor, got {getattr(M, 'shape', type(M).__name__)}")


@torch.no_grad()
def truncated_svd(M: Tensor, k: int, *, method: Method | str = Method.AUTO, oversample: int = 10, n_iter: int = 4,
                  seed: int = 0, on_warning: Warn | None = None, power_tol: float | None = POWER_TOL,
                  norm: float | None = None) -> TruncatedSVD:
    """Top-k SVD of ``M (m, n)`` on M's device: ``U (m, k)``, ``S (k,)``, ``Vh (k, n)``; k is clamped to min(m, n).

    ``exact``: ``torch.linalg.svd`` then slice, on one CPU thread (the same bits for any thread count).
    ``randomized``: Halko, Martinsson & Tropp 2011, "Finding structure with randomness", Alg. 4.4 with
    ``k + oversample`` Gaussian columns (seeded with ``seed``) and at most ``n_iter`` power iterations (fewer once
    the rank-k error improves by at most ``power_tol`` per iteration, see :class:`~lowrank_tools.linalg.sketch.
    PowerStop`; ``power_tol=None``: always ``n_iter``; the bf16 range finder always does ``n_iter``), then Alg.
    5.1; ``.power_iters`` says how many. ``norm``: ``||M||_F`` when known (spares a pass over M).
    ``auto``: randomized when ``k + oversample <= min(m, n) // 4`` and ``min(m, n) >= 96``, else exact (a
    cost rule: see ``_AUTO_MIN_SIDE``). Signs are fixed: the largest-|.| entry of each U column is positive. A
    failed SVD is retried in float64, then exactly on CPU, each retry reported through ``on_warning``; :class:`NumericalError` if all fail.
    """
    check_matrix(M, "M")
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"k must be a whole number >= 1, got {k!r}")
    if oversample < 0 or n_iter < 0:
        raise InvalidOption(f"oversample ({oversample}) and n_iter ({n_iter}) must be 0 or more")
    side = min(M.shape)
    k = min(int(k), side)
    chosen = resolve_method(_as_method(method), side, k, oversample)

    iters: list[int] = []  # the power iterations of the randomized attempt that returned

    def compute(X: Tensor, exact: bool) -> tuple[Tensor, ...]:
        if exact or chosen is Method.EXACT:
            return _exact(X, k)
        frobenius = float(torch.linalg.vector_norm(X)) if norm is None else norm  # float32 norm: enough here
        iters[:] = [n_iter]
        if X.dtype == torch.float32 and _bf16_fast(X.device.type):  # the range finder in bf16 where that is fast
            U, S, Vh = randomized_svd(X, k, oversample, n_iter, seed, bf16=True)  # always n_iter (bf16 noise)
            if bf16_accepts(S, frobenius, X.shape):
                return U, S, Vh
        stop = PowerStop(frobenius, k, power_tol)
        out = randomized_svd(X, k, oversample, n_iter, seed, stop=stop)
        iters[:] = [stop.used]
        return out

    # float32 (float64 kept): see the module docstring; bf16/fp16 SVDs are unsupported or too coarse
    (U, S, Vh), fell_back = _with_fallback(compute, M.detach(), on_warning)
    U, Vh = fix_signs(U, Vh)
    randomized = not fell_back and chosen is Method.RANDOMIZED
    return TruncatedSVD(U=U, S=S[:k].contiguous(), Vh=Vh, method=Method.EXACT if fell_back else chosen, spectrum=S,
                        power_iters=iters[0] if randomized and iters else None)


@torch.no_grad()
def singular_values(M: Tensor, *, on_warning: Warn | None = None) -> Tensor:
    """All singular values of ``M (m, n)``, descending, shape ``(min(m, n),)``; float32 (float64 kept)."""
    check_matrix(M, "M")
    (S,), _ = _with_fallback(lambda X, exact: (torch.linalg.svdvals(X),), M.detach(), on_warning)
    return S


@torch.no_grad()
def balanced_factors(svd: TruncatedSVD, r: int, *, scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """Balanced split of the top r components: ``B = U_r sqrt(S_r / scale)`` (m, r) and
    ``A = sqrt(S_r / scale) Vh_r`` (r, n), so that ``scale * B @ A = U_r diag(S_r) Vh_r``."""
    if not 0 <= r <= svd.S.shape[0]:
        raise ValueError(f"r must be in [0, {svd.S.shape[0]}] (the computed components), got {r}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite number, got {scale}")
    root = torch.sqrt(svd.S[:r].clamp_min(0) / scale)  # (r,)
    return (svd.U[:, :r] * root).contiguous(), (root.unsqueeze(1) * svd.Vh[:r]).contiguous()


@dataclass
class QRCore:
    """The QR core of ``scale * B @ A`` (B (m, r), A (r, n)): ``B = Q_B R_B``, ``A^T = Q_A R_A`` (reduced QR) and
    ``core = scale * R_B @ R_A^T``, which has the product's singular values and Frobenius norm."""

    core: Tensor  # (p, q); p = min(m, r), q = min(n, r)
    R_B: Tensor  # (p, r)
    R_A: Tensor  # (q, r)
    Q_B: Tensor | None = None  # (m, p) orthonormal columns; None unless asked for
    Q_A: Tensor | None = None  # (n, q)


def _check_chain(B: Tensor, A: Tensor) -> None:
    check_matrix(B, "B")
    check_matrix(A, "A")
    if B.shape[1] != A.shape[0]:
        raise ValueError(f"B {tuple(B.shape)} and A {tuple(A.shape)} do not chain: B is (m, r), A is (r, n)")


@torch.no_grad()
def qr_core(B: Tensor, A: Tensor, *, scale: float = 1.0, dtype: torch.dtype | None = None, device=None,
            orthonormal: bool = False) -> QRCore:
    """The QR core of ``scale * B @ A`` (:class:`QRCore`), the one step every product-free computation on a
    low-rank product starts from (:func:`qr_core_svd`; resize and merge; ``norms.lowrank_frobenius_norm``).

    ``dtype``: of the QRs (default float32, float64 kept); ``device``: B's unless given. ``orthonormal``: also
    form ``Q_B`` and ``Q_A`` (to lift singular vectors of the core); without it only the R factors are computed
    (LAPACK's R-only QR, cheaper, the same R). Works for r > m or r > n and rank-deficient factors."""
    _check_chain(B, A)
    work = dtype or work_dtype(B, A)
    device = B.device if device is None else device
    B = B.detach().to(device=device, dtype=work)
    A = A.detach().to(device=device, dtype=work)
    mode = "reduced" if orthonormal else "r"
    Q_B, R_B = torch.linalg.qr(B, mode=mode)  # (m, p), (p, r)
    Q_A, R_A = torch.linalg.qr(A.mT, mode=mode)  # (n, q), (q, r)
    core = scale * (R_B @ R_A.mT)  # (p, q)
    return QRCore(core, R_B, R_A, Q_B if orthonormal else None, Q_A if orthonormal else None)


@torch.no_grad()
def qr_core_svd(B: Tensor, A: Tensor, *, scale: float = 1.0, on_warning: Warn | None = None) -> TruncatedSVD:
    """Exact SVD of ``scale * B @ A`` (B (m, r), A (r, n)) without forming the (m, n) product.

    SVD of the :func:`qr_core` ``scale * R_B @ R_A^T = U_c S V_c^T``, then ``U = Q_B U_c`` and
    ``Vh = V_c^T Q_A^T``. Works for r > m or r > n (the core is then rectangular) and rank-deficient factors.
    Returns ``min(m, n, r)`` components, signs fixed as in :func:`truncated_svd`; float32 (float64 kept).
    """
    qr = qr_core(B, A, scale=scale, orthonormal=True)
    (Uc, S, Vch), _ = _with_fallback(lambda X, exact: torch.linalg.svd(X, full_matrices=False), qr.core, on_warning)
    U, Vh = fix_signs(qr.Q_B @ Uc, Vch @ qr.Q_A.mT)  # (m, min(p, q)), (min(p, q), n)
    return TruncatedSVD(U=U, S=S.contiguous(), Vh=Vh, method=Method.EXACT)


# --------------------------------------------------------------------------- factors


@torch.no_grad()
def concat_factors(parts: Sequence[tuple[Tensor, Tensor, float]]) -> tuple[Tensor, Tensor]:
    """``[(B_i (m, r_i), A_i (r_i, n), coef_i)]`` -> ``B = [coef_1 B_1 | coef_2 B_2 ...]`` (m, sum r) and
    ``A = [A_1; A_2; ...]`` (sum r, n), so that ``B @ A = sum_i coef_i B_i @ A_i`` exactly.
    float32 (float64 if any factor is)."""
    if not parts:
        raise ValueError("concat_factors needs at least one (B, A, coef) part")
    work = work_dtype(*(t for B, A, _ in parts for t in (B, A)))
    device = parts[0][0].device
    m, n = parts[0][0].shape[0], parts[0][1].shape[1]
    for i, (B, A, _) in enumerate(parts):
        if B.ndim != 2 or A.ndim != 2 or B.shape[0] != m or A.shape[1] != n or B.shape[1] != A.shape[0]:
            raise ValueError(f"part {i}: B {tuple(B.shape)} and A {tuple(A.shape)} do not fit ({m}, r) and (r, {n})")
    Bs = [B.detach().to(device=device, dtype=work) * float(coef) for B, _, coef in parts]
    As = [A.detach().to(device=device, dtype=work) for _, A, _ in parts]
    return torch.cat(Bs, dim=1), torch.cat(As, dim=0)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> cuda when available else cpu; ``"cpu"``/``"cuda"``/``"cuda:N"`` checked to exist."""
    if isinstance(device, str) and device.strip().lower() == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise InvalidOption(f"--device {device!r} is not a device: use cpu, cuda or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidOption(f"--device {device} asked for but CUDA is not available: use --device cpu or auto")
    return dev
