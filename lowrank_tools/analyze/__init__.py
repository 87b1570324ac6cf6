"""The analyze operation: its records (:mod:`.records`), the spectrum of every layer's change (:mod:`.spectra`), the ranks it calls for
(:mod:`.recommend`), the tables and files it writes (:mod:`.report`) and its plots (:mod:`.plots`).
"""

from __future__ import annotations

from .records import Analysis, LayerAnalysis, module_type, depth_key
from .spectra import analyze_delta, analyze_adapter, group_layers
from .recommend import RECOMMEND_LEVELS, energy_curve, recommend
from .report import format_analysis, analysis_json, analysis_csv, check_analysis_outputs, write_analysis
from .plots import PLOT_FILES, require_matplotlib, render_plots

__all__ = [
    "Analysis", "LayerAnalysis", "analyze_delta", "analyze_adapter", "module_type", "depth_key", "group_layers",
    "RECOMMEND_LEVELS", "recommend", "energy_curve", "format_analysis", "analysis_json", "analysis_csv",
    "check_analysis_outputs", "write_analysis", "PLOT_FILES", "require_matplotlib", "render_plots",
]
