"""Rank allocation under a parameter budget (``--budget N``). Pure Python.

Each layer l keeps r_l singular values at ``cost_l`` parameters per rank unit (``out + in`` for
``B (out, r)`` and ``A (r, in)``). Keeping the i-th singular value gains ``s_i^2`` of retained
energy, so minimising the total squared error ``sum_l (||dW_l||_F^2 - sum_{i<r_l} s_i^2)`` is a
multiple-choice knapsack whose per-layer gains are non-increasing (concave): the units of one layer
are taken in order, and the best ratio ``s_i^2 / cost_l`` among all layers' next units is the greedy
choice of the fractional knapsack (Dantzig 1957).
"""

from __future__ import annotations

import heapq
import math
import numbers
from dataclasses import dataclass
from typing import NamedTuple, Sequence

from ..errors import InvalidOption

__all__ = ["LayerSpectrum", "allocate_budget", "uniform_rank_params"]


@dataclass(frozen=True)
class LayerSpectrum:
    """One layer's spectrum: ``singular_values`` descending (possibly a truncated top-k) of a matrix of
    ``shape (out, in)``; ``cost``: parameters per rank unit, default ``out + in``."""

    name: str
    shape: tuple[int, int]
    singular_values: Sequence[float]
    cost: int | None = None

    def __post_init__(self) -> None:
        shape = tuple(int(d) for d in self.shape)
        values = self.singular_values
        values = tuple(float(v) for v in (values.tolist() if hasattr(values, "tolist") else values))
        if len(shape) != 2 or min(shape) < 1:
            raise ValueError(f"{self.name}: shape must be (out, in) with both >= 1, got {self.shape}")
        if self.cost is not None and int(self.cost) < 1:
            raise ValueError(f"{self.name}: cost per rank unit must be >= 1, got {self.cost}")
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "singular_values", values)

    @property
    def unit_cost(self) -> int:
        """Parameters added by one more rank unit."""
        return int(self.cost) if self.cost is not None else self.shape[0] + self.shape[1]


class _Allocation(NamedTuple):
    ranks: list[int]
    retained: float  # sum of kept s_i^2
    first_miss: float | None  # gain of the first unit the greedy could not afford (the bound's slack)


def _gains(layer: LayerSpectrum, max_rank: int | None) -> list[float]:
    """Gains s_i^2 of the units that may be taken: positive values only, at most the layer's max rank."""
    cap = min(len(layer.singular_values), min(layer.shape), max_rank if max_rank is not None else math.inf)
    values = sorted(layer.singular_values, reverse=True)[: int(cap)]
    return [v * v for v in values if v > 0 and math.isfinite(v)]


def _greedy(gains: list[list[float]], costs: list[int], start: list[int], budget: int) -> _Allocation:
    """Greedy by ``gain / cost`` over each layer's next unit, from ranks ``start``; a unit that does not
    fit drops its layer (its later units cost the same) and the scan goes on to fill the leftover.
    Ties go to the earlier layer, then the lower index."""
    ranks = list(start)
    remaining = budget - sum(r * c for r, c in zip(ranks, costs))
    heap = [(-g[r] / c, i, r) for i, (g, c, r) in enumerate(zip(gains, costs, ranks)) if r < len(g)]
    heapq.heapify(heap)
    first_miss = None
    while heap:
        _, i, r = heapq.heappop(heap)
        if costs[i] > remaining:
            first_miss = gains[i][r] if first_miss is None else first_miss
            continue
        remaining -= costs[i]
        ranks[i] = r + 1
        if r + 1 < len(gains[i]):
            heapq.heappush(heap, (-gains[i][r + 1] / costs[i], i, r + 1))
    retained = math.fsum(v for g, r in zip(gains, ranks) for v in g[:r])
    return _Allocation(ranks, retained, first_miss)


def _uniform_start(gains: list[list[float]], costs: list[int], budget: int) -> list[int]:
    """Ranks ``min(r, len(gains_l))`` for the largest uniform r that fits the budget (binary search)."""
    def spend(r: int) -> int:
        return sum(min(r, len(g)) * c for g, c in zip(gains, costs))

    lo, hi = 0, max((len(g) for g in gains), default=0)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if spend(mid) <= budget else (lo, mid - 1)
    return [min(lo, len(g)) for g in gains]


def _allocate(layers: Sequence[LayerSpectrum], budget: int, max_rank: int | None) -> _Allocation:
    gains = [_gains(layer, max_rank) for layer in layers]
    costs = [layer.unit_cost for layer in layers]
    greedy = _greedy(gains, costs, [0] * len(layers), budget)
    # The greedy can strand budget behind one expensive unit; a uniform start then filled greedily
    # never does worse than the uniform rank, so keep whichever retains more.
    seeded = _greedy(gains, costs, _uniform_start(gains, costs, budget), budget)
    if seeded.retained > greedy.retained:
        return _Allocation(seeded.ranks, seeded.retained, greedy.first_miss)
    return greedy


def _check_budget(layers: Sequence[LayerSpectrum], budget: int, max_rank: int | None) -> None:
    if isinstance(budget, bool) or not isinstance(budget, numbers.Integral):
        raise InvalidOption(f"--budget {budget!r} is not a whole number of parameters")
    if max_rank is not None and max_rank < 1:
        raise InvalidOption(f"--rank {max_rank} is outside [1, inf): use a whole number of 1 or more")
    names = [layer.name for layer in layers]
    if len(set(names)) != len(names):
        raise ValueError("layer names must be unique")
    smallest = min(layers, key=lambda layer: layer.unit_cost)
    if budget < smallest.unit_cost:
        cost, (out, inp) = smallest.unit_cost, smallest.shape
        raise InvalidOption(f"--budget {budget} is smaller than one rank unit of the smallest layer ({cost} "
                            f"parameters for {smallest.name} {out} x {inp}): use --budget {cost} or more")


def allocate_budget(layers: Sequence[LayerSpectrum], budget: int, *, max_rank: int | None = None) -> dict[str, int]:
    """Ranks per layer name that minimise the total squared error with ``sum_l r_l * cost_l <= budget``.

    Greedy on ``s_i^2 / cost_l`` over each layer's next unit (optimal for the fractional relaxation
    because the gains are non-increasing), then the remaining units in ratio order fill the leftover;
    the better of that and a uniform-rank start filled the same way is returned. Guarantees: never
    over budget; retained energy ``>= OPT - g`` where ``g`` is the gain of the first unit that did not
    fit (the classic fractional-knapsack bound), and never less than the largest uniform rank that
    fits. Zero singular values are never taken; ``max_rank`` caps every layer. Ties go to the earlier
    layer. O(U log L) for U units over L layers.

    Raises :class:`InvalidOption` when the budget cannot buy one rank unit of the cheapest layer.
    """
    if not layers:
        return {}
    _check_budget(layers, budget, max_rank)
    ranks = _allocate(layers, int(budget), max_rank).ranks
    return {layer.name: r for layer, r in zip(layers, ranks)}


def uniform_rank_params(layers: Sequence[LayerSpectrum], r: int) -> int:
    """Parameters of giving every layer rank r (clamped to the layer's smaller side): ``sum min(r, side) * cost``."""
    if r < 0:
        raise ValueError(f"r must be >= 0, got {r}")
    return sum(min(r, min(layer.shape)) * layer.unit_cost for layer in layers)
