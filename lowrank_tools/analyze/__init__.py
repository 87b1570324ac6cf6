"""The analyze operation: the spectrum of every layer's change (:mod:`.spectra`), the ranks it calls for
(:mod:`.recommend`), the tables and files it writes (:mod:`.report`) and its plots (:mod:`.plots`).
"""

from __future__ import annotations

from .spectra import Analysis, LayerAnalysis, analyze_delta, analyze_adapter, module_type, depth_key, group_layers
from .recommend import RECOMMEND_LEVELS, recommend, minimal_budget
from .report import format_analysis, analysis_json, analysis_csv, check_analysis_outputs, write_analysis
from .plots import PLOT_FILES, require_matplotlib, render_plots

__all__ = [
    "Analysis", "LayerAnalysis", "analyze_delta", "analyze_adapter", "module_type", "depth_key", "group_layers",
    "RECOMMEND_LEVELS", "recommend", "minimal_budget", "format_analysis", "analysis_json", "analysis_csv",
    "check_analysis_outputs", "write_analysis", "PLOT_FILES", "require_matplotlib", "render_plots",
]
