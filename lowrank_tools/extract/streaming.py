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
from contextlib import nullcontext
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

from ..adapter import Adapter, LoraModule, ModuleKind, cast_whole, matrix_view, module_name
from ..io.checkpoint import Checkpoint, as_checkpoint, pair_tensors
from .distributed import Share, current_share, layer_cost
from ..errors import InvalidOption, NumericalError
from .budget import budget_top_k, extract_with_budget
from ..io.layers import compile_filters, plan_layers, relative_change
from ..linalg.memory import stream_large_buffers
from ..linalg.svd import Method, RankRule, TruncatedSVD, balanced_factors, resolve_device, truncated_svd
from ..linalg.norms import check_finite, frobenius_error, frobenius_norm
from .pipeline import Stager, batch_size, batched_svds, plan_batches, staged, tf32
from ..io.prefetch import prefetch
from ..report import MAX_SINGULAR_VALUES, AdapterResult, LayerRecord, Progress, Report, Warn, summarize

__all__ = ["ExtractResult", "extract", "Progress"]


ExtractResult = AdapterResult  # the adapter and its report


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
    batch: int = 1  # layers per stacked SVD (pipeline.batch_size: 1 on the CPU)
    allow_tf32: bool = False

    def rule_for(self, kind: ModuleKind) -> RankRule:
        return self.conv_rule if kind is ModuleKind.CONV and self.conv_rule is not None else self.rule


@dataclass
class _Delta:
    """One layer's delta, ready to factor: dW in its 2-D matrix view, float32, on the device."""

    name: str  # tensor name (``...weight``)
    matrix: Tensor  # (out, in_flat) float32
    weight_shape: tuple[int, ...]
    dtype: torch.dtype  # the tuned tensor's stored dtype (default output dtype)
    kind: ModuleKind


@dataclass
class _Pair:
    """One layer as read in the read-ahead thread: W' and W0 as stored, or dW already (float32 pairs)."""

    name: str  # tensor name (``...weight``)
    kind: ModuleKind
    tuned: Tensor | None  # W' (a fresh CPU buffer we own), or dW when ``base`` is None; None once consumed
    base: Tensor | None  # W0; None when float32 W' was turned into dW as it was read
    dtype: torch.dtype  # the tuned tensor's stored dtype (default output dtype)
    sources: tuple[Checkpoint, Checkpoint]  # (base, tuned): read again to name a NaN/Inf


def _read_pairs(base: Checkpoint, tuned: Checkpoint, selected: dict[str, ModuleKind]) -> Iterator[_Pair]:
    """Runs in the read-ahead thread. float32 pairs are subtracted here, in place and on this one thread (numpy:
    no OpenMP team to slow the factoring's small QRs down), so that only dW waits in the queue; other dtypes
    wait as stored (together no larger than their float32 dW) and are converted by the consumer."""
    for name, kind in selected.items():
        W1, W0 = tuned.get(name), base.get(name)
        dtype = W1.dtype
        if W1.dtype == W0.dtype == torch.float32:
            with np.errstate(all="ignore"):  # an overflow is reported by _subtract, naming the tensor
                np.subtract(W1.numpy(), W0.numpy(), out=W1.numpy())
            W0 = None
        yield _Pair(name, kind, W1, W0, dtype, (base, tuned))
        del W1, W0


def _subtract(pair: _Pair, stager: Stager, out: Tensor | None = None) -> _Delta:
    """dW = W' - W0 in float32 on the stager's device, in its (out, in_flat) matrix view; NaN/Inf named.

    Written into ``out`` when given (a slot of a batch), else in place of a float32 W' (read into a fresh
    buffer), else into the stager's scratch buffer (valid until the next layer): no per-layer allocation."""
    shape = tuple(pair.tuned.shape)
    V1 = matrix_view(stager.place(pair.tuned), pair.kind)  # (out, in_flat)
    if out is None and V1.dtype == torch.float32 and V1.is_contiguous():  # a fresh buffer of ours either way
        dW = V1
    else:  # float32 math whatever the stored dtype: bf16/fp16 differences lose digits otherwise
        dW = (out if out is not None else stager.scratch(V1.shape)).copy_(V1)
    if pair.base is not None:
        dW.sub_(matrix_view(stager.place(pair.base), pair.kind))
    del V1
    pair.tuned = pair.base = None  # the read-ahead queue still holds the pair until the next one is asked for
    if not torch.isfinite(dW.sum()):  # NaN/Inf reach the sum (10x cheaper than isfinite(dW).all()); an
        # overflowing sum of finite values only costs the checks below, which then find nothing
        check_finite(pair.sources[0].get(pair.name), f"base tensor {pair.name}")
        check_finite(pair.sources[1].get(pair.name), f"tuned tensor {pair.name}")
        check_finite(dW, f"delta of {pair.name}")
    return _Delta(pair.name, dW, shape, pair.dtype, pair.kind)


def _factor_layer(delta: _Delta, opts: _Options, warn: Warn | None, svd: TruncatedSVD | None = None,
                  ) -> tuple[LoraModule, LayerRecord] | None:
    """Factor one layer's delta (its top-k ``svd`` if already computed in a batch); None when the delta is
    exactly zero or the rule keeps nothing."""
    dW = delta.matrix.to(opts.device)  # (out, in_flat)
    norm = frobenius_norm(dW)
    if norm == 0.0:
        return None
    mod = module_name(delta.name)
    rule = opts.rule_for(delta.kind)
    k = rule.needed_k(tuple(dW.shape))
    if svd is None:
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
    distributed: bool | None = None,
    allow_tf32: bool = False,
    svd_batch: int | None = None,
    progress: Progress | None = None,
    warn: Warn | None = None,
) -> ExtractResult:
    """Extract a LoRA adapter approximating ``tuned - base`` for every adaptable weight.

    ``base`` / ``tuned``: checkpoint paths, :class:`~lowrank_tools.checkpoint.Checkpoint` objects or
    mappings of tensor name -> tensor. ``dtype`` of the written factors defaults to each tuned tensor's
    dtype. ``warn`` receives one-line warnings (skipped tensors, SVD fallbacks). ``budget``: total adapter
    parameters, spread over layers by :mod:`~lowrank_tools.extract_budget` (``rule`` then caps each layer: its
    rank, or where its dynamic rule stops within the top K computed).
    ``conv_rank``: the rank (or cap) for conv kernels, default that of ``rule``. ``full_modules``: regexes of
    modules saved whole (PEFT ``modules_to_save``). ``embeddings=False`` leaves embeddings out (kohya targets).
    Tied weights (an ``lm_head`` that is the embedding) are factored once and carried on both sides.
    ``distributed``: split the layers over the processes of a torch.distributed group (None: when one of
    more than one process is initialised), see :mod:`~lowrank_tools.distributed`; rank 0 returns the whole
    result, other ranks ``primary=False`` with an empty adapter. ``allow_tf32``: let CUDA matmuls use TF32
    (off by default, restored after). ``svd_batch``: same-shape layers per stacked SVD (default: 1 on the
    CPU, :data:`~lowrank_tools.pipeline.CUDA_BATCH` on CUDA).
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
    dev = resolve_device(device)
    opts = _Options(rule=rule, method=Method(method), alpha=alpha, dtype=dtype, device=dev, seed=seed,
                    oversample=oversample, n_iter=n_iter, conv_rule=_conv_rule(rule, budget, conv_rank),
                    batch=batch_size(dev, svd_batch), allow_tf32=bool(allow_tf32))
    plan = plan_layers(base_ckpt, tuned_ckpt, pairing, include=include, exclude=exclude, full_modules=full_modules,
                       embeddings=embeddings)
    pairing = plan.unsaved(pairing)  # tensors saved whole are not "skipped"
    if warn and pairing.warning():
        warn(pairing.warning())
    selected, skipped, one_d = plan.layers, plan.skipped, plan.one_d
    share = current_share(distributed)
    with share or nullcontext():
        modules, records, zero = _factor_layers(base_ckpt, tuned_ckpt, selected, opts, budget=budget, share=share,
                                                progress=progress, warn=warn,
                                                tied=frozenset(module_name(e) for e in plan.tied))
    if share is not None and not share.primary:  # rank 0 has the factors and writes; nothing more to do here
        summary = summarize(records, wall_time=time.perf_counter() - start, distributed_rank=share.rank)
        return ExtractResult(adapter=Adapter(), report=Report(command="extract", layers=records, summary=summary),
                             primary=False)
    changed = {n: relative_change(base_ckpt.get(n), tuned_ckpt.get(n)) for n in one_d}
    skipped["zero delta or nothing kept"] = zero
    full = plan.finish(modules, tuned_ckpt)  # tied heads beside their embedding; tensors saved whole
    _count_tied_heads(records, plan, modules)
    adapter = Adapter(modules=modules, full_tensors=cast_whole(full, dtype), base_model=_base_name(base),
                      source_format="extract")
    more = {"processes": share.world_size} if share is not None else {}
    summary = summarize(records, wall_time=time.perf_counter() - start, **more)
    report = Report(command="extract", layers=records, summary=summary,
                    skipped={k: v for k, v in skipped.items() if v},
                    notes=([pairing.warning()] if pairing.warning() else []) + plan.notes,
                    changed_1d={n: v for n, v in changed.items() if v > 0})
    return ExtractResult(adapter=adapter, report=report)


def _count_tied_heads(records: list[LayerRecord], plan, modules: dict[str, LoraModule]) -> None:
    """A tied embedding's record also counts the head's copy of its factors: both are in the file."""
    by_name = {r.name: r for r in records}
    for emb, tie in plan.tied.items():
        record = by_name.get(module_name(emb))
        if record is not None and tie.head in modules:
            record.params += modules[tie.head].params
            record.extra["tied_head"] = tie.head


def _factor_layers(base: Checkpoint, tuned: Checkpoint, selected: dict[str, ModuleKind], opts: _Options, *,
                   budget: int | None, share: Share | None, progress: Progress | None, warn: Warn | None,
                   tied: frozenset[str] = frozenset(),
                   ) -> tuple[dict[str, LoraModule], list[LayerRecord], list[str]]:
    """(modules, records, module names left out) of the selected layers, in their order. Distributed: this rank
    reads and factors its units only; rank 0 gets everyone's, the other ranks keep their own."""
    names = list(selected)
    shapes = [_matrix_shape(tuned.shape(n), selected[n]) for n in names]  # (out, in_flat) views
    ks = [budget_top_k(s, opts.rule.cap if opts.rule else None) if budget is not None
          else opts.rule_for(selected[n]).needed_k(s) for n, s in zip(names, shapes)]
    units = plan_batches(list(zip(shapes, ks)), [math.prod(s) for s in shapes],
                         batch=1 if budget is not None else opts.batch)  # --budget: one layer at a time
    if share is not None:
        costs = [sum(layer_cost(*shapes[i], ks[i], opts.oversample) for i in unit) for unit in units]
        units = [units[u] for u in share.take(costs, plan=(names, costs))]
    mine = {names[i]: selected[names[i]] for unit in units for i in unit}
    with tf32(opts.allow_tf32), (share.guard() if share else nullcontext()):
        pairs = prefetch(_read_pairs(base, tuned, mine))
        if budget is not None:  # one pass of top-K SVDs, allocate_budget, truncate; it consumes every delta
            deltas = (d for group, _ in staged(pairs, sizes=[1] * len(mine), stager=Stager(opts.device),
                                               make=_subtract) for d in group)
            result = extract_with_budget(deltas, {n: tuned.shape(n) for n in names}, budget=budget, opts=opts,
                                         progress=progress, warn=warn, exchange=_spectra_exchange(share, names),
                                         tied=tied)
        else:
            result = _factor_stream(pairs, [len(unit) for unit in units], opts, progress=progress, warn=warn)
        if share is not None:
            share.exchange(None)  # every rank is done, or one's failure is raised on all
    if progress:
        progress(len(mine), len(mine), "")
    return _gathered(share, result, names) if share is not None else result


def _factor_stream(pairs: Iterator[_Pair], sizes: list[int], opts: _Options, *, progress: Progress | None,
                   warn: Warn | None) -> tuple[dict[str, LoraModule], list[LayerRecord], list[str]]:
    """Factor ``pairs`` in batches of ``sizes`` (a stacked SVD for a batch of more than one, see pipeline)."""
    modules, records, zero = {}, [], []
    done, total = 0, sum(sizes)
    for group, stack in staged(pairs, sizes=sizes, stager=Stager(opts.device), make=_subtract):
        svds = [None] * len(group) if stack is None else batched_svds(
            stack, opts.rule_for(group[0].kind).needed_k(tuple(stack.shape[1:])), method=opts.method,
            oversample=opts.oversample, n_iter=opts.n_iter, seed=opts.seed)
        del stack  # the group's matrices are views of it: it goes with the last of them
        while group:
            delta, svd = group.pop(0), svds.pop(0)
            name = module_name(delta.name)
            if progress:
                progress(done, total, name)
            out = _factor_layer(delta, opts, warn, svd=svd)
            del delta, svd  # the next delta is being read meanwhile: hold one at a time here
            done += 1
            if out is None:
                zero.append(name)
                continue
            modules[name], rec = out
            records.append(rec)
    return modules, records, zero


def _matrix_shape(shape: Sequence[int], kind: ModuleKind) -> tuple[int, int]:
    """The (out, in_flat) shape of :func:`~lowrank_tools.adapter.matrix_view` for a weight of ``shape``."""
    if kind is ModuleKind.EMBEDDING:
        return int(shape[1]), int(shape[0])
    return int(shape[0]), math.prod(int(d) for d in shape[1:])


def _spectra_exchange(share: Share | None, names: list[str]):
    """For --budget when distributed: every rank's layer spectra, in the single-process order (None alone)."""
    if share is None:
        return None
    order = {module_name(n): i for i, n in enumerate(names)}
    return lambda spectra: sorted((s for part in share.exchange(spectra) for s in part), key=lambda s: order[s.name])


def _gathered(share: Share, result: tuple, names: list[str]) -> tuple:
    """Rank 0: every rank's (modules, records, left out) merged in the single-process order; others: ``result``."""
    parts = share.gather(result)
    if parts is None:
        return result
    order = {module_name(n): i for i, n in enumerate(names)}
    modules = dict(sorted(((k, m) for part in parts for k, m in part[0].items()), key=lambda km: order[km[0]]))
    records = sorted((r for part in parts for r in part[1]), key=lambda r: order[r.name])
    zero = sorted((z for part in parts for z in part[2]), key=order.__getitem__)
    return modules, records, zero


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
