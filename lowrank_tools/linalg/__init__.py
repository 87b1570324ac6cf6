"""The math: pure torch (and numpy), no files. Truncated SVD exact and randomized (:mod:`.svd`), the
randomized sketch (:mod:`.sketch`), rank rules, spectrum metrics, norms, the budget allocator, the
exact algebra of LoHa / LoKr / Tucker factors (:mod:`.structured`) and the allocator settings for huge buffers
(:mod:`.memory`). Imports torch, numpy, the standard library and
``errors`` only.
"""

from typing import TYPE_CHECKING as _TYPE_CHECKING

from .lazy import lazy_exports

if _TYPE_CHECKING:  # the same names, imported for type checkers and tests/test_architecture.py's layer graph
    from .rank_rules import RankRule, ENERGY_RTOL, energy_count, require_rank_option
    from .svd import (Device, Method, OutOfMemory, QRCore, TruncatedSVD, truncated_svd, singular_values, balanced_factors,
                      qr_core, qr_core_svd, concat_factors, fast_bf16, bf16_accepts, range_finder,
                      resolve_device)
    from .memory import stream_large_buffers, empty_huge
    from .sketch import top_singular_values, PowerStop, POWER_TOL
    from .spectrum import (ENERGY_LEVELS, SpectrumMetrics, spectrum_metrics, cumulative_energy, energy_rank, effective_rank,
                           stable_rank, level_key)
    from .norms import (delta_stats, check_finite, frobenius_error, frobenius_norm, lowrank_frobenius_diff,
                        lowrank_frobenius_norm)
    from .budget import LayerSpectrum, allocate_budget, minimal_budget, uniform_rank_params, greedy_units
    from .structured import (ExactSVD, face_splitting, khatri_rao, loha_factors, tucker_down, tucker_loha_pair,
                             tucker_locon_factors, lokr_w2_tucker, factor_svd, lowrank_svd,
                             loha_svd, kron_svd, numerical_rank, exact_rank, top_svd, dora_rescale_,
                             dora_row_norms)
    from .whiten import (DEFAULT_DAMPING, Whitener, WhitenedFactors, whitener, whitened_matrix, whitened_svd,
                         whitened_balanced_factors, WhitenedSVD, output_rel_error, measured_output_error,
                         whitened_factors)
    from .fused import split_rows, fuse_rows, swap_halves
    from .lazy import lazy_exports

# public name -> the module that defines it, imported on first use (PEP 562): importing one module of this package
# does not import the others (the command line's info reads an adapter without the SVD machinery)
_EXPORTS = {name: module for module, names in {
    ".rank_rules": ("RankRule", "ENERGY_RTOL", "energy_count", "require_rank_option",),
    ".svd": ("Device", "Method", "OutOfMemory", "QRCore", "TruncatedSVD", "truncated_svd", "singular_values",
           "balanced_factors", "qr_core", "qr_core_svd", "concat_factors", "fast_bf16", "bf16_accepts",
           "range_finder", "resolve_device",),
    ".memory": ("stream_large_buffers", "empty_huge",),
    ".sketch": ("top_singular_values", "PowerStop", "POWER_TOL",),
    ".spectrum": ("ENERGY_LEVELS", "SpectrumMetrics", "spectrum_metrics", "cumulative_energy", "energy_rank",
                "effective_rank", "stable_rank", "level_key",),
    ".norms": ("delta_stats", "check_finite", "frobenius_error", "frobenius_norm", "lowrank_frobenius_diff",
             "lowrank_frobenius_norm",),
    ".budget": ("LayerSpectrum", "allocate_budget", "minimal_budget", "uniform_rank_params", "greedy_units",),
    ".structured": ("ExactSVD", "face_splitting", "khatri_rao", "loha_factors", "tucker_down", "tucker_loha_pair",
                  "tucker_locon_factors", "lokr_w2_tucker", "factor_svd", "lowrank_svd", "loha_svd",
                  "kron_svd", "numerical_rank", "exact_rank", "top_svd", "dora_rescale_", "dora_row_norms",),
    ".whiten": ("DEFAULT_DAMPING", "Whitener", "WhitenedFactors", "whitener", "whitened_matrix", "whitened_svd",
              "whitened_balanced_factors", "WhitenedSVD", "output_rel_error", "measured_output_error", "whitened_factors",),
    ".fused": ("split_rows", "fuse_rows", "swap_halves",),
    ".lazy": ("lazy_exports",),
}.items() for name in names}

__all__ = [*_EXPORTS]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
