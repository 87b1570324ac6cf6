"""One implementation per formula (issue 12): the shared helpers, and the identities that tie their users together."""

from __future__ import annotations

import math
from dataclasses import FrozenInstanceError
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import planted, planted_delta
from lowrank_tools.extract import budget as extract_budget
from lowrank_tools.extract import options as extract_options
from lowrank_tools.linalg import sketch
from lowrank_tools.linalg import svd as linalg
from lowrank_tools.adapter import LoraModule, ModuleKind, cast_factors, check_alpha, matrix_shape, matrix_view
from lowrank_tools.linalg.budget import LayerSpectrum, allocate_budget, minimal_budget
from lowrank_tools.errors import InvalidOption, NumericalError
from lowrank_tools.extract import ExtractOptions, extract
from lowrank_tools.linalg import RankRule, qr_core, qr_core_svd
from lowrank_tools.linalg.norms import lowrank_frobenius_norm
from lowrank_tools.linalg.rank_rules import energy_count, require_rank_option
from lowrank_tools.refactor import module_core
from lowrank_tools.report import factor_record
from lowrank_tools.resize import resize
from lowrank_tools.linalg.sketch import bf16_accepts, top_singular_values
from lowrank_tools.linalg.spectrum import energy_rank

# ------------------------------------------------------------------------------------------ the energy rule


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(1e-3, 10.0), min_size=1, max_size=10), st.sampled_from([0.5, 0.9, 0.95, 0.99, 1.0]))
def test_energy_rule_is_one_function(values, level):
    s = torch.tensor(sorted(values, reverse=True), dtype=torch.float64)
    cum = torch.cumsum(s * s, 0)
    r = energy_count(cum, level, float(cum[-1]))
    assert r == RankRule(energy=level).choose(s) == energy_rank(s, level)[0]
    assert float(cum[r - 1]) >= level * float(cum[-1]) * (1 - 1e-12)
    assert r == 1 or float(cum[r - 2]) < level * float(cum[-1])


def test_energy_count_boundary_and_beyond():
    cum = torch.tensor([9.0, 10.0], dtype=torch.float64)  # 3, 1: c_1 = 0.9 exactly
    assert energy_count(cum, 0.9, 10.0) == 1 and energy_count(cum, 0.9000001, 10.0) == 2
    assert energy_count(cum, 0.99, 20.0) == 3  # not reached by the values given: k + 1


# ------------------------------------------------------------------------------------------ the greedy order


def test_minimal_budget_is_a_prefix_of_the_allocators_order():
    a = LayerSpectrum("a", (10, 10), [4.0, 2.0, 1.0])  # cost 20: ratios 0.8, 0.2, 0.05
    b = LayerSpectrum("b", (5, 5), [2.0, 1.0])  # cost 10: ratios 0.4, 0.1
    # order: a1 (16), b1 (4), a2 (4), b2 (1), a3 (1)
    assert minimal_budget([a, b], 16) == 20
    assert minimal_budget([a, b], 20) == 30
    assert minimal_budget([a, b], 24) == 50
    assert minimal_budget([a, b], 26) == 80 and minimal_budget([a, b], 26.5) is None
    for target in (16, 20, 24, 25, 26):
        ranks = allocate_budget([a, b], minimal_budget([a, b], target))
        kept = sum(v * v for layer in (a, b) for v in layer.singular_values[: ranks[layer.name]])
        assert kept >= target


# ------------------------------------------------------------------------------------------ the QR core


def test_qr_core_serves_svd_resize_and_norm():
    B, A = planted_delta(40, 6, 6, seed=1), planted_delta(6, 30, 6, seed=2)
    dense = 0.5 * B.double() @ A.double()
    r_only, full = qr_core(B, A, scale=0.5, dtype=torch.float64), qr_core(B, A, scale=0.5, dtype=torch.float64,
                                                                           orthonormal=True)
    assert r_only.Q_B is None and full.Q_B.shape == (40, 6) and full.Q_A.shape == (30, 6)
    assert torch.equal(r_only.R_B, full.R_B) and torch.equal(r_only.core, full.core)  # the same R either way
    exact = torch.linalg.svdvals(dense)[:6]
    assert torch.allclose(torch.linalg.svdvals(r_only.core), exact, rtol=1e-10)
    core = module_core(LoraModule(B=B, A=A, alpha=3.0), device=torch.device("cpu"))  # scale 3 / 6 = 0.5
    assert torch.allclose(core.S, exact, rtol=1e-10)
    assert torch.allclose(qr_core_svd(B, A, scale=0.5).S.double(), exact, rtol=1e-5)
    assert lowrank_frobenius_norm(B, A, 0.5) == pytest.approx(float(dense.norm()), rel=1e-12)
    with pytest.raises(ValueError, match="do not chain"):
        qr_core(B, A.T)


# ------------------------------------------------------------------------------------------ the range finder


def _decaying(m: int, n: int) -> torch.Tensor:
    return planted([1.0 / (i + 1) for i in range(min(m, n))], m, n)


def test_bf16_rule_is_the_same_for_the_sketch_and_the_svd():
    """One rule: a 1/i spectrum passes, a planted rank-5 matrix (no tail) and a steep spectrum do not, whichever
    function asks; a rank-1 matrix goes to float32 in the sketch and still gives its value exactly."""
    slow, low = _decaying(300, 240), planted_delta(300, 240, 5, seed=3)
    steep = planted([10 ** (-4 * i / 16) for i in range(240)], 300, 240)
    for M, expected in ((slow, True), (low, False), (steep, False)):
        S = torch.linalg.svdvals(M.double())[:8].float()
        assert bf16_accepts(S, float(M.norm()), M.shape) is expected
        _, how = top_singular_values(M, 8, bf16=True)
        assert how == ("randomized-bf16" if expected else "randomized")
        with mock.patch.object(linalg, "_bf16_fast", lambda device_type: device_type == "cpu"), \
                mock.patch.object(linalg, "randomized_svd", wraps=linalg.randomized_svd) as spy:
            linalg.truncated_svd(M, 8, method="randomized")
        assert [c.kwargs.get("bf16", False) for c in spy.call_args_list] == ([True] if expected else [True, False])
    M = torch.full((300, 200), 1.0 / 3.0)  # rank 1: no tail, float32, exact
    S, how = top_singular_values(M, 1, bf16=True)
    assert how == "randomized" and float(S[0]) == pytest.approx(float(torch.linalg.svdvals(M.double())[0]), rel=1e-6)


def test_the_randomized_svd_keeps_its_test_matrix():
    """The range finder's Gaussian test matrix is the one truncated_svd always drew: randn(n, l) of the seed."""
    omega = sketch._test_matrix(50, 12, 7, torch.float32)
    assert torch.equal(omega, torch.randn(50, 12, generator=torch.Generator().manual_seed(7)))


# ------------------------------------------------------------------------------------------ shapes, casts, checks


@pytest.mark.parametrize("shape, kind", [((12, 7), ModuleKind.LINEAR), ((12, 3, 3, 3), ModuleKind.CONV),
                                         ((50, 8), ModuleKind.EMBEDDING)])
def test_matrix_shape_is_the_matrix_view(shape, kind):
    assert matrix_shape(shape, kind) == tuple(matrix_view(torch.zeros(shape), kind).shape)


def test_extract_budget_transposes_embeddings():
    """The budget sees an embedding (vocab, dim) as its matrix view (dim, vocab), as every other path does."""
    g = torch.Generator().manual_seed(0)
    base = {"model.embed_tokens.weight": torch.randn(50, 8, generator=g),
            "model.layers.0.mlp.down_proj.weight": torch.randn(8, 20, generator=g)}
    tuned = {n: w + planted_delta(*w.shape, 2, seed=5) for n, w in base.items()}
    with mock.patch.object(extract_budget, "allocate_budget", wraps=allocate_budget) as spy:
        result = extract(base, tuned, budget=200, method="exact")
    shapes = {layer.name: layer.shape for layer in spy.call_args.args[0]}
    assert shapes == {"model.embed_tokens": (8, 50), "model.layers.0.mlp.down_proj": (8, 20)}
    emb = result.adapter.modules["model.embed_tokens"]
    assert emb.matrix_shape == (8, 50) and emb.weight_shape == (50, 8)
    with pytest.raises(InvalidOption, match=r"58 parameters for model.embed_tokens 8 x 50"):
        extract({"model.embed_tokens.weight": base["model.embed_tokens.weight"]},
                {"model.embed_tokens.weight": tuned["model.embed_tokens.weight"]}, budget=57)


def test_cast_factors_and_alpha_and_rank_option():
    B, A = torch.full((3, 1), 1e5), torch.ones(1, 4)
    with pytest.raises(NumericalError, match=r"^m: factors overflow torch.float16 when cast: pass --dtype float32"):
        cast_factors(B, A, torch.float16, "m")
    assert cast_factors(B, A, torch.bfloat16, "m")[0].dtype == torch.bfloat16
    for bad in (0, -1.0, math.nan, math.inf, True, "8"):
        with pytest.raises(InvalidOption, match="must be a positive number"):
            check_alpha(bad)
    check_alpha(None), check_alpha(8), check_alpha(0.5)
    for command, call in (("extract", lambda: ExtractOptions()),
                          ("resize", lambda: resize(mock.Mock(modules={}), rule=None, budget=None))):
        with pytest.raises(InvalidOption, match=f"^{command} needs a rank option: pass --rank, .* or --budget$"):
            call()
    require_rank_option(None, 100, "merge")


def test_factor_record():
    rec = factor_record("m", (4, 3, 2, 2), rank=2, values=torch.tensor([4.0, 2.0, 1.0]), norm=math.sqrt(21.0),
                        err=1.0, params=30, shown=[4.0], extra={"method": "exact"})
    assert rec.retained_energy == pytest.approx(20 / 21) and rec.rel_error == pytest.approx(1 / math.sqrt(21))
    assert rec.singular_values == [4.0] and rec.weight_params == 48 and rec.shape == (4, 3, 2, 2)
    zero = factor_record("z", (2, 2), rank=1, values=[0.0], norm=0.0, err=0.0, params=4)
    assert zero.retained_energy == 1.0 and zero.rel_error == 0.0


# ------------------------------------------------------------------------------------------ extract's options


def test_extract_options_typed_checked_and_resolved_once():
    opts = ExtractOptions(rule=RankRule(rank=4), device="auto", include="q_proj", method="exact")
    assert isinstance(opts.device, torch.device) and opts.include == ("q_proj",) and opts.method is linalg.Method.EXACT
    with pytest.raises(FrozenInstanceError):
        opts.seed = 3
    with pytest.raises(InvalidOption, match="--conv-rank"):
        ExtractOptions(budget=100, conv_rank=2)
    with pytest.raises(InvalidOption, match="svd_batch"):
        ExtractOptions(rule=RankRule(rank=4), svd_batch=0)
    with pytest.raises(TypeError):
        ExtractOptions(rule=RankRule(rank=4), rank=4)  # an unknown keyword is an error, not ignored
    g = torch.Generator().manual_seed(1)
    base = {"model.layers.0.self_attn.q_proj.weight": torch.randn(16, 12, generator=g)}
    tuned = {n: w + planted_delta(16, 12, 3, seed=2) for n, w in base.items()}
    with mock.patch.object(extract_options, "resolve_device", wraps=linalg.resolve_device) as spy:
        typed = extract(base, tuned, ExtractOptions(rule=RankRule(rank=3), method="exact"))
    assert spy.call_count == 1  # the device is resolved once, when the options are made
    by_keywords = extract(base, tuned, rule=RankRule(rank=3), method="exact")
    overridden = extract(base, tuned, ExtractOptions(rule=RankRule(rank=5), method="exact"), rule=RankRule(rank=3))
    for other in (by_keywords, overridden):
        mod, ref = other.adapter.modules, typed.adapter.modules
        assert mod.keys() == ref.keys() and all(torch.equal(mod[n].B, ref[n].B) for n in ref)
