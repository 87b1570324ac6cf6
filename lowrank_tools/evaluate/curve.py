"""One adapter truncated to several sizes (``--ranks``, ``--budgets``, ``--energies``) and where the curve crosses.

The CLI extracts once, at the largest size asked (in memory), and each point here is the Eckart-Young optimal
truncation of those factors through :func:`~lowrank_tools.refactor.refactor_modules` (R-only QRs and a small
SVD per module: no dense delta). With exact SVD factors the truncation to rank r is the rank-r extraction
itself (the top r singular triplets of dW are the top r of its best rank-R approximation); with randomized
factors it is the truncation of the larger sketch, at least as accurate as a separate randomized extraction
at rank r. Budgets are spread by the same allocation as ``extract --budget``, each layer capped at the
extracted rank; energies are shares of the extracted factors' energy (of dW's whole energy when the extraction
kept every singular value).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from ..adapter import Adapter
from ..errors import InvalidOption
from ..linalg.svd import RankRule
from ..refactor import refactor_modules
from ..report import Warn
from .run import Score

__all__ = ["LEVELS", "curve_adapters", "dora_twins", "smallest_reaching"]

LEVELS = (0.9, 0.95, 0.99)


def _truncated(adapter: Adapter, *, rule: RankRule | None = None, budget: int | None = None,
               device: str | torch.device, warn: Warn | None) -> Adapter:
    out = refactor_modules(adapter.modules, rule=rule, budget=budget, dtypes={n: torch.float32 for n in adapter.modules},
                           device=device, warn=warn)
    return Adapter(modules=out.modules, full_tensors=dict(adapter.full_tensors), base_model=adapter.base_model,
                   source_format="curve", pipeline=adapter.pipeline)


def _checked(values: Sequence, name: str, ok, what: str) -> list:
    values = sorted(set(values))
    bad = [v for v in values if not ok(v)]
    if bad:
        raise InvalidOption(f"--{name} {bad[0]!r}: {what}")
    return values


def curve_adapters(adapter: Adapter, *, ranks: Sequence[int] = (), budgets: Sequence[int] = (),
                   energies: Sequence[float] = (), device: str | torch.device = "cpu",
                   warn: Warn | None = None) -> list[tuple[str, Adapter, dict]]:
    """``(label, adapter, size)`` per point, smallest first within each series; ``size`` is ``{"rank": r}``,
    ``{"budget": n}`` or ``{"energy": f}``."""
    points = []
    for r in _checked(ranks, "ranks", lambda v: isinstance(v, int) and v >= 1, "ranks are whole numbers >= 1"):
        points.append((f"rank {r}", _truncated(adapter, rule=RankRule(rank=r), device=device, warn=warn), {"rank": r}))
    for n in _checked(budgets, "budgets", lambda v: isinstance(v, int) and v >= 1, "budgets are parameter counts >= 1"):
        points.append((f"budget {n}", _truncated(adapter, budget=n, device=device, warn=warn), {"budget": n}))
    for f in _checked(energies, "energies", lambda v: 0 < v <= 1, "energies are fractions in (0, 1]"):
        points.append((f"energy {f:g}", _truncated(adapter, rule=RankRule(energy=f), device=device, warn=warn),
                       {"energy": f}))
    return points


def dora_twins(points: Sequence[tuple[str, Adapter, dict]], dora: Adapter) -> list[tuple[str, Adapter, dict]]:
    """Per curve point, its DoRA twin: the same factors with the magnitudes of ``dora`` (extract --dora's
    ``m = ||W'||_row``, per module name; modules without one stay LoRA). Labels ``dora <label>``, sizes
    ``{"dora_rank": r}`` / ``{"dora_budget": n}`` / ``{"dora_energy": f}`` (a series of their own)."""
    twins = []
    for label, adapter, size in points:
        modules = {}
        for name, m in adapter.modules.items():
            d = dora.modules.get(name)
            modules[name] = m if d is None or d.magnitude is None else replace(m, magnitude=d.magnitude,
                                                                             dora_axis=d.dora_axis)
        twins.append((f"dora {label}", replace(adapter, modules=modules), {f"dora_{k}": v for k, v in size.items()}))
    return twins


def smallest_reaching(scores: Sequence[Score], levels: Sequence[float] = LEVELS) -> dict[float, Score | None]:
    """Per level, the score with the fewest parameters whose recovered share reaches it (None: none does)."""
    out = {}
    for level in levels:
        ok = [s for s in scores if s.behaviour_recovered is not None and s.behaviour_recovered >= level]
        out[level] = min(ok, key=lambda s: s.params) if ok else None
    return out
