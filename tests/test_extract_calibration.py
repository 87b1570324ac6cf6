"""extract --calibration: whitened factors where statistics exist, plain ones elsewhere, checked inputs."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from lowrank_tools.cli import main
from lowrank_tools.errors import DataError, InvalidOption, ShapeMismatch
from lowrank_tools.extract import extract
from lowrank_tools.io.atomic import write_safetensors
from lowrank_tools.io.calibration import InputStats, write_calibration
from lowrank_tools.io.formats import load_adapter
from lowrank_tools.linalg import RankRule
from lowrank_tools.linalg.whiten import measured_output_error, whitened_factors

IN, OUT, TOKENS = 48, 40, 300


def _inputs(seed: int) -> torch.Tensor:
    X = torch.randn(IN, TOKENS, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    X[: IN // 2] *= 0.02  # half of the input directions are hardly used: whitening should notice
    return X


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("extract_calibration")
    g = torch.Generator().manual_seed(0)
    base = {f"{n}.weight": torch.randn(OUT, IN, generator=g) for n in ("blk.q", "blk.k", "blk.o")}
    base["emb.weight"] = torch.randn(20, IN, generator=g)
    tuned = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    X = _inputs(1)
    write_safetensors(base, root / "base.safetensors")
    write_safetensors(tuned, root / "tuned.safetensors")
    write_calibration(root / "stats.safetensors", [InputStats(("blk.q", "blk.k"), X @ X.T, TOKENS),
                                                   InputStats(("blk.o",), torch.eye(IN, dtype=torch.float64), 1)])
    return {"root": root, "base": base, "tuned": tuned, "X": X, "stats": root / "stats.safetensors"}


def _delta(files, name):
    return (files["tuned"][f"{name}.weight"] - files["base"][f"{name}.weight"]).double()


@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_whitened_where_statistics_exist_plain_elsewhere(files, method):
    result = extract(files["base"], files["tuned"], rule=RankRule(rank=4), method=method, calibration=files["stats"])
    plain = extract(files["base"], files["tuned"], rule=RankRule(rank=4), method=method)
    records = {r.name: r for r in result.report.layers}
    X = files["X"]
    for name in ("blk.q", "blk.k"):
        mod, ref = result.adapter.modules[name], plain.adapter.modules[name]
        dW = _delta(files, name)
        ours = measured_output_error(dW, mod.B, mod.A, X)
        theirs = measured_output_error(dW, ref.B, ref.A, X)
        assert ours < 0.95 * theirs  # whitened wins on the output...
        assert records[name].rel_error > {r.name: r for r in plain.report.layers}[name].rel_error  # ...not weights
        assert records[name].extra["whitened"] is True
        if method == "exact":
            expected = whitened_factors(dW, X @ X.T, 4, method="exact")
            torch.testing.assert_close((mod.B @ mod.A).double(), expected.B @ expected.A, rtol=1e-4, atol=1e-5)
            assert records[name].extra["output_rel_error"] == pytest.approx(expected.output_rel_error, rel=1e-4)
    # identity statistics for blk.o: the plain factors' product (exact; the randomized range finders differ: both
    # near-optimal on this flat random spectrum); emb has none: plain, named in one note
    ours_o, plain_o = result.adapter.modules["blk.o"], plain.adapter.modules["blk.o"]
    if method == "exact":
        torch.testing.assert_close(ours_o.B @ ours_o.A, plain_o.B @ plain_o.A, rtol=1e-4, atol=1e-5)
    plain_rel = {r.name: r for r in plain.report.layers}["blk.o"].rel_error
    assert records["blk.o"].rel_error == pytest.approx(plain_rel, rel=0.02)
    assert "whitened" not in records["emb"].extra
    assert any("no input statistics" in n and "emb" in n for n in result.report.notes)


def test_mismatched_statistics_are_one_line_errors(files, tmp_path):
    wrong = tmp_path / "wrong.safetensors"
    write_calibration(wrong, [InputStats(("blk.q",), torch.eye(IN + 1, dtype=torch.float64), 1)])
    with pytest.raises(ShapeMismatch, match=r"statistics of blk.q are 49 x 49 but its weight takes 48 inputs"):
        extract(files["base"], files["tuned"], rule=RankRule(rank=4), calibration=wrong)
    other = tmp_path / "other.safetensors"
    write_calibration(other, [InputStats(("model.layers.0.q_proj",), torch.eye(IN, dtype=torch.float64), 1)])
    with pytest.raises(DataError, match="no layer of the checkpoints has statistics"):
        extract(files["base"], files["tuned"], rule=RankRule(rank=4), calibration=other)
    with pytest.raises(InvalidOption, match="--damping"):
        extract(files["base"], files["tuned"], rule=RankRule(rank=4), calibration=files["stats"], damping=-1.0)


def test_cli_report_has_both_errors_and_the_adapter_is_plain_lora(files, tmp_path):
    root = files["root"]
    out, report = tmp_path / "adapter", tmp_path / "report.json"
    result = CliRunner().invoke(main, ["extract", str(root / "base.safetensors"), str(root / "tuned.safetensors"),
                                       "-o", str(out), "--rank", "4", "--calibration", str(files["stats"]),
                                       "--damping", "0.05", "--report", str(report), "-q"])
    assert result.exit_code == 0, result.output
    layers = {r["name"]: r for r in json.loads(report.read_text())["layers"]}
    assert 0 < layers["blk.q"]["output_rel_error"] < layers["blk.q"]["rel_error"]
    adapter = load_adapter(out)
    assert set(adapter.modules) == {"blk.q", "blk.k", "blk.o", "emb"} and adapter.modules["blk.q"].A.shape == (4, IN)
    budget = CliRunner().invoke(main, ["extract", str(root / "base.safetensors"), str(root / "tuned.safetensors"),
                                       "-o", str(tmp_path / "b"), "--budget", "999", "--calibration",
                                       str(files["stats"]), "-q"])
    assert budget.exit_code == 0, budget.output  # --budget allocates on the whitened values (test_calibration_budget)
    missing = CliRunner().invoke(main, ["extract", str(root / "base.safetensors"), str(root / "tuned.safetensors"),
                                        "-o", str(tmp_path / "c"), "--calibration", str(tmp_path / "none.safetensors")])
    assert missing.exit_code == 1 and "lowrank-tools calibrate" in missing.output
    assert len(missing.output.strip().splitlines()) == 1
