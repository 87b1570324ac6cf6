"""convert's rank options (optimal truncation of LoHa / LoKr / diff / plain modules) and the top-k path of a LoKr's
full Kronecker factor (top_svd: Gram eigen-decomposition instead of a full SVD), against dense SVDs."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from lowrank_tools.cli import main
from lowrank_tools.io.formats import load_adapter
from lowrank_tools.linalg.structured import kron_svd, top_svd
from lowrank_tools.linalg.sketch import POWER_TOL


def _r(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _planted(m, n, values, seed):
    """(m, n) float64 with exactly the singular values ``values``."""
    Q1 = torch.linalg.qr(_r(m, len(values), seed=seed).double()).Q
    Q2 = torch.linalg.qr(_r(n, len(values), seed=seed + 1).double()).Q
    return (Q1 * torch.tensor(values, dtype=torch.float64)) @ Q2.mT


def _modules(seed=0):
    """kohya keys: a LoHa (12 x 20, 3x3), a LoKr with a full W2 (24 x 30), a LoKr with factored W2, a diff, a plain
    LoRA with a planted rank 5; and the dense float64 delta of each."""
    loha = {"hada_w1_a": _r(12, 3, seed=seed), "hada_w1_b": _r(3, 20, seed=seed + 1),
            "hada_w2_a": _r(12, 3, seed=seed + 2), "hada_w2_b": _r(3, 20, seed=seed + 3)}
    lokr_full = {"lokr_w1": _r(2, 3, seed=seed + 4), "lokr_w2": _r(12, 10, seed=seed + 5)}
    lokr_fact = {"lokr_w1": _r(3, 2, seed=seed + 6), "lokr_w2_a": _r(8, 4, seed=seed + 7),
                 "lokr_w2_b": _r(4, 9, seed=seed + 8)}
    diff = {"diff": _planted(16, 14, [5.0, 3.0, 2.0, 1.0, 0.5, 0.25], seed + 9).float()}
    up, down = _r(18, 5, seed=seed + 11), _r(5, 22, seed=seed + 12)
    plain = {"lora_up.weight": up, "lora_down.weight": down, "alpha": torch.tensor(5.0)}
    dense = {"loha": (loha["hada_w1_a"] @ loha["hada_w1_b"]).double() * (loha["hada_w2_a"] @ loha["hada_w2_b"]).double(),
             "lokrfull": torch.kron(lokr_full["lokr_w1"].double(), lokr_full["lokr_w2"].double()),
             "lokrfact": torch.kron(lokr_fact["lokr_w1"].double(),
                                     (lokr_fact["lokr_w2_a"] @ lokr_fact["lokr_w2_b"]).double()),
             "diff": diff["diff"].double(), "plain": (up @ down).double()}
    tensors = {}
    for name, t in (("loha", loha), ("lokrfull", lokr_full), ("lokrfact", lokr_fact), ("diff", diff),
                    ("plain", plain)):
        tensors.update({f"lora_unet_{name}.{k}": v for k, v in t.items()})
    return tensors, dense


def _optimal(M, k):
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return (U[:, :k] * S[:k]) @ Vh[:k], S


def _convert(tmp_path, *args):
    src, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    tensors, dense = _modules()
    save_file(tensors, str(src))
    res = CliRunner().invoke(main, ["convert", str(src), "-o", str(out), "-q", *args])
    assert res.exit_code == 0, res.output
    return {n.removeprefix("unet."): m for n, m in load_adapter(out).modules.items()}, dense


@pytest.mark.parametrize("k", [1, 3, 4])
def test_convert_rank_is_the_dense_optimal_truncation(tmp_path, k):
    modules, dense = _convert(tmp_path, "--rank", str(k))
    assert set(modules) == set(dense)
    for name, M in dense.items():
        m = modules[name]
        want, _ = _optimal(M, k)
        got = m.scale * (m.B.double() @ m.A.double())
        assert m.rank == k, name
        assert float((got - want).norm() / want.norm()) < 1e-5, name  # the same matrix, not only the same error


def test_convert_without_rank_writes_the_smallest_exact_rank(tmp_path):
    modules, dense = _convert(tmp_path)
    planted = {"loha": 9, "lokrfull": 20, "lokrfact": 8, "diff": 6, "plain": 5}  # 3x3, 2 x 10, 2 x 4, planted
    for name, M in dense.items():
        m = modules[name]
        assert m.rank == planted[name], name
        assert float((m.scale * (m.B.double() @ m.A.double()) - M).norm() / M.norm()) < 1e-6, name


@pytest.mark.parametrize("rule", [["--energy", "0.9"], ["--sv-ratio", "4"], ["--threshold", "1.5"],
                                  ["--energy", "0.95", "-r", "3"]])
def test_convert_dynamic_rules_pick_the_rank_of_the_exact_spectrum(tmp_path, rule):
    from lowrank_tools.linalg import RankRule

    modules, dense = _convert(tmp_path, *rule)
    opts = dict(zip(rule[::2], rule[1::2]))
    made = RankRule(rank=int(opts["-r"]) if "-r" in opts else None,
                    energy=float(opts["--energy"]) if "--energy" in opts else None,
                    sv_ratio=float(opts["--sv-ratio"]) if "--sv-ratio" in opts else None,
                    threshold=float(opts["--threshold"]) if "--threshold" in opts else None)
    for name, M in dense.items():
        _, S = _optimal(M, 1)
        k = made.choose(S)
        if k == 0:
            assert name not in modules
            continue
        want, _ = _optimal(M, k)
        m = modules[name]
        assert m.rank == k, name
        assert float((m.scale * (m.B.double() @ m.A.double()) - want).norm() / want.norm()) < 1e-5, name


def test_convert_budget_spends_at_most_the_budget(tmp_path):
    modules, dense = _convert(tmp_path, "--budget", "300")
    assert 0 < sum(m.params for m in modules.values()) <= 300


def test_convert_rank_zero_everywhere_refuses_to_write(tmp_path):
    src, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_file(_modules()[0], str(src))
    res = CliRunner().invoke(main, ["convert", str(src), "-o", str(out), "--threshold", "1e9"])
    assert res.exit_code == 1 and not out.exists()


@pytest.mark.parametrize("shape", [(30, 80), (80, 30), (40, 40)])
@pytest.mark.parametrize("flat", [False, True], ids=["decaying", "flat"])
def test_top_svd_equals_the_svd(shape, flat):
    m, n = shape
    W = _r(m, n, seed=3).double()
    if not flat:
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        W = (U * (0.8 ** torch.arange(len(S), dtype=torch.float64))) @ Vh
    k = 7
    got = top_svd(W, k)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    assert got.rank == k
    assert torch.allclose(got.S, S[:k], rtol=1e-10, atol=0)
    want = (U[:, :k] * S[:k]) @ Vh[:k]
    assert float((got.dense() - want).norm() / want.norm()) < 1e-9
    assert torch.allclose(got.U.mT @ got.U, torch.eye(k, dtype=torch.float64), atol=1e-10)


def test_top_svd_drops_components_at_the_gram_noise_floor():
    W = _planted(20, 50, [1.0, 0.5, 1e-12], seed=4)  # a third value below sqrt(eps) of the first: noise in a Gram
    assert top_svd(W, 3).rank == 2
    assert top_svd(W, 25).rank == 3  # k >= min side: the full exact SVD, which resolves it


@pytest.mark.parametrize("k", [1, 5, 12])
def test_kron_top_k_with_full_factors_is_the_optimal_truncation(k):
    W1, W2 = _r(3, 4, seed=5).double(), _r(16, 40, seed=6).double()
    got = kron_svd(W1, W2, k)
    M = torch.kron(W1, W2)
    want, S = _optimal(M, k)
    assert torch.allclose(got.S, S[:k], rtol=1e-10, atol=0)
    assert float((got.dense() - want).norm() / want.norm()) < 1e-9


def _dora_case(tmp_path):
    """A 300 x 400 base and a rank-4 PEFT-style DoRA module on it (perturbed magnitude): large enough for the
    randomized SVD (auto: k + 10 <= min side / 4)."""
    from lowrank_tools.adapter import Adapter, LoraModule

    W0 = _r(300, 400, seed=20) / 20
    save_file({"lin.weight": W0}, str(tmp_path / "base.safetensors"))
    B, A = _r(300, 4, seed=21), _r(4, 400, seed=22) / 20
    m = (W0.double() + B.double() @ A.double()).norm(dim=1) * (0.5 + torch.rand(300, generator=torch.Generator()
                                                                                  .manual_seed(23)))
    module = LoraModule(B=B, A=A, alpha=4.0, magnitude=m.float())
    D = (m.unsqueeze(1) * (W0.double() + B.double() @ A.double())
         / (W0.double() + B.double() @ A.double()).norm(dim=1, keepdim=True)) - W0.double()
    return Adapter(modules={"lin": module}), tmp_path / "base.safetensors", D


@pytest.mark.parametrize("method", ["auto", "randomized", "exact"])
def test_dora_to_lora_error_report_matches_the_written_factors(tmp_path, method):
    from lowrank_tools.dora import dora_to_lora

    adapter, base, D = _dora_case(tmp_path)
    done = dora_to_lora(adapter, base, method=method)
    m = done.adapter.modules["lin"]
    written = float((D - m.scale * (m.B.double() @ m.A.double())).norm() / D.norm())
    S = torch.linalg.svdvals(D)
    optimal = float(S[4:].norm() / S.norm())
    assert m.rank == 4 and m.magnitude is None
    assert abs(done.rel_errors["lin"] - written) < 1e-6  # what is reported is what is written
    assert optimal <= written <= optimal * (1 + POWER_TOL)  # randomized: within the adaptive stop's tolerance


def test_cli_convert_dora_lora_method_and_rank(tmp_path):
    from lowrank_tools.io.formats import save_adapter

    adapter, base, D = _dora_case(tmp_path)
    save_adapter(adapter, tmp_path / "dora", format="peft")
    for method in ("exact", "auto"):
        res = CliRunner().invoke(main, ["convert", str(tmp_path / "dora"), "-o", str(tmp_path / method), "--base",
                                        str(base), "--dora", "lora", "--method", method, "-r", "6", "--format", "peft"])
        assert res.exit_code == 0, res.output
        m = load_adapter(tmp_path / method).modules["lin"]
        S = torch.linalg.svdvals(D)
        err = float((D - m.scale * (m.B.double() @ m.A.double())).norm() / D.norm())
        assert m.rank == 6 and err <= float(S[6:].norm() / S.norm()) * (1 + POWER_TOL)  # the adaptive stop's
        assert f"largest rel error {err:.3g}" in res.output


def test_cli_convert_dora_lora_energy_is_applied_once(tmp_path):
    """--energy picks k on the whole DoRA delta's spectrum; the truncated module is not truncated again."""
    from lowrank_tools.io.formats import save_adapter

    adapter, base, D = _dora_case(tmp_path)
    save_adapter(adapter, tmp_path / "dora", format="peft")
    res = CliRunner().invoke(main, ["convert", str(tmp_path / "dora"), "-o", str(tmp_path / "out"), "--base",
                                    str(base), "--dora", "lora", "--energy", "0.99", "--format", "peft", "-q"])
    assert res.exit_code == 0, res.output
    S = torch.linalg.svdvals(D)
    k = int((S.square().cumsum(0) / S.square().sum() < 0.99).sum()) + 1  # 36: a second pass would keep 4
    assert load_adapter(tmp_path / "out").modules["lin"].rank == k
