"""PNG figures of an :class:`~lowrank_tools.analyze.Analysis`. matplotlib is the optional ``.[plot]`` extra.

- ``singular_values.png``: every layer's singular values on a log scale, one panel per module type;
- ``cumulative_energy.png``: every layer's cumulative energy ``c_r`` against r, coloured by module type;
- ``rank90_heatmap.png``: depth x module type, the rank needed for 90 % of the energy (the largest, where
  several layers share a cell).

Figures are drawn on the Agg canvas directly (no pyplot, no global backend switch) and returned as PNG
bytes; :func:`~lowrank_tools.analysis_report.write_analysis` writes them.
"""

from __future__ import annotations

import io
import math
from typing import TYPE_CHECKING

from ..errors import MissingExtra
from ..linalg.spectrum import level_key

if TYPE_CHECKING:
    from .spectra import Analysis

__all__ = ["PLOT_FILES", "require_matplotlib", "render_plots"]

PLOT_FILES = ("singular_values.png", "cumulative_energy.png", "rank90_heatmap.png")
_DPI = 100
_ANNOTATE_CELLS = 400  # heat maps with more cells get no numbers


def require_matplotlib() -> None:
    """Raise :class:`MissingExtra` naming the extra when matplotlib cannot be imported."""
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
    except ImportError:
        raise MissingExtra("--plot needs matplotlib, which is not installed: pip install 'lowrank-tools[plot]' "
                           "(or pip install matplotlib)") from None


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI)
    return buf.getvalue()


def _colors(cmap_name: str, n: int) -> list:
    """n colours: the first n of a qualitative map (tab10, tab20; cycled), else n evenly spread."""
    from matplotlib import colormaps

    cmap = colormaps[cmap_name]
    listed = getattr(cmap, "colors", None)
    if cmap_name.startswith("tab") and listed is not None:
        return [listed[i % len(listed)] for i in range(n)]
    return [cmap(i / max(1, n - 1)) for i in range(n)]


def _singular_values(analysis: Analysis) -> bytes:
    types = list(analysis.groups["module_type"])
    depths = list(analysis.groups["depth"])
    colors = dict(zip(depths, _colors("viridis", len(depths))))
    cols = min(3, len(types))
    rows = math.ceil(len(types) / cols)
    fig = _figure(4.2 * cols, 3.2 * rows)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, kind in zip(axes.flat, types):
        for x in (x for x in analysis.layers if x.module_type == kind):
            values = [s if s > 0 else math.nan for s in x.singular_values]  # zeros have no log
            ax.plot(range(1, len(values) + 1), values, color=colors[x.depth or "-"], linewidth=0.8, alpha=0.8)
        ax.set_yscale("log")
        ax.set_title(kind, fontsize=10)
        ax.set_xlabel("index i")
        ax.set_ylabel("singular value s_i")
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(types):]:
        ax.set_visible(False)
    fig.suptitle("singular values per module type (colour: depth, dark = first)")
    return _png(fig)


def _cumulative_energy(analysis: Analysis) -> bytes:
    types = list(analysis.groups["module_type"])
    colors = dict(zip(types, _colors("tab10" if len(types) <= 10 else "tab20", len(types))))
    fig = _figure(8, 5)
    ax = fig.subplots()
    labelled = set()
    for x in analysis.layers:
        total = x.metrics.total_energy
        cum, acc = [], 0.0
        for s in x.singular_values:
            acc += s * s
            cum.append(acc / total if total else 0.0)
        label = None if x.module_type in labelled else x.module_type
        labelled.add(x.module_type)
        ax.plot(range(1, len(cum) + 1), cum, color=colors[x.module_type], linewidth=0.8, alpha=0.7, label=label)
    for level in (0.5, 0.9, 0.95, 0.99):
        ax.axhline(level, color="grey", linestyle="--", linewidth=0.6)
    ax.set_xscale("log")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("rank r")
    ax.set_ylabel("cumulative energy  sum_{i<=r} s_i^2 / ||dW||_F^2")
    ax.set_title("cumulative energy per layer")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=2 if len(types) > 8 else 1, loc="lower right")
    return _png(fig)


def _heatmap(analysis: Analysis) -> bytes:
    import numpy as np

    types = list(analysis.groups["module_type"])
    depths = list(analysis.groups["depth"])
    key = level_key(0.9)
    grid = np.full((len(depths), len(types)), np.nan)
    for x in analysis.layers:
        i, j = depths.index(x.depth or "-"), types.index(x.module_type)
        r = x.metrics.energy_rank[key]
        grid[i, j] = r if np.isnan(grid[i, j]) else max(grid[i, j], r)
    fig = _figure(max(5.0, 1.0 + 0.7 * len(types)), max(3.5, 1.5 + 0.25 * len(depths)))
    ax = fig.subplots()
    image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap="magma_r", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="rank for 90% energy")
    ax.set_xticks(range(len(types)), types, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(depths)), depths, fontsize=7 if len(depths) > 30 else 9)
    ax.set_xlabel("module type")
    ax.set_ylabel("depth")
    if grid.size <= _ANNOTATE_CELLS:
        for (i, j), value in np.ndenumerate(grid):
            if not np.isnan(value):  # light text on the dark (high-rank) half of the map
                dark = image.norm(value) > 0.5
                ax.text(j, i, f"{value:g}", ha="center", va="center", fontsize=7, color="white" if dark else "black")
    ax.set_title("rank needed for 90% of each layer's energy")
    return _png(fig)


def render_plots(analysis: Analysis) -> dict[str, bytes]:
    """``{file name: PNG bytes}`` for the three figures of the module docstring."""
    require_matplotlib()
    if not analysis.layers:
        return {}
    return {PLOT_FILES[0]: _singular_values(analysis), PLOT_FILES[1]: _cumulative_energy(analysis),
            PLOT_FILES[2]: _heatmap(analysis)}
