"""analyze's figures read as objects (not pixels): the depth colour bar, one distinct colour per module type with
families together, and the labelled 50/90/95/99 % lines."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("matplotlib")

from matplotlib.colors import to_rgba  # noqa: E402

from lowrank_tools.analyze import analyze_delta  # noqa: E402
from lowrank_tools.analyze.plots import (LEVELS, PLOT_FILES, depth_colors, figures, type_colors,  # noqa: E402
                                         type_family)

TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")


def _llama_like(blocks: int = 4):
    g = torch.Generator().manual_seed(0)
    base, tuned = {}, {}
    for i in range(blocks):
        for kind in TYPES:
            name = f"model.layers.{i}.{'mlp' if kind in ('up_proj', 'down_proj') else 'self_attn'}.{kind}.weight"
            base[name] = torch.randn(12, 8, generator=g)
            tuned[name] = base[name] + torch.randn(12, 2, generator=g) @ torch.randn(2, 8, generator=g)
    base["conv_in.weight"] = torch.randn(4, 2, 3, 3, generator=g)
    tuned["conv_in.weight"] = base["conv_in.weight"] + 0.1 * torch.randn(4, 2, 3, 3, generator=g)
    return base, tuned


@pytest.fixture(scope="module")
def figs():
    analysis = analyze_delta(*_llama_like())
    return analysis, figures(analysis)


def test_singular_values_figure_has_a_depth_colour_bar_naming_the_blocks(figs):
    analysis, f = figs
    fig = f[PLOT_FILES[0]]
    bars = [ax for ax in fig.axes if ax.get_ylabel() == "depth (block)"]
    assert len(bars) == 1
    depths = list(analysis.groups["depth"])
    assert [t.get_text() for t in bars[0].get_yticklabels()] == depths
    colors = depth_colors(depths)
    panel = next(ax for ax in fig.axes if ax.get_title() == "q_proj")
    assert [to_rgba(line.get_color()) for line in panel.get_lines()] == [
        to_rgba(colors[f"layers.{i}"]) for i in range(4)]  # one line per block, coloured by its depth


def test_cumulative_energy_gives_each_type_its_own_colour_families_together(figs):
    _, f = figs
    ax = f[PLOT_FILES[1]].axes[0]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["q_proj (q)", "k_proj (k)", "v_proj (v)", "o_proj (o)", "down_proj (mlp)", "up_proj (mlp)",
                      "conv_in (conv)"]
    by_type = {}
    for line in ax.get_lines():
        if line.get_gid():
            by_type.setdefault(line.get_gid(), set()).add(to_rgba(line.get_color()))
    assert all(len(c) == 1 for c in by_type.values())  # every layer of a type: that type's colour
    assert len({next(iter(c)) for c in by_type.values()}) == len(by_type) == 7  # all distinct


@pytest.mark.parametrize("name", [PLOT_FILES[1], PLOT_FILES[3]])
def test_energy_levels_are_drawn_and_labelled(figs, name):
    _, f = figs
    ax = f[name].axes[0]
    labels = {t.get_text(): t.xy[1] for t in ax.texts if t.get_text().endswith("%")}
    assert labels == {"50%": 0.5, "90%": 0.9, "95%": 0.95, "99%": 0.99}
    flat = sorted(line.get_ydata()[0] for line in ax.get_lines()
                  if len(set(line.get_ydata())) == 1 and len(line.get_ydata()) == 2 and not line.get_gid())
    assert flat == list(LEVELS)


def test_heatmap_type_labels_take_the_type_colours(figs):
    analysis, f = figs
    ax = next(ax for ax in f[PLOT_FILES[2]].axes if ax.get_xlabel() == "module type")
    colors = type_colors(analysis.groups["module_type"])
    for label in ax.get_xticklabels():
        assert to_rgba(label.get_color()) == to_rgba(colors[label.get_text()])


def test_type_colours_stay_distinct_past_twenty_types():
    types = [f"proj_{i}" for i in range(45)]
    colors = type_colors(types)
    assert len({to_rgba(c) for c in colors.values()}) == 45
    assert len({to_rgba(c) for c in type_colors(TYPES).values()}) == len(TYPES)


@pytest.mark.parametrize("kind,family", [("q_proj", "q"), ("to_k", "k"), ("value", "v"), ("0", "o"), ("to_out", "o"),
                                         ("gate_proj", "mlp"), ("fc2", "mlp"), ("conv1", "conv"), ("c_attn", "qkv"),
                                         ("embed_tokens", "embedding"), ("norm", "other")])
def test_type_families(kind, family):
    assert type_family(kind) == family
