"""The math: pure torch (and numpy), no files. Truncated SVD exact and randomized (:mod:`.svd`), the
randomized sketch (:mod:`.sketch`), rank rules, spectrum metrics, norms, the budget allocator and the
allocator settings for huge buffers (:mod:`.memory`). Imports torch, numpy, the standard library and
``errors`` only.
"""

from __future__ import annotations

from .rank_rules import RankRule, ENERGY_RTOL
from .svd import (Device, Method, TruncatedSVD, truncated_svd, singular_values, balanced_factors, qr_core_svd,
    concat_factors, fast_bf16, resolve_device)
from .memory import stream_large_buffers, empty_huge
from .sketch import top_singular_values
from .spectrum import (ENERGY_LEVELS, SpectrumMetrics, spectrum_metrics, cumulative_energy, energy_rank,
    effective_rank, stable_rank, level_key)
from .norms import check_finite, frobenius_error, frobenius_norm, lowrank_frobenius_diff, lowrank_frobenius_norm
from .budget import LayerSpectrum, allocate_budget, uniform_rank_params

__all__ = [
    "RankRule", "ENERGY_RTOL", "Device", "Method", "TruncatedSVD", "truncated_svd", "singular_values",
    "balanced_factors", "qr_core_svd", "concat_factors", "fast_bf16", "resolve_device", "stream_large_buffers",
    "empty_huge", "top_singular_values", "ENERGY_LEVELS", "SpectrumMetrics", "spectrum_metrics",
    "cumulative_energy", "energy_rank", "effective_rank", "stable_rank", "level_key", "check_finite",
    "frobenius_error", "frobenius_norm", "lowrank_frobenius_diff", "lowrank_frobenius_norm", "LayerSpectrum",
    "allocate_budget", "uniform_rank_params",
]
