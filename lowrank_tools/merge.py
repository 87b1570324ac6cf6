"""merge: several adapters, each with a weight, into one, exactly or truncated, without forming any B @ A.

For a module present in adapters i = 1..N (each with its own rank r_i and scale convention):

    sum_i w_i scale_i B_i A_i  =  [w_1 scale_1 B_1 | ... | w_N scale_N B_N] @ [A_1; ...; A_N]

so exact concatenation (rank sum r_i, scale 1) is the weighted sum itself. With a rank rule or a
budget the concatenation is truncated through its QR core (:mod:`lowrank_tools.refactor`): the
optimal rank-r approximation of the weighted sum. (Adding up- and down-factors separately, as kohya's
merge without ``--concat`` does, is not the sum of the products.) Modules present in only some inputs
are kept; inputs that disagree on a module's shape are an error naming it.

DoRA modules (``W = m (W0 + s B A) / ||W0 + s B A||_row``): the direction update is the exact weighted sum above
(what PEFT's ``add_weighted_adapter(combination_type="cat")`` puts in lora_A / lora_B) and the magnitude is the
weighted mean ``m = sum_i w_i m_i / sum_i w_i``: one DoRA module at any weight keeps its m, weights summing to 1
give PEFT's linear combination ``sum_i w_i m_i``. PEFT itself (0.21) re-initialises m to ``||W0||_row`` whatever the
inputs, so even one adapter at weight 1 does not come back (PEFT #3761): it is not followed there. Refused, naming
the module: DoRA mixed with plain LoRA on one module (a plain module has no magnitude without the base: make it
DoRA first with ``convert --dora dora --base``), different DoRA axes, and weights that sum to 0 (no mean).
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import replace

import torch

from .adapter import Adapter, LoraModule, cast_whole, check_alpha
from .errors import AdapterMismatch, InvalidOption
from .io.arch_convert import to_common_naming
from .io.layers import compile_filters, matches
from .linalg.svd import RankRule, concat_factors
from .refactor import refactor_modules
from .report import AdapterResult, Progress, Report, Warn, summarize
from .weighted import WeightedAdapter, as_weighted

__all__ = ["MergeResult", "merge", "weighted_sum_module", "select_inputs"]



MergeResult = AdapterResult  # the adapter and its report


def _layout(m: LoraModule) -> tuple:
    return m.kind.value, tuple(m.weight_shape), m.matrix_shape


def weighted_sum_module(name: str, parts: Sequence[tuple[LoraModule, float, str]]) -> LoraModule:
    """The exact ``sum_i w_i scale_i B_i A_i`` of ``[(module, weight, source)]`` as one module:
    B (out, sum r_i) float32 with the coefficients folded in, A (sum r_i, in), alpha = sum r_i (scale 1).

    Raises :class:`AdapterMismatch` naming the module when the inputs disagree on its kind or shape."""
    first, _, first_src = parts[0]
    for m, _, src in parts[1:]:
        if _layout(m) != _layout(first):
            kind0, shape0, _ = _layout(first)
            kind1, shape1, _ = _layout(m)
            raise AdapterMismatch(f"module {name} is {kind0} {shape0} in {first_src} but {kind1} {shape1} in {src}: "
                                  f"the adapters were made for different base models; leave it out with "
                                  f"--exclude '^{re.escape(name)}$'")
    magnitude = _dora_magnitude(name, parts)
    # float32 (float64 if any input is): the coefficients are folded in before any rounding
    B, A = concat_factors([(m.B, m.A, w * m.scale) for m, w, _ in parts])  # (out, R), (R, in)
    return LoraModule(B=B, A=A, alpha=float(B.shape[1]), kind=first.kind, weight_shape=first.weight_shape,
                      magnitude=magnitude, dora_axis=first.dora_axis)


def _dora_magnitude(name: str, parts: Sequence[tuple[LoraModule, float, str]]):
    """The merged DoRA magnitude: the weighted mean ``sum_i w_i m_i / sum_i w_i`` (see the module doc); None when no
    input is DoRA. Raises :class:`AdapterMismatch` naming the module where it is not defined."""
    dora = [(m, w, src) for m, w, src in parts if m.magnitude is not None]
    if not dora:
        return None
    leave_out = f"or leave it out with --exclude '^{re.escape(name)}$'"
    plain = [src for m, _, src in parts if m.magnitude is None]
    if plain:
        raise AdapterMismatch(f"module {name} is DoRA in {dora[0][2]} but plain LoRA in {plain[0]}: a plain module has "
                              f"no magnitude without its base; make it DoRA first (convert --dora dora --base BASE), "
                              f"{leave_out}")
    if len({m.dora_axis for m, _, _ in dora}) > 1:
        raise AdapterMismatch(f"module {name} holds output-axis and legacy input-axis DoRA magnitudes: they do not "
                              f"combine; {leave_out}")
    total = sum(w for _, w, _ in dora)
    if abs(total) <= 1e-12 * sum(abs(w) for _, w, _ in dora):
        raise AdapterMismatch(f"module {name}: the weights of its DoRA inputs sum to 0, so the merged magnitude (their "
                              f"weighted mean) is undefined; change the weights, {leave_out}")
    dtype = torch.float64 if any(m.magnitude.dtype == torch.float64 for m, _, _ in dora) else torch.float32
    return (sum(w * m.magnitude.double() for m, w, _ in dora) / total).to(dtype)


def _tensor_deltas(inputs: list[WeightedAdapter]) -> dict[str, torch.Tensor]:
    """Whole-tensor deltas (biases, norms) add up: sum_i w_i delta_i (float32, float64 if an input is)."""
    out: dict[str, torch.Tensor] = {}
    for item in inputs:
        for name, t in item.adapter.tensor_deltas.items():
            term = t.double() * float(item.weight)
            out[name] = out[name] + term if name in out else term
    return {n: t.to(torch.float64 if any(i.adapter.tensor_deltas.get(n, torch.empty(0)).dtype == torch.float64
                                         for i in inputs) else torch.float32) for n, t in out.items()}


def _out_dtype(dtypes: set[torch.dtype]) -> torch.dtype:
    """The inputs' common factor dtype; float32 when they differ."""
    return next(iter(dtypes)) if len(dtypes) == 1 else torch.float32


def _common(values: set):
    """The one value all inputs share, else None (PEFT's task_type of a merge)."""
    return next(iter(values)) if len(values) == 1 else None


def select_inputs(inputs: list[WeightedAdapter], include, exclude) -> tuple[list[WeightedAdapter], list[str]]:
    """Each input's modules and tensor deltas that pass ``include`` / ``exclude`` on its own names (before any
    renaming), and the module names left out."""
    if not include and not exclude:
        return inputs, []
    out, filtered = [], []
    for item in inputs:
        a = item.adapter
        filtered += [n for n in a.modules if not matches(n, include, exclude) and n not in filtered]
        kept = replace(a, modules={n: m for n, m in a.modules.items() if matches(n, include, exclude)},
                       tensor_deltas={n: t for n, t in a.tensor_deltas.items()
                                      if matches(n.rsplit(".", 1)[0], include, exclude)})
        out.append(WeightedAdapter(kept, item.weight, item.source))
    return out, filtered


def _gather(inputs: list[WeightedAdapter]) -> dict[str, list]:
    """{module: [(module, weight, source), ...]} in order of first appearance."""
    parts: dict[str, list] = {}
    for item in inputs:
        for name, m in item.adapter.modules.items():
            parts.setdefault(name, []).append((m, float(item.weight), item.source))
    return parts


def _full_tensors(inputs: list[WeightedAdapter], warn: Warn | None) -> dict[str, torch.Tensor]:
    """Tensors saved whole (modules_to_save) cannot be summed: the first input's copy is kept."""
    full: dict[str, torch.Tensor] = {}
    owner: dict[str, str] = {}
    for item in inputs:
        for name, t in item.adapter.full_tensors.items():
            if name not in full:
                full[name], owner[name] = t, item.source
            elif warn and (t.shape != full[name].shape or not torch.equal(t, full[name])):
                warn(f"tensor {name} is saved whole in {owner[name]} and {item.source}; kept the one of {owner[name]}")
    return full


@torch.no_grad()
def merge(adapters: Sequence[WeightedAdapter | Adapter | tuple], *, rule: RankRule | None = None,
          budget: int | None = None, alpha: float | None = None, dtype: torch.dtype | None = None,
          device: str | torch.device = "cpu", include: Sequence[str] = (), exclude: Sequence[str] = (),
          progress: Progress | None = None, warn: Warn | None = None) -> MergeResult:
    """Merge weighted adapters into one.

    No ``rule`` and no ``budget``: exact concatenation, rank = the sum of the inputs' ranks. Otherwise the
    concatenation is truncated (``budget`` spreads total parameters, ``rule`` caps each module). Modules
    filtered out by ``include`` / ``exclude`` are left out. ``dtype`` defaults to the inputs' factor dtype
    (float32 when they differ). The report measures each module against the exact weighted sum. DoRA modules: the
    direction update is that sum, the magnitude the weighted mean of the inputs' (see the module doc; PEFT #3761).
    Inputs of one transformer diffusion model in different namings (a BFL/kohya Flux file and a diffusers one) are
    first brought to the first one's naming, exactly (:func:`~lowrank_tools.io.arch_convert.to_common_naming`);
    ``include`` / ``exclude`` see each input's own names.
    """
    inputs = as_weighted(adapters)
    if not inputs:
        raise InvalidOption("merge needs at least one ADAPTER[:WEIGHT] argument")
    check_alpha(alpha)
    start = time.perf_counter()
    include, exclude = compile_filters(include, "--include"), compile_filters(exclude, "--exclude")
    inputs, filtered = select_inputs(inputs, include, exclude)  # on each input's own names
    named = to_common_naming([i.adapter for i in inputs])
    inputs = [WeightedAdapter(a, i.weight, i.source) for a, i in zip(named, inputs)]
    parts = _gather(inputs)
    sums = {name: weighted_sum_module(name, p) for name, p in parts.items()}
    dtypes = {name: dtype or _out_dtype({m.B.dtype for m, _, _ in p}) for name, p in parts.items()}
    extra = {name: {"old_rank": "+".join(str(m.rank) for m, _, _ in p)} for name, p in parts.items()}
    done = refactor_modules(sums, rule=rule, budget=budget, alpha=alpha, dtypes=dtypes, device=device, extra=extra,
                            progress=progress, warn=warn)
    bases = [i.adapter.base_model for i in inputs if i.adapter.base_model]
    notes = [f"inputs name different base models: {', '.join(sorted(set(bases)))}"] if len(set(bases)) > 1 else []
    if notes and warn:
        warn(notes[0])
    merged = Adapter(modules=done.modules, full_tensors=cast_whole(_full_tensors(inputs, warn), dtype),
                     base_model=bases[0] if bases else None, source_format="merge", notes=notes,
                     task_type=_common({i.adapter.task_type for i in inputs}),
                     pipeline=_common({i.adapter.pipeline for i in inputs}),
                     base_class=_common({i.adapter.base_class for i in inputs}),  # inputs for different classes: none
                     tensor_deltas=_tensor_deltas(inputs),  # and the names recorded for a transformers model:
                     model_names={k: v for i in inputs for k, v in i.adapter.model_names.items()})  # tied aliases
    more = {"inputs": [{"source": i.source, "weight": i.weight} for i in inputs],
            "old_params": sum(m.params for p in parts.values() for m, _, _ in p)}
    if budget is not None:
        more["budget"] = int(budget)
    report = Report(command="merge", layers=done.records, notes=notes,
                    summary=summarize(done.records, wall_time=time.perf_counter() - start, **more),
                    skipped={k: v for k, v in {"filtered out": filtered, "rank 0 (dropped)": done.dropped}.items() if v})
    return MergeResult(adapter=merged, report=report)
