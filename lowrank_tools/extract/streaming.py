"""extract: LoRA factors from a base checkpoint W0 and a fully fine-tuned one W'.

Per layer, streaming one tensor pair at a time (the next pair is read in a background thread
while the current one is factored):

    dW = W' - W0                     in float32, whatever the stored dtype
    dW ~= U_r S_r V_r^T              truncated SVD (exact, or randomized range finder)
    B = U_r sqrt(S_r / scale),  A = sqrt(S_r / scale) V_r^T,   scale = alpha / r
    rel_error = ||dW - scale*B@A||_F / ||dW||_F   measured on the factors as written (after the cast)

With --calibration, a layer with input statistics factors dW L instead (C + lambda I = L L^T;
see linalg.whiten and extract.whitening): B = U_r sqrt(S_r / scale), A = sqrt(S_r / scale) V_r^T L^-1.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing, nullcontext
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from ..adapter import Adapter, LoraModule, ModuleKind, cast_factors, cast_whole, matrix_shape, matrix_view, module_name
from ..io.checkpoint import Checkpoint, Pairing, as_checkpoint, pair_tensors
from .distributed import Share, current_share, layer_cost
from ..errors import Warn
from .budget import budget_top_k, extract_with_budget, svd_fields
from .options import ExtractOptions
from .whitening import Whitening, whitened_record
from ..io.formats import left_out_warning
from ..io.module_names import in_model_names
from ..io.layers import (FUSED_EXPERTS, GROUPED, NOT_HELD, LayerPlan, compile_filters, grouped_warning, plan_layers,
                         relative_change)
from ..io.base_class import base_class
from ..io.base_model import base_model_reference, task_type
from ..io.model_config import pipeline_evidence
from ..linalg.svd import TruncatedSVD, balanced_factors, truncated_svd
from ..linalg.memory import stream_large_buffers
from ..linalg.norms import check_finite, frobenius_error, frobenius_norm
from ..linalg.whiten import Whitener, output_rel_error, whitened_balanced_factors, whitened_svd
from .reading import LayerReader, Pair, read_pairs
from .side_thread import factored_in_order, side_threads_allowed
from .pipeline import Stager, batched_svds, plan_batches, staged, tf32
from ..io.prefetch import prefetch
from ..report import AdapterResult, LayerRecord, Progress, Report, factor_record, summarize

__all__ = ["ExtractOptions", "ExtractResult", "extract", "Progress"]


ExtractResult = AdapterResult  # the adapter and its report


@dataclass
class _Delta:
    """One layer's delta, ready to factor: dW in its 2-D matrix view, float32, on the device."""

    name: str  # tensor name (``...weight``)
    matrix: Tensor  # (out, in_flat) float32
    weight_shape: tuple[int, ...]
    dtype: torch.dtype  # the tuned tensor's stored dtype (default output dtype)
    kind: ModuleKind
    norm: float | None  # ||dW||_F, measured as it is made (the same pass finds NaN/Inf)
    sources: tuple = ()  # (base, tuned) checkpoints, to name a non-finite input


def _subtract(pair: Pair, stager: Stager, out: Tensor | None = None) -> _Delta:
    """dW = W' - W0 in float32 on the stager's device, in its (out, in_flat) matrix view; NaN/Inf named.

    Written into ``out`` when given (a slot of a batch), else in place of a float32 W' (read into a fresh
    buffer), else into the stager's scratch buffer (valid until the next layer): no per-layer allocation. ||dW|| is
    measured here (:func:`_measured`): on a side worker, on its one thread."""
    shape = tuple(pair.tuned.shape)
    V1 = matrix_view(stager.place(pair.tuned), pair.kind)  # (out, in_flat)
    if out is None and V1.dtype == torch.float32 and (V1.is_contiguous() or V1.mT.is_contiguous()):
        dW = V1  # a buffer of ours either way; an embedding's (dim, vocab) is the transpose of the stored (vocab, dim),
        # which the SVD takes as it is (its tall problem is the stored layout); a copy cost 0.1 s and a fresh buffer
    else:  # float32 math whatever the stored dtype: bf16/fp16 differences lose digits otherwise
        dW = (out if out is not None else stager.scratch(V1.shape)).copy_(V1)
    if pair.base is not None:
        dW.sub_(matrix_view(stager.place(pair.base), pair.kind))
    del V1
    pair.tuned = pair.base = None  # the read-ahead queue still holds the pair until the next one is asked for
    return _measured(_Delta(pair.name, dW, shape, pair.dtype, pair.kind, None, tuple(pair.sources)))


def _measured(delta: _Delta) -> _Delta:
    """``delta`` with its ``norm``: inf or nan exactly when dW holds Inf or NaN, so the one pass also checks (the
    offending input named)."""
    norm = frobenius_norm(delta.matrix)
    if not math.isfinite(norm):
        for source, what in zip(delta.sources, ("base", "tuned")):
            check_finite(source.get(delta.name), f"{what} tensor {delta.name}")
        check_finite(delta.matrix, f"delta of {delta.name}")
    delta.norm = norm
    return delta


def _factor_layer(delta: _Delta, opts: ExtractOptions, warn: Warn | None, svd: TruncatedSVD | None = None,
                  whitening: Whitening | None = None) -> tuple[LoraModule, LayerRecord] | None:
    """Factor one layer's delta (its top-k ``svd`` if already computed in a batch; whitened when ``whitening`` has
    its input statistics); None when the delta is exactly zero or the rule keeps nothing."""
    dW = delta.matrix.to(opts.device)  # (out, in_flat)
    norm = delta.norm
    if norm == 0.0:
        return None
    mod = module_name(delta.name)
    rule = opts.rule_for(delta.kind)
    w = whitening.get(mod) if whitening is not None else None
    if w is not None:
        return _whitened_layer(delta, dW, norm, w, opts, warn)
    if svd is None:
        svd = truncated_svd(dW, rule.needed_k(tuple(dW.shape)), method=opts.method, oversample=opts.oversample,
                            n_iter=opts.n_iter, seed=opts.seed, norm=norm,
                            on_warning=(lambda msg: warn(f"{mod}: {msg}")) if warn else None)
    r = rule.choose(svd.S, total_energy=norm**2)
    if r == 0:
        return None
    alpha = float(opts.alpha) if opts.alpha is not None else float(r)
    B, A = cast_factors(*balanced_factors(svd, r, scale=alpha / r), opts.dtype or delta.dtype, mod)  # (out, r), (r, in)
    err = frobenius_error(dW, B.float(), A.float(), scale=alpha / r, norm=norm)  # on the factors as written
    record = factor_record(mod, delta.weight_shape, rank=r, values=svd.spectrum if svd.spectrum is not None else svd.S,
                           norm=norm, err=err, params=B.numel() + A.numel(),
                           extra=svd_fields(svd.method.value, svd.power_iters))
    module = LoraModule(B=B.cpu(), A=A.cpu(), alpha=alpha, kind=delta.kind, weight_shape=delta.weight_shape)
    return module, record


def _whitened_layer(delta: _Delta, dW: Tensor, norm: float, w: Whitener, opts: ExtractOptions, warn: Warn | None,
                    ) -> tuple[LoraModule, LayerRecord] | None:
    """One layer's whitened factors: the rule reads the spectrum of dW L (the output error); the record keeps the
    weight-space ``rel_error`` (measured on the factors as written) and adds ``output_rel_error``."""
    mod = module_name(delta.name)
    rule = opts.rule_for(delta.kind)
    svd = whitened_svd(dW, w, rule.needed_k(tuple(dW.shape)), method=opts.method, oversample=opts.oversample,
                       n_iter=opts.n_iter, seed=opts.seed, on_warning=(lambda msg: warn(f"{mod}: {msg}")) if warn else None)
    total = svd.total  # ||dW L||_F
    r = rule.choose(svd.S, total_energy=total**2) if total > 0 else 0
    if r == 0:
        return None
    alpha = float(opts.alpha) if opts.alpha is not None else float(r)
    B, A = cast_factors(*whitened_balanced_factors(svd, r, scale=alpha / r), opts.dtype or delta.dtype, mod)
    err = frobenius_error(dW, B.float(), A.float(), scale=alpha / r)  # weight space, on the factors as written
    record = whitened_record(mod, delta.weight_shape, rank=r, values=svd.spectrum if svd.spectrum is not None
                             else svd.S, output_norm=total, output_err=output_rel_error(svd.S[:r], total) * total,
                             norm=norm, err=err, params=B.numel() + A.numel(), method=svd.method.value,
                             extra={"output_norm_estimated": True} if svd.total_estimated else None)
    module = LoraModule(B=B.cpu(), A=A.cpu(), alpha=alpha, kind=delta.kind, weight_shape=delta.weight_shape)
    return module, record


@torch.no_grad()
def extract(base, tuned, options: ExtractOptions | None = None, *, progress: Progress | None = None,
            warn: Warn | None = None, **kwargs) -> ExtractResult:
    """Extract a LoRA adapter approximating ``tuned - base`` for every adaptable weight.

    ``base`` / ``tuned``: checkpoint paths, :class:`~lowrank_tools.io.checkpoint.Checkpoint` objects or mappings of
    tensor name -> tensor. ``options``: an :class:`~lowrank_tools.extract.options.ExtractOptions` (rank rule or
    budget, method, dtype, device, filters, ...); or its fields as keywords (``extract(base, tuned,
    rule=RankRule(rank=16))``), which also override those of ``options`` when both are given. ``progress`` hears
    (done, total, module); ``warn`` receives one-line warnings (skipped tensors, SVD fallbacks).
    Tied weights (an ``lm_head`` that is the embedding) are factored once and carried on both sides. Under
    torch.distributed (see ``ExtractOptions.distributed``) rank 0 returns the whole result, other ranks
    ``primary=False`` with an empty adapter.
    """
    start = time.perf_counter()
    opts = replace(options, **kwargs) if options is not None and kwargs else options or ExtractOptions(**kwargs)
    stream_large_buffers()
    base_ckpt, tuned_ckpt = as_checkpoint(base), as_checkpoint(tuned)
    pairing, plan = _plan(base_ckpt, tuned_ckpt, opts, warn)
    whitening = _whitening(plan.layers, tuned_ckpt, opts, warn)
    share = current_share(opts.distributed)
    with share or nullcontext():
        modules, records, zero = _factor_layers(base_ckpt, tuned_ckpt, plan.layers, opts, share=share,
                                                progress=progress, warn=warn, whitening=whitening,
                                                tied=frozenset(module_name(e) for e in plan.tied))
    if share is not None and not share.primary:  # rank 0 has the factors and writes; nothing more to do here
        summary = summarize(records, wall_time=time.perf_counter() - start, distributed_rank=share.rank)
        return ExtractResult(adapter=Adapter(), report=Report(command="extract", layers=records, summary=summary),
                             primary=False)
    plan.skipped["zero delta or nothing kept"] = zero
    full = plan.finish(modules, tuned_ckpt)  # tied heads beside their embedding; tensors saved whole
    _count_tied_heads(records, plan, modules)
    adapter = Adapter(modules=modules, full_tensors=cast_whole(full, opts.dtype), source_format="extract",
                      base_model=base_model_reference(base_ckpt.config, getattr(base_ckpt, "path", None)),
                      task_type=task_type(base_ckpt.config or tuned_ckpt.config),
                      pipeline=pipeline_evidence(base_ckpt.config or tuned_ckpt.config,
                                                 components=bool(base_ckpt.components or tuned_ckpt.components)),
                      base_class=base_class(base_ckpt))  # model_index.json / config.json: check judges by it
    renamed = None
    if opts.embeddings and adapter.pipeline is not True:  # a PEFT target: the names of the model PEFT loads it onto
        adapter, renamed = in_model_names(adapter, base_ckpt)
    more = {"processes": share.world_size} if share is not None else {}
    changed = {n: relative_change(base_ckpt.get(n), tuned_ckpt.get(n)) for n in plan.one_d}
    experts = _experts_note(base_ckpt, tuned_ckpt, plan.skipped.get(FUSED_EXPERTS, []), warn)
    report = Report(command="extract", layers=records,
                    summary=summarize(records, wall_time=time.perf_counter() - start, **more),
                    skipped={k: v for k, v in plan.skipped.items() if v},
                    notes=([pairing.warning()] if pairing.warning() else []) + plan.notes
                    + ([renamed] if renamed else []) + experts
                    + ([whitening.note()] if whitening is not None and whitening.note() else []),
                    changed_1d={n: v for n, v in changed.items() if v > 0})
    return ExtractResult(adapter=adapter, report=report)


def _experts_note(base: Checkpoint, tuned: Checkpoint, names: list[str], warn: Warn | None) -> list[str]:
    """What leaving fused MoE experts out costs: each one's ||dW|| / ||W0||, as a note (and a warning when any
    changed)."""
    changes = {n: relative_change(base.get(n), tuned.get(n)) for n in names}
    moved = {n: c for n, c in changes.items() if c > 0}
    if not moved:
        return []
    shown = ", ".join(f"{n} {tuple(tuned.shape(n))} ||dW||/||W0|| = {c:.3g}" for n, c in list(moved.items())[:4])
    note = (f"left out {len(moved)} fused MoE expert tensor(s) the fine-tune changed (no LoRA layout for them): "
            f"{shown}{' ...' if len(moved) > 4 else ''}")
    if warn:
        warn(note)
    return [note]


def _plan(base: Checkpoint, tuned: Checkpoint, opts: ExtractOptions, warn: Warn | None) -> tuple[Pairing, LayerPlan]:
    """(pairing, layer plan): which tensors pair up, which become modules, which are saved whole or skipped."""
    include, exclude = compile_filters(opts.include, "--include"), compile_filters(opts.exclude, "--exclude")
    pairing = pair_tensors(base, tuned, strict=opts.strict)
    plan = plan_layers(base, tuned, pairing, include=include, exclude=exclude, full_modules=opts.full_modules,
                       embeddings=opts.embeddings)
    pairing = plan.unsaved(pairing)  # tensors saved whole are not "skipped"
    if warn and pairing.warning():
        warn(pairing.warning())
    if warn and plan.skipped.get(NOT_HELD):  # before any work, in the words convert, resize and merge use
        warn(left_out_warning([module_name(n) for n in plan.skipped[NOT_HELD]], "kohya"))
    if warn and plan.skipped.get(GROUPED):
        warn(grouped_warning(plan.skipped[GROUPED]))
    return pairing, plan


def _whitening(layers: dict[str, ModuleKind], tuned: Checkpoint, opts: ExtractOptions, warn: Warn | None,
               ) -> Whitening | None:
    """--calibration: the statistics, checked against the selected layers before any work (None without it)."""
    if opts.calibration is None:
        return None
    whitening = Whitening(opts.calibration, damping=opts.damping, device=opts.device, warn=warn,
                          fused=tuned.fused_parts)
    whitening.check(layers, {n: matrix_shape(tuned.shape(n), kind)[1] for n, kind in layers.items()})
    if warn and whitening.note():
        warn(whitening.note())
    return whitening


def _count_tied_heads(records: list[LayerRecord], plan, modules: dict[str, LoraModule]) -> None:
    """A tied embedding's record also counts the head's copy of its factors: both are in the file."""
    by_name = {r.name: r for r in records}
    for emb, tie in plan.tied.items():
        record = by_name.get(module_name(emb))
        if record is not None and tie.head in modules:
            record.params += modules[tie.head].params
            record.extra["tied_head"] = tie.head


def _factor_layers(base: Checkpoint, tuned: Checkpoint, selected: dict[str, ModuleKind], opts: ExtractOptions, *,
                   share: Share | None, progress: Progress | None, warn: Warn | None,
                   tied: frozenset[str] = frozenset(), whitening: Whitening | None = None,
                   ) -> tuple[dict[str, LoraModule], list[LayerRecord], list[str]]:
    """(modules, records, module names left out) of the selected layers, in their order. Distributed: this rank
    reads and factors its units only; rank 0 gets everyone's, the other ranks keep their own."""
    names = list(selected)
    shapes = [matrix_shape(tuned.shape(n), selected[n]) for n in names]  # (out, in_flat) views
    units = _units(names, shapes, [selected[n] for n in names], opts, share)
    mine = {names[i]: selected[names[i]] for unit in units for i in unit}
    side = (opts.budget is None and side_threads_allowed(opts.device) and opts.batch == 1 and whitening is None)
    with tf32(opts.allow_tf32), (share.guard() if share else nullcontext()):
        if side:  # the workers read their own layers: no read-ahead thread, no delta waiting; closing: an error
            # here (a progress callback's) cancels and joins the workers now, not when its traceback is let go
            with closing(factored_in_order(list(mine.items()), _side_worker(base, tuned, opts, warn))) as results:
                result = _collect(((name, out) for (name, _), out in results), len(mine), progress)
        else:
            # closing: an error in the consumer stops and joins the read-ahead thread now, not at interpreter exit,
            # where a daemon thread caught inside torch/numpy aborts the process ("terminate called without an
            # active exception")
            with closing(prefetch(read_pairs(base, tuned, mine))) as pairs:
                if opts.budget is not None:  # one pass of top-K SVDs, allocate_budget, truncate: every delta
                    result = extract_with_budget(_one_by_one(pairs, len(mine), opts), dict(zip(names, shapes)),
                                                 opts=opts, progress=progress, warn=warn,
                                                 exchange=_spectra_exchange(share, names), tied=tied,
                                                 whitening=whitening)
                else:
                    result = _factor_stream(pairs, [len(unit) for unit in units], opts, progress=progress,
                                            warn=warn, whitening=whitening)
        if share is not None:
            share.exchange(None)  # every rank is done, or one's failure is raised on all
    if progress:
        progress(len(mine), len(mine), "")
    return _gathered(share, result, names) if share is not None else result


def _units(names: list[str], shapes: list[tuple[int, int]], kinds: list[ModuleKind], opts: ExtractOptions,
           share: Share | None) -> list[list[int]]:
    """Layer indices in units of work: runs of one shape and k batched by :func:`~lowrank_tools.pipeline.plan_batches`
    (one layer at a time under --budget); distributed: this rank's units only."""
    if opts.budget is not None:
        ks = [budget_top_k(s, opts.rule.cap if opts.rule else None) for s in shapes]
    else:
        ks = [opts.rule_for(kind).needed_k(s) for kind, s in zip(kinds, shapes)]
    units = plan_batches(list(zip(shapes, ks)), [math.prod(s) for s in shapes], batch=opts.batch)
    if share is None:
        return units
    costs = [sum(layer_cost(*shapes[i], ks[i], opts.oversample) for i in unit) for unit in units]
    return [units[u] for u in share.take(costs, plan=(names, costs))]


def _one_by_one(pairs: Iterator[Pair], count: int, opts: ExtractOptions) -> Iterator[_Delta]:
    """The deltas of ``count`` pairs, one at a time on the device (--budget: no stacked SVDs)."""
    for group, _ in staged(pairs, sizes=[1] * count, stager=Stager(opts.device), make=_subtract):
        yield from group


def _factor_stream(pairs: Iterator[Pair], sizes: list[int], opts: ExtractOptions, *, progress: Progress | None,
                   warn: Warn | None, whitening: Whitening | None = None,
                   ) -> tuple[dict[str, LoraModule], list[LayerRecord], list[str]]:
    """Factor ``pairs`` in batches of ``sizes`` (a stacked SVD for a batch of more than one, see pipeline), on this
    thread."""
    items = _deltas(pairs, sizes, opts)
    results = ((module_name(delta.name), _factor_layer(delta, opts, warn, svd=svd, whitening=whitening))
               for delta, svd in items)
    return _collect(results, sum(sizes), progress)


def _side_worker(base: Checkpoint, tuned: Checkpoint, opts: ExtractOptions, warn: Warn | None,
                 ) -> Callable[[tuple[str, ModuleKind]], tuple[LoraModule, LayerRecord] | None]:
    """What a worker of :func:`~lowrank_tools.extract.side_thread.factored_in_order` does with one layer: read its
    pair, make dW and ||dW|| and factor it, on its one thread, in buffers of its own reused layer after layer (a
    :class:`~lowrank_tools.extract.reading.LayerReader` per worker; its one delta is dead when the next is read).
    The two workers read at the same time: every tensor source reads without shared state (a safetensors file
    is opened per read; pickles and dicts are copied from memory), and a worker reading a large layer does not hold
    the other up (a lock around the reads left one core idle for the first 0.15 s of a 135M extract, while the
    embedding was read)."""
    local = threading.local()

    def work(item: tuple[str, ModuleKind]) -> tuple[LoraModule, LayerRecord] | None:
        if not hasattr(local, "reader"):
            local.reader, local.stager = LayerReader(pool_size=1), Stager(opts.device)
        return _factor_layer(_subtract(local.reader.pair(base, tuned, *item), local.stager), opts, warn)
    return work


def _collect(results: Iterable[tuple[str, tuple[LoraModule, LayerRecord] | None]], total: int,
             progress: Progress | None) -> tuple[dict[str, LoraModule], list[LayerRecord], list[str]]:
    """(modules, records, modules left out) from ``(module or tensor name, factored layer or None)`` in order."""
    modules, records, zero = {}, [], []
    for done, (name, out) in enumerate(results):
        name = module_name(name)
        if progress:
            progress(done, total, name)
        if out is None:
            zero.append(name)
            continue
        modules[name], rec = out
        records.append(rec)
    return modules, records, zero


def _deltas(pairs: Iterator[Pair], sizes: list[int], opts: ExtractOptions,
            ) -> Iterator[tuple[_Delta, TruncatedSVD | None]]:
    """(delta, its SVD when a batch computed it) in order."""
    for group, stack in staged(pairs, sizes=sizes, stager=Stager(opts.device), make=_subtract):
        svds = [None] * len(group) if stack is None else batched_svds(
            stack, opts.rule_for(group[0].kind).needed_k(tuple(stack.shape[1:])), method=opts.method,
            oversample=opts.oversample, n_iter=opts.n_iter, seed=opts.seed)
        del stack  # the group's matrices are views of it: it goes with the last of them
        while group:
            delta = group.pop(0)
            yield delta, svds.pop(0)
            del delta


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


