"""Metrics of one singular-value spectrum. Pure torch; never computes an SVD itself.

For a matrix ``M (m, n)`` with singular values ``s_1 >= s_2 >= ... >= s_p`` (``p = min(m, n)``) and
``E = ||M||_F^2 = sum s_i^2``:

    cumulative energy   c_r = sum_{i<=r} s_i^2 / E
    energy rank at F    the smallest r with c_r >= F                 (same rule as ``--energy F``)
    stable rank         E / s_1^2                                   (Rudelson & Vershynin 2007)
    effective rank      exp(H(p)),  p_i = s_i / sum_j s_j,  H(p) = -sum p_i log p_i
                        (Roy & Vetterli 2007, "The effective rank: a measure of effective dimensionality")

A spectrum may be a top-k only (``--top K``): ``S`` holds k < p values and ``total_energy`` is
``||M||_F^2``, measured on the matrix. Then ``c_r`` for r <= k and the stable rank are still exact;
an energy rank the top k values do not reach is the lower bound ``k + ceil(missing / s_k^2)`` (no tail
value exceeds s_k), and the effective rank models the tail the same way: ``ceil(E_tail / s_k^2)`` equal
values that hold the tail energy ``E_tail = E - sum_{i<=k} s_i^2``. Both are flagged as estimated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

from .rank_rules import ENERGY_RTOL  # the same slack as RankRule: F reached exactly is not off by one

__all__ = ["ENERGY_LEVELS", "SpectrumMetrics", "spectrum_metrics", "cumulative_energy", "energy_rank",
           "effective_rank", "stable_rank", "level_key"]

ENERGY_LEVELS = (0.5, 0.9, 0.95, 0.99)  # energy ranks reported per layer
_TAIL_RTOL = 1e-6  # tail energy below this share of E is float32 rounding, not a tail


def level_key(level: float) -> str:
    """The JSON key of an energy level: 0.9 -> "0.9", 0.5 -> "0.5"."""
    return f"{level:g}"


def _values(S: Tensor | Sequence[float]) -> Tensor:
    """(k,) float64 CPU tensor, sorted descending, negatives (rounding) clamped to 0."""
    t = S.detach() if isinstance(S, Tensor) else torch.as_tensor(list(S), dtype=torch.float64)
    t = t.reshape(-1).to("cpu", torch.float64).clamp_min(0)
    return torch.sort(t, descending=True).values


def _total(s: Tensor, total_energy: float | None) -> float:
    known = float((s * s).sum())
    return known if total_energy is None else max(float(total_energy), known)


def _tail(s: Tensor, total: float, full_length: int | None) -> tuple[float, int]:
    """Tail energy beyond the k values and how many tail values the model gives it (0 if no tail)."""
    k = len(s)
    room = (full_length if full_length is not None else k) - k
    tail = total - float((s * s).sum())
    if room <= 0 or k == 0 or tail <= _TAIL_RTOL * total or not float(s[-1]) > 0:
        return 0.0, 0
    return tail, min(room, math.ceil(tail / float(s[-1]) ** 2 * (1 - ENERGY_RTOL)))


def cumulative_energy(S: Tensor | Sequence[float], *, total_energy: float | None = None) -> Tensor:
    """``c_r`` for r = 1..k, (k,) float64: the share of ``total_energy`` (default ``sum S^2``) in the top r."""
    s = _values(S)
    total = _total(s, total_energy)
    cum = torch.cumsum(s * s, 0)  # (k,)
    return cum / total if total > 0 else torch.zeros_like(cum)


def energy_rank(S: Tensor | Sequence[float], level: float, *, total_energy: float | None = None,
                full_length: int | None = None) -> tuple[int, bool]:
    """(smallest r with ``c_r >= level``, estimated). Beyond the k values given: the lower bound
    ``k + ceil(missing / s_k^2)`` capped at ``full_length``, flagged estimated. 0 for a zero spectrum."""
    s = _values(S)
    total = _total(s, total_energy)
    if total <= 0 or len(s) == 0:
        return 0, False
    cum = torch.cumsum(s * s, 0)  # (k,)
    target = level * total - ENERGY_RTOL * total
    r = int(torch.searchsorted(cum, torch.tensor([target], dtype=cum.dtype))[0]) + 1
    if r <= len(s):
        return r, False
    tail, count = _tail(s, total, full_length)
    if count == 0:  # complete spectrum (or rounding): every value is needed
        return len(s), False
    missing = target - float(cum[-1])
    return len(s) + min(count, math.ceil(missing / float(s[-1]) ** 2 * (1 - ENERGY_RTOL))), True


def stable_rank(S: Tensor | Sequence[float], *, total_energy: float | None = None) -> float:
    """``E / s_1^2``; 0 for a zero spectrum."""
    s = _values(S)
    total = _total(s, total_energy)
    return total / float(s[0]) ** 2 if len(s) and float(s[0]) > 0 else 0.0


def effective_rank(S: Tensor | Sequence[float], *, total_energy: float | None = None,
                   full_length: int | None = None) -> float:
    """``exp(-sum p_i log p_i)`` with ``p_i = s_i / sum s_j`` (Roy & Vetterli 2007); 0 for a zero spectrum.

    With a top-k spectrum the tail is modelled as in the module docstring (an estimate)."""
    s = _values(S)
    total = _total(s, total_energy)
    tail, count = _tail(s, total, full_length)
    if count:
        s = torch.cat([s, torch.full((count,), math.sqrt(tail / count), dtype=s.dtype)])
    l1 = float(s.sum())
    if l1 <= 0:
        return 0.0
    p = s[s > 0] / l1
    return math.exp(float(-(p * torch.log(p)).sum()))


@dataclass(frozen=True)
class SpectrumMetrics:
    """All metrics of one spectrum; ``estimated`` names the ones that rest on the tail model."""

    effective_rank: float
    stable_rank: float
    energy_rank: dict[str, int]  # level_key(F) -> r
    total_energy: float  # ||M||_F^2
    complete: bool  # the spectrum holds every singular value (no tail to estimate)
    estimated: tuple[str, ...] = field(default=())  # "effective_rank" and/or level keys of estimated energy ranks


def spectrum_metrics(S: Tensor | Sequence[float], *, total_energy: float | None = None,
                     full_length: int | None = None, levels: Sequence[float] = ENERGY_LEVELS) -> SpectrumMetrics:
    """Every metric of the module docstring for ``S`` (k,), descending or not.

    ``total_energy``: ``||M||_F^2`` (default ``sum S^2``: a complete spectrum); ``full_length``: ``min(m, n)``
    (default ``len(S)``). The spectrum is complete when ``len(S) >= full_length`` or no tail energy is left.
    """
    s = _values(S)
    total = _total(s, total_energy)
    tail, count = _tail(s, total, full_length)
    ranks, estimated = {}, []
    for level in levels:
        r, est = energy_rank(s, level, total_energy=total, full_length=full_length)
        ranks[level_key(level)] = r
        if est:
            estimated.append(level_key(level))
    if count:
        estimated.insert(0, "effective_rank")
    return SpectrumMetrics(effective_rank=effective_rank(s, total_energy=total, full_length=full_length),
                           stable_rank=stable_rank(s, total_energy=total), energy_rank=ranks, total_energy=total,
                           complete=count == 0, estimated=tuple(estimated))
