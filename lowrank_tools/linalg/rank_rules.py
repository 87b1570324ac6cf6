"""Rank rules: how many singular values to keep (fixed rank, energy, ratio, threshold). Imports torch only.

Each rule returns "the smallest r such that ..." and is tested exactly at its boundaries.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import InvalidOption

__all__ = ["RankRule", "ENERGY_RTOL"]

ENERGY_RTOL = 1e-12  # relative slack so spectra that reach the target exactly are not off by one
_ENERGY_RTOL = ENERGY_RTOL
_RATIO_RTOL = 1e-12  # same for S_1 / sv_ratio, which is rounded when computed



def _check_range(option: str, value: object, ok: Callable[[float], bool], allowed: str, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or not ok(value):
        raise InvalidOption(f"--{option} {value!r} is outside {allowed}: {hint}")


@dataclass(frozen=True)
class RankRule:
    """How many singular values to keep. ``rank``: fixed rank, and the cap for the dynamic rules.

    At most one dynamic rule (``energy``, ``sv_ratio``, ``threshold``) may be given, and at least one
    of them or ``rank``. :meth:`choose` returns the smallest r that satisfies the rule.
    """

    rank: int | None = None  # >= 1
    energy: float | None = None  # in (0, 1]: smallest r with sum(S[:r]^2) / total_energy >= energy
    sv_ratio: float | None = None  # >= 1: keep S_i >= S_1 / sv_ratio
    threshold: float | None = None  # >= 0: keep S_i > threshold

    def __post_init__(self) -> None:
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, numbers.Integral)
                                      or self.rank < 1):
            raise InvalidOption(f"--rank {self.rank!r} is outside [1, inf): use a whole number of 1 or more")
        if self.energy is not None:
            _check_range("energy", self.energy, lambda v: 0 < v <= 1, "(0, 1]",
                         "give the fraction of squared singular values to keep, e.g. 0.9")
        if self.sv_ratio is not None:
            _check_range("sv-ratio", self.sv_ratio, lambda v: v >= 1, "[1, inf)",
                         "keep S_i >= S_1 / F needs F of 1 or more, e.g. 10")
        if self.threshold is not None:
            _check_range("threshold", self.threshold, lambda v: v >= 0, "[0, inf)",
                         "keep S_i > F needs F of 0 or more")
        given = [f"--{k} {v}" for k, v in (("energy", self.energy), ("sv-ratio", self.sv_ratio),
                                           ("threshold", self.threshold)) if v is not None]
        if len(given) > 1:
            raise InvalidOption(f"{' and '.join(given)} exclude each other: pick one dynamic rank rule")
        if not given and self.rank is None:
            raise InvalidOption("no rank rule: pass --rank, --energy, --sv-ratio or --threshold")

    @property
    def dynamic(self) -> bool:
        """True when the rank depends on the spectrum (energy, sv_ratio or threshold)."""
        return self.energy is not None or self.sv_ratio is not None or self.threshold is not None

    @property
    def cap(self) -> int | None:
        """The largest rank this rule may return (``rank``), None when uncapped."""
        return self.rank

    def choose(self, S: Tensor | Sequence[float], *, total_energy: float | None = None,
               max_rank: int | None = None) -> int:
        """The smallest r that satisfies the rule, capped by ``rank``, ``len(S)`` and ``max_rank``.

        ``S``: singular values (k,), possibly a truncated top-k; they are sorted descending here.
        ``total_energy``: ``||M||_F^2`` when ``S`` is truncated (default ``sum(S^2)``). Returns 0 only
        when ``S`` is all zero or the threshold excludes every value.
        """
        s, dtype = _as_spectrum(S)  # float64, descending
        limit = len(s) if self.rank is None else min(len(s), int(self.rank))
        if max_rank is not None:
            limit = min(limit, max(0, int(max_rank)))
        if limit == 0 or not float(s[0]) > 0:
            return 0
        r = self._dynamic_count(s, dtype, total_energy) if self.dynamic else limit
        return max(0, min(r, limit))

    def _dynamic_count(self, s: Tensor, dtype: torch.dtype, total_energy: float | None) -> int:
        if self.energy is not None:
            sq = s * s
            cum = torch.cumsum(sq, 0)  # (k,) float64: exact enough for boundary comparisons
            total = float(cum[-1]) if total_energy is None else max(float(total_energy), float(cum[-1]))
            target = self.energy * total - _ENERGY_RTOL * total
            return min(int(torch.searchsorted(cum, torch.tensor([target], dtype=cum.dtype))[0]) + 1, len(s))
        if self.sv_ratio is not None:
            cutoff = float(s[0]) / self.sv_ratio * (1 - _RATIO_RTOL)
            return int((s >= cutoff).sum())
        # the threshold is rounded to the spectrum's dtype, so "0.1" means the stored value it names
        thr = float(torch.tensor(float(self.threshold), dtype=dtype)) if dtype.is_floating_point else self.threshold
        return int((s > thr).sum())

    def needed_k(self, shape: Sequence[int]) -> int:
        """How many singular values to compute for a matrix of ``shape``: ``rank`` if given, else all.

        A shape with more than two dims is read as ``(shape[0], prod(shape[1:]))`` (flattened conv).
        """
        dims = [int(d) for d in shape]
        side = min(dims[0], math.prod(dims[1:])) if len(dims) > 1 else dims[0]
        return side if self.rank is None else min(int(self.rank), side)


def _as_spectrum(S: Tensor | Sequence[float]) -> tuple[Tensor, torch.dtype]:
    """(k,) float64 CPU tensor sorted descending, plus the dtype the values came in."""
    t = S.detach() if isinstance(S, Tensor) else torch.as_tensor(list(S), dtype=torch.float64)
    dtype = t.dtype
    return torch.sort(t.reshape(-1).to("cpu", torch.float64), descending=True).values, dtype
