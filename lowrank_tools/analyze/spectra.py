"""analyze: the singular-value spectrum of every layer's change, grouped, with the ranks it calls for.

Two sources, one result (:class:`Analysis`):

- ``analyze_delta(BASE, TUNED)``: ``dW = W' - W0`` per layer, streamed one tensor pair at a time (the next
  pair is read in a background thread), in float32. All singular values by default (``svdvals``);
  with ``top=K`` only the top K through the randomized range finder (Halko et al. 2011), the tail then
  estimated from ``||dW||_F`` (see :mod:`lowrank_tools.linalg.spectrum`).
- ``analyze_adapter(ADAPTER)``: each module's ``scale * B @ A`` through the QR core
  (:func:`~lowrank_tools.linalg.svd.qr_core_svd`): exact, and never the dense product.

Per layer: singular values, effective / stable rank, energy ranks at 50/90/95/99 %, ``||dW||_F / ||W0||_F``.
Groups: by module type (the last name component: ``q_proj``, ``to_k``) and by depth (the name up to its
first integer component: ``layers.12``, ``down_blocks.1``). Recommendations: :mod:`lowrank_tools.analyze.recommend`.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass

import torch
from torch import Tensor

from ..adapter import Adapter, ModuleKind, matrix_view, module_name
from ..io.checkpoint import Checkpoint, as_checkpoint, pair_tensors
from ..errors import InvalidOption
from ..io.layers import compile_filters, matches, relative_change, select_layers
from ..linalg.svd import Method, qr_core_svd, resolve_device, singular_values
from ..linalg.norms import check_finite, frobenius_norm
from ..io.prefetch import prefetch
from .recommend import energy_curve, recommend
from .records import Analysis, LayerAnalysis, depth_key, module_type
from ..linalg.sketch import top_singular_values
from ..linalg.spectrum import ENERGY_LEVELS, level_key, spectrum_metrics
from ..report import Progress, Warn

__all__ = ["Analysis", "LayerAnalysis", "analyze_delta", "analyze_adapter", "module_type", "depth_key",
           "group_layers"]


_R90 = level_key(0.9)


def _depth_order(key: str | None, first_seen: dict[str, int]) -> tuple:
    if key is None:
        return (1, 0, 0)
    parent, _, index = key.rpartition(".")
    return (0, first_seen[parent], int(index))


# ------------------------------------------------------------------------------------------ groups


def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else 0.0


def _stats(layers: Sequence[LayerAnalysis], total_energy: float) -> dict:
    energy = sum(x.delta_norm**2 for x in layers)
    r90 = [x.metrics.energy_rank[_R90] for x in layers]
    change = None  # sqrt(sum ||dW||^2 / sum ||W0||^2): adapters have no W0, a zero W0 no ratio
    if all(x.base_norm is not None for x in layers):
        base_energy = sum(x.base_norm**2 for x in layers)
        change = math.sqrt(energy / base_energy) if base_energy else None
    return {"layers": len(layers), "energy_share": energy / total_energy if total_energy else 0.0,
            "relative_change": change,
            "effective_rank_mean": statistics.fmean(x.metrics.effective_rank for x in layers),
            "stable_rank_mean": statistics.fmean(x.metrics.stable_rank for x in layers),
            "rank90_median": _median(r90), "rank90_max": max(r90),
            "rank90_share_mean": statistics.fmean(r / min(x.matrix_shape) for r, x in zip(r90, layers))}


def group_layers(layers: Sequence[LayerAnalysis], by: str) -> dict[str, dict]:
    """Stats per module type (``by="module_type"``, in order of appearance) or per depth (``by="depth"``,
    blocks in index order, layers outside any block last under ``"-"``)."""
    if by not in ("module_type", "depth"):
        raise ValueError(f"group_layers by {by!r}: use 'module_type' or 'depth'")
    total = sum(x.delta_norm**2 for x in layers)
    buckets: dict[str | None, list[LayerAnalysis]] = {}
    for x in layers:
        buckets.setdefault(getattr(x, by), []).append(x)
    keys = list(buckets)
    if by == "depth":
        first_seen: dict[str, int] = {}
        for k in keys:
            if k is not None:
                first_seen.setdefault(k.rpartition(".")[0], len(first_seen))
        keys.sort(key=lambda k: _depth_order(k, first_seen))
    return {("-" if k is None else k): _stats(buckets[k], total) for k in keys}


def _summary(layers: Sequence[LayerAnalysis], wall_time: float, **more) -> dict:
    if not layers:
        return {"layers": 0, **more}
    stats = _stats(layers, sum(x.delta_norm**2 for x in layers))
    del stats["energy_share"]
    stats["delta_norm"] = math.sqrt(sum(x.delta_norm**2 for x in layers))
    stats["energy_rank_median"] = {level_key(f): _median([x.metrics.energy_rank[level_key(f)] for x in layers])
                                   for f in ENERGY_LEVELS}
    stats["covered_params"] = sum(math.prod(x.shape) for x in layers)
    stats["wall_time_s"] = round(wall_time, 3)
    return {**stats, **more}


def _assemble(source: str, layers: list[LayerAnalysis], start: float, *, top: int | None,
              skipped: dict[str, list[str]], changed_1d: dict[str, float], notes: list[str]) -> Analysis:
    groups = {by: group_layers(layers, by) for by in ("module_type", "depth")} if layers else {}
    return Analysis(source=source, layers=layers, groups=groups, recommendation=recommend(layers), top=top,
                    energy_curve=energy_curve(layers),
                    summary=_summary(layers, time.perf_counter() - start, top=top), notes=notes,
                    skipped={k: v for k, v in skipped.items() if v}, changed_1d=changed_1d)


# ------------------------------------------------------------------------------------------ BASE TUNED


@dataclass(frozen=True)
class _Options:
    top: int | None
    device: torch.device
    seed: int
    oversample: int | None
    n_iter: int


def _spectrum(dW: Tensor, norm: float, opts: _Options, warn: Warn | None, mod: str) -> tuple[Tensor, str]:
    """(singular values, method): all of them (svdvals), or the top K by
    :func:`~lowrank_tools.linalg.sketch.top_singular_values` (a sketch of 2K columns by default, bfloat16 products
    where they are fast, the values from float32)."""
    oversample = opts.top if opts.oversample is None else opts.oversample  # (when top is given)
    if opts.top is None or opts.top + oversample >= min(dW.shape):  # a sketch as wide as the matrix: svdvals
        on_warning = (lambda msg: warn(f"{mod}: {msg}")) if warn else None
        return singular_values(dW, on_warning=on_warning), Method.EXACT.value
    return top_singular_values(dW, opts.top, oversample=oversample, n_iter=opts.n_iter, seed=opts.seed,
                               frobenius=norm)


@dataclass
class _Pair:
    """One layer as read ahead: W0 and W' as stored (fresh buffers from a Checkpoint), emptied by the consumer
    once it has dW and the norms, so that only dW is held while the spectrum is computed."""

    name: str  # tensor name
    base: Tensor | None
    tuned: Tensor | None
    sources: tuple[Checkpoint, Checkpoint]  # (base, tuned): read again to name a NaN/Inf


def _pairs(base: Checkpoint, tuned: Checkpoint, names: Sequence[str]) -> Iterator[_Pair]:
    for name in names:
        yield _Pair(name, base.get(name), tuned.get(name), (base, tuned))


def _delta_layer(pair: _Pair, kind: ModuleKind, opts: _Options, warn: Warn | None) -> LayerAnalysis | None:
    """One layer's spectrum; None when the delta is exactly zero."""
    name, shape, itemsize = pair.name, tuple(pair.base.shape), pair.tuned.element_size()
    W0f = pair.base.to(opts.device, torch.float32)  # float32 math whatever the stored dtype
    base_norm = frobenius_norm(W0f)
    # in place: Checkpoint.get hands out tensors that own their memory, and W' is not used again
    dW = matrix_view(pair.tuned.to(opts.device, torch.float32).sub_(W0f), kind)  # (out, in_flat)
    pair.base = pair.tuned = None  # the read-ahead queue still holds the pair until the next one is asked for
    del W0f
    norm = frobenius_norm(dW)
    if not math.isfinite(norm + base_norm):  # finite norms: every entry is finite, no separate pass needed
        check_finite(pair.sources[0].get(name), f"base tensor {name}")
        check_finite(pair.sources[1].get(name), f"tuned tensor {name}")
        check_finite(dW, f"delta of {name}")  # finite inputs whose difference overflows float32
    if norm == 0.0:
        return None
    mod = module_name(name)
    S, method = _spectrum(dW, norm, opts, warn, mod)
    values = S.double().cpu()
    complete = len(values) >= min(dW.shape)
    metrics = spectrum_metrics(values, total_energy=None if complete else norm**2, full_length=min(dW.shape))
    return LayerAnalysis(name=mod, shape=shape, matrix_shape=tuple(dW.shape), kind=kind.value,
                         singular_values=values.tolist(), delta_norm=norm, base_norm=base_norm, metrics=metrics,
                         method=method, bytes_per_param=itemsize, full_length=min(dW.shape))


def _check_top(top: int | None) -> int | None:
    if top is not None and (isinstance(top, bool) or not isinstance(top, int) or top < 1):
        raise InvalidOption(f"--top {top!r} is outside [1, inf): give how many singular values to compute, e.g. 64")
    return top


def _top_notes(top: int | None, layers: Sequence[LayerAnalysis], warn: Warn | None) -> list[str]:
    """--top K clamps, with a warning, on layers whose smaller side is <= K; and the tail is estimated elsewhere."""
    if top is None:
        return []
    notes = []
    small = [x for x in layers if min(x.matrix_shape) <= top]
    if small:
        x = small[0]
        notes.append(f"--top {top} is not below the smaller side of {len(small)} layer(s) (e.g. {x.name} "
                     f"{x.matrix_shape[0]} x {x.matrix_shape[1]}): their full spectra were computed exactly")
        if warn:
            warn(notes[-1])
    if any(not x.metrics.complete for x in layers):
        notes.append(f"--top {top}: only the top {top} singular values were computed; the tail is estimated from "
                     f"||dW||_F: cumulative energy and stable rank stay exact, energy ranks above {top} are lower "
                     f"bounds and effective ranks estimates (marked ~)")
    return notes


@torch.no_grad()
def analyze_delta(base, tuned, *, top: int | None = None, include: Sequence[str] = (), exclude: Sequence[str] = (),
                  device: str | torch.device = "cpu", seed: int = 0, oversample: int | None = None, n_iter: int = 3,
                  strict: bool = False, progress: Progress | None = None, warn: Warn | None = None) -> Analysis:
    """Spectra of ``tuned - base`` for every adaptable weight (paths, Checkpoints or name -> tensor mappings).

    ``top``: compute only the top K singular values (randomized, :mod:`~lowrank_tools.linalg.sketch`; ``oversample``
    defaults to K, ``n_iter`` power iterations, ``seed``); layers whose smaller side is <= K get their full
    spectrum, with one warning, and so do those below ``K + oversample`` (the sketch would be the whole matrix).
    Unchanged layers are listed under ``skipped``; changed 1-D tensors under ``changed_1d``.
    """
    start = time.perf_counter()
    top = _check_top(top)
    include, exclude = compile_filters(include, "--include"), compile_filters(exclude, "--exclude")
    base_ckpt, tuned_ckpt = as_checkpoint(base), as_checkpoint(tuned)
    pairing = pair_tensors(base_ckpt, tuned_ckpt, strict=strict)
    if warn and pairing.warning():
        warn(pairing.warning())
    opts = _Options(top=top, device=resolve_device(device), seed=seed, oversample=oversample, n_iter=n_iter)
    selected, skipped, one_d = select_layers(pairing.names, tuned_ckpt, include, exclude, base=base_ckpt)
    layers, unchanged = [], []
    with closing(prefetch(_pairs(base_ckpt, tuned_ckpt, selected))) as pairs:  # an error joins the reader now
        for i, pair in enumerate(pairs):
            if progress:
                progress(i, len(selected), module_name(pair.name))
            layer = _delta_layer(pair, selected[pair.name], opts, warn)
            if layer is None:
                unchanged.append(module_name(pair.name))
            else:
                layers.append(layer)
    if progress:
        progress(len(selected), len(selected), "")
    changed = {n: relative_change(base_ckpt.get(n), tuned_ckpt.get(n)) for n in one_d}
    skipped["unchanged (zero delta)"] = unchanged
    notes = ([pairing.warning()] if pairing.warning() else []) + _top_notes(top, layers, warn)
    return _assemble("delta", layers, start, top=top, skipped=skipped, notes=notes,
                     changed_1d={n: v for n, v in changed.items() if v > 0})


# ------------------------------------------------------------------------------------------ ADAPTER


@torch.no_grad()
def analyze_adapter(adapter: Adapter | str | os.PathLike, *, include: Sequence[str] = (),
                    exclude: Sequence[str] = (), device: str | torch.device = "cpu",
                    progress: Progress | None = None, warn: Warn | None = None) -> Analysis:
    """Spectra of every module's ``scale * B @ A`` through the QR core: exact, never the dense product."""
    start = time.perf_counter()
    include, exclude = compile_filters(include, "--include"), compile_filters(exclude, "--exclude")
    if not isinstance(adapter, Adapter):
        from ..io.formats import load_adapter  # formats pulls in both file layouts: only when given a path

        adapter = load_adapter(adapter)
    dev = resolve_device(device)
    names = [n for n in adapter.modules if matches(n, include, exclude)]
    layers, unchanged = [], []
    for i, name in enumerate(names):
        if progress:
            progress(i, len(names), name)
        layer = _adapter_layer(name, adapter.modules[name], dev, warn)
        if layer is None:
            unchanged.append(name)
        else:
            layers.append(layer)
    if progress:
        progress(len(names), len(names), "")
    kept = set(names)
    skipped = {"filtered out": [n for n in adapter.modules if n not in kept], "zero product": unchanged}
    return _assemble("adapter", layers, start, top=None, skipped=skipped, changed_1d={},
                     notes=list(adapter.notes))


def _adapter_layer(name: str, m, device: torch.device, warn: Warn | None) -> LayerAnalysis | None:
    if m.rank == 0 or m.scale == 0:
        return None
    B, A = m.B.to(device), m.A.to(device)  # (out, r), (r, in_flat)
    check_finite(B, f"{name} factor B")
    check_finite(A, f"{name} factor A")
    on_warning = (lambda msg: warn(f"{name}: {msg}")) if warn else None
    values = qr_core_svd(B, A, scale=m.scale, on_warning=on_warning).S.double().cpu()  # (min(out, in, r),)
    energy = float((values * values).sum())
    if energy == 0.0:
        return None
    return LayerAnalysis(name=name, shape=tuple(m.weight_shape), matrix_shape=m.matrix_shape, kind=m.kind.value,
                         singular_values=values.tolist(), delta_norm=math.sqrt(energy), base_norm=None,
                         metrics=spectrum_metrics(values, full_length=len(values)), method="qr-core",
                         bytes_per_param=m.B.element_size(), full_length=len(values))
