"""Ranks that keep a share F of a model's delta energy: uniform, per layer, and under a parameter budget.

The energy is the whole delta's, ``E = sum_l ||dW_l||_F^2``; ranks ``r_l`` retain
``sum_l sum_{i <= r_l} s_{l,i}^2`` of it at ``sum_l r_l (out_l + in_l)`` adapter parameters. For each F:

- ``uniform``: the smallest r that retains >= F E with every layer at ``min(r, p_l)`` (``--rank r``);
- ``energy``: every layer at its own energy rank (``--energy F``): each layer keeps >= F, so the whole does;
- ``budget``: rank units taken in the greedy order of :func:`~lowrank_tools.budget.allocate_budget`
  (``s^2 / cost``, best first, ties to the earlier layer) until F E is reached; their cost N is the
  ``--budget N`` to pass, and ``allocate_budget(N)``, which takes that same prefix first, retains >= F E.

Sizes are parameters and megabytes (10^6 bytes, each layer in its own dtype). With top-K spectra only the
computed values count: a target they do not reach gets None, and a rank beyond a layer's K is marked estimated.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..linalg.budget import LayerSpectrum, allocate_budget
from ..linalg.spectrum import level_key

if TYPE_CHECKING:  # analyze imports this module
    from .spectra import LayerAnalysis

__all__ = ["RECOMMEND_LEVELS", "recommend", "minimal_budget"]

RECOMMEND_LEVELS = (0.9, 0.95, 0.99)
_RTOL = 1e-12  # same slack as the energy rule


def _size(layers: Sequence[LayerAnalysis], ranks: Sequence[int]) -> dict:
    params = sum(r * x.unit_cost for x, r in zip(layers, ranks))
    nbytes = sum(r * x.unit_cost * x.bytes_per_param for x, r in zip(layers, ranks))
    return {"params": int(params), "megabytes": nbytes / 1e6,
            "rank_min": min(ranks, default=0), "rank_max": max(ranks, default=0)}


def _retained(layers: Sequence[LayerAnalysis], ranks: Sequence[int]) -> float:
    return math.fsum(s * s for x, r in zip(layers, ranks) for s in x.singular_values[:r])


def _uniform(layers: Sequence[LayerAnalysis], target: float, total: float) -> dict | None:
    """Smallest uniform r whose computed values retain >= target (None if they never do)."""
    longest = max(len(x.singular_values) for x in layers)
    retained = torch.zeros(longest, dtype=torch.float64)  # (longest,): energy retained at r = 1..longest
    for x in layers:
        cum = torch.cumsum(torch.tensor(x.singular_values, dtype=torch.float64) ** 2, 0)
        retained[: len(cum)] += cum
        retained[len(cum):] += cum[-1]
    hit = torch.nonzero(retained >= target - _RTOL * total)
    if len(hit) == 0:
        return None
    r = int(hit[0]) + 1
    ranks = [min(r, x.full_length) for x in layers]
    estimated = any(not x.metrics.complete and r > len(x.singular_values) for x in layers)
    return {"rank": r, **_size(layers, ranks), "retained_energy": float(retained[r - 1]) / total,
            "estimated": estimated}


def _per_layer(layers: Sequence[LayerAnalysis], level: float, total: float) -> dict:
    key = level_key(level)
    ranks = [x.metrics.energy_rank[key] for x in layers]
    estimated = any(key in x.metrics.estimated for x in layers)
    return {"energy": level, **_size(layers, ranks), "retained_energy": _retained(layers, ranks) / total,
            "estimated": estimated}


def _spectra(layers: Sequence[LayerAnalysis]) -> list[LayerSpectrum]:
    return [LayerSpectrum(x.name, x.matrix_shape, x.singular_values) for x in layers]


def minimal_budget(spectra: Sequence[LayerSpectrum], target: float) -> int | None:
    """The cost of the shortest prefix, in ``allocate_budget``'s greedy order, whose gains reach ``target``
    (squared singular values); None when all units together fall short."""
    gains, costs, layer_idx, unit_idx = [], [], [], []
    for i, layer in enumerate(spectra):
        cap = min(len(layer.singular_values), min(layer.shape))
        values = sorted(layer.singular_values, reverse=True)[:cap]
        g = [v * v for v in values if v > 0 and math.isfinite(v)]  # as budget._gains
        gains += g
        costs += [layer.unit_cost] * len(g)
        layer_idx += [i] * len(g)
        unit_idx += list(range(len(g)))
    if not gains:
        return None
    gains_a, costs_a = np.asarray(gains, dtype=np.float64), np.asarray(costs, dtype=np.int64)
    order = np.lexsort((np.asarray(unit_idx), np.asarray(layer_idx), -(gains_a / costs_a)))
    reached = np.nonzero(np.cumsum(gains_a[order]) >= target)[0]
    if len(reached) == 0:
        return None
    return int(np.cumsum(costs_a[order])[reached[0]])


def _budget(layers: Sequence[LayerAnalysis], target: float, total: float) -> dict | None:
    spectra = _spectra(layers)
    budget = minimal_budget(spectra, target - _RTOL * total)
    if budget is None:
        return None
    chosen = allocate_budget(spectra, budget)
    ranks = [chosen[x.name] for x in layers]
    return {"budget": budget, **_size(layers, ranks), "retained_energy": _retained(layers, ranks) / total,
            "ranks": chosen}


def recommend(layers: Sequence[LayerAnalysis], *, levels: Sequence[float] = RECOMMEND_LEVELS) -> dict:
    """For each level F (key ``"0.9"``...): ``uniform``, ``energy`` and ``budget`` choices as in the module
    docstring, each with params, megabytes, min/max rank and the retained share of the whole delta's energy."""
    total = math.fsum(x.metrics.total_energy for x in layers)  # sum S^2 where complete, else ||dW||_F^2
    if not layers or total <= 0:
        return {}
    out = {}
    for level in levels:
        target = level * total
        out[level_key(level)] = {"uniform": _uniform(layers, target, total),
                                 "energy": _per_layer(layers, level, total),
                                 "budget": _budget(layers, target, total)}
    return out
