"""extract --budget: within budget, the allocation of allocate_budget, never worse than a uniform rank, and
errors measured by the top-K identity agree with brute force."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from conftest import LLAMA_SHAPES, make_pair
from lowrank_tools.linalg.budget import LayerSpectrum, allocate_budget, uniform_rank_params
from lowrank_tools.cli import main
from lowrank_tools.errors import InvalidOption
from lowrank_tools.extract import extract
from lowrank_tools.extract.budget import BUDGET_TOP_K, budget_top_k
from lowrank_tools.io.formats import load_adapter
from lowrank_tools.linalg import RankRule

SHAPES = {k: v for k, v in LLAMA_SHAPES.items() if len(v) == 2}


@pytest.fixture(scope="module")
def full_rank_pair():
    return make_pair(LLAMA_SHAPES, k=16, seed=4)  # rank 16 deltas: every budget truncates something


def _spectra(base, tuned) -> list[LayerSpectrum]:
    out = []
    for name in SHAPES:
        d = (tuned[name] - base[name]).double()
        out.append(LayerSpectrum(name[: -len(".weight")], tuple(d.shape), torch.linalg.svdvals(d).tolist()))
    return out


def _squared_error(result) -> float:
    return sum((r.delta_norm * r.rel_error) ** 2 for r in result.report.layers)


@pytest.mark.parametrize("budget", [80, 500, 2000, 4000])
def test_within_budget_and_equal_to_allocate_budget(full_rank_pair, budget):
    base, tuned = full_rank_pair
    result = extract(base, tuned, budget=budget, method="exact")
    assert result.adapter.params <= budget
    assert result.report.summary["params"] == result.adapter.params
    expected = {n: r for n, r in allocate_budget(_spectra(base, tuned), budget).items() if r > 0}
    assert result.adapter.ranks == expected
    assert {r.name: r.rank for r in result.report.layers} == expected


def test_budget_beyond_the_planted_ranks_keeps_them_all(full_rank_pair):
    # 16 (out + in) per layer holds every planted value; what is left buys rounding-level units only
    base, tuned = full_rank_pair
    result = extract(base, tuned, budget=100_000, method="exact")
    assert result.adapter.params <= 100_000
    assert all(r.rank >= 16 and r.rel_error < 1e-5 for r in result.report.layers)


@pytest.mark.parametrize("r", [1, 3, 8])
def test_never_worse_than_uniform_rank_at_the_same_parameter_count(full_rank_pair, r):
    base, tuned = full_rank_pair
    budget = uniform_rank_params(_spectra(base, tuned), r)
    uniform = extract(base, tuned, rule=RankRule(rank=r), method="exact")
    spread = extract(base, tuned, budget=budget, method="exact")
    assert uniform.adapter.params == budget and spread.adapter.params <= budget
    assert _squared_error(spread) <= _squared_error(uniform) * (1 + 1e-6)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_rel_error_identity_matches_brute_force(full_rank_pair, dtype, method):
    base, tuned = full_rank_pair
    result = extract(base, tuned, budget=1500, method=method, dtype=dtype, alpha=8.0)
    for rec in result.report.layers:
        d = tuned[f"{rec.name}.weight"] - base[f"{rec.name}.weight"]
        measured = float((result.adapter.modules[rec.name].delta() - d).norm() / d.norm())
        assert rec.rel_error == pytest.approx(measured, rel=1e-4 if dtype is None else 1e-3)
        s = torch.linalg.svdvals(d.double())
        if dtype is None:  # float32 factors: the error is the tail beyond the allocated rank
            assert rec.rel_error == pytest.approx(float(s[rec.rank:].norm() / s.norm()), rel=1e-4)


def test_randomized_top_k_in_one_pass():
    shapes = {f"model.layers.{i}.proj.weight": (320, 300) for i in range(3)}
    base, tuned = make_pair(shapes, k=40, seed=2)
    calls = []
    result = extract(base, tuned, budget=30_000, rule=RankRule(rank=24), method="randomized",
                     progress=lambda done, total, name: calls.append(done))
    assert calls == [0, 1, 2, 3]  # one pass over the layers
    assert result.adapter.params <= 30_000
    assert {r.extra["method"] for r in result.report.layers} == {"randomized"}
    assert {r.extra["budget_k"] for r in result.report.layers} == {24}  # K = the --rank cap
    assert max(result.adapter.ranks.values()) <= 24
    for rec in result.report.layers:
        d = tuned[f"{rec.name}.weight"] - base[f"{rec.name}.weight"]
        measured = float((result.adapter.modules[rec.name].delta() - d).norm() / d.norm())
        assert rec.rel_error == pytest.approx(measured, rel=1e-4)


def test_default_k():
    assert BUDGET_TOP_K == 256
    assert budget_top_k((4096, 11008), None) == 256 and budget_top_k((64, 32), None) == 32
    assert budget_top_k((4096, 4096), 16) == 16 and budget_top_k((8, 4, 3, 3), None) == 8  # conv: (8, 36)


def test_too_small_budget_fails_before_reading(full_rank_pair):
    base, tuned = full_rank_pair
    calls = []
    smallest = min(sum(s) for s in SHAPES.values())  # v_proj 16 x 32: 48 per rank unit
    with pytest.raises(InvalidOption, match=rf"--budget 47 is smaller than one rank unit of the smallest layer "
                                            rf"\({smallest} parameters for model.layers.0.self_attn.v_proj 16 x 32\): "
                                            rf"use --budget {smallest} or more"):
        extract(base, tuned, budget=smallest - 1, progress=lambda *a: calls.append(a))
    assert calls == []
    result = extract(base, tuned, budget=smallest, method="exact")
    assert result.adapter.params == smallest


@pytest.mark.parametrize("rule", [RankRule(energy=0.5), RankRule(sv_ratio=2.0), RankRule(threshold=1.0)])
def test_dynamic_rule_caps_each_layer_under_a_budget(full_rank_pair, rule):
    """--budget with --energy/--sv-ratio/--threshold: the rule caps every layer (as in resize and merge), the
    budget spreads what is left; a generous budget then gives exactly the rule's ranks."""
    base, tuned = full_rank_pair
    free = extract(base, tuned, rule=rule, method="exact").adapter.ranks  # the rule alone
    capped = extract(base, tuned, budget=10**9, rule=rule, method="exact").adapter.ranks
    assert capped == free
    tight = extract(base, tuned, budget=1000, rule=rule, method="exact").adapter
    assert tight.params <= 1000
    assert all(r <= free[name] for name, r in tight.ranks.items())


def test_budget_needs_no_rule_but_something(full_rank_pair):
    with pytest.raises(InvalidOption, match="no rank rule"):
        extract(*full_rank_pair)


def test_cli_budget(full_rank_pair, tmp_path):
    base, tuned = full_rank_pair
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(tuned, str(tmp_path / "tuned.safetensors"))
    args = ["extract", str(tmp_path / "base.safetensors"), str(tmp_path / "tuned.safetensors")]
    result = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "lora"), "--budget", "3000", "--method", "exact",
                                       "--report", str(tmp_path / "r.json"), "-q"])
    assert result.exit_code == 0, result.output
    adapter = load_adapter(tmp_path / "lora")
    report = json.loads((tmp_path / "r.json").read_text())
    assert adapter.params <= 3000 and len(set(adapter.ranks.values())) > 1
    assert adapter.ranks == {row["name"]: row["rank"] for row in report["layers"]}
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["rank_pattern"]  # per-layer ranks reach PEFT
    for row in report["layers"]:  # alpha = r per layer: scale 1
        assert math.isclose(adapter.modules[row["name"]].scale, 1.0)
    bad = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "x"), "--budget", "10"])
    assert bad.exit_code == 2 and "use --budget 48 or more" in bad.output and not (tmp_path / "x").exists()
    capped = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "e"), "--budget", "100000", "--energy", "0.5",
                                       "--method", "exact", "-q"])
    assert capped.exit_code == 0, capped.output
    assert load_adapter(tmp_path / "e").ranks == extract(base, tuned, rule=RankRule(energy=0.5), method="exact").adapter.ranks


def test_conv_and_zero_layers_under_a_budget():
    shapes = {"down.0.conv.weight": (8, 4, 3, 3), "down.0.proj.weight": (24, 16), "down.0.same.weight": (12, 12)}
    base, tuned = make_pair(shapes, k=4, seed=5)
    tuned["down.0.same.weight"] = base["down.0.same.weight"].clone()
    result = extract(base, tuned, budget=300, method="exact")
    assert result.adapter.params <= 300
    assert "down.0.same" in result.report.skipped["zero delta or nothing kept"]
    conv = result.adapter.modules["down.0.conv"]
    assert conv.weight_shape == (8, 4, 3, 3) and conv.matrix_shape == (8, 36)
    spectra = [LayerSpectrum(n, s, torch.linalg.svdvals((tuned[f"{n}.weight"] - base[f"{n}.weight"]).reshape(s[0], -1)
                                                        .double()).tolist())
               for n, s in (("down.0.conv", (8, 36)), ("down.0.proj", (24, 16)))]
    assert result.adapter.ranks == {n: r for n, r in allocate_budget(spectra, 300).items() if r}
    for name, m in result.adapter.modules.items():
        d = tuned[f"{name}.weight"] - base[f"{name}.weight"]
        rec = next(r for r in result.report.layers if r.name == name)
        assert rec.rel_error == pytest.approx(float((m.delta() - d).norm() / d.norm()), rel=1e-4, abs=1e-6)
