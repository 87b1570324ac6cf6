"""Ranks that keep a share F of a model's delta energy: uniform, per layer, and under a parameter budget.

The energy is the whole delta's, ``E = sum_l ||dW_l||_F^2``; ranks ``r_l`` retain
``sum_l sum_{i <= r_l} s_{l,i}^2`` of it at ``sum_l r_l (out_l + in_l)`` adapter parameters. For each F:

- ``uniform``: the smallest r that retains >= F E with every layer at ``min(r, p_l)`` (``--rank r``);
- ``energy``: every layer at its own energy rank (``--energy F``): each layer keeps >= F, so the whole does;
- ``budget``: rank units taken in the greedy order of :func:`~lowrank_tools.linalg.budget.allocate_budget`
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

from ..linalg.budget import LayerSpectrum, allocate_budget, greedy_units, minimal_budget
from ..linalg.rank_rules import ENERGY_RTOL, energy_count
from ..linalg.spectrum import level_key

if TYPE_CHECKING:  # annotations only
    from .records import LayerAnalysis

__all__ = ["RECOMMEND_LEVELS", "recommend", "energy_curve"]

RECOMMEND_LEVELS = (0.9, 0.95, 0.99)


def _size(layers: Sequence[LayerAnalysis], ranks: Sequence[int]) -> dict:
    params = sum(r * x.unit_cost for x, r in zip(layers, ranks))
    nbytes = sum(r * x.unit_cost * x.bytes_per_param for x, r in zip(layers, ranks))
    return {"params": int(params), "megabytes": nbytes / 1e6,
            "rank_min": min(ranks, default=0), "rank_max": max(ranks, default=0)}


def _retained(layers: Sequence[LayerAnalysis], ranks: Sequence[int]) -> float:
    return math.fsum(s * s for x, r in zip(layers, ranks) for s in x.singular_values[:r])


def _uniform(layers: Sequence[LayerAnalysis], level: float, total: float) -> dict | None:
    """Smallest uniform r whose computed values retain >= target (None if they never do)."""
    longest = max(len(x.singular_values) for x in layers)
    retained = torch.zeros(longest, dtype=torch.float64)  # (longest,): energy retained at r = 1..longest
    for x in layers:
        cum = torch.cumsum(torch.tensor(x.singular_values, dtype=torch.float64) ** 2, 0)
        retained[: len(cum)] += cum
        retained[len(cum):] += cum[-1]
    r = energy_count(retained, level, total)
    if r > longest:
        return None
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


def _log_spaced(n: int, points: int) -> np.ndarray:
    """At most ``points`` indices in [0, n), log-spaced, the last one included (all of them when points >= n)."""
    if points >= n:
        return np.arange(n)
    return np.unique(np.round(np.geomspace(1, n, num=min(points, n))).astype(np.int64)) - 1


def energy_curve(layers: Sequence[LayerAnalysis], *, points: int = 48) -> dict:
    """The whole delta's retained energy share against adapter parameters, from the computed singular values:
    ``uniform`` (``rank``, ``params``, ``retained_energy``: every layer at min(r, its length), r = 1..longest) and
    ``budget`` (``params``, ``retained_energy``: the greedy prefixes ``allocate_budget`` takes), each at most
    ``points`` log-spaced points. The data of ``retained_energy_vs_params.png``."""
    total = math.fsum(x.metrics.total_energy for x in layers)
    if not layers or total <= 0:
        return {"uniform": [], "budget": []}
    longest = max(len(x.singular_values) for x in layers)
    uniform = []
    for i in _log_spaced(longest, points):
        r = int(i) + 1
        ranks = [min(r, x.full_length) for x in layers]
        uniform.append({"rank": r, "params": _size(layers, ranks)["params"],
                        "retained_energy": min(1.0, _retained(layers, ranks) / total)})
    gains, costs = greedy_units(_spectra(layers))
    cum_gain, cum_cost = np.cumsum(np.asarray(gains, dtype=np.float64)), np.cumsum(np.asarray(costs, dtype=np.int64))
    budget = [{"params": int(cum_cost[i]), "retained_energy": min(1.0, float(cum_gain[i]) / total)}
              for i in (_log_spaced(len(gains), points) if len(gains) else [])]
    return {"uniform": uniform, "budget": budget}


def _budget(layers: Sequence[LayerAnalysis], level: float, total: float) -> dict | None:
    spectra = _spectra(layers)
    budget = minimal_budget(spectra, level * total - ENERGY_RTOL * total)  # the slack of the energy rule
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
        out[level_key(level)] = {"uniform": _uniform(layers, level, total),
                                 "energy": _per_layer(layers, level, total),
                                 "budget": _budget(layers, level, total)}
    return out
