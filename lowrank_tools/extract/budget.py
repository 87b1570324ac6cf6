"""extract --budget N: spread ranks over layers to minimise the total squared error within N parameters.

One pass over the checkpoint, then the allocation, then the factors:

    pass       per layer: top-K SVD  dW ~= U_K S_K Vh_K  (randomized when the method allows), plus
               ||dW||_F and the tail ||dW - U_K S_K Vh_K||_F measured while dW is at hand; dW is dropped.
               K = the --rank cap if given, else min(min side, 256): ranks above 256 are rarely worth
               their parameters, and K bounds the memory kept: K (out + in) float32 values per layer.
    allocate   r_l = allocate_budget(layers, N, max_rank=--rank): greedy by s_i^2 / (out + in), see budget.py;
               a dynamic rule (--energy, --sv-ratio, --threshold) caps each layer first, as in resize and merge
    truncate   B, A = balanced split of the top r_l (alpha = r_l unless --alpha), cast to the output dtype
    error      ||dW - s B A||_F^2 = ||dW - U_K S_K Vh_K||_F^2 + ||U_K S_K Vh_K - s B A||_F^2

The error identity: the tail T = dW - U_K S_K Vh_K is orthogonal to every matrix whose columns lie in
span(U_K) or whose rows lie in span(Vh_K). Exact method: T = U_tail S_tail Vh_tail, orthogonal on both
sides. Randomized (Halko et al. Alg. 5.1): U_K S_K Vh_K = U_K U_K^T dW (or dW V_K V_K^T for wide
matrices), an orthogonal projection, so T is orthogonal on that side; the identity is then exact as well
and what is approximate is only how close span(U_K) comes to the optimal one (the range finder's
accuracy). B A lies in those spans before the cast; the cast to the output dtype adds a rounding E
whose cross term 2<E, T> (random signs, ~||E|| ||T|| / sqrt(out * in)) is left out. The second term is
computed from the factors (:func:`~lowrank_tools.norms.lowrank_frobenius_diff`), never densely.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..adapter import LoraModule, ModuleKind, module_name
from ..linalg.budget import LayerSpectrum, allocate_budget
from ..errors import NumericalError
from ..linalg.svd import Method, TruncatedSVD, balanced_factors, truncated_svd
from ..linalg.norms import frobenius_error, frobenius_norm, lowrank_frobenius_diff
from ..report import MAX_SINGULAR_VALUES, LayerRecord, Progress, Warn

__all__ = ["BUDGET_TOP_K", "budget_top_k", "check_budget", "extract_with_budget"]

BUDGET_TOP_K = 256  # singular values computed per layer under --budget when --rank gives no cap



@dataclass
class _Top:
    """What the pass keeps of one layer: its top-K SVD, ||dW||_F and the tail's norm."""

    name: str  # module name
    kind: ModuleKind
    weight_shape: tuple[int, ...]
    dtype: torch.dtype  # the tuned tensor's stored dtype
    U: Tensor  # (out, K) float32, CPU
    S: Tensor  # (K,)
    Vh: Tensor  # (K, in_flat)
    norm: float  # ||dW||_F
    tail: float  # ||dW - U_K S_K Vh_K||_F
    head: list[float]  # leading singular values for the report (all computed ones, at most 64)
    method: str


def budget_top_k(shape: Sequence[int], cap: int | None) -> int:
    """K for a weight of ``shape`` (read as (out, in_flat)): ``cap`` if given, else 256; at most the smaller side."""
    side = min(int(shape[0]), math.prod(int(d) for d in shape[1:]))
    return min(side, cap if cap is not None else BUDGET_TOP_K)


def _matrix_shape(shape: Sequence[int]) -> tuple[int, int]:
    return int(shape[0]), math.prod(int(d) for d in shape[1:])


def check_budget(budget: int, rule, shapes: Mapping[str, Sequence[int]]) -> int | None:
    """Fail before any reading on a budget below one rank unit of the cheapest layer (the message of
    :func:`allocate_budget`). Returns the rank cap (--rank) or None."""
    cap = rule.cap if rule is not None else None
    placeholders = [LayerSpectrum(module_name(n), _matrix_shape(s), [1.0]) for n, s in shapes.items()]
    allocate_budget(placeholders, budget, max_rank=cap)  # validation only: raises what the allocation would
    return cap


def _top_layer(delta, cap: int | None, opts, warn: Warn | None) -> _Top | None:
    """The pass for one layer (``delta``: name, matrix (out, in_flat) float32, weight_shape, dtype, kind)."""
    dW = delta.matrix.to(opts.device)  # (out, in_flat)
    norm = frobenius_norm(dW)
    if norm == 0.0:
        return None
    mod = module_name(delta.name)
    k = budget_top_k(dW.shape, cap)
    svd = truncated_svd(dW, k, method=opts.method, oversample=opts.oversample, n_iter=opts.n_iter, seed=opts.seed,
                        on_warning=(lambda msg: warn(f"{mod}: {msg}")) if warn else None)
    tail = frobenius_error(dW, svd.U * svd.S, svd.Vh)  # measured now, not ||dW||^2 - sum S^2: no cancellation
    spectrum = svd.spectrum if svd.spectrum is not None else svd.S
    return _Top(name=mod, kind=delta.kind, weight_shape=tuple(delta.weight_shape), dtype=delta.dtype,
                U=svd.U.cpu(), S=svd.S.cpu(), Vh=svd.Vh.cpu(), norm=norm, tail=tail, method=svd.method.value,
                head=[float(s) for s in spectrum[:MAX_SINGULAR_VALUES].double()])


def _truncate(top: _Top, r: int, opts) -> tuple[LoraModule, LayerRecord]:
    """Factors of rank r from the kept top-K SVD, cast, and their error by the identity of the module docstring."""
    alpha = float(opts.alpha) if opts.alpha is not None else float(r)
    scale = alpha / r
    svd = TruncatedSVD(U=top.U, S=top.S, Vh=top.Vh, method=Method(top.method))
    B, A = balanced_factors(svd, r, scale=scale)  # (out, r), (r, in_flat)
    out_dtype = opts.dtype or top.dtype
    B, A = B.to(out_dtype), A.to(out_dtype)
    if not (torch.isfinite(B).all() and torch.isfinite(A).all()):
        raise NumericalError(f"{top.name}: factors overflow {out_dtype} when cast: pass --dtype float32")
    head = lowrank_frobenius_diff(top.U * top.S, top.Vh, 1.0, B.float(), A.float(), scale)  # (top K) - (written)
    err = math.sqrt(top.tail**2 + head**2)
    retained = float((top.S[:r].double() ** 2).sum()) / top.norm**2
    record = LayerRecord(name=top.name, shape=top.weight_shape, rank=r, delta_norm=top.norm,
                         singular_values=top.head, retained_energy=min(1.0, retained), rel_error=err / top.norm,
                         params=int(B.numel() + A.numel()), weight_params=math.prod(top.weight_shape),
                         extra={"method": top.method, "budget_k": int(top.S.shape[0])})
    module = LoraModule(B=B, A=A, alpha=alpha, kind=top.kind, weight_shape=top.weight_shape)
    return module, record


def _capped(top: _Top, rule) -> list[float]:
    """The values the budget may spend on: the top K, cut where a dynamic rule (--energy, --sv-ratio,
    --threshold) stops for this layer, as resize and merge do; --energy counts the whole ||dW||_F^2."""
    if rule is None or not rule.dynamic:
        return top.S.tolist()
    return top.S[:rule.choose(top.S, total_energy=top.norm**2)].tolist()


def extract_with_budget(deltas: Iterable, shapes: Mapping[str, Sequence[int]], *, budget: int, opts,
                        progress: Progress | None = None, warn: Warn | None = None,
                        exchange: Callable[[list[LayerSpectrum]], list[LayerSpectrum]] | None = None,
                        tied: frozenset[str] = frozenset(),
                        ) -> tuple[dict[str, LoraModule], list[LayerRecord], list[str]]:
    """``(modules, records, left out)`` for ``deltas`` (one per tensor name of ``shapes``, in order) within
    ``budget`` parameters. ``opts``: extract's options (rule, method, alpha, dtype, device, seed,
    oversample, n_iter). Layers whose delta is zero or that get rank 0 are left out (their names returned).
    ``progress`` hears (i, total, name) as each layer's pass starts; the caller reports the end.
    ``exchange`` (distributed extract): ``deltas`` are this rank's share of ``shapes``; it turns this rank's
    spectra into every rank's, in the order of ``shapes``, so that every rank allocates the same ranks.
    ``tied``: embedding modules whose factors are written twice (also on the tied output head): each of
    their rank units costs twice, so the file stays within the budget."""
    cap = check_budget(budget, opts.rule, shapes)
    tops, zero = [], []
    for i, delta in enumerate(deltas):
        name = module_name(delta.name)
        if progress:
            progress(i, len(shapes), name)
        top = _top_layer(delta, cap, opts, warn)
        del delta  # the pass keeps the top-K SVD only
        if top is None:
            zero.append(name)
        else:
            tops.append(top)
    spectra = [LayerSpectrum(t.name, _matrix_shape(t.weight_shape), _capped(t, opts.rule),
                             cost=2 * sum(_matrix_shape(t.weight_shape)) if t.name in tied else None) for t in tops]
    if exchange is not None:
        spectra = exchange(spectra)
    ranks = allocate_budget(spectra, budget, max_rank=cap) if spectra else {}
    modules, records = {}, []
    for top in tops:
        if ranks[top.name] == 0:
            zero.append(top.name)
            continue
        modules[top.name], record = _truncate(top, ranks[top.name], opts)
        records.append(record)
    return modules, records, zero
