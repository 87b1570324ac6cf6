"""extract / convert / resize / merge to kohya from diffusers-named Flux parts (split to_q/to_k/to_v, proj_mlp):
the fused module the file names (``double_blocks_N_img_attn_qkv``, ``single_blocks_N_linear1``) is factored as one
matrix, [dW_q; dW_k; dW_v], at the rank asked -- not three rank-r parts concatenated to rank 3r.

Known answers: the planted deltas are stacked by hand here; the written module's rank is r and its error is the
dense SVD truncation error of the stacked delta (exact method: to 1e-5; randomized: within 1% of it, the bar of
benchmarks/bench_flux.py)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from lowrank_tools.adapter import Adapter, LoraModule
from lowrank_tools.cli import main
from lowrank_tools.extract.reading import fused_pair
from lowrank_tools.io.arch_checkpoint import in_original_naming
from lowrank_tools.io.checkpoint import open_checkpoint
from lowrank_tools.io.formats import load_adapter, save_adapter

D = 96  # wide enough for --method randomized to stay randomized at rank 4 (sketch 14 <= 96 / 4)
RANK = 4
QKV = ("to_q", "to_k", "to_v")


def shapes() -> dict[str, tuple[int, int]]:
    """{diffusers module: (out, in)} of one double and one single Flux block and the final modulation."""
    b, s = "transformer_blocks.0", "single_transformer_blocks.0"
    out = {f"{b}.attn.{p}": (D, D) for p in (*QKV, "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")}
    out |= {f"{s}.attn.{p}": (D, D) for p in QKV}
    out |= {f"{s}.proj_mlp": (4 * D, D), f"{s}.proj_out": (D, 5 * D), "norm_out.linear": (2 * D, D)}
    return out


def decaying(m: int, n: int, seed: int, k: int = 8) -> torch.Tensor:
    """(m, n) of rank k, singular values ~ 1/i: a truncation to rank 4 of a stack of these loses something."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    return (U * (1.0 / torch.arange(1, k + 1, dtype=torch.float64))) @ V.T


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """base / tuned float32 safetensors of diffusers-named Flux modules; the planted deltas (float64)."""
    folder = tmp_path_factory.mktemp("flux")
    base, tuned, deltas = {}, {}, {}
    for i, (name, (m, n)) in enumerate(shapes().items()):
        g = torch.Generator().manual_seed(100 + i)
        W = torch.randn(m, n, generator=g)
        T = W + decaying(m, n, seed=i).float()
        base[f"{name}.weight"], tuned[f"{name}.weight"] = W, T
        deltas[name] = T.double() - W.double()
    save_file(base, str(folder / "base.safetensors"))
    save_file(tuned, str(folder / "tuned.safetensors"))
    return folder, deltas


def stacked(deltas: dict, fused: str) -> torch.Tensor:
    if fused == "double_blocks.0.img_attn.qkv":
        return torch.cat([deltas[f"transformer_blocks.0.attn.{p}"] for p in QKV])
    if fused == "double_blocks.0.txt_attn.qkv":
        return torch.cat([deltas[f"transformer_blocks.0.attn.add_{p}_proj"] for p in "qkv"])
    assert fused == "single_blocks.0.linear1"
    return torch.cat([*(deltas[f"single_transformer_blocks.0.attn.{p}"] for p in QKV),
                      deltas["single_transformer_blocks.0.proj_mlp"]])


FUSED = ("double_blocks.0.img_attn.qkv", "double_blocks.0.txt_attn.qkv", "single_blocks.0.linear1")


def truncation_error(target: torch.Tensor, r: int) -> float:
    return float(torch.linalg.svdvals(target)[r:].square().sum().sqrt())


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_extract_kohya_factors_each_fused_module_at_the_rank_asked(pair, tmp_path, method):
    folder, deltas = pair
    out, report = tmp_path / "k.safetensors", tmp_path / "report.json"
    result = run("extract", folder / "base.safetensors", folder / "tuned.safetensors", "-o", out, "--rank", RANK,
                 "--method", method, "--report", report, "-q")
    assert result.exit_code == 0, result.output
    adapter = load_adapter(out)
    assert {m.rank for m in adapter.modules.values()} == {RANK}  # never 3r / 4r
    records = {r["name"]: r for r in json.loads(report.read_text())["layers"]}
    for name in FUSED:
        target = stacked(deltas, name)
        err = float(torch.linalg.matrix_norm(target - adapter.modules[name].delta_matrix().double()))
        best = truncation_error(target, RANK)
        if method == "exact":
            assert err == pytest.approx(best, rel=1e-5, abs=1e-6), name
        else:
            assert best * (1 - 1e-6) <= err <= best * 1.01, name
        assert records[name]["rank"] == RANK  # the report names the fused module
        assert records[name]["rel_error"] == pytest.approx(err / float(target.norm()), rel=1e-3)
    swapped = adapter.modules["final_layer.adaLN_modulation.1"].delta_matrix().double()
    d = deltas["norm_out.linear"]
    assert float(torch.linalg.matrix_norm(torch.cat([d[D:], d[:D]]) - swapped)) == pytest.approx(
        truncation_error(d, RANK), rel=1e-3)


def test_extract_peft_keeps_the_split_names_and_ranks(pair, tmp_path):
    folder, _ = pair
    result = run("extract", folder / "base.safetensors", folder / "tuned.safetensors", "-o", tmp_path / "p",
                 "--rank", RANK, "-q")
    assert result.exit_code == 0, result.output
    adapter = load_adapter(tmp_path / "p")
    assert set(adapter.modules) == set(shapes())
    assert {m.rank for m in adapter.modules.values()} == {RANK}


def test_budget_counts_a_fused_module_as_one(pair, tmp_path):
    """--budget allocates over the fused modules: every layer the report lists is a module of the file."""
    folder, _ = pair
    report = tmp_path / "r.json"
    result = run("extract", folder / "base.safetensors", folder / "tuned.safetensors", "-o", tmp_path / "k.safetensors",
                 "--budget", 40 * D * 6, "--report", report, "-q")
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    names = {r["name"] for r in data["layers"]}
    assert set(FUSED) <= names and not any("to_q" in n for n in names)
    assert data["summary"]["params"] <= 40 * D * 6
    assert sum(m.params for m in load_adapter(tmp_path / "k.safetensors").modules.values()) == data["summary"]["params"]


def test_the_view_reads_a_fused_layer_as_its_stacked_parts(pair):
    folder, _ = pair
    raw = open_checkpoint(folder / "tuned.safetensors")
    view, arch = in_original_naming(raw)
    assert arch.name == "flux"
    assert "double_blocks.0.img_attn.qkv.weight" in view and "transformer_blocks.0.attn.to_q.weight" not in view
    expected = torch.cat([raw.get(f"transformer_blocks.0.attn.{p}.weight") for p in QKV])
    assert view.shape("double_blocks.0.img_attn.qkv.weight") == (3 * D, D)
    assert torch.equal(view.get("double_blocks.0.img_attn.qkv.weight"), expected)
    lin1 = view.get("single_blocks.0.linear1.weight")
    assert lin1.shape == (7 * D, D)
    assert torch.equal(lin1[3 * D:], raw.get("single_transformer_blocks.0.proj_mlp.weight"))
    final = view.get("final_layer.adaLN_modulation.1.weight")
    assert torch.equal(final[:D], raw.get("norm_out.linear.weight")[D:])


def test_a_pair_of_other_names_is_read_as_it_is(tmp_path):
    save_file({"model.layers.0.mlp.up_proj.weight": torch.zeros(4, 4)}, str(tmp_path / "llm.safetensors"))
    base, tuned = fused_pair(tmp_path / "llm.safetensors", tmp_path / "llm.safetensors")
    assert list(tuned.keys()) == ["model.layers.0.mlp.up_proj.weight"]


def split_adapter(deltas: dict) -> Adapter:
    """The planted deltas of the q/k/v parts as exact (rank-8) diffusers-named LoRA modules."""
    modules = {}
    for name, d in deltas.items():
        U, S, Vh = torch.linalg.svd(d, full_matrices=False)
        modules[f"transformer.{name}"] = LoraModule(B=(U[:, :8] * S[:8]).float(), A=Vh[:8].float(), alpha=8.0)
    return Adapter(modules=modules)


@pytest.mark.parametrize("command", ["convert", "resize"])
def test_convert_and_resize_split_to_fused_with_a_rank_is_the_optimal_truncation(pair, tmp_path, command):
    _, deltas = pair
    save_adapter(split_adapter(deltas), tmp_path / "split", format="peft")
    result = run(command, tmp_path / "split", "-o", tmp_path / "k.safetensors", "--rank", RANK, "-q")
    assert result.exit_code == 0, result.output
    adapter = load_adapter(tmp_path / "k.safetensors")
    for name in FUSED:
        m = adapter.modules[name]
        target = stacked(deltas, name)
        assert m.rank == RANK, name
        err = float(torch.linalg.matrix_norm(target - m.delta_matrix().double()))
        assert err == pytest.approx(truncation_error(target, RANK), rel=1e-4, abs=1e-5), name


def test_convert_split_to_fused_without_a_rank_is_the_exact_concatenation(pair, tmp_path):
    _, deltas = pair
    save_adapter(split_adapter(deltas), tmp_path / "split", format="peft")
    result = run("convert", tmp_path / "split", "-o", tmp_path / "k.safetensors", "-q")
    assert result.exit_code == 0, result.output
    adapter = load_adapter(tmp_path / "k.safetensors")
    assert adapter.modules["double_blocks.0.img_attn.qkv"].rank == 24
    assert adapter.modules["single_blocks.0.linear1"].rank == 32
    for name in FUSED:
        torch.testing.assert_close(adapter.modules[name].delta_matrix().double(), stacked(deltas, name),
                                   rtol=0, atol=1e-5)


def test_written_keys_are_bfl(pair, tmp_path):
    folder, _ = pair
    run("extract", folder / "base.safetensors", folder / "tuned.safetensors", "-o", tmp_path / "k.safetensors",
        "--rank", RANK, "-q")
    keys = {k.split(".")[0] for k in load_file(str(tmp_path / "k.safetensors"))}
    assert {"lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_0_linear1",
            "lora_unet_final_layer_adaLN_modulation_1", "lora_unet_double_blocks_0_txt_attn_proj"} <= keys
    assert not any("to_q" in k for k in keys)


def test_keep_bias_carries_a_fused_layers_stacked_bias(tmp_path):
    """--keep-bias to kohya: the fused module's diff_b is [db_q; db_k; db_v] (the view stacks biases too)."""
    base, tuned = {}, {}
    g = torch.Generator().manual_seed(7)
    for name, (m, n) in shapes().items():
        base[f"{name}.weight"] = torch.randn(m, n, generator=g)
        tuned[f"{name}.weight"] = base[f"{name}.weight"] + decaying(m, n, seed=1).float()
        base[f"{name}.bias"] = torch.randn(m, generator=g)
        tuned[f"{name}.bias"] = base[f"{name}.bias"] + 0.1 * torch.randn(m, generator=g)
    save_file(base, str(tmp_path / "b.safetensors"))
    save_file(tuned, str(tmp_path / "t.safetensors"))
    result = run("extract", tmp_path / "b.safetensors", tmp_path / "t.safetensors", "-o", tmp_path / "k.safetensors",
                 "--rank", RANK, "--keep-bias", "-q")
    assert result.exit_code == 0, result.output
    written = load_file(str(tmp_path / "k.safetensors"))
    expected = torch.cat([tuned[f"transformer_blocks.0.attn.{p}.bias"] - base[f"transformer_blocks.0.attn.{p}.bias"]
                          for p in QKV])
    torch.testing.assert_close(written["lora_unet_double_blocks_0_img_attn_qkv.diff_b"], expected)
    final = tuned["norm_out.linear.bias"] - base["norm_out.linear.bias"]
    torch.testing.assert_close(written["lora_unet_final_layer_adaLN_modulation_1.diff_b"],
                               torch.cat([final[D:], final[:D]]))


def test_merge_split_to_fused_with_a_rank_is_the_optimal_truncation(pair, tmp_path):
    """The adapter merged with itself at 0.5 / 0.5 and rank r into a kohya file: each fused module is the rank-r
    truncation of the stacked delta; --exclude sees the inputs' own (split) names."""
    _, deltas = pair
    save_adapter(split_adapter(deltas), tmp_path / "split", format="peft")
    result = run("merge", f"{tmp_path / 'split'}:0.5", f"{tmp_path / 'split'}:0.5", "-o", tmp_path / "k.safetensors",
                 "--rank", RANK, "-q", "--exclude", r"attn\.to_out\.0$", "--report", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    adapter = load_adapter(tmp_path / "k.safetensors")
    assert "double_blocks.0.img_attn.proj" not in adapter.modules
    skipped = json.loads((tmp_path / "r.json").read_text())["skipped"]
    assert "transformer.transformer_blocks.0.attn.to_out.0" in skipped["filtered out"]
    for name in FUSED:
        target = stacked(deltas, name)
        err = float(torch.linalg.matrix_norm(target - adapter.modules[name].delta_matrix().double()))
        assert adapter.modules[name].rank == RANK
        assert err == pytest.approx(truncation_error(target, RANK), rel=1e-4, abs=1e-5), name


def test_calibration_whitens_each_fused_module_by_its_parts_input(pair, tmp_path):
    """extract --calibration --format kohya: the fused module is factored as the file holds it, at the rank asked,
    whitened by the one input its parts share (q/k/v and proj_mlp read the same activations): the optimal rank-r
    output-error truncation of the stacked delta, not three whitened rank-r parts (rank 3r). The modulation and the
    1:1 renamed modules without statistics are factored plainly and named in the note."""
    from lowrank_tools.io.calibration import InputStats, write_calibration
    from lowrank_tools.linalg.whiten import measured_output_error, whitened_factors

    folder, deltas = pair
    b, s = "transformer_blocks.0", "single_transformer_blocks.0"
    inputs = {}
    for i, name in enumerate(("img", "txt", "single")):
        X = torch.randn(D, 400, generator=torch.Generator().manual_seed(50 + i), dtype=torch.float64)
        X[: D // 2] *= 0.03  # half the input directions hardly used: whitening must see it
        inputs[name] = X
    stats = tmp_path / "stats.safetensors"
    write_calibration(stats, [InputStats(tuple(f"{b}.attn.{p}" for p in QKV), inputs["img"] @ inputs["img"].T, 400),
                              InputStats(tuple(f"{b}.attn.add_{p}_proj" for p in "qkv"),
                                         inputs["txt"] @ inputs["txt"].T, 400),
                              InputStats((*(f"{s}.attn.{p}" for p in QKV), f"{s}.proj_mlp"),
                                         inputs["single"] @ inputs["single"].T, 400)])
    out, report = tmp_path / "k.safetensors", tmp_path / "report.json"
    result = run("extract", folder / "base.safetensors", folder / "tuned.safetensors", "-o", out, "--rank", RANK,
                 "--method", "exact", "--calibration", stats, "--report", report, "-q")
    assert result.exit_code == 0, result.output
    adapter = load_adapter(out)
    assert {m.rank for m in adapter.modules.values()} == {RANK}
    data = json.loads(report.read_text())
    records = {r["name"]: r for r in data["layers"]}
    for name, X in zip(FUSED, inputs.values()):
        target = stacked(deltas, name)
        mod = adapter.modules[name]
        expected = whitened_factors(target, X @ X.T, RANK, method="exact")
        torch.testing.assert_close(mod.delta_matrix().double(), expected.B @ expected.A, rtol=1e-4, atol=1e-5)
        plain = truncation_error(target, RANK) / float(target.norm())
        ours = measured_output_error(target, mod.B, mod.A, X, scale=mod.alpha / mod.rank)
        assert ours < measured_output_error(target, *_plain_factors(target), X)  # the output error is what it cuts
        assert records[name]["whitened"] is True and records[name]["rel_error"] > plain
    assert "whitened" not in records["final_layer.adaLN_modulation.1"]
    assert any("no input statistics" in n and "double_blocks.0.img_attn.proj" in n for n in data["notes"])


def _plain_factors(target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    U, S, Vh = torch.linalg.svd(target, full_matrices=False)
    return U[:, :RANK] * S[:RANK], Vh[:RANK]
