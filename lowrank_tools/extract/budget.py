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
computed from the factors (:func:`~lowrank_tools.linalg.norms.lowrank_frobenius_diff`), never densely.

With --calibration, a layer with input statistics runs the pass on ``M = dW L`` (see extract.whitening): it
keeps U_K, S_K of M, ``V_K^T L^-1`` (the rows of A before the split), the output tail sqrt(||M||^2 - sum S_K^2) and
``c_i = <U_i^T dW, (Vh_K L^-1)_i>``; the allocation reads S_K / sqrt(tokens) (the per-token output error, which
is what whitening minimises); the weight-space error of the written factors is then, without dW,
``||dW||^2 - 2 sum_{i<r} s_i c_i + s^2 ||B A||_F^2`` (the cross term on the factors before the cast).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from ..adapter import LoraModule, ModuleKind, cast_factors, matrix_shape, module_name
from ..linalg.budget import LayerSpectrum, allocate_budget
from ..errors import Warn
from .options import ExtractOptions
from .whitening import Whitening, whitened_record
from ..linalg.svd import Method, TruncatedSVD, balanced_factors, truncated_svd
from ..linalg.norms import frobenius_error, lowrank_frobenius_diff
from ..linalg.whiten import whitened_svd
from ..report import MAX_SINGULAR_VALUES, LayerRecord, Progress, factor_record

__all__ = ["BUDGET_TOP_K", "budget_top_k", "check_budget", "extract_with_budget"]

BUDGET_TOP_K = 256  # singular values computed per layer under --budget when --rank gives no cap



def svd_fields(method: str, power_iters: int | None) -> dict:
    """A layer record's fields from its SVD: ``method``, and ``power_iters`` (the range finder's power iterations
    actually done, at most ``--power-iters``) where randomized."""
    return {"method": method, **({"power_iters": power_iters} if power_iters is not None else {})}


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
    output_norm: float | None = None  # whitened: ||dW L||_F (then U, S, tail are those of dW L, Vh is V^T L^-1)
    cross: Tensor | None = None  # whitened: (K,) float64 <U_i^T dW, Vh_i>, for the weight-space error
    unit: float = 1.0  # the allocation reads S * unit (whitened: 1 / sqrt(tokens))
    power_iters: int | None = None  # randomized: the power iterations done

    @property
    def energy_norm(self) -> float:
        """The norm the spectrum S is a part of: ||dW L||_F when whitened, else ||dW||_F."""
        return self.output_norm if self.output_norm is not None else self.norm


def budget_top_k(shape: tuple[int, int], cap: int | None) -> int:
    """K for a matrix of ``shape`` (out, in_flat): ``cap`` if given, else 256; at most the smaller side."""
    return min(int(shape[0]), int(shape[1]), cap if cap is not None else BUDGET_TOP_K)


def check_budget(budget: int, rule, shapes: Mapping[str, tuple[int, int]]) -> int | None:
    """Fail before any reading on a budget below one rank unit of the cheapest layer (the message of
    :func:`allocate_budget`; ``shapes``: tensor name -> (out, in_flat)). Returns the rank cap (--rank) or None."""
    cap = rule.cap if rule is not None else None
    placeholders = [LayerSpectrum(module_name(n), s, [1.0]) for n, s in shapes.items()]
    allocate_budget(placeholders, budget, max_rank=cap)  # validation only: raises what the allocation would
    return cap


def _top_layer(delta, cap: int | None, opts: ExtractOptions, warn: Warn | None,
               whitening: Whitening | None = None) -> _Top | None:
    """The pass for one layer (``delta``: name, matrix (out, in_flat) float32, weight_shape, dtype, kind, norm); on
    ``dW L`` when ``whitening`` has the layer's input statistics."""
    dW = delta.matrix.to(opts.device)  # (out, in_flat)
    norm = delta.norm  # measured when the delta was made
    if norm == 0.0:
        return None
    mod = module_name(delta.name)
    w = whitening.get(mod) if whitening is not None else None
    if w is not None:
        return _whitened_top(delta, dW, norm, w, whitening.unit(mod), cap, opts, warn)
    svd = truncated_svd(dW, budget_top_k(dW.shape, cap), method=opts.method, oversample=opts.oversample,
                        n_iter=opts.n_iter, seed=opts.seed, norm=norm,
                        on_warning=(lambda msg: warn(f"{mod}: {msg}")) if warn else None)
    tail = frobenius_error(dW, svd.U * svd.S, svd.Vh)  # measured now, not ||dW||^2 - sum S^2: no cancellation
    unit = whitening.plain_unit() if whitening is not None else 1.0
    spectrum = svd.spectrum if svd.spectrum is not None else svd.S
    return _Top(name=mod, kind=delta.kind, weight_shape=tuple(delta.weight_shape), dtype=delta.dtype,
                U=svd.U.cpu(), S=svd.S.cpu(), Vh=svd.Vh.cpu(), norm=norm, tail=tail, method=svd.method.value,
                head=[float(s) for s in spectrum[:MAX_SINGULAR_VALUES].double()], unit=unit,
                power_iters=svd.power_iters)


def _whitened_top(delta, dW: Tensor, norm: float, w, unit: float, cap: int | None, opts: ExtractOptions,
                  warn: Warn | None) -> _Top | None:
    """The pass on ``dW L`` (module docstring): U, S of dW L, rows V^T L^-1, the output tail, the cross terms."""
    mod = module_name(delta.name)
    svd = whitened_svd(dW, w, budget_top_k(dW.shape, cap), method=opts.method, oversample=opts.oversample,
                       n_iter=opts.n_iter, seed=opts.seed, on_warning=(lambda msg: warn(f"{mod}: {msg}")) if warn else None)
    if svd.total == 0.0:  # statistics of an input that never reached this layer: nothing changes its output
        return None
    cross = ((svd.U.double().mT @ dW.double()) * svd.rows.double()).sum(dim=1)  # (K,) <U_i^T dW, rows_i>
    tail = math.sqrt(max(svd.total**2 - float(torch.sum(svd.S.double() ** 2)), 0.0))  # exact: a projection
    spectrum = svd.spectrum if svd.spectrum is not None else svd.S
    return _Top(name=mod, kind=delta.kind, weight_shape=tuple(delta.weight_shape), dtype=delta.dtype,
                U=svd.U.cpu(), S=svd.S.cpu(), Vh=svd.rows.cpu(), norm=norm, tail=tail, method=svd.method.value,
                head=[float(s) for s in spectrum[:MAX_SINGULAR_VALUES].double()], output_norm=svd.total,
                cross=cross.cpu(), unit=unit)


def _truncate(top: _Top, r: int, opts: ExtractOptions) -> tuple[LoraModule, LayerRecord]:
    """Factors of rank r from the kept top-K SVD, cast, and their error by the identity of the module docstring."""
    alpha = float(opts.alpha) if opts.alpha is not None else float(r)
    scale = alpha / r
    svd = TruncatedSVD(U=top.U, S=top.S, Vh=top.Vh, method=Method(top.method))
    B, A = cast_factors(*balanced_factors(svd, r, scale=scale), opts.dtype or top.dtype, top.name)  # (out, r), (r, in)
    module = LoraModule(B=B, A=A, alpha=alpha, kind=top.kind, weight_shape=top.weight_shape)
    if top.cross is not None:
        return module, _whitened_truncation_record(top, r, B, A, scale)
    head = lowrank_frobenius_diff(top.U * top.S, top.Vh, 1.0, B.float(), A.float(), scale)  # (top K) - (written)
    record = factor_record(top.name, top.weight_shape, rank=r, values=top.S.double(), shown=top.head, norm=top.norm,
                           err=math.sqrt(top.tail**2 + head**2), params=B.numel() + A.numel(),
                           extra={**svd_fields(top.method, top.power_iters), "budget_k": int(top.S.shape[0])})
    return module, record


def _whitened_truncation_record(top: _Top, r: int, B: Tensor, A: Tensor, scale: float) -> LayerRecord:
    """Both errors of a whitened layer at rank r: output ``sqrt(tail^2 + sum_{i>=r} S_i^2)`` (exact before the
    cast), weight ``||dW||^2 - 2 sum_{i<r} s_i c_i + s^2 ||B A||^2`` (module docstring)."""
    S = top.S.double()
    output_err = math.sqrt(top.tail**2 + float(torch.sum(S[r:] ** 2)))
    Bd, Ad = B.double(), A.double()
    product = scale**2 * float(torch.sum((Bd.mT @ Bd) * (Ad @ Ad.mT)))  # ||s B A||_F^2 = s^2 tr(B^T B A A^T)
    err = math.sqrt(max(top.norm**2 - 2.0 * float(torch.sum(S[:r] * top.cross[:r])) + product, 0.0))
    return whitened_record(top.name, top.weight_shape, rank=r, values=S, output_norm=top.output_norm,
                           output_err=output_err, norm=top.norm, err=err, params=B.numel() + A.numel(),
                           method=top.method, extra={"budget_k": int(top.S.shape[0])})


def _capped(top: _Top, rule) -> list[float]:
    """The values the budget may spend on: the top K, cut where a dynamic rule (--energy, --sv-ratio,
    --threshold) stops for this layer, as resize and merge do; --energy counts the whole ||dW||_F^2."""
    values = top.S if rule is None or not rule.dynamic else top.S[:rule.choose(top.S, total_energy=top.energy_norm**2)]
    return (values.double() * top.unit).tolist()


def extract_with_budget(deltas: Iterable, shapes: Mapping[str, tuple[int, int]], *, opts: ExtractOptions,
                        progress: Progress | None = None, warn: Warn | None = None,
                        exchange: Callable[[list[LayerSpectrum]], list[LayerSpectrum]] | None = None,
                        tied: frozenset[str] = frozenset(), whitening: Whitening | None = None,
                        ) -> tuple[dict[str, LoraModule], list[LayerRecord], list[str]]:
    """``(modules, records, left out)`` for ``deltas`` (one per tensor name of ``shapes``: (out, in_flat), the
    matrix views, in order) within ``opts.budget`` parameters (``opts``: extract's options; the rule, method,
    alpha, dtype, device, seed, oversample and n_iter act here). Layers whose delta is zero or that get rank 0
    are left out (their names returned).
    ``progress`` hears (i, total, name) as each layer's pass starts; the caller reports the end.
    ``exchange`` (distributed extract): ``deltas`` are this rank's share of ``shapes``; it turns this rank's
    spectra into every rank's, in the order of ``shapes``, so that every rank allocates the same ranks.
    ``tied``: embedding modules whose factors are written twice (also on the tied output head): each of
    their rank units costs twice, so the file stays within the budget. ``whitening`` (--calibration): layers with
    input statistics are allocated on their per-token output error (module docstring)."""
    budget = opts.budget
    cap = check_budget(budget, opts.rule, shapes)
    tops, zero = [], []
    for i, delta in enumerate(deltas):
        name = module_name(delta.name)
        if progress:
            progress(i, len(shapes), name)
        top = _top_layer(delta, cap, opts, warn, whitening)
        del delta  # the pass keeps the top-K SVD only
        if top is None:
            zero.append(name)
        else:
            tops.append(top)
    spectra = [LayerSpectrum(t.name, matrix_shape(t.weight_shape, t.kind), _capped(t, opts.rule),
                             cost=2 * sum(matrix_shape(t.weight_shape, t.kind)) if t.name in tied else None)
               for t in tops]
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
