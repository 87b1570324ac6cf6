"""extract: planted deltas come back exactly; the report measures what was written."""

from __future__ import annotations

import pytest
import torch

from conftest import LLAMA_SHAPES, make_pair
from lowrank_tools.adapter import ModuleKind
from lowrank_tools.errors import InvalidOption, NoCommonTensors, NonFiniteWeight
from lowrank_tools.extract import extract
from lowrank_tools.io.layers import layer_kind
from lowrank_tools.linalg import RankRule


def _product_error(result, base, tuned) -> float:
    worst = 0.0
    for name, m in result.adapter.modules.items():
        d = tuned[f"{name}.weight"].float() - base[f"{name}.weight"].float()
        worst = max(worst, float((m.delta() - d).norm() / d.norm()))
    return worst


@pytest.mark.parametrize("method", ["exact", "randomized"])
@pytest.mark.parametrize("rank", [3, 5, 64])
def test_planted_rank_recovered(method, rank):
    base, tuned = make_pair(LLAMA_SHAPES, k=3)
    result = extract(base, tuned, rule=RankRule(rank=rank), method=method)
    assert set(result.adapter.modules) == {n[:-7] for n, s in LLAMA_SHAPES.items() if len(s) == 2}
    assert _product_error(result, base, tuned) < 1e-5
    for rec in result.report.layers:
        assert rec.rel_error < 1e-5 and rec.retained_energy == pytest.approx(1.0, abs=1e-6)
        assert rec.rank == min(rank, *rec.shape)


def test_rank_below_planted_is_optimal_truncation():
    base, tuned = make_pair(LLAMA_SHAPES, k=6)
    result = extract(base, tuned, rule=RankRule(rank=2), method="exact")
    for rec in result.report.layers:
        d = tuned[f"{rec.name}.weight"] - base[f"{rec.name}.weight"]
        s = torch.linalg.svdvals(d.double())
        assert rec.rel_error == pytest.approx(float(s[2:].norm() / s.norm()), rel=1e-4)
        assert rec.retained_energy == pytest.approx(float((s[:2] ** 2).sum() / (s**2).sum()), rel=1e-6)
        assert rec.singular_values[:6] == pytest.approx(s[:6].tolist(), rel=1e-4)
        assert rec.delta_norm == pytest.approx(float(d.norm()), rel=1e-6)


def test_alpha_rescales_factors_keeps_product():
    base, tuned = make_pair(LLAMA_SHAPES, k=3)
    plain = extract(base, tuned, rule=RankRule(rank=4), method="exact")
    scaled = extract(base, tuned, rule=RankRule(rank=4), method="exact", alpha=32)
    for name, m in scaled.adapter.modules.items():
        assert m.alpha == 32 and m.scale == 8
        assert torch.allclose(m.delta(), plain.adapter.modules[name].delta(), atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_and_output_dtype(dtype):
    base, tuned = make_pair(LLAMA_SHAPES, k=3, dtype=dtype)
    result = extract(base, tuned, rule=RankRule(rank=3), method="exact")
    m = result.adapter.modules["model.layers.0.self_attn.q_proj"]
    assert m.A.dtype == dtype and m.B.dtype == dtype
    # the error is measured after the cast, so it is the half-precision rounding, not ~0
    rec = result.report.layers[0]
    d = tuned[f"{rec.name}.weight"].float() - base[f"{rec.name}.weight"].float()
    measured = float((result.adapter.modules[rec.name].delta() - d).norm() / d.norm())
    assert rec.rel_error == pytest.approx(measured, rel=1e-3)
    assert 0 < rec.rel_error < 2e-2
    as_f32 = extract(base, tuned, rule=RankRule(rank=3), method="exact", dtype=torch.float32)
    f32 = as_f32.report.layers[0]
    # stored half values are not exactly rank 3: in float32 the error is the spectrum's tail, nothing more
    assert as_f32.adapter.dtype == torch.float32
    s = torch.linalg.svdvals(d.double())
    assert f32.rel_error == pytest.approx(float(s[3:].norm() / s.norm()), rel=1e-2)
    assert f32.rel_error < rec.rel_error


def test_zero_deltas_skipped_and_listed():
    base, tuned = make_pair(LLAMA_SHAPES, k=3)
    tuned["model.layers.0.mlp.up_proj.weight"] = base["model.layers.0.mlp.up_proj.weight"].clone()
    result = extract(base, tuned, rule=RankRule(rank=4))
    assert "model.layers.0.mlp.up_proj" not in result.adapter.modules
    assert "model.layers.0.mlp.up_proj" in result.report.skipped["zero delta or nothing kept"]


def test_include_exclude_filters():
    base, tuned = make_pair(LLAMA_SHAPES, k=3)
    only_attn = extract(base, tuned, rule=RankRule(rank=3), include=[r"self_attn"], exclude=[r"v_proj"])
    assert list(only_attn.adapter.modules) == ["model.layers.0.self_attn.q_proj"]
    with pytest.raises(InvalidOption, match="--include"):
        extract(base, tuned, rule=RankRule(rank=3), include=["("])


def test_one_d_tensors_reported_not_factored():
    base, tuned = make_pair(LLAMA_SHAPES, k=3)
    result = extract(base, tuned, rule=RankRule(rank=3))
    name = "model.layers.0.input_layernorm.weight"
    w0, w1 = base[name], tuned[name]
    assert result.report.changed_1d[name] == pytest.approx(float((w1 - w0).norm() / w0.norm()), rel=1e-5)


def test_energy_rule_picks_smallest_rank():
    base, tuned = make_pair({"a.weight": (40, 30)}, k=5)
    full = extract(base, tuned, rule=RankRule(rank=30), method="exact").report.layers[0]
    s2 = torch.tensor(full.singular_values, dtype=torch.float64) ** 2
    target = float(s2[:3].sum()) / full.delta_norm**2  # exactly the energy of the top 3, as extract measures it
    rec = extract(base, tuned, rule=RankRule(energy=target), method="exact").report.layers[0]
    assert rec.rank == 3


def test_nan_names_the_tensor():
    base, tuned = make_pair(LLAMA_SHAPES, k=3)
    tuned["model.layers.0.mlp.down_proj.weight"][0, 0] = float("nan")
    with pytest.raises(NonFiniteWeight, match="model.layers.0.mlp.down_proj.weight"):
        extract(base, tuned, rule=RankRule(rank=3))


def test_no_common_names():
    base, _ = make_pair({"a.weight": (4, 4)})
    _, tuned = make_pair({"b.weight": (4, 4)})
    with pytest.raises(NoCommonTensors, match="share no tensor name"):
        extract(base, tuned, rule=RankRule(rank=2))


def test_summary_fields():
    base, tuned = make_pair(LLAMA_SHAPES, k=6)
    report = extract(base, tuned, rule=RankRule(rank=2), method="exact").report
    d = report.to_dict()
    assert {"params", "rel_error", "layers", "param_share", "wall_time_s"} <= set(d["summary"])
    assert d["summary"]["params"] == sum(2 * sum(s) for s in LLAMA_SHAPES.values() if len(s) == 2)
    norms = [r.delta_norm for r in report.layers]
    expected = sum(r.delta_norm * r.rel_error for r in report.layers) / sum(norms)
    assert d["summary"]["rel_error"] == pytest.approx(expected)
    for row in d["layers"]:
        assert {"name", "shape", "rank", "delta_norm", "singular_values", "retained_energy", "rel_error"} <= set(row)


@pytest.mark.parametrize(("name", "shape", "kind"), [
    ("model.layers.0.q_proj.weight", (8, 4), ModuleKind.LINEAR),
    ("model.embed_tokens.weight", (100, 8), ModuleKind.EMBEDDING),
    ("text_model.embeddings.token_embedding.weight", (100, 8), ModuleKind.EMBEDDING),
    ("time_embedding.linear_1.weight", (8, 4), ModuleKind.LINEAR),
    ("conv_in.weight", (8, 4, 3, 3), ModuleKind.CONV),
    ("model.norm.weight", (8,), None),
    ("model.layers.0.q_proj.bias", (8, 4), None),
])
def test_layer_kind(name, shape, kind):
    assert layer_kind(name, shape) is kind
