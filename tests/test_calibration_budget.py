"""extract --budget with --calibration: ranks allocated on the whitened singular values (the per-token output
error), factors and errors the same as a whitened --rank at the allocated rank (issue 17)."""

from __future__ import annotations

import math

import pytest
import torch

from lowrank_tools.extract import extract
from lowrank_tools.io.calibration import InputStats, read_calibration, write_calibration
from lowrank_tools.linalg import RankRule
from lowrank_tools.linalg.budget import LayerSpectrum, allocate_budget
from lowrank_tools.linalg.whiten import measured_output_error, whitener

OUT, IN, TOKENS = 24, 32, 200


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _planted():
    """Two layers with the SAME delta (rank 8, flat spectrum): layer a's inputs live where dW acts (its row space),
    layer b's inputs are mostly orthogonal to it. Plain SVD sees twins; the output error is nearly all in a."""
    q, _ = torch.linalg.qr(torch.randn(IN, IN, generator=_gen(1), dtype=torch.float64))
    rows, other = q[:, :8], q[:, 8:]  # (IN, 8) dW's row space, (IN, 24) its complement
    U, _ = torch.linalg.qr(torch.randn(OUT, 8, generator=_gen(2), dtype=torch.float64))
    dW = U @ torch.diag(torch.linspace(1.0, 0.8, 8, dtype=torch.float64)) @ rows.T  # (OUT, IN)
    Xa = rows @ torch.randn(8, TOKENS, generator=_gen(3), dtype=torch.float64) + 0.05 * torch.randn(
        IN, TOKENS, generator=_gen(4), dtype=torch.float64)
    Xb = other @ torch.randn(24, TOKENS, generator=_gen(5), dtype=torch.float64) + 0.05 * torch.randn(
        IN, TOKENS, generator=_gen(6), dtype=torch.float64)
    base = {f"{n}.weight": torch.randn(OUT, IN, generator=_gen(7 + i)) for i, n in enumerate("ab")}
    tuned = {k: v + dW.float() for k, v in base.items()}
    return base, tuned, {"a": Xa, "b": Xb}


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    base, tuned, X = _planted()
    path = tmp_path_factory.mktemp("calibration_budget") / "stats.safetensors"
    write_calibration(path, [InputStats((n,), X[n] @ X[n].T, TOKENS) for n in "ab"])
    return base, tuned, X, path


def _expected_ranks(base, tuned, X, budget, damping):
    spectra = []
    for n in "ab":
        dW = (tuned[f"{n}.weight"] - base[f"{n}.weight"]).double()
        L = whitener(X[n] @ X[n].T, damping=damping).L
        spectra.append(LayerSpectrum(n, (OUT, IN), torch.linalg.svdvals(dW @ L) / math.sqrt(TOKENS)))
    return allocate_budget(spectra, budget)


def test_budget_puts_rank_where_the_output_error_is(planted):
    base, tuned, X, stats = planted
    budget = 8 * (OUT + IN)  # 8 rank units in all
    plain = extract(base, tuned, budget=budget, method="exact")
    ours = extract(base, tuned, budget=budget, method="exact", calibration=stats)
    plain_ranks = {n: plain.adapter.modules[n].rank for n in "ab"}
    ranks = {n: ours.adapter.modules[n].rank if n in ours.adapter.modules else 0 for n in "ab"}
    assert plain_ranks == {"a": 4, "b": 4}  # twins: the ties split evenly
    assert ranks == _expected_ranks(base, tuned, X, budget, 0.01)  # the known answer: allocate_budget on S(dW L)
    assert ranks["a"] == 8 and ranks["b"] == 0  # every unit where the inputs meet dW
    def total_output_error(result):  # sum over both layers of ||(dW - BA) X||^2, measured on the inputs
        total = 0.0
        for n in "ab":
            dW = (tuned[f"{n}.weight"] - base[f"{n}.weight"]).double()
            mod = result.adapter.modules.get(n)
            err = (dW @ X[n]) if mod is None else dW @ X[n] - mod.delta_matrix().double() @ X[n]
            total += float(torch.linalg.matrix_norm(err)) ** 2
        return total
    assert total_output_error(ours) < 0.2 * total_output_error(plain)


def test_larger_inputs_weigh_more(tmp_path):
    """Same delta, same isotropic input directions, inputs 10x larger in a: the per-token output error is 10x
    larger there, so a gets the units first; token counts differ and do not matter (per-token)."""
    g = _gen(11)
    dW = torch.randn(OUT, IN, generator=g)
    base = {f"{n}.weight": torch.zeros(OUT, IN) for n in "ab"}
    tuned = {k: dW.clone() for k in base}
    Xa, Xb = 10 * torch.randn(IN, 400, generator=g, dtype=torch.float64), torch.randn(IN, 100, generator=g,
                                                                                    dtype=torch.float64)
    stats = tmp_path / "stats.safetensors"
    write_calibration(stats, [InputStats(("a",), Xa @ Xa.T, 400), InputStats(("b",), Xb @ Xb.T, 100)])
    result = extract(base, tuned, budget=6 * (OUT + IN), method="exact", calibration=stats)
    ranks = {n: m.rank for n, m in result.adapter.modules.items()}
    assert ranks.get("a", 0) > ranks.get("b", 0)
    assert read_calibration(stats).mean_squares()["a"] == pytest.approx(
        float((Xa @ Xa.T).diagonal().mean()) / 400)  # the metadata the plain_unit of mixed runs reads


@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_factors_and_errors_match_a_whitened_rank_run(planted, method):
    base, tuned, X, stats = planted
    ours = extract(base, tuned, budget=5 * (OUT + IN), method=method, calibration=stats)
    records = {r.name: r for r in ours.report.layers}
    for name, mod in ours.adapter.modules.items():
        ref = extract(base, tuned, rule=RankRule(rank=mod.rank), method=method, calibration=stats,
                      include=[f"^{name}$"])
        torch.testing.assert_close(mod.delta_matrix(), ref.adapter.modules[name].delta_matrix(), rtol=1e-4, atol=1e-5)
        dW = (tuned[f"{name}.weight"] - base[f"{name}.weight"]).double()
        weight_err = float(torch.linalg.matrix_norm(dW - mod.delta_matrix().double())) / float(
            torch.linalg.matrix_norm(dW))
        L = whitener(X[name] @ X[name].T, damping=0.01).L
        assert records[name].rel_error == pytest.approx(weight_err, rel=1e-4, abs=1e-6)
        assert records[name].extra["output_rel_error"] == pytest.approx(
            measured_output_error(dW, mod.B, mod.A, L, scale=mod.scale), rel=1e-4, abs=1e-6)
        assert records[name].extra["whitened"] is True


def test_layers_without_statistics_join_at_the_typical_input_scale(planted, tmp_path):
    base, tuned, X, _ = planted
    base, tuned = dict(base), dict(tuned)
    base["c.weight"], tuned["c.weight"] = torch.zeros(OUT, IN), 1.5 * torch.eye(OUT, IN)  # no statistics
    stats = tmp_path / "only_a.safetensors"
    write_calibration(stats, [InputStats(("a",), X["a"] @ X["a"].T, TOKENS)])
    result = extract(base, tuned, budget=10 * (OUT + IN), method="exact", calibration=stats)
    records = {r.name: r for r in result.report.layers}
    assert "whitened" not in records["c"].extra and records["a"].extra["whitened"] is True
    assert any("no input statistics" in n and "b, c" in n for n in result.report.notes)
    # c's values (1.5 each) times sqrt(mean squared input of a) against a's per-token whitened values: known answer
    unit = math.sqrt(float((X["a"] @ X["a"].T).diagonal().mean()) / TOKENS)
    dW = (tuned["a.weight"] - base["a.weight"]).double()
    La = whitener(X["a"] @ X["a"].T, damping=0.01).L
    spectra = [LayerSpectrum("a", (OUT, IN), torch.linalg.svdvals(dW @ La) / math.sqrt(TOKENS)),
               LayerSpectrum("b", (OUT, IN), torch.linalg.svdvals(dW) * unit),
               LayerSpectrum("c", (OUT, IN), torch.full((OUT,), 1.5, dtype=torch.float64) * unit)]
    expected = {k: v for k, v in allocate_budget(spectra, 10 * (OUT + IN)).items() if v}
    assert {n: m.rank for n, m in result.adapter.modules.items()} == expected
