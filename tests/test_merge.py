"""merge: exact concatenation is the weighted sum of products; truncation is its optimal rank-r approximation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from lowrank_tools.adapter import Adapter, ModuleKind
from lowrank_tools.cli import main
from lowrank_tools.errors import AdapterMismatch, CheckpointNotFound, InvalidOption
from lowrank_tools.io.formats import load_adapter, save_adapter
from lowrank_tools.linalg import RankRule
from lowrank_tools.merge import merge
from lowrank_tools.weighted import AdapterSpec, WeightedAdapter, load_weighted, parse_adapter_spec
from test_resize import random_module, rel


def three_adapters() -> list[Adapter]:
    """Different ranks, alphas and scale conventions on the same modules (and one module only in the first)."""
    a = Adapter(modules={"q": random_module(24, 16, 4, alpha=8.0, seed=1),
                         "conv": random_module(12, 54, 4, alpha=2.0, seed=2, kind=ModuleKind.CONV,
                                               weight_shape=(12, 6, 3, 3)),
                         "only_a": random_module(10, 10, 3, seed=3)})
    b = Adapter(modules={"q": random_module(24, 16, 8, alpha=4.0, seed=4, rslora=True),
                         "conv": random_module(12, 54, 6, alpha=6.0, seed=5, kind=ModuleKind.CONV,
                                               weight_shape=(12, 6, 3, 3))})
    c = Adapter(modules={"q": random_module(24, 16, 2, alpha=32.0, seed=6)})
    return [a, b, c]


WEIGHTS = [0.7, -1.5, 2.0]


def weighted_sum(adapters, weights, name) -> torch.Tensor:
    return sum(w * a.modules[name].delta_matrix().double() for a, w in zip(adapters, weights) if name in a.modules)


def test_exact_concatenation_is_the_weighted_sum_of_products():
    adapters = three_adapters()
    result = merge(list(zip(adapters, WEIGHTS)))
    merged = result.adapter
    assert merged.ranks == {"q": 4 + 8 + 2, "conv": 4 + 6, "only_a": 3}
    for name, m in merged.modules.items():
        assert m.scale == 1.0
        assert rel(m.delta_matrix(), weighted_sum(adapters, WEIGHTS, name)) < 1e-6
    assert merged.modules["conv"].kind is ModuleKind.CONV and merged.modules["conv"].weight_shape == (12, 6, 3, 3)
    records = {r.name: r for r in result.report.layers}
    assert records["q"].extra["old_rank"] == "4+8+2" and records["only_a"].extra["old_rank"] == "3"
    assert all(r.rel_error < 1e-6 and r.retained_energy == pytest.approx(1.0) for r in records.values())
    assert result.report.summary["inputs"][1]["weight"] == -1.5


def test_adding_factors_separately_is_not_the_sum():
    """What kohya's merge without --concat does (sum of B's times sum of A's) differs; ours is exact."""
    adapters = three_adapters()[:2]
    a, b = adapters[0].modules["conv"], adapters[1].modules["conv"]
    a6 = torch.nn.functional.pad(a.B, (0, 2)), torch.nn.functional.pad(a.A, (0, 0, 0, 2))
    naive = (a6[0] * a.scale + b.B * b.scale) @ (a6[1] + b.A)
    exact = weighted_sum(adapters, [1, 1], "conv")
    assert rel(naive, exact) > 0.1
    assert rel(merge(adapters).adapter.modules["conv"].delta_matrix(), exact) < 1e-6


@pytest.mark.parametrize("rank", [1, 3, 9])
def test_truncated_merge_is_the_optimal_approximation_of_the_sum(rank):
    adapters = three_adapters()
    result = merge(list(zip(adapters, WEIGHTS)), rule=RankRule(rank=rank))
    for name, m in result.adapter.modules.items():
        exact = weighted_sum(adapters, WEIGHTS, name)
        U, S, Vh = torch.linalg.svd(exact, full_matrices=False)
        k = min(rank, len(S))
        assert m.rank == min(k, sum(a.modules[name].rank for a in adapters if name in a.modules))
        assert rel(m.delta_matrix(), (U[:, :k] * S[:k]) @ Vh[:k]) < 1e-5
        rec = next(r for r in result.report.layers if r.name == name)
        assert rec.rel_error == pytest.approx(float(S[k:].norm() / S.norm()), rel=1e-4, abs=1e-7)


def test_budget_and_alpha():
    adapters = three_adapters()
    result = merge(adapters, budget=400, alpha=2.0)
    assert sum(m.params for m in result.adapter.modules.values()) <= 400
    assert {m.alpha for m in result.adapter.modules.values()} == {2.0}
    assert result.report.summary["budget"] == 400
    exact = merge(adapters, alpha=2.0).adapter.modules["q"]
    assert exact.alpha == 2.0 and exact.rank == 14
    assert rel(exact.delta_matrix(), weighted_sum(adapters, [1, 1, 1], "q")) < 1e-6


def test_filters_and_dtype():
    adapters = [a.to(dtype=torch.bfloat16) for a in three_adapters()]
    result = merge(adapters, exclude=["^conv$"])
    assert set(result.adapter.modules) == {"q", "only_a"} and result.report.skipped == {"filtered out": ["conv"]}
    assert result.adapter.dtype == torch.bfloat16
    mixed = merge([adapters[0], three_adapters()[1]])  # bf16 + float32 inputs: float32 out
    assert mixed.adapter.modules["q"].B.dtype == torch.float32


def test_inputs_that_disagree_on_a_shape_name_the_module():
    a = Adapter(modules={"layers.0.q": random_module(24, 16, 4)})
    b = Adapter(modules={"layers.0.q": random_module(24, 32, 4)})
    with pytest.raises(AdapterMismatch, match=r"module layers\.0\.q is linear \(24, 16\) in adapter #1 but linear "
                                              r"\(24, 32\) in adapter #2"):
        merge([a, b])


# ------------------------------------------------------------------------------------------ ADAPTER[:WEIGHT]


def test_parse_adapter_spec(tmp_path):
    f = tmp_path / "a.safetensors"
    f.write_bytes(b"")
    odd = tmp_path / "we:ird"
    odd.mkdir()
    assert parse_adapter_spec(str(f)) == AdapterSpec(f, 1.0)
    assert parse_adapter_spec(f"{f}:0.5") == AdapterSpec(f, 0.5)
    assert parse_adapter_spec(f"{f}:-2e-1") == AdapterSpec(f, -0.2)
    assert parse_adapter_spec(str(odd)) == AdapterSpec(odd, 1.0)  # "we" is no path: the colon is part of the name
    assert parse_adapter_spec(f"{odd}:3") == AdapterSpec(odd, 3.0)
    assert parse_adapter_spec(str(tmp_path / "missing:0.5")) == AdapterSpec(tmp_path / "missing:0.5", 1.0)
    assert parse_adapter_spec(f"{f}:0.5:1") == AdapterSpec(Path(f"{f}:0.5:1"), 1.0)  # "<f>:0.5" is no path
    for bad in ("x", "", "nan", "inf", "1e999"):
        with pytest.raises(InvalidOption, match="weight"):
            parse_adapter_spec(f"{f}:{bad}")
    with pytest.raises(CheckpointNotFound):
        load_weighted([str(tmp_path / "missing:0.5")])


def test_mixed_formats_merge_from_files(tmp_path):
    adapters = three_adapters()
    save_adapter(adapters[0], tmp_path / "a-peft", format="peft")
    save_adapter(Adapter(modules={k: v for k, v in adapters[1].modules.items()}), tmp_path / "b.safetensors",
                 format="kohya")
    loaded = load_weighted([f"{tmp_path / 'a-peft'}:0.7", f"{tmp_path / 'b.safetensors'}:-1.5"])
    assert [(w.weight, w.source) for w in loaded] == [(0.7, str(tmp_path / "a-peft")),
                                                      (-1.5, str(tmp_path / "b.safetensors"))]
    merged = merge(loaded).adapter
    for name in ("q", "conv"):
        assert rel(merged.modules[name].delta_matrix(), weighted_sum(adapters[:2], WEIGHTS[:2], name)) < 1e-6


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_merge_exact_and_truncated(tmp_path):
    adapters = three_adapters()
    paths = []
    for i, a in enumerate(adapters):
        paths.append(tmp_path / f"in{i}.safetensors")
        save_adapter(Adapter(modules={k: v for k, v in a.modules.items()}), paths[-1], format="kohya")
    args = [f"{p}:{w}" for p, w in zip(paths, WEIGHTS)]
    res = run("merge", *args, "-o", tmp_path / "exact.safetensors", "-q")
    assert res.exit_code == 0, res.output
    exact = load_adapter(tmp_path / "exact.safetensors")
    assert exact.source_format == "kohya" and exact.ranks["q"] == 14
    assert rel(exact.modules["q"].delta_matrix(), weighted_sum(adapters, WEIGHTS, "q")) < 1e-6
    res = run("merge", *args, "-o", tmp_path / "small", "--rank", 2, "--report", tmp_path / "r.csv", "-q")
    assert res.exit_code == 0, res.output
    small = load_adapter(tmp_path / "small")
    assert small.source_format == "peft" and set(small.ranks.values()) == {2}
    assert "old_rank" in (tmp_path / "r.csv").read_text().splitlines()[0]


@pytest.mark.parametrize("make_args, code, pattern", [
    (lambda p: [f"{p}:x", "-o", p.parent / "out"], 2, "weight 'x' is not a number"),
    (lambda p: [p, "-o", p, "--force"], 1, "also an input"),
    (lambda p: [p, p.parent / "nope.safetensors", "-o", p.parent / "out"], 1, "does not exist"),
    (lambda p: [p, p.parent / "other.safetensors", "-o", p.parent / "out"], 1, "module q is linear"),
    (lambda p: [p, "-o", p.parent / "out", "--report", p], 1, "also an input"),
])
def test_cli_merge_bad_input_writes_nothing(tmp_path, make_args, code, pattern):
    src = tmp_path / "a.safetensors"
    save_adapter(Adapter(modules={"q": random_module(24, 16, 4)}), src, format="kohya")
    save_adapter(Adapter(modules={"q": random_module(24, 8, 4)}), tmp_path / "other.safetensors", format="kohya")
    before = sorted(p.name for p in tmp_path.iterdir())
    res = run("merge", *make_args(src))
    assert res.exit_code == code, res.output
    assert pattern in res.output and "Traceback" not in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_weighted_adapter_inputs_and_report_json(tmp_path):
    a, b = three_adapters()[:2]
    result = merge([WeightedAdapter(a, 2.0, "first"), (b, 0.0)], rule=RankRule(rank=4))  # b adds nothing
    text = json.dumps(result.report.to_dict(), default=str)
    assert '"source": "first"' in text
    assert rel(result.adapter.modules["only_a"].delta_matrix(), 2 * a.modules["only_a"].delta_matrix()) < 1e-6
    assert rel(result.adapter.modules["conv"].delta_matrix(), 2 * a.modules["conv"].delta_matrix()) < 1e-5
