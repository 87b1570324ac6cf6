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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .adapter import Adapter, LoraModule, ModuleKind, matrix_view, module_name
from .checkpoint import Checkpoint, as_checkpoint, pair_tensors
from .errors import InvalidOption, NonFiniteWeight, NumericalError
from .extract_budget import extract_with_budget
from .layers import compile_filters, plan_layers, relative_change
from .memory import stream_large_buffers
from .linalg import Method, RankRule, balanced_factors, frobenius_error, frobenius_norm, resolve_device, truncated_svd
from .prefetch import prefetch
from .report import MAX_SINGULAR_VALUES, AdapterResult, LayerRecord, Progress, Report, Warn, summarize

__all__ = ["ExtractResult", "extract", "Progress"]


ExtractResult = AdapterResult  # the adapter and its report


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
    conv_rule: RankRule | None = None  # --conv-rank: the rule for conv kernels (default: rule)

    def rule_for(self, kind: ModuleKind) -> RankRule:
        return self.conv_rule if kind is ModuleKind.CONV and self.conv_rule is not None else self.rule


@dataclass
class _Delta:
    """One layer's delta, ready to factor: dW in its 2-D matrix view, float32, on the CPU."""

    name: str  # tensor name (``...weight``)
    matrix: Tensor  # (out, in_flat) float32
    weight_shape: tuple[int, ...]
    dtype: torch.dtype  # the tuned tensor's stored dtype (default output dtype)
    kind: ModuleKind


def _deltas(base: Checkpoint, tuned: Checkpoint, selected: dict[str, ModuleKind]) -> Iterator[_Delta]:
    """Read each pair and subtract (run in the read-ahead thread): only dW is held, never W0 and W' both."""
    for name, kind in selected.items():
        W1 = tuned.get(name)  # a fresh buffer we own, so it may be changed in place
        dtype, shape = W1.dtype, tuple(W1.shape)
        # float32 math whatever the stored dtype: bf16/fp16 differences lose digits otherwise
        dW = W1.float().sub_(base.get(name))  # in place: W' and dW are never both held (float32 input)
        if not torch.isfinite(dW).all():
            _check_finite(base.get(name), f"base tensor {name}")
            _check_finite(tuned.get(name), f"tuned tensor {name}")
            _check_finite(dW, f"delta of {name}")
        del W1
        yield _Delta(name, matrix_view(dW, kind).contiguous(), shape, dtype, kind)  # (out, in_flat)
        del dW


def _factor_layer(delta: _Delta, opts: _Options, warn: Warn | None) -> tuple[LoraModule, LayerRecord] | None:
    """Factor one layer's delta; None when the delta is exactly zero or the rule keeps nothing."""
    dW = delta.matrix.to(opts.device)  # (out, in_flat)
    norm = frobenius_norm(dW)
    if norm == 0.0:
        return None
    mod = module_name(delta.name)
    rule = opts.rule_for(delta.kind)
    k = rule.needed_k(tuple(dW.shape))
    svd = truncated_svd(dW, k, method=opts.method, oversample=opts.oversample, n_iter=opts.n_iter, seed=opts.seed,
                        on_warning=(lambda msg: warn(f"{mod}: {msg}")) if warn else None)
    r = rule.choose(svd.S, total_energy=norm**2)
    if r == 0:
        return None
    alpha = float(opts.alpha) if opts.alpha is not None else float(r)
    scale = alpha / r
    B, A = balanced_factors(svd, r, scale=scale)  # (out, r), (r, in_flat)
    out_dtype = opts.dtype or delta.dtype
    B, A = B.to(out_dtype), A.to(out_dtype)
    if not (torch.isfinite(B).all() and torch.isfinite(A).all()):
        raise NumericalError(f"{mod}: factors overflow {out_dtype} when cast: pass --dtype float32")
    err = frobenius_error(dW, B.float(), A.float(), scale=scale)  # measured on the factors as written
    S = (svd.spectrum if svd.spectrum is not None else svd.S).double()
    record = LayerRecord(
        name=mod, shape=delta.weight_shape, rank=r, delta_norm=norm,
        singular_values=[float(s) for s in S[:MAX_SINGULAR_VALUES]],
        retained_energy=min(1.0, float((S[:r] ** 2).sum()) / norm**2), rel_error=err / norm,
        params=int(B.numel() + A.numel()), weight_params=int(dW.numel()), extra={"method": svd.method.value},
    )
    module = LoraModule(B=B.cpu(), A=A.cpu(), alpha=alpha, kind=delta.kind, weight_shape=delta.weight_shape)
    return module, record


@torch.no_grad()
def extract(
    base,
    tuned,
    *,
    rule: RankRule | None = None,
    budget: int | None = None,
    method: Method | str = Method.AUTO,
    alpha: float | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    conv_rank: int | None = None,
    full_modules: Sequence[str] = (),
    embeddings: bool = True,
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
    dtype. ``warn`` receives one-line warnings (skipped tensors, SVD fallbacks). ``budget``: total adapter
    parameters, spread over layers by :mod:`~lowrank_tools.extract_budget` (``rule`` then only gives the cap).
    ``conv_rank``: the rank (or cap) for conv kernels, default that of ``rule``. ``full_modules``: regexes of
    modules saved whole (PEFT ``modules_to_save``). ``embeddings=False`` leaves embeddings out (kohya targets).
    Tied weights (an ``lm_head`` that is the embedding) are factored once and carried on both sides.
    """
    start = time.perf_counter()
    if rule is None and budget is None:
        raise InvalidOption("no rank rule: pass --rank, --energy, --sv-ratio, --threshold or --budget")
    stream_large_buffers()
    if alpha is not None and not (math.isfinite(alpha) and alpha > 0):
        raise InvalidOption(f"--alpha {alpha} must be a positive number")
    include, exclude = compile_filters(include, "--include"), compile_filters(exclude, "--exclude")
    base_ckpt, tuned_ckpt = as_checkpoint(base), as_checkpoint(tuned)
    pairing = pair_tensors(base_ckpt, tuned_ckpt, strict=strict)
    opts = _Options(rule=rule, method=Method(method), alpha=alpha, dtype=dtype, device=resolve_device(device),
                    seed=seed, oversample=oversample, n_iter=n_iter, conv_rule=_conv_rule(rule, budget, conv_rank))
    plan = plan_layers(base_ckpt, tuned_ckpt, pairing, include=include, exclude=exclude, full_modules=full_modules,
                       embeddings=embeddings)
    pairing = plan.unsaved(pairing)  # tensors saved whole are not "skipped"
    if warn and pairing.warning():
        warn(pairing.warning())
    selected, skipped, one_d = plan.layers, plan.skipped, plan.one_d
    modules, records, zero = {}, [], []
    selected_names = list(selected)
    deltas = prefetch(_deltas(base_ckpt, tuned_ckpt, selected))
    if budget is not None:  # one pass of top-K SVDs, allocate_budget, truncate; it consumes every delta
        shapes = {name: tuned_ckpt.shape(name) for name in selected}
        modules, records, zero = extract_with_budget(deltas, shapes, budget=budget, opts=opts, progress=progress,
                                                     warn=warn)
    for i, delta in enumerate(deltas):  # with --budget nothing is left to iterate
        if progress:
            progress(i, len(selected), module_name(delta.name))
        out = _factor_layer(delta, opts, warn)
        del delta  # the next delta is being read meanwhile: hold one at a time here
        if out is None:
            zero.append(module_name(selected_names[i]))
            continue
        modules[out[1].name], rec = out
        records.append(rec)
    if progress:
        progress(len(selected), len(selected), "")
    changed = {n: relative_change(base_ckpt.get(n), tuned_ckpt.get(n)) for n in one_d}
    skipped["zero delta or nothing kept"] = zero
    full = plan.finish(modules, tuned_ckpt)  # tied heads beside their embedding; tensors saved whole
    adapter = Adapter(modules=modules, full_tensors=full, base_model=_base_name(base), source_format="extract")
    report = Report(command="extract", layers=records, summary=summarize(records, wall_time=time.perf_counter() - start),
                    skipped={k: v for k, v in skipped.items() if v},
                    notes=([pairing.warning()] if pairing.warning() else []) + plan.notes,
                    changed_1d={n: v for n, v in changed.items() if v > 0})
    return ExtractResult(adapter=adapter, report=report)


def _conv_rule(rule: RankRule | None, budget: int | None, conv_rank: int | None) -> RankRule | None:
    """--conv-rank: the rule with conv kernels' own rank (or cap); None when not given."""
    if conv_rank is None:
        return None
    if isinstance(conv_rank, bool) or not isinstance(conv_rank, int) or conv_rank < 1:
        raise InvalidOption(f"--conv-rank {conv_rank!r} is outside [1, inf): use a whole number of 1 or more")
    if budget is not None or rule is None:
        raise InvalidOption("--conv-rank cannot be combined with --budget: the budget decides every rank")
    return replace(rule, rank=conv_rank)


def _base_name(base) -> str | None:
    """base_model_name_or_path: the base checkpoint's config ``_name_or_path``, else its path."""
    ckpt_config = getattr(base, "config", None) or {}
    name = ckpt_config.get("_name_or_path") if isinstance(ckpt_config, dict) else None
    if name:
        return str(name)
    return str(base) if isinstance(base, (str,)) or hasattr(base, "__fspath__") else None
