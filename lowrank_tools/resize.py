"""resize: change the ranks of an adapter's modules without forming any B @ A.

Per module, ``delta = scale * B @ A`` (B (out, r), A (r, in)) is re-factored through its r x r QR
core (see :mod:`lowrank_tools.refactor`) and truncated by a rank rule or a parameter budget. The
result is the optimal truncation of the adapter's own delta; a module whose rank is kept keeps its
factors, so resizing to the same or a larger rank changes no product. Whatever the input's scale
convention (kohya alpha, PEFT alpha / r, rsLoRA alpha / sqrt(r)), the product is what is preserved;
new modules get ``alpha = r`` (scale 1) unless ``alpha`` is given.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace

import torch

from .adapter import Adapter, cast_whole
from .errors import InvalidOption
from .io.layers import compile_filters, matches
from .linalg.svd import RankRule
from .refactor import refactor_modules
from .report import AdapterResult, Progress, Report, Warn, summarize

__all__ = ["ResizeResult", "resize"]



ResizeResult = AdapterResult  # the adapter and its report


@torch.no_grad()
def resize(adapter: Adapter, *, rule: RankRule | None = None, budget: int | None = None, alpha: float | None = None,
           dtype: torch.dtype | None = None, device: str | torch.device = "cpu", include: Sequence[str] = (),
           exclude: Sequence[str] = (), progress: Progress | None = None, warn: Warn | None = None) -> ResizeResult:
    """Truncate every selected module of ``adapter`` by ``rule`` and/or ``budget``.

    ``budget``: total adapter parameters of the selected modules, spread to minimise the total squared
    error (``rule`` then caps each module). Modules filtered out by ``include`` / ``exclude`` are kept
    unchanged; a module left with rank 0 is dropped (listed in the report). ``dtype`` of the written
    factors defaults to the input's. The report measures, per module, the new factors against the original.
    """
    if rule is None and budget is None:
        raise InvalidOption("resize needs a rank option: pass --rank, --energy, --sv-ratio, --threshold or --budget")
    start = time.perf_counter()
    include, exclude = compile_filters(include, "--include"), compile_filters(exclude, "--exclude")
    selected = {n: m for n, m in adapter.modules.items() if matches(n, include, exclude)}
    done = refactor_modules(
        selected, rule=rule, budget=budget, alpha=alpha, dtypes={n: dtype or m.B.dtype for n, m in selected.items()},
        device=device, extra={n: {"old_rank": m.rank} for n, m in selected.items()}, progress=progress, warn=warn)
    modules = {}
    for name, m in adapter.modules.items():  # input order; filtered-out modules pass through
        if name in done.modules:
            modules[name] = done.modules[name]
        elif name not in selected:
            modules[name] = m if dtype is None else m.to(dtype=dtype)
    out = replace(adapter, modules=modules, full_tensors=cast_whole(adapter.full_tensors, dtype), source_format="resize",
                  notes=list(adapter.notes))
    kept = [n for n in adapter.modules if n not in selected]
    more = {"old_params": sum(m.params for m in selected.values())}
    if budget is not None:
        more["budget"] = int(budget)
    report = Report(command="resize", layers=done.records,
                    summary=summarize(done.records, wall_time=time.perf_counter() - start, **more),
                    skipped={k: v for k, v in {"filtered out (kept unchanged)": kept,
                                               "rank 0 (dropped)": done.dropped}.items() if v})
    return ResizeResult(adapter=out, report=report)
