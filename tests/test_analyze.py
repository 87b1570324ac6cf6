"""analyze: planted spectra come back with their known metrics; adapters equal their densified deltas;
groups, recommendations and the command line."""

from __future__ import annotations

import csv
import io
import itertools
import json
import math

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from conftest import planted
from lowrank_tools.adapter import Adapter, LoraModule, ModuleKind
from lowrank_tools.analyze.report import format_analysis
from lowrank_tools.analyze import analyze_adapter, analyze_delta, depth_key, module_type
from lowrank_tools.linalg.budget import LayerSpectrum, allocate_budget
from lowrank_tools.cli import main
from lowrank_tools.errors import InvalidOption, NonFiniteWeight
from lowrank_tools.io.formats import save_adapter
from lowrank_tools.analyze.plots import PLOT_FILES


def pair(deltas: dict[str, torch.Tensor], seed: int = 0) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(seed)
    base = {n: torch.randn(*d.shape, generator=g) for n, d in deltas.items()}
    return base, {n: base[n] + d for n, d in deltas.items()}


def _entropy_rank(values) -> float:
    total = sum(values)
    return math.exp(-sum(v / total * math.log(v / total) for v in values if v > 0))


# A small "model": two blocks of q_proj / down_proj plus an lm_head, each delta with a planted spectrum
SPECTRA = {
    "model.layers.0.self_attn.q_proj.weight": ([8.0, 4.0, 2.0, 1.0], (24, 20)),
    "model.layers.0.mlp.down_proj.weight": ([5.0] * 6, (20, 30)),
    "model.layers.1.self_attn.q_proj.weight": ([3.0, 1.0], (24, 20)),
    "model.layers.1.mlp.down_proj.weight": ([6.0, 3.0, 3.0], (20, 30)),
    "lm_head.weight": ([10.0], (16, 20)),
}


@pytest.fixture(scope="module")
def model_pair():
    return pair({n: planted(v, *shape, seed=i) for i, (n, (v, shape)) in enumerate(SPECTRA.items())})


def test_planted_spectra_give_their_metrics(model_pair):
    base, tuned = model_pair
    result = analyze_delta(base, tuned)
    layers = {x.name: x for x in result.layers}
    assert set(layers) == {n[: -len(".weight")] for n in SPECTRA}
    for name, (values, shape) in SPECTRA.items():
        x = layers[name[: -len(".weight")]]
        assert x.shape == shape and x.matrix_shape == shape and x.method == "exact"
        assert len(x.singular_values) == min(shape)
        assert x.singular_values[: len(values)] == pytest.approx(values, rel=1e-5)
        energy = sum(v * v for v in values)
        assert x.metrics.stable_rank == pytest.approx(energy / values[0] ** 2, rel=1e-5)
        assert x.metrics.effective_rank == pytest.approx(_entropy_rank(values), rel=1e-4)
        assert x.delta_norm == pytest.approx(math.sqrt(energy), rel=1e-6)
        d = tuned[name] - base[name]
        assert x.relative_change == pytest.approx(float(d.norm() / base[name].norm()), rel=1e-6)
    assert layers["model.layers.0.self_attn.q_proj"].metrics.energy_rank == {"0.5": 1, "0.9": 2, "0.95": 3, "0.99": 4}
    assert layers["model.layers.0.mlp.down_proj"].metrics.energy_rank == {"0.5": 3, "0.9": 6, "0.95": 6, "0.99": 6}
    assert layers["model.layers.1.mlp.down_proj"].metrics.energy_rank == {"0.5": 1, "0.9": 3, "0.95": 3, "0.99": 3}
    assert layers["lm_head"].metrics.energy_rank == {"0.5": 1, "0.9": 1, "0.95": 1, "0.99": 1}


def test_groups_by_module_type_and_depth(model_pair):
    result = analyze_delta(*model_pair)
    by_type, by_depth = result.groups["module_type"], result.groups["depth"]
    assert list(by_type) == ["q_proj", "down_proj", "lm_head"]  # in order of appearance
    assert list(by_depth) == ["layers.0", "layers.1", "-"]
    energy = {n[: -len(".weight")]: sum(v * v for v in vals) for n, (vals, _) in SPECTRA.items()}
    total = sum(energy.values())
    q = energy["model.layers.0.self_attn.q_proj"] + energy["model.layers.1.self_attn.q_proj"]
    assert by_type["q_proj"]["energy_share"] == pytest.approx(q / total, rel=1e-5)
    assert by_type["q_proj"]["layers"] == 2 and by_type["lm_head"]["layers"] == 1
    assert by_type["down_proj"]["rank90_max"] == 6 and by_type["down_proj"]["rank90_median"] == 4.5
    assert sum(g["energy_share"] for g in by_depth.values()) == pytest.approx(1.0)
    assert by_depth["-"]["layers"] == 1 and by_depth["layers.1"]["rank90_max"] == 3


@pytest.mark.parametrize(("name", "depth", "kind"), [
    ("model.layers.12.mlp.up_proj", "layers.12", "up_proj"),
    ("base_model.model.model.layers.3.self_attn.q_proj", "layers.3", "q_proj"),
    ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k", "down_blocks.1", "to_k"),
    ("mid_block.attentions.0.proj_in", "mid_block.attentions.0", "proj_in"),
    ("transformer.h.3.attn.c_attn.weight", "transformer.h.3", "c_attn"),
    ("lm_head", None, "lm_head"),
    ("encoder.proj.0", None, "0"),  # a trailing integer names the module (nn.Sequential), not a block
])
def test_names(name, depth, kind):
    assert depth_key(name) == depth and module_type(name) == kind


def test_depth_groups_sort_by_block_index():
    deltas = {f"model.layers.{i}.q_proj.weight": planted([1.0], 6, 5, seed=i) for i in (10, 2, 1)}
    deltas["model.embed_tokens.weight"] = planted([1.0], 12, 6)
    result = analyze_delta(*pair(deltas))
    assert list(result.groups["depth"]) == ["layers.1", "layers.2", "layers.10", "-"]


def _random_adapter() -> Adapter:
    g = torch.Generator().manual_seed(3)

    def module(out, inp, r, alpha, kind=ModuleKind.LINEAR, weight_shape=()):
        return LoraModule(B=torch.randn(out, r, generator=g), A=torch.randn(r, inp, generator=g), alpha=alpha,
                          kind=kind, weight_shape=weight_shape)

    return Adapter(modules={
        "model.layers.0.self_attn.q_proj": module(24, 16, 4, 8.0),
        "model.layers.0.mlp.down_proj": module(16, 40, 6, 6.0),
        "model.layers.1.self_attn.q_proj": module(24, 16, 20, 4.0),  # r above the smaller side
        "conv_in": module(8, 4 * 9, 3, 3.0, ModuleKind.CONV, (8, 4, 3, 3)),
        "model.embed_tokens": module(12, 50, 5, 10.0, ModuleKind.EMBEDDING, (50, 12)),  # B (dim, r), A (r, vocab)
    })


def test_adapter_equals_its_densified_delta():
    adapter = _random_adapter()
    dense = {f"{n}.weight": m.delta() for n, m in adapter.modules.items()}  # in each base weight's layout
    from_factors = {x.name: x for x in analyze_adapter(adapter).layers}
    from_dense = {x.name: x for x in analyze_delta(*pair(dense)).layers}
    assert set(from_factors) == set(from_dense) == set(adapter.modules)
    for name, a in from_factors.items():
        d = from_dense[name]
        r = len(a.singular_values)
        assert a.method == "qr-core" and r == min(*adapter.modules[name].matrix_shape, adapter.modules[name].rank)
        assert a.shape == d.shape and sorted(a.matrix_shape) == sorted(d.matrix_shape)
        assert a.singular_values == pytest.approx(d.singular_values[:r], rel=1e-4)
        assert max(d.singular_values[r:], default=0.0) < 1e-4 * a.singular_values[0]  # the dense tail is rounding
        assert a.delta_norm == pytest.approx(d.delta_norm, rel=1e-5)
        assert a.metrics.energy_rank == d.metrics.energy_rank
        assert a.metrics.stable_rank == pytest.approx(d.metrics.stable_rank, rel=1e-4)
        assert a.metrics.effective_rank == pytest.approx(d.metrics.effective_rank, rel=1e-3)
        assert a.relative_change is None


def test_adapter_is_never_densified():
    # a 200000 x 100000 delta would need 80 GB dense; through the QR core it takes milliseconds
    g = torch.Generator().manual_seed(0)
    m = LoraModule(B=torch.randn(200_000, 2, generator=g), A=torch.randn(2, 100_000, generator=g), alpha=2.0)
    x = analyze_adapter(Adapter(modules={"big.proj": m})).layers[0]
    assert x.matrix_shape == (200_000, 100_000) and len(x.singular_values) == 2
    assert x.delta_norm == pytest.approx(float(torch.linalg.matrix_norm(
        torch.linalg.qr(m.B.double()).R @ torch.linalg.qr(m.A.double().T).R.T)), rel=1e-5)


def _decaying(m: int, n: int, seed: int = 0) -> torch.Tensor:
    p = min(m, n)
    return planted([1.0 / (i + 1) for i in range(p)], m, n, seed=seed)


def test_top_k_within_a_tenth_of_a_percent_and_tail_estimated():
    deltas = {"block.0.proj.weight": _decaying(400, 300)}
    exact = analyze_delta(*pair(deltas)).layers[0]
    result = analyze_delta(*pair(deltas), top=16)
    top = result.layers[0]
    assert top.method.startswith("randomized") and len(top.singular_values) == 16
    rel = [abs(a - b) / b for a, b in zip(top.singular_values, exact.singular_values)]
    assert max(rel) < 1e-3
    assert not top.metrics.complete and "effective_rank" in top.metrics.estimated
    assert top.metrics.stable_rank == pytest.approx(exact.metrics.stable_rank, rel=1e-3)
    for key, r in top.metrics.energy_rank.items():  # exact inside the top 16, a lower bound beyond
        if key in top.metrics.estimated:
            assert 16 < r <= exact.metrics.energy_rank[key]
        else:
            assert r == exact.metrics.energy_rank[key]
    assert any("tail is estimated from ||dW||_F" in note for note in result.notes)
    assert "~" in format_analysis(result)
    assert "+" in format_analysis(result)  # estimated energy ranks are shown as lower bounds


def test_top_above_the_smaller_side_is_clamped_with_a_warning():
    deltas = {"a.small.weight": planted([3.0, 2.0, 1.0], 12, 40), "a.big.weight": _decaying(300, 200)}
    warnings: list[str] = []
    result = analyze_delta(*pair(deltas), top=24, warn=warnings.append)
    layers = {x.name: x for x in result.layers}
    assert layers["a.small"].method == "exact" and layers["a.small"].metrics.complete
    assert len(layers["a.small"].singular_values) == 12
    assert layers["a.big"].method.startswith("randomized") and len(layers["a.big"].singular_values) == 24
    assert len(warnings) == 1 and "--top 24 is not below the smaller side of 1 layer(s) (e.g. a.small 12 x 40)" in \
        warnings[0]
    assert warnings[0] in result.notes


def test_bad_top_and_filters():
    deltas = {"x.weight": planted([1.0], 4, 4)}
    with pytest.raises(InvalidOption, match=r"--top 0 is outside \[1, inf\)"):
        analyze_delta(*pair(deltas), top=0)
    with pytest.raises(InvalidOption, match="--include"):
        analyze_delta(*pair(deltas), include=["("])


def test_non_finite_weights_name_the_tensor():
    base, tuned = pair({"m.a.weight": planted([2.0, 1.0], 8, 6)})
    tuned["m.a.weight"][1, 2] = float("nan")
    with pytest.raises(NonFiniteWeight, match=r"tuned tensor m.a.weight .*holds 1 NaN/Inf"):
        analyze_delta(base, tuned)
    base["m.a.weight"][0, 0] = float("inf")
    with pytest.raises(NonFiniteWeight, match="base tensor m.a.weight holds 1 NaN/Inf"):
        analyze_delta(base, tuned)


def test_overflowing_difference_is_named():
    base, tuned = pair({"m.a.weight": planted([2.0, 1.0], 8, 6)})
    base["m.a.weight"][0, 0], tuned["m.a.weight"][0, 0] = -3e38, 3e38  # both finite; their difference is not
    with pytest.raises(NonFiniteWeight, match="delta of m.a.weight holds 1 NaN/Inf"):
        analyze_delta(base, tuned)


def test_only_the_delta_is_held_while_the_spectrum_is_computed(tmp_path, monkeypatch):
    """The base tensor is dropped before the SVD (extract's memory shape: dW plus the pair read ahead)."""
    import gc
    import weakref

    from lowrank_tools.analyze import spectra as analyze_module
    from lowrank_tools.io.checkpoint import open_checkpoint

    deltas = {f"m.{i}.weight": planted([3.0, 2.0, 1.0], 64, 48, seed=i) for i in range(3)}
    base, tuned = pair(deltas)
    save_file(base, str(tmp_path / "b.safetensors"))
    save_file(tuned, str(tmp_path / "t.safetensors"))
    ckpt = open_checkpoint(tmp_path / "b.safetensors")
    handed_out: dict[str, weakref.ref] = {}
    get = ckpt.get

    def tracking_get(name):
        t = get(name)
        handed_out[name] = weakref.ref(t)
        return t

    monkeypatch.setattr(ckpt, "get", tracking_get)
    spectrum, alive = analyze_module._spectrum, []

    def checking_spectrum(dW, norm, opts, warn, mod):
        gc.collect()
        alive.append(handed_out[f"{mod}.weight"]() is not None)
        return spectrum(dW, norm, opts, warn, mod)

    monkeypatch.setattr(analyze_module, "_spectrum", checking_spectrum)
    result = analyze_delta(ckpt, tmp_path / "t.safetensors")
    assert alive == [False, False, False]
    assert [x.singular_values[:3] for x in result.layers] == [pytest.approx([3.0, 2.0, 1.0], rel=1e-5)] * 3


def test_unchanged_and_one_d_tensors_are_listed():
    deltas = {"m.a.weight": planted([2.0, 1.0], 8, 6), "m.b.weight": torch.zeros(8, 6), "m.norm.weight": torch.zeros(6)}
    base, tuned = pair(deltas)
    tuned["m.norm.weight"] = base["m.norm.weight"] * 1.5
    result = analyze_delta(base, tuned)
    assert [x.name for x in result.layers] == ["m.a"]
    assert result.skipped["unchanged (zero delta)"] == ["m.b"]
    assert result.changed_1d == {"m.norm.weight": pytest.approx(0.5)}


# ------------------------------------------------------------------------------------------ recommendation


def _brute_uniform(result, target: float) -> int:
    for r in itertools.count(1):
        kept = sum(sum(s * s for s in x.singular_values[:r]) for x in result.layers)
        if kept >= target * (1 - 1e-12):
            return r


def test_recommendation_against_brute_force(model_pair):
    result = analyze_delta(*model_pair)
    total = sum(x.metrics.total_energy for x in result.layers)
    costs = {x.name: sum(x.matrix_shape) for x in result.layers}
    for key, rec in result.recommendation.items():
        target = float(key) * total
        uniform, per_layer, budget = rec["uniform"], rec["energy"], rec["budget"]
        assert uniform["rank"] == _brute_uniform(result, target)
        assert uniform["params"] == sum(min(uniform["rank"], min(x.matrix_shape)) * costs[x.name] for x in result.layers)
        assert uniform["megabytes"] == pytest.approx(uniform["params"] * 4 / 1e6)  # float32 checkpoints
        ranks = {x.name: x.metrics.energy_rank[key] for x in result.layers}
        assert per_layer["params"] == sum(r * costs[n] for n, r in ranks.items())
        # the budget: allocate_budget(N) reaches the target within N, and N is at most one unit above the
        # cheapest way to reach it (brute force over every rank combination)
        spectra = [LayerSpectrum(x.name, x.matrix_shape, x.singular_values) for x in result.layers]
        assert budget["ranks"] == allocate_budget(spectra, budget["budget"])
        assert budget["params"] <= budget["budget"] and budget["retained_energy"] >= float(key) - 1e-9
        caps = [range(min(len(x.singular_values), 7) + 1) for x in result.layers]
        cheapest = min(sum(r * costs[x.name] for r, x in zip(combo, result.layers))
                       for combo in itertools.product(*caps)
                       if sum(sum(s * s for s in x.singular_values[:r]) for r, x in zip(combo, result.layers))
                       >= target * (1 - 1e-12))
        assert cheapest <= budget["budget"] <= cheapest + max(costs.values())
        assert budget["params"] <= uniform["params"]


def test_recommendation_sizes_follow_the_dtype(model_pair):
    base, tuned = model_pair
    half = analyze_delta({k: v.bfloat16() for k, v in base.items()}, {k: v.bfloat16() for k, v in tuned.items()})
    rec = half.recommendation["0.9"]["uniform"]
    assert rec["megabytes"] == pytest.approx(rec["params"] * 2 / 1e6)


def test_top_k_recommendation_unreached_is_none():
    result = analyze_delta(*pair({"b.0.w.weight": _decaying(300, 300)}), top=4)
    assert result.recommendation["0.99"]["uniform"] is None and result.recommendation["0.99"]["budget"] is None
    assert result.recommendation["0.99"]["energy"]["estimated"] is True
    assert "not reached by the computed singular values" in format_analysis(result)


# ------------------------------------------------------------------------------------------ command line


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def model_files(tmp_path, model_pair):
    base, tuned = model_pair
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(tuned, str(tmp_path / "tuned.safetensors"))
    return tmp_path / "base.safetensors", tmp_path / "tuned.safetensors"


def test_cli_base_tuned_table_json_csv(model_files, tmp_path):
    base, tuned = model_files
    out_json, out_csv = tmp_path / "a.json", tmp_path / "a.csv"
    result = run("analyze", base, tuned, "--json", out_json, "--csv", out_csv, "--plot", tmp_path / "figs")
    assert result.exit_code == 0, result.output
    pngs = sorted((tmp_path / "figs").iterdir())
    assert [p.name for p in pngs] == sorted(PLOT_FILES)
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 1000 for p in pngs)
    lines = result.stdout.splitlines()  # stderr holds the progress bar
    assert lines[0].split()[0] == "layer" and lines[1].startswith("model.layers.0.mlp.down_proj")  # r90 = 6: worst
    assert "by module type" in result.output and "by depth" in result.output and "--budget" in result.output
    data = json.loads(out_json.read_text())
    assert data["command"] == "analyze" and data["source"] == "delta" and len(data["layers"]) == 5
    row = next(r for r in data["layers"] if r["name"] == "model.layers.0.self_attn.q_proj")
    assert {"name", "shape", "singular_values", "energy_rank", "effective_rank", "stable_rank",
            "relative_change"} <= set(row)
    assert row["energy_rank"] == {"0.5": 1, "0.9": 2, "0.95": 3, "0.99": 4} and row["shape"] == [24, 20]
    assert row["singular_values"][:4] == pytest.approx([8, 4, 2, 1], rel=1e-5)
    assert set(data["groups"]) == {"module_type", "depth"} and set(data["recommendation"]) == {"0.9", "0.95", "0.99"}
    rows = list(csv.DictReader(io.StringIO(out_csv.read_text())))
    assert len(rows) == 5 and rows[0]["energy_rank_0.9"].isdigit()


def test_cli_adapter(tmp_path):
    adapter = _random_adapter()
    del adapter.modules["conv_in"], adapter.modules["model.embed_tokens"]
    save_adapter(adapter, tmp_path / "lora")
    result = run("analyze", tmp_path / "lora", "--json", tmp_path / "a.json", "--top", "3")
    assert result.exit_code == 0, result.output
    assert "--top 3 is ignored for an adapter" in result.output
    data = json.loads((tmp_path / "a.json").read_text())
    assert data["source"] == "adapter" and {r["method"] for r in data["layers"]} == {"qr-core"}
    assert all(r["relative_change"] is None for r in data["layers"])


def test_cli_bad_input_writes_nothing(model_files, tmp_path):
    base, tuned = model_files
    existing = tmp_path / "a.json"
    existing.write_text("keep")
    result = run("analyze", base, tuned, "--json", existing, "--csv", tmp_path / "new.csv")
    assert result.exit_code == 1 and "exists: pass --force" in result.output
    assert existing.read_text() == "keep" and not (tmp_path / "new.csv").exists()
    result = run("analyze", base, tuned, base)
    assert result.exit_code == 2 and "BASE TUNED or one ADAPTER, got 3 paths" in result.output
    result = run("analyze", base, tuned, "--top", "0")
    assert result.exit_code == 2
    result = run("analyze", base, tuned, "--json", tmp_path / "same", "--csv", tmp_path / "same")
    assert result.exit_code == 2 and "two outputs share one path" in result.output
    result = run("analyze", base, tuned, "--json", tmp_path / "x.json", "--plot", existing)
    assert result.exit_code == 1 and "is not a folder" in result.output and not (tmp_path / "x.json").exists()


def test_cli_top_clamp_warns(model_files):
    base, tuned = model_files
    result = run("analyze", base, tuned, "--top", "64")
    assert result.exit_code == 0, result.output
    assert "warning: --top 64 is not below the smaller side of 5 layer(s)" in result.output
