"""analyze's weight-space twin of evaluate's curve: the whole delta's retained energy against adapter size."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from conftest import LLAMA_SHAPES, make_pair
from lowrank_tools.analyze import analyze_delta
from lowrank_tools.linalg.budget import LayerSpectrum, allocate_budget
from lowrank_tools.cli import main
from lowrank_tools.analyze.recommend import energy_curve


def _pair():
    return make_pair({k: v for k, v in LLAMA_SHAPES.items() if len(v) == 2}, k=3)


def test_uniform_curve_is_exact_on_planted_rank_3_deltas():
    base, tuned = _pair()
    analysis = analyze_delta(base, tuned)
    unit = sum(x.unit_cost for x in analysis.layers)  # out + in summed over layers
    uniform = {p["rank"]: p for p in analysis.energy_curve["uniform"]}
    assert uniform[3]["retained_energy"] == pytest.approx(1.0, abs=1e-9) and uniform[3]["params"] == 3 * unit
    assert uniform[1]["params"] == unit and 0 < uniform[1]["retained_energy"] < uniform[2]["retained_energy"] < 1
    total = sum(x.metrics.total_energy for x in analysis.layers)
    assert uniform[1]["retained_energy"] == pytest.approx(sum(x.singular_values[0] ** 2 for x in analysis.layers)
                                                          / total, rel=1e-12)


def test_budget_curve_points_are_what_allocate_budget_keeps():
    base, tuned = _pair()
    analysis = analyze_delta(base, tuned)
    spectra = [LayerSpectrum(x.name, x.matrix_shape, x.singular_values) for x in analysis.layers]
    total = sum(x.metrics.total_energy for x in analysis.layers)
    points = analysis.energy_curve["budget"]
    assert points[-1]["retained_energy"] == pytest.approx(1.0, abs=1e-9)
    assert all(a["params"] < b["params"] and a["retained_energy"] <= b["retained_energy"]
               for a, b in zip(points, points[1:]))
    for p in points:
        ranks = allocate_budget(spectra, p["params"])
        kept = sum(sum(s * s for s in x.singular_values[:ranks[x.name]]) for x in analysis.layers)
        assert sum(r * x.unit_cost for x, r in zip(analysis.layers, ranks.values())) == p["params"]
        assert kept / total == pytest.approx(p["retained_energy"], rel=1e-9)


def test_energy_curve_is_in_the_json_and_thins_to_log_spaced_points(tmp_path):
    base, tuned = _pair()
    analysis = analyze_delta(base, tuned)
    thin = energy_curve(analysis.layers, points=2)
    longest = max(len(x.singular_values) for x in analysis.layers)
    assert [p["rank"] for p in thin["uniform"]] == [1, longest] and len(thin["budget"]) == 2
    every = energy_curve(analysis.layers, points=10**6)  # more points than ranks: every rank, none skipped
    assert [p["rank"] for p in every["uniform"]] == list(range(1, longest + 1))
    from safetensors.torch import save_file

    save_file(base, str(tmp_path / "b.safetensors"))
    save_file(tuned, str(tmp_path / "t.safetensors"))
    out = tmp_path / "a.json"
    result = CliRunner().invoke(main, ["analyze", str(tmp_path / "b.safetensors"), str(tmp_path / "t.safetensors"),
                                       "--json", str(out), "-q"])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["energy_curve"]["uniform"][-1]["retained_energy"] == pytest.approx(1.0)
