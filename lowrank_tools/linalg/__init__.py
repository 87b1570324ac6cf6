"""The math: pure torch (and numpy), no files. Truncated SVD exact and randomized (:mod:`.svd`), the
randomized sketch (:mod:`.sketch`), rank rules, spectrum metrics, norms, the budget allocator, the
exact algebra of LoHa / LoKr / Tucker factors (:mod:`.structured`) and the allocator settings for huge buffers
(:mod:`.memory`). Imports torch, numpy, the standard library and
``errors`` only.
"""

from __future__ import annotations

import importlib

from .rank_rules import RankRule, ENERGY_RTOL, energy_count, require_rank_option
from .svd import (Device, Method, OutOfMemory, QRCore, TruncatedSVD, truncated_svd, singular_values, balanced_factors, qr_core,
    qr_core_svd, concat_factors, fast_bf16, bf16_accepts, range_finder, resolve_device)
from .memory import stream_large_buffers, empty_huge
from .sketch import top_singular_values
from .spectrum import (ENERGY_LEVELS, SpectrumMetrics, spectrum_metrics, cumulative_energy, energy_rank, effective_rank, stable_rank,
    level_key)
from .norms import (delta_stats, check_finite, frobenius_error, frobenius_norm, lowrank_frobenius_diff, lowrank_frobenius_norm)
from .budget import LayerSpectrum, allocate_budget, minimal_budget, uniform_rank_params, greedy_units
from .structured import (ExactSVD, face_splitting, khatri_rao, loha_factors, tucker_down, tucker_loha_pair, tucker_locon_factors,
    lokr_w2_tucker, factor_svd, lowrank_svd, loha_svd, kron_svd, numerical_rank, exact_rank, dora_rescale_,
    dora_row_norms)

_MODULES = (
    "rank_rules", "svd", "memory", "sketch", "spectrum", "norms", "budget", "structured",
)
__all__ = list(dict.fromkeys(  # every module's public names, once
    name for m in _MODULES for name in importlib.import_module(f".{m}", __name__).__all__))
