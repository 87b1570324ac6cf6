"""extract: LoRA factors from a base checkpoint W0 and a fully fine-tuned one W'.

Per layer, streaming one tensor pair at a time (the next pair is read in a background thread
while the current one is factored):

    dW = W' - W0                     in float32, whatever the stored dtype
    dW ~= U_r S_r V_r^T              truncated SVD (exact, or randomized range finder)
    B = U_r sqrt(S_r / scale),  A = sqrt(S_r / scale) V_r^T,   scale = alpha / r
    rel_error = ||dW - scale*B@A||_F / ||dW||_F   measured on the factors as written (after the cast)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .adapter import Adapter, LoraModule, ModuleKind, matrix_view, module_name
from .checkpoint import Checkpoint, as_checkpoint, pair_tensors
from .errors import InvalidOption, NonFiniteWeight, NumericalError
from .layers import compile_filters, relative_change, select_layers
from .linalg import Method, RankRule, balanced_factors, frobenius_error, resolve_device, truncated_svd
from .prefetch import prefetch
from .report import MAX_SINGULAR_VALUES, LayerRecord, Report, summarize

__all__ = ["ExtractResult", "extract", "Progress"]

Progress = Callable[[int, int, str], None]  # (done, total, current name)
Warn = Callable[[str], None]

@dataclass
class ExtractResult:
    adapter: Adapter
    report: Report


def _check_finite(t: Tensor, what: str) -> None:
    if not torch.isfinite(t).all():
        bad = int((~torch.isfinite(t)).sum())
        raise NonFiniteWeight(f"{what} holds {bad} NaN/Inf values: repair or re-export the checkpoint")


@dataclass(frozen=True)
class _Options:
    rule: RankRule
    method: Method
    alpha: float | None
    dtype: torch.dtype | None
    device: torch.device
    seed: int
    oversample: int
    n_iter: int


def _factor_layer(name: str, W0: Tensor, W1: Tensor, kind: ModuleKind, opts: _Options,
                  warn: Warn | None) -> tuple[LoraModule, LayerRecord] | None:
    """Factor one layer's delta; None when the delta is exactly zero or the rule keeps nothing."""
    # float32 math whatever the stored dtype: bf16/fp16 differences lose digits otherwise
    dW = matrix_view(W1.to(opts.device, torch.float32) - W0.to(opts.device, torch.float32), kind)  # (out, in_flat)
    _check_finite(dW, f"delta of {name}")
    norm = float(torch.linalg.vector_norm(dW, dtype=torch.float64))
    if norm == 0.0:
        return None
    mod = module_name(name)
    k = opts.rule.needed_k(tuple(dW.shape))
    svd = truncated_svd(dW, k, method=opts.method, oversample=opts.oversample, n_iter=opts.n_iter, seed=opts.seed,
                        on_warning=(lambda msg: warn(f"{mod}: {msg}")) if warn else None)
    r = opts.rule.choose(svd.S, total_energy=norm**2)
    if r == 0:
        return None
    alpha = float(opts.alpha) if opts.alpha is not None else float(r)
    scale = alpha / r
    B, A = balanced_factors(svd, r, scale=scale)  # (out, r), (r, in_flat)
    out_dtype = opts.dtype or W1.dtype
    B, A = B.to(out_dtype), A.to(out_dtype)
    if not (torch.isfinite(B).all() and torch.isfinite(A).all()):
        raise NumericalError(f"{mod}: factors overflow {out_dtype} when cast: pass --dtype float32")
    err = frobenius_error(dW, B.float(), A.float(), scale=scale)
    S = (svd.spectrum if svd.spectrum is not None else svd.S).double()
    record = LayerRecord(
        name=mod, shape=tuple(W0.shape), rank=r, delta_norm=norm,
        singular_values=[float(s) for s in S[:MAX_SINGULAR_VALUES]],
        retained_energy=min(1.0, float((S[:r] ** 2).sum()) / norm**2), rel_error=err / norm,
        params=int(B.numel() + A.numel()), weight_params=int(W0.numel()), extra={"method": svd.method.value},
    )
    module = LoraModule(B=B.cpu(), A=A.cpu(), alpha=alpha, kind=kind, weight_shape=tuple(W0.shape))
    return module, record


def _pairs(base: Checkpoint, tuned: Checkpoint, names: Sequence[str]) -> Iterator[tuple[str, Tensor, Tensor]]:
    for name in names:
        yield name, base.get(name), tuned.get(name)


@torch.no_grad()
def extract(
    base,
    tuned,
    *,
    rule: RankRule,
    method: Method | str = Method.AUTO,
    alpha: float | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    strict: bool = False,
    seed: int = 0,
    oversample: int = 10,
    n_iter: int = 4,
    progress: Progress | None = None,
    warn: Warn | None = None,
) -> ExtractResult:
    """Extract a LoRA adapter approximating ``tuned - base`` for every adaptable weight.

    ``base`` / ``tuned``: checkpoint paths, :class:`~lowrank_tools.checkpoint.Checkpoint` objects or
    mappings of tensor name -> tensor. ``dtype`` of the written factors defaults to each tuned tensor's
    dtype. ``warn`` receives one-line warnings (skipped tensors, SVD fallbacks).
    """
    start = time.perf_counter()
    if alpha is not None and not (math.isfinite(alpha) and alpha > 0):
        raise InvalidOption(f"--alpha {alpha} must be a positive number")
    include, exclude = compile_filters(include, "--include"), compile_filters(exclude, "--exclude")
    base_ckpt, tuned_ckpt = as_checkpoint(base), as_checkpoint(tuned)
    pairing = pair_tensors(base_ckpt, tuned_ckpt, strict=strict)
    if warn and pairing.warning():
        warn(pairing.warning())
    opts = _Options(rule=rule, method=Method(method), alpha=alpha, dtype=dtype, device=resolve_device(device),
                    seed=seed, oversample=oversample, n_iter=n_iter)
    selected, skipped, one_d = select_layers(pairing.names, tuned_ckpt, include, exclude)
    modules, records, zero = {}, [], []
    for i, (name, W0, W1) in enumerate(prefetch(_pairs(base_ckpt, tuned_ckpt, selected))):
        if progress:
            progress(i, len(selected), module_name(name))
        _check_finite(W0, f"base tensor {name}")
        _check_finite(W1, f"tuned tensor {name}")
        out = _factor_layer(name, W0, W1, selected[name], opts, warn)
        if out is None:
            zero.append(module_name(name))
            continue
        modules[module_name(name)], rec = out
        records.append(rec)
    if progress:
        progress(len(selected), len(selected), "")
    changed = {n: relative_change(base_ckpt.get(n), tuned_ckpt.get(n)) for n in one_d}
    skipped["zero delta or nothing kept"] = zero
    adapter = Adapter(modules=modules, base_model=_base_name(base), source_format="extract")
    report = Report(command="extract", layers=records, summary=summarize(records, wall_time=time.perf_counter() - start),
                    skipped={k: v for k, v in skipped.items() if v},
                    notes=[pairing.warning()] if pairing.warning() else [],
                    changed_1d={n: v for n, v in changed.items() if v > 0})
    return ExtractResult(adapter=adapter, report=report)


def _base_name(base) -> str | None:
    """base_model_name_or_path: the base checkpoint's config ``_name_or_path``, else its path."""
    ckpt_config = getattr(base, "config", None) or {}
    name = ckpt_config.get("_name_or_path") if isinstance(ckpt_config, dict) else None
    if name:
        return str(name)
    return str(base) if isinstance(base, (str,)) or hasattr(base, "__fspath__") else None
