"""Numerical edge cases: fp16 overflow (computed in float32; a cast that overflows is an error naming the module and
the fix), all-zero and exactly rank-deficient deltas, 1xN / Nx1 and extreme aspect ratios, subnormal values, and SVDs
that fail to converge (float64, then exact on CPU, each retry a warning naming the layer)."""

from __future__ import annotations

import math
import re

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from conftest import planted_delta
from lowrank_tools import Adapter, LoraModule, RankRule, extract, merge, resize
from lowrank_tools.analyze import analyze_delta
from lowrank_tools.cli import main
from lowrank_tools.errors import NumericalError

FP16_MAX = torch.finfo(torch.float16).max  # 65504
UP = "model.layers.0.mlp.up_proj"


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _one_line_error(result, code: int, pattern: str) -> None:
    assert result.exit_code == code, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    assert re.search(pattern, lines[0]), lines[0]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


# ------------------------------------------------------------------------------------------ fp16 overflow


def _fp16_pair() -> tuple[torch.Tensor, torch.Tensor]:
    """W0 = -W, W' = W in float16 with |W| up to 60000: W' - W0 reaches 120000, past float16's 65504."""
    W = planted_delta(48, 32, 1, seed=3)
    W = (W / W.abs().max() * 60000).half()
    return -W, W


def test_fp16_delta_past_fp16_range_is_computed_in_float32(tmp_path):
    W0, W1 = _fp16_pair()
    assert torch.isinf(W1 - W0).any()  # in float16 the delta itself overflows
    dW = W1.float() - W0.float()  # (48, 32), up to 120000
    result = extract({f"{UP}.weight": W0}, {f"{UP}.weight": W1}, rule=RankRule(rank=1))
    m = result.adapter.modules[UP]
    assert m.B.dtype == torch.float16 and torch.isfinite(m.B).all() and torch.isfinite(m.A).all()
    assert _rel(m.delta(), dW) < 2e-3  # float16 rounding of the factors only
    # applying it back in float16: W0 + delta fits (it is W'), computed in float32 and cast once
    save_file({f"{UP}.weight": W0}, str(tmp_path / "base.safetensors"))
    from lowrank_tools.io.formats import save_adapter

    save_adapter(result.adapter, tmp_path / "adapter")
    assert _cli("apply", tmp_path / "base.safetensors", tmp_path / "adapter", "-o", tmp_path / "out.safetensors",
                "-q").exit_code == 0
    out = load_file(str(tmp_path / "out.safetensors"))[f"{UP}.weight"]
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    assert _rel(out, W1) < 2e-3


def test_fp16_factors_that_overflow_are_an_error_naming_the_module(tmp_path):
    """A tiny --alpha makes B = U sqrt(S r / alpha) too large for float16: error, nothing written; --dtype float32
    is the documented fix."""
    W0, W1 = _fp16_pair()
    save_file({f"{UP}.weight": W0}, str(tmp_path / "b.safetensors"))
    save_file({f"{UP}.weight": W1}, str(tmp_path / "t.safetensors"))
    out = tmp_path / "adapter"
    result = _cli("extract", tmp_path / "b.safetensors", tmp_path / "t.safetensors", "-o", out, "-r", 1,
                  "--alpha", "1e-6", "-q")
    _one_line_error(result, 1, rf"{re.escape(UP)}: factors overflow torch\.float16 when cast: pass --dtype float32")
    assert not out.exists()
    ok = _cli("extract", tmp_path / "b.safetensors", tmp_path / "t.safetensors", "-o", out, "-r", 1, "--alpha",
              "1e-6", "--dtype", "float32", "-q")
    assert ok.exit_code == 0, ok.output
    from lowrank_tools.io.formats import load_adapter

    m = load_adapter(out).modules[UP]
    assert m.B.dtype == torch.float32 and float(m.B.abs().max()) > FP16_MAX
    assert _rel(m.delta(), W1.float() - W0.float()) < 2e-3  # the rank-1 truncation of float16-rounded values


def test_apply_overflowing_fp16_is_an_error_naming_the_tensor(tmp_path):
    base = {f"{UP}.weight": torch.full((8, 8), 65000.0, dtype=torch.float16)}
    save_file(base, str(tmp_path / "base.safetensors"))
    from lowrank_tools.io.formats import save_adapter

    plus = LoraModule(B=torch.full((8, 1), 40.0), A=torch.full((1, 8), 40.0), alpha=1.0)  # adds 1600 everywhere
    save_adapter(Adapter(modules={UP: plus}), tmp_path / "adapter")
    out = tmp_path / "out.safetensors"
    result = _cli("apply", tmp_path / "base.safetensors", tmp_path / "adapter", "-o", out, "-q")
    _one_line_error(result, 1, rf"{re.escape(UP)}\.weight overflows torch\.float16: pass --dtype float32")
    assert not out.exists() and not list(tmp_path.glob(".*lrt-tmp*"))
    assert _cli("apply", tmp_path / "base.safetensors", tmp_path / "adapter", "-o", out, "--dtype", "float32",
                "-q").exit_code == 0
    stored = float(base[f"{UP}.weight"][0, 0])  # 65000 rounds to 64992 in float16
    assert torch.equal(load_file(str(out))[f"{UP}.weight"], torch.full((8, 8), stored + 1600.0))


def test_resize_fp16_overflow_is_an_error_naming_the_module():
    g = torch.Generator().manual_seed(0)
    m = LoraModule(B=torch.randn(32, 4, generator=g).half(), A=torch.randn(4, 16, generator=g).half(), alpha=4.0)
    with pytest.raises(NumericalError, match=rf"{re.escape(UP)}: factors overflow torch\.float16"):
        resize(Adapter(modules={UP: m}), rule=RankRule(rank=2), alpha=1e-9)


# ------------------------------------------------------------------------------------------ zero and deficient


def test_all_zero_deltas_give_no_module_and_say_so():
    g = torch.Generator().manual_seed(0)
    base = {f"l{i}.weight": torch.randn(16, 8, generator=g) for i in range(3)}
    result = extract(base, {k: v.clone() for k, v in base.items()}, rule=RankRule(rank=4))
    assert result.adapter.modules == {} and result.report.layers == []
    assert sorted(result.report.skipped["zero delta or nothing kept"]) == ["l0", "l1", "l2"]
    tuned = dict(base, **{"l1.weight": base["l1.weight"] + planted_delta(16, 8, 2)})  # one layer changed
    result = extract(base, tuned, rule=RankRule(rank=4))
    assert list(result.adapter.modules) == ["l1"] and sorted(result.report.skipped["zero delta or nothing kept"]) == [
        "l0", "l2"]


def test_zero_products_in_resize_and_merge():
    g = torch.Generator().manual_seed(0)
    zero = LoraModule(B=torch.zeros(16, 3), A=torch.randn(3, 8, generator=g), alpha=3.0)
    done = resize(Adapter(modules={"z": zero}), rule=RankRule(rank=2))
    assert done.adapter.modules == {} and done.report.skipped["rank 0 (dropped)"] == ["z"]
    m = LoraModule(B=torch.randn(16, 2, generator=g), A=torch.randn(2, 8, generator=g), alpha=2.0)
    pair = [(Adapter(modules={"m": m}), 1.0), (Adapter(modules={"m": m}), -1.0)]  # w B A - w B A = 0
    exact = merge(pair).adapter.modules["m"]  # concatenation: rank 4, product zero up to rounding
    assert exact.rank == 4 and float(exact.delta().abs().max()) < 1e-6 * float(m.delta().abs().max())
    cancel = merge(pair, rule=RankRule(rank=2, threshold=1e-6))
    assert cancel.adapter.modules == {} and cancel.report.skipped["rank 0 (dropped)"] == ["m"]


@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_exactly_rank_deficient_delta(method):
    """A rank-3 delta: the dynamic rules find 3; a larger fixed rank keeps what is asked and loses nothing."""
    W0 = torch.zeros(300, 280)
    dW = planted_delta(300, 280, 3, seed=4)
    W1 = {"a.weight": W0 + dW}
    for rule in (RankRule(energy=0.999999), RankRule(sv_ratio=1e3), RankRule(threshold=1e-3)):
        r = extract({"a.weight": W0}, W1, rule=rule, method=method)
        assert r.adapter.ranks == {"a": 3}, rule
        assert r.report.layers[0].rel_error < 1e-5
    big = extract({"a.weight": W0}, W1, rule=RankRule(rank=10), method=method)
    assert big.adapter.ranks == {"a": 10} and big.report.layers[0].rel_error < 1e-5
    assert _rel(big.adapter.modules["a"].delta(), dW) < 1e-5


def test_rank_deficient_factors_in_resize():
    """B (32, 6) of rank 3: the QR core sees rank 3, --energy keeps 3 and the product is unchanged."""
    g = torch.Generator().manual_seed(1)
    B = torch.randn(32, 3, generator=g) @ torch.randn(3, 6, generator=g)
    m = LoraModule(B=B, A=torch.randn(6, 24, generator=g), alpha=6.0)
    done = resize(Adapter(modules={"m": m}), rule=RankRule(energy=0.9999999))
    assert done.adapter.ranks == {"m": 3}
    assert _rel(done.adapter.modules["m"].delta(), m.delta()) < 1e-5


# ------------------------------------------------------------------------------------------ shapes


@pytest.mark.parametrize("method", ["exact", "randomized", "auto"])
@pytest.mark.parametrize("shape", [(1, 64), (64, 1), (1, 4096), (4096, 2), (2, 4096)],
                         ids=["1x64", "64x1", "1x4096", "4096x2", "2x4096"])
def test_thin_and_extreme_aspect_ratios(shape, method):
    """The rank is clamped to the smaller side; a delta of full rank (1 or 2) comes back exactly."""
    k = min(shape)
    dW = planted_delta(*shape, k, seed=7)
    result = extract({"a.weight": torch.zeros(shape)}, {"a.weight": dW}, rule=RankRule(rank=8), method=method)
    assert result.adapter.ranks == {"a": k}
    m = result.adapter.modules["a"]
    assert tuple(m.B.shape) == (shape[0], k) and tuple(m.A.shape) == (k, shape[1])
    assert _rel(m.delta(), dW) < 1e-5 and result.report.layers[0].rel_error < 1e-5


# ------------------------------------------------------------------------------------------ subnormals


def test_float32_subnormal_delta():
    """A rank-2 delta of values around 1e-40 (all below float32's smallest normal 1.2e-38): found, rank 2 by energy,
    and recovered to the precision subnormals hold (~1e-5 relative at this size)."""
    dW = planted_delta(48, 32, 2, seed=5) * 1e-40
    assert (dW.abs() < torch.finfo(torch.float32).tiny).all() and (dW != 0).all()
    result = extract({"a.weight": torch.zeros(48, 32)}, {"a.weight": dW}, rule=RankRule(energy=0.9999))
    assert result.adapter.ranks == {"a": 2}
    m = result.adapter.modules["a"]
    assert torch.isfinite(m.B).all() and (m.B != 0).any()
    assert _rel(m.delta(), dW) < 1e-3


def test_float16_subnormal_delta():
    """float16 values near 1e-6 are subnormal (smallest normal 6.1e-5): the float32 difference keeps them, and the
    written float16 factors are normal numbers, not flushed to zero."""
    dW = (planted_delta(48, 32, 2, seed=6) * 1e-6).half()
    assert (dW.float().abs() < 6.1e-5).all() and (dW != 0).float().mean() > 0.9
    result = extract({"a.weight": torch.zeros(48, 32, dtype=torch.float16)}, {"a.weight": dW}, rule=RankRule(rank=2))
    m = result.adapter.modules["a"]
    assert m.B.dtype == torch.float16 and (m.B.float().abs() >= 6.1e-5).float().mean() > 0.9
    assert _rel(m.delta(), dW.float()) < 0.05  # dW itself holds float16-subnormal rounding (~3%)


# ------------------------------------------------------------------------------------------ SVD fallbacks


def _flaky(monkeypatch, name: str, fails: int) -> list[torch.dtype]:
    """torch.linalg.<name> raises LinAlgError on its first ``fails`` calls; returns the dtypes it was called with."""
    real = getattr(torch.linalg, name)
    calls: list[torch.dtype] = []

    def flaky(A, *args, **kwargs):
        calls.append(A.dtype)
        if len(calls) <= fails:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge because the input matrix is "
                                           "ill-conditioned or has too many repeated singular values (error code: 7).")
        return real(A, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, name, flaky)
    return calls


def _layer_pair():
    dW = planted_delta(300, 260, 3, seed=8)
    return {f"{UP}.weight": torch.zeros(300, 260)}, {f"{UP}.weight": dW}, dW


@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_svd_failure_retries_in_float64(monkeypatch, method):
    base, tuned, dW = _layer_pair()
    calls = _flaky(monkeypatch, "svd", fails=1)
    warnings: list[str] = []
    result = extract(base, tuned, rule=RankRule(rank=3), method=method, warn=warnings.append)
    assert calls[:2] == [torch.float32, torch.float64]
    assert len(warnings) == 1 and warnings[0].startswith(f"{UP}: SVD did not converge")
    assert "retried in float64" in warnings[0]
    m = result.adapter.modules[UP]
    assert m.B.dtype == torch.float32 and _rel(m.delta(), dW) < 1e-5  # results come back in the working dtype


def test_svd_failure_then_exact_on_cpu(monkeypatch):
    """float32 and float64 randomized both fail: the exact float64 CPU SVD answers, and the report says exact."""
    base, tuned, dW = _layer_pair()
    calls = _flaky(monkeypatch, "svd", fails=2)
    warnings: list[str] = []
    result = extract(base, tuned, rule=RankRule(rank=3), method="randomized", warn=warnings.append)
    assert calls[:3] == [torch.float32, torch.float64, torch.float64]
    assert [w.startswith(f"{UP}: SVD did not converge") for w in warnings] == [True, True]
    assert "exact method on CPU" in warnings[1]
    assert result.report.layers[0].extra["method"] == "exact"
    assert _rel(result.adapter.modules[UP].delta(), dW) < 1e-5


def test_svd_failure_everywhere_is_one_line_error(monkeypatch, tmp_path):
    base, tuned, _ = _layer_pair()
    _flaky(monkeypatch, "svd", fails=10**6)
    with pytest.raises(NumericalError, match=r"failed after the float64 and exact CPU fallbacks"):
        extract(base, tuned, rule=RankRule(rank=3), method="exact")
    save_file(base, str(tmp_path / "b.safetensors"))
    save_file(tuned, str(tmp_path / "t.safetensors"))
    result = _cli("extract", tmp_path / "b.safetensors", tmp_path / "t.safetensors", "-o", tmp_path / "o", "-r", 3)
    assert result.exit_code == 1 and "Traceback" not in result.output
    parts = re.split(r"[\r\n]", result.output)  # warnings are written above the progress bar, each on its own line
    lines = [ln for ln in parts if ln.startswith(("warning:", "Error:"))]
    assert [ln.split(":", 1)[0] for ln in lines] == ["warning", "warning", "Error"]
    assert all(UP in ln for ln in lines[:2]) and "SVD of a 300 x 260 matrix failed" in lines[2]
    assert not (tmp_path / "o").exists()


def test_analyze_svd_failure_warns_naming_the_layer(monkeypatch):
    base, tuned, dW = _layer_pair()
    _flaky(monkeypatch, "svdvals", fails=1)
    warnings: list[str] = []
    result = analyze_delta(base, tuned, warn=warnings.append)
    assert len(warnings) == 1 and warnings[0].startswith(f"{UP}: SVD did not converge")
    expected = torch.linalg.svdvals(dW.double())[:3]
    assert torch.allclose(torch.tensor(result.layers[0].singular_values[:3], dtype=torch.float64), expected,
                          rtol=1e-5)
    assert math.isclose(result.layers[0].delta_norm, float(dW.double().norm()), rel_tol=1e-6)
