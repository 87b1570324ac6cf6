"""plots: valid PNG files, written all or nothing; a clear error without matplotlib."""

from __future__ import annotations

import sys

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from lowrank_tools.analyze import plots
from lowrank_tools.adapter import Adapter, LoraModule
from lowrank_tools.analyze.report import write_analysis
from lowrank_tools.analyze import analyze_adapter, analyze_delta
from lowrank_tools.cli import main
from lowrank_tools.errors import MissingExtra, OutputError, OutputExists
from lowrank_tools.analyze.plots import PLOT_FILES, render_plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _pair(blocks: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    base, tuned = {}, {}
    for i in range(blocks):
        for kind, shape in (("to_q", (24, 16)), ("to_v", (24, 16)), ("ff", (40, 24))):
            name = f"down_blocks.{i}.attn.{kind}.weight"
            base[name] = torch.randn(*shape, generator=g)
            k = 2 + i
            tuned[name] = base[name] + torch.randn(shape[0], k, generator=g) @ torch.randn(k, shape[1], generator=g)
    base["conv_out.weight"] = torch.randn(4, 8, 3, 3, generator=g)
    tuned["conv_out.weight"] = base["conv_out.weight"] + 0.1 * torch.randn(4, 8, 3, 3, generator=g)
    return base, tuned


@pytest.fixture(scope="module")
def analysis():
    return analyze_delta(*_pair())


def _assert_png(data: bytes) -> None:
    assert data[:8] == PNG_SIGNATURE and len(data) > 1000


def test_three_valid_pngs(analysis, tmp_path):
    written = write_analysis(analysis, plot_dir=tmp_path / "figs")
    assert sorted(p.name for p in written) == sorted(PLOT_FILES)
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == sorted(PLOT_FILES)  # no temporaries left
    import matplotlib.image

    for name in PLOT_FILES:
        data = (tmp_path / "figs" / name).read_bytes()
        _assert_png(data)
        pixels = matplotlib.image.imread(tmp_path / "figs" / name)  # decodes: a real image
        assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100


def test_adapter_and_single_layer_plots():
    g = torch.Generator().manual_seed(1)
    adapter = Adapter(modules={"lm_head": LoraModule(B=torch.randn(12, 3, generator=g),
                                                     A=torch.randn(3, 10, generator=g), alpha=3.0)})
    figures = render_plots(analyze_adapter(adapter))
    assert sorted(figures) == sorted(PLOT_FILES)
    for data in figures.values():
        _assert_png(data)


def test_missing_matplotlib_is_a_clear_error(analysis, tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(MissingExtra, match=r"--plot needs matplotlib.*pip install 'lowrank-tools\[plot\]'"):
        plots.require_matplotlib()
    with pytest.raises(MissingExtra, match=r"lowrank-tools\[plot\]"):
        write_analysis(analysis, json_path=tmp_path / "a.json", plot_dir=tmp_path / "figs")
    assert not (tmp_path / "a.json").exists() and not (tmp_path / "figs").exists()


def test_missing_matplotlib_on_the_command_line(tmp_path, monkeypatch):
    base, tuned = _pair(blocks=1)
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(tuned, str(tmp_path / "tuned.safetensors"))
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    result = CliRunner().invoke(main, ["analyze", str(tmp_path / "base.safetensors"), str(tmp_path / "tuned.safetensors"),
                                       "--json", str(tmp_path / "a.json"), "--plot", str(tmp_path / "figs")])
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and "lowrank-tools[plot]" in errors[0]
    assert not (tmp_path / "a.json").exists() and not (tmp_path / "figs").exists()


def test_failure_while_writing_leaves_nothing(analysis, tmp_path, monkeypatch):
    def broken(_analysis):
        raise RuntimeError("renderer broke")

    monkeypatch.setattr(plots, "_heatmap", broken)
    with pytest.raises(RuntimeError, match="renderer broke"):
        write_analysis(analysis, json_path=tmp_path / "a.json", plot_dir=tmp_path / "figs")
    assert list(tmp_path.iterdir()) == []


def test_unwritable_targets(analysis, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match=r"--plot .*file: plot folder is not a folder: choose another --plot"):
        write_analysis(analysis, plot_dir=blocker)
    with pytest.raises(OutputError, match="parent of the plot folder, is not a folder"):
        write_analysis(analysis, plot_dir=blocker / "figs")
    write_analysis(analysis, plot_dir=tmp_path / "figs")
    before = (tmp_path / "figs" / PLOT_FILES[0]).stat().st_mtime_ns
    with pytest.raises(OutputExists, match="pass --force"):
        write_analysis(analysis, plot_dir=tmp_path / "figs")
    write_analysis(analysis, plot_dir=tmp_path / "figs", force=True)
    assert (tmp_path / "figs" / PLOT_FILES[0]).stat().st_mtime_ns >= before
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == sorted(PLOT_FILES)
