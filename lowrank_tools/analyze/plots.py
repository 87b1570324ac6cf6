"""PNG figures of an :class:`~lowrank_tools.analyze.records.Analysis`. matplotlib is the optional ``.[plot]`` extra.

- ``singular_values.png``: every layer's singular values on a log scale, one panel per module type, coloured by
  depth (a colour bar names the blocks);
- ``cumulative_energy.png``: every layer's cumulative energy ``c_r`` against r, one distinct colour per module type
  (types of one family side by side: q, k, v, o, mlp, conv, ...), the 50/90/95/99 % levels labelled;
- ``retained_energy_vs_params.png``: the whole delta's retained energy against adapter parameters, for a uniform
  rank and for ``--budget`` (:func:`~lowrank_tools.analyze.recommend.energy_curve`), the recommended points marked (the
  weight-space twin of ``evaluate``'s ``recovered_vs_params.png``);
- ``rank90_heatmap.png``: depth x module type, the rank needed for 90 % of the energy (the largest, where
  several layers share a cell).

Figures are drawn on the Agg canvas directly (no pyplot, no global backend switch); :func:`figures` returns the
matplotlib ``Figure`` objects (tests read them), :func:`render_plots` their PNG bytes, which
:func:`~lowrank_tools.analyze.report.write_analysis` writes.
"""

from __future__ import annotations

import io
import math
import re
from typing import TYPE_CHECKING

from ..errors import MissingExtra
from ..linalg.spectrum import level_key

if TYPE_CHECKING:
    from .records import Analysis

__all__ = ["PLOT_FILES", "LEVELS", "require_matplotlib", "figures", "render_plots", "type_family", "type_colors",
           "depth_colors"]

PLOT_FILES = ("singular_values.png", "cumulative_energy.png", "rank90_heatmap.png", "retained_energy_vs_params.png")
LEVELS = (0.5, 0.9, 0.95, 0.99)  # the energy levels drawn (and labelled) as horizontal lines
_LEVEL_STYLES = (":", "--", "-.", (0, (5, 1)))
_DPI = 100
_ANNOTATE_CELLS = 400  # heat maps with more cells get no numbers
_DEPTH_CMAP = "viridis"
_FAMILIES = (  # (family, pattern on the module type): the order of the legend
    ("q", r"(^|_)(q|query|to_q|q_proj|wq)$|^q_"), ("k", r"(^|_)(k|key|to_k|k_proj|wk)$|^k_"),
    ("v", r"(^|_)(v|value|to_v|v_proj|wv)$|^v_"), ("qkv", r"qkv|in_proj|c_attn"),
    ("o", r"(^|_)(o|out|to_out|o_proj|out_proj|wo|dense|proj_out|c_proj)$|^\d+$"),
    ("mlp", r"gate|up_proj|down_proj|fc\d|c_fc|^w[123]$|mlp|ff|ffn|intermediate|proj_mlp|linear_\d"),
    ("conv", r"conv|proj_in|shortcut|downsampler|upsampler"), ("embedding", r"emb|wte|wpe|lm_head"),
)

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


def type_family(kind: str) -> str:
    """The family of a module type (``q_proj`` -> ``q``, ``up_proj`` -> ``mlp``, ``conv1`` -> ``conv``), else
    ``other``: it orders the types so that one family's colours sit together."""
    for family, pattern in _FAMILIES:
        if re.search(pattern, kind.lower()):
            return family
    return "other"


def type_colors(types) -> dict:
    """One distinct colour per module type, families together: tab10 up to 10 types, then tab20 + tab20b + tab20c
    (60 colours; beyond that they repeat)."""
    order = {family: i for i, (family, _) in enumerate(_FAMILIES)}
    ranked = sorted(dict.fromkeys(types), key=lambda t: (order.get(type_family(t), len(order)), t))
    if len(ranked) <= 10:
        palette = _colors("tab10", 10)
    else:
        palette = [c for name in ("tab20", "tab20b", "tab20c") for c in _colors(name, 20)]
    return {t: palette[i % len(palette)] for i, t in enumerate(ranked)}


def depth_colors(depths) -> dict:
    """``{depth: colour}``, dark (first) to light (last) on viridis, in the order given."""
    depths = list(depths)
    return dict(zip(depths, _colors(_DEPTH_CMAP, len(depths))))


def _depth_colorbar(fig, axes, depths: list) -> None:
    """A colour bar naming the depth of each colour (at most ~12 tick labels)."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    mappable = ScalarMappable(norm=Normalize(0, max(1, len(depths) - 1)), cmap=colormaps[_DEPTH_CMAP])
    bar = fig.colorbar(mappable, ax=axes, label="depth (block)", shrink=0.9)
    step = max(1, math.ceil(len(depths) / 12))
    ticks = list(range(0, len(depths), step))
    bar.set_ticks(ticks, labels=[str(depths[i]) for i in ticks], fontsize=7)


def _levels(ax) -> None:
    """The 50/90/95/99 % lines, each labelled at the right edge."""
    for level, style in zip(LEVELS, _LEVEL_STYLES):
        ax.axhline(level, color="0.45", linestyle=style, linewidth=0.8)
        ax.annotate(f"{level:.0%}", xy=(1.0, level), xycoords=("axes fraction", "data"), xytext=(3, 0),
                    textcoords="offset points", va="center", fontsize=8, color="0.3")


def _singular_values(analysis: Analysis):
    types = list(analysis.groups["module_type"])
    depths = list(analysis.groups["depth"])
    colors = depth_colors(depths)
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
    _depth_colorbar(fig, axes, depths)
    fig.suptitle("singular values per module type (colour: depth, dark = first)")
    return fig


def _cumulative_energy(analysis: Analysis):
    colors = type_colors(analysis.groups["module_type"])
    types = list(colors)  # families together: the legend's order
    fig = _figure(8, 5)
    ax = fig.subplots()
    for x in analysis.layers:
        total = x.metrics.total_energy
        cum, acc = [], 0.0
        for s in x.singular_values:
            acc += s * s
            cum.append(acc / total if total else 0.0)
        ax.plot(range(1, len(cum) + 1), cum, color=colors[x.module_type], linewidth=0.8, alpha=0.7, gid=x.module_type)
    for kind in types:  # one legend entry per type, in family order
        ax.plot([], [], color=colors[kind], label=f"{kind} ({type_family(kind)})")
    _levels(ax)
    ax.set_xscale("log")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("rank r")
    ax.set_ylabel("cumulative energy  sum_{i<=r} s_i^2 / ||dW||_F^2")
    ax.set_title("cumulative energy per layer")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=2 if len(types) > 8 else 1, loc="lower right", title="module type (family)",
              title_fontsize=8)
    return fig


def _heatmap(analysis: Analysis):
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
    colors = type_colors(types)
    for label in ax.get_xticklabels():  # each type in its colour of the other figures
        label.set_color(colors[label.get_text()])
    ax.set_yticks(range(len(depths)), depths, fontsize=7 if len(depths) > 30 else 9)
    ax.set_xlabel("module type")
    ax.set_ylabel("depth")
    if grid.size <= _ANNOTATE_CELLS:
        for (i, j), value in np.ndenumerate(grid):
            if not np.isnan(value):  # light text on the dark (high-rank) half of the map
                dark = image.norm(value) > 0.5
                ax.text(j, i, f"{value:g}", ha="center", va="center", fontsize=7, color="white" if dark else "black")
    ax.set_title("rank needed for 90% of each layer's energy")
    return fig


def _retained_vs_params(analysis: Analysis):
    from matplotlib.ticker import NullFormatter

    curve = analysis.energy_curve
    fig = _figure(7.5, 4.8)
    ax = fig.subplots()
    for key, label, color in (("uniform", "uniform --rank", "tab:blue"), ("budget", "--budget", "tab:orange")):
        points = [p for p in curve.get(key, []) if p["params"] > 0]
        ax.plot([p["params"] for p in points], [p["retained_energy"] for p in points], color=color, label=label,
                marker="." if key == "uniform" else None)
        chosen = [rec[key] for rec in analysis.recommendation.values() if rec.get(key)]
        ax.scatter([c["params"] for c in chosen], [c["retained_energy"] for c in chosen], s=120, facecolors="none",
                   edgecolors=color, linewidths=1.5, zorder=3)
    _levels(ax)
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("adapter parameters")
    ax.set_ylabel("retained energy of the whole delta")
    ax.set_title("retained energy vs adapter size (circled: recommended for 90/95/99%)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    return fig


def figures(analysis: Analysis) -> dict:
    """``{file name: matplotlib Figure}`` for the four figures of the module docstring (none without layers)."""
    require_matplotlib()
    if not analysis.layers:
        return {}
    return {PLOT_FILES[0]: _singular_values(analysis), PLOT_FILES[1]: _cumulative_energy(analysis),
            PLOT_FILES[2]: _heatmap(analysis), PLOT_FILES[3]: _retained_vs_params(analysis)}


def render_plots(analysis: Analysis) -> dict[str, bytes]:
    """``{file name: PNG bytes}`` for the four figures of the module docstring."""
    return {name: _png(fig) for name, fig in figures(analysis).items()}
