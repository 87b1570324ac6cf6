"""resize: the QR-core truncation equals the dense SVD truncation of the adapter's own delta; products survive."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lowrank_tools.adapter import Adapter, LoraModule, ModuleKind
from lowrank_tools.linalg.budget import LayerSpectrum, allocate_budget
from lowrank_tools.cli import main
from lowrank_tools.errors import InvalidOption
from lowrank_tools.io.formats import load_adapter, save_adapter
from lowrank_tools.linalg import RankRule
from lowrank_tools.resize import resize


def random_module(out: int, inp: int, r: int, *, alpha: float | None = None, seed: int = 0, rslora: bool = False,
                  kind: ModuleKind = ModuleKind.LINEAR, weight_shape=(), dtype=torch.float32) -> LoraModule:
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(out, r, generator=g) / math.sqrt(out)
    A = torch.randn(r, inp, generator=g) * torch.linspace(1.0, 0.1, r).unsqueeze(1)  # a spread-out spectrum
    return LoraModule(B=B.to(dtype), A=A.to(dtype), alpha=float(alpha if alpha is not None else r), kind=kind,
                      weight_shape=weight_shape, rslora=rslora)


def planted_module(s: list[float], out: int = 20, inp: int = 16, *, seed: int = 0) -> LoraModule:
    """A module (scale 1) whose delta has exactly the singular values ``s``: B and A^T are scaled columns of
    permuted identities, so every value is stored exactly and the rank rules can be tested at their boundaries."""
    g = torch.Generator().manual_seed(seed)
    r = len(s)
    U = torch.eye(out)[torch.randperm(out, generator=g)[:r]].T  # (out, r) orthonormal, exact
    V = torch.eye(inp)[torch.randperm(inp, generator=g)[:r]].T  # (inp, r)
    return LoraModule(B=U * torch.tensor(s), A=V.T.contiguous(), alpha=float(r))


def dense_truncation(m: LoraModule, r: int) -> torch.Tensor:
    D = m.delta_matrix().double()
    U, S, Vh = torch.linalg.svd(D, full_matrices=False)
    return (U[:, :r] * S[:r]) @ Vh[:r]


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref.double()).norm() / ref.double().norm())


GRID = {
    "square": (dict(out=64, inp=64, r=16), ModuleKind.LINEAR, ()),
    "wide": (dict(out=32, inp=200, r=12), ModuleKind.LINEAR, ()),
    "tall": (dict(out=300, inp=40, r=20), ModuleKind.LINEAR, ()),
    "conv": (dict(out=16, inp=4 * 3 * 3, r=10), ModuleKind.CONV, (16, 4, 3, 3)),
    "embedding": (dict(out=24, inp=50, r=8), ModuleKind.EMBEDDING, (50, 24)),
    "rank_above_side": (dict(out=8, inp=30, r=12), ModuleKind.LINEAR, ()),
}
CONVENTIONS = {"kohya_alpha": dict(alpha=4.0), "peft_alpha_r": dict(alpha=32.0), "rslora": dict(alpha=8.0, rslora=True)}


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("case", GRID)
def test_resize_is_the_optimal_truncation_of_the_delta(case, convention):
    dims, kind, shape = GRID[case]
    m = random_module(dims["out"], dims["inp"], dims["r"], kind=kind, weight_shape=shape, **CONVENTIONS[convention])
    result = resize(Adapter(modules={"x": m}), rule=RankRule(rank=5))
    new = result.adapter.modules["x"]
    assert new.rank == 5 and new.alpha == 5.0 and new.scale == 1.0
    assert new.kind is kind and new.weight_shape == m.weight_shape
    assert rel(new.delta_matrix(), dense_truncation(m, 5)) < 1e-5
    assert new.delta().shape == m.delta().shape  # laid out as the base weight
    S = torch.linalg.svdvals(m.delta_matrix().double())
    rec = result.report.layers[0]
    assert rec.extra["old_rank"] == dims["r"] and rec.rank == 5 and rec.shape == m.weight_shape
    assert rec.retained_energy == pytest.approx(float((S[:5] ** 2).sum() / (S**2).sum()), rel=1e-5)
    assert rec.rel_error == pytest.approx(float(S[5:].norm() / S.norm()), rel=1e-4)
    assert rec.delta_norm == pytest.approx(float(S.norm()), rel=1e-6)


@pytest.mark.parametrize("rank", [12, 13, 100])
def test_same_or_larger_rank_leaves_products_unchanged(rank):
    m = random_module(40, 30, 12, alpha=3.0, rslora=True)
    result = resize(Adapter(modules={"x": m}), rule=RankRule(rank=rank))
    new = result.adapter.modules["x"]
    assert torch.equal(new.B, m.B) and torch.equal(new.A, m.A) and new.scale == m.scale
    assert result.report.layers[0].rel_error < 1e-12 and result.report.layers[0].retained_energy == 1.0


def test_rank_deficient_module_truncates_without_dividing_by_zero():
    m = random_module(20, 16, 6, alpha=3.0)
    m.B[:, 4:] = m.B[:, :2]  # true rank 4 (columns repeat), stored rank 6
    m.A[4:] = 0.5 * m.A[:2]
    new = resize(Adapter(modules={"x": m}), rule=RankRule(rank=5)).adapter.modules["x"]
    assert new.rank == 5 and bool(torch.isfinite(new.B).all() and torch.isfinite(new.A).all())
    assert rel(new.delta_matrix(), m.delta_matrix()) < 1e-6  # rank 4 fits in 5: nothing lost
    assert float(new.B[:, 4].norm() * new.A[4].norm()) < 1e-6 * float(m.delta_matrix().norm())


def test_alpha_option_sets_scale_keeps_product():
    m = random_module(40, 30, 12, alpha=7.0)
    plain = resize(Adapter(modules={"x": m}), rule=RankRule(rank=4)).adapter.modules["x"]
    scaled = resize(Adapter(modules={"x": m}), rule=RankRule(rank=4), alpha=16).adapter.modules["x"]
    assert scaled.alpha == 16 and scaled.scale == 4
    assert rel(scaled.delta_matrix(), plain.delta_matrix()) < 1e-6
    kept = resize(Adapter(modules={"x": m}), rule=RankRule(rank=12), alpha=16).adapter.modules["x"]
    assert kept.alpha == 16 and rel(kept.delta_matrix(), m.delta_matrix()) < 1e-6


def test_rank_rules_at_their_boundaries():
    s = [8.0, 4.0, 2.0, 1.0, 0.5]
    m = planted_module(s)
    total = sum(v * v for v in s)
    cases = {RankRule(energy=(64 + 16) / total): 2, RankRule(energy=(64 + 16) / total + 1e-6): 3,
             RankRule(threshold=2.0): 2, RankRule(threshold=1.999): 3, RankRule(sv_ratio=4.0): 3,
             RankRule(sv_ratio=3.99): 2, RankRule(energy=0.999, rank=3): 3}
    for rule, want in cases.items():
        new = resize(Adapter(modules={"x": m}), rule=rule).adapter.modules["x"]
        assert new.rank == want, rule
        assert torch.linalg.svdvals(new.delta_matrix().double())[:want].tolist() == pytest.approx(s[:want], rel=1e-5)


def test_threshold_keeping_nothing_drops_the_module():
    adapter = Adapter(modules={"a": planted_module([3.0, 1.0]), "b": planted_module([0.5, 0.1], seed=1)})
    result = resize(adapter, rule=RankRule(threshold=1.0))
    assert list(result.adapter.modules) == ["a"] and result.adapter.modules["a"].rank == 1
    assert result.report.skipped == {"rank 0 (dropped)": ["b"]}


def test_budget_spreads_parameters_and_rank_caps_it():
    spectra = {"a": [9.0, 6.0, 3.0, 1.0], "b": [5.0, 4.5, 4.0, 0.2], "c": [2.0, 1.0, 0.5, 0.25]}
    adapter = Adapter(modules={n: planted_module(s, seed=i) for i, (n, s) in enumerate(spectra.items())})
    budget = 6 * 36  # six rank units of (20 + 16) parameters
    result = resize(adapter, budget=budget)
    want = allocate_budget([LayerSpectrum(n, (20, 16), s) for n, s in spectra.items()], budget)
    assert result.adapter.ranks == {n: r for n, r in want.items() if r}
    assert sum(m.params for m in result.adapter.modules.values()) <= budget
    assert result.report.summary["budget"] == budget and result.report.summary["params"] <= budget
    capped = resize(adapter, budget=10_000, rule=RankRule(rank=2))
    assert capped.adapter.ranks == {"a": 2, "b": 2, "c": 2}
    with pytest.raises(InvalidOption, match="--budget 10 is smaller than one rank unit"):
        resize(adapter, budget=10)


def test_filtered_modules_pass_through_and_dtype_is_kept():
    adapter = Adapter(modules={"attn.q": random_module(30, 20, 8, dtype=torch.bfloat16),
                               "mlp.up": random_module(40, 20, 8, seed=1, dtype=torch.bfloat16)})
    result = resize(adapter, rule=RankRule(rank=2), exclude=["mlp"])
    assert result.adapter.modules["mlp.up"] is adapter.modules["mlp.up"]
    q = result.adapter.modules["attn.q"]
    assert q.rank == 2 and q.A.dtype == torch.bfloat16 and q.B.dtype == torch.bfloat16
    assert rel(q.delta_matrix(), dense_truncation(adapter.modules["attn.q"], 2)) < 2e-2  # bf16 rounding only
    assert result.report.skipped == {"filtered out (kept unchanged)": ["mlp.up"]}
    as_f32 = resize(adapter, rule=RankRule(rank=2), dtype=torch.float32).adapter
    assert {m.B.dtype for m in as_f32.modules.values()} == {torch.float32}


def test_no_rank_option_is_a_usage_error():
    with pytest.raises(InvalidOption, match="resize needs a rank option"):
        resize(Adapter(modules={"x": random_module(8, 8, 2)}))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(out=st.integers(1, 24), inp=st.integers(1, 24), r=st.integers(1, 10), k=st.integers(1, 12),
       alpha=st.floats(0.5, 64), rslora=st.booleans())
def test_property_resize_matches_dense_truncation(out, inp, r, k, alpha, rslora):
    m = random_module(out, inp, r, alpha=alpha, rslora=rslora, seed=out * 31 + inp)
    new = resize(Adapter(modules={"x": m}), rule=RankRule(rank=k)).adapter.modules["x"]
    S = torch.linalg.svdvals(m.delta_matrix().double())
    kept = min(k, r, out, inp)
    # the best rank-k error is the spectrum's tail, whatever the truncation's (possibly tied) subspace
    err = float((new.delta_matrix().double() - m.delta_matrix().double()).norm())
    assert err == pytest.approx(float(S[kept:].norm()), abs=1e-5 * float(S.norm()) + 1e-9)


# ------------------------------------------------------------------------------------------------ files, CLI


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def two_module_adapter() -> Adapter:
    return Adapter(modules={"unet.down.0.proj": random_module(24, 16, 8, alpha=4.0),
                            "unet.up.0.conv": random_module(12, 6 * 9, 8, alpha=16.0, seed=1, kind=ModuleKind.CONV,
                                                            weight_shape=(12, 6, 3, 3))})


def test_resized_factors_survive_both_file_formats(tmp_path):
    adapter = two_module_adapter()
    adapter.modules["unet.down.0.proj"].rslora = True
    adapter.modules["unet.mid.attn"] = planted_module([5.0, 0.1, 0.05])
    result = resize(adapter, rule=RankRule(energy=0.9, rank=6))
    assert result.adapter.modules["unet.mid.attn"].rank == 1
    assert len(set(result.adapter.ranks.values())) > 1  # per-module ranks: rank_pattern / kohya alphas
    save_adapter(result.adapter, tmp_path / "peft")
    save_adapter(result.adapter, tmp_path / "k.safetensors", format="kohya")
    for path in (tmp_path / "peft", tmp_path / "k.safetensors"):
        back = load_adapter(path)
        for name, m in result.adapter.modules.items():
            assert back.modules[name].rank == m.rank
            assert rel(back.modules[name].delta_matrix(), m.delta_matrix()) < 1e-6


def test_cli_resize_kohya_in_kohya_out_with_report(tmp_path):
    src = tmp_path / "in.safetensors"
    save_adapter(two_module_adapter(), src, format="kohya")
    out, report = tmp_path / "out.safetensors", tmp_path / "r.json"
    res = run("resize", src, "-o", out, "--rank", 3, "--report", report, "-q")
    assert res.exit_code == 0, res.output
    back = load_adapter(out)
    assert back.source_format == "kohya" and back.ranks == {"unet.down.0.proj": 3, "unet.up.0.conv": 3}
    assert back.modules["unet.up.0.conv"].kind is ModuleKind.CONV
    data = json.loads(report.read_text())
    assert [r["old_rank"] for r in data["layers"]] == [8, 8] and data["summary"]["old_params"] > data["summary"]["params"]
    res = run("resize", src, "-o", tmp_path / "peft", "--budget", 300, "--format", "peft", "-q")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "peft").is_dir()  # unet.* modules: diffusers' pytorch_lora_weights.safetensors folder
    assert load_adapter(tmp_path / "peft").params <= 300


@pytest.mark.parametrize("args, code, pattern", [
    ([], 2, "needs a rank option"),
    (["--rank", 0], 2, "--rank 0"),
    (["--rank", 2, "--format", "kohya"], 2, "ending in .safetensors"),
    (["--energy", 1.5], 2, "--energy 1.5"),
])
def test_cli_resize_bad_options_write_nothing(tmp_path, args, code, pattern):
    src = tmp_path / "in.safetensors"
    save_adapter(two_module_adapter(), src, format="kohya")
    res = run("resize", src, "-o", tmp_path / "out", *args)
    assert res.exit_code == code, res.output
    assert pattern in res.output and "Traceback" not in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors"]


def test_cli_resize_output_equal_to_input_is_refused(tmp_path):
    src = tmp_path / "in.safetensors"
    save_adapter(two_module_adapter(), src, format="kohya")
    before = src.read_bytes()
    res = run("resize", src, "-o", src, "--rank", 2, "--force")
    assert res.exit_code == 1 and "also an input" in res.output
    assert src.read_bytes() == before
