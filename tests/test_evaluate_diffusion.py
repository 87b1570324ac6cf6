"""evaluate on diffusers denoisers: tiny UNet2DConditionModel, FluxTransformer2DModel and SD3Transformer2DModel
pairs whose tuned model is the base plus planted rank-4 deltas (singular values 1, 1/2, 1/4, 1/8 of a share of each weight's norm), so the
answers are known: the rank-4 extraction is the exact delta (recovered 1), the empty adapter recovers 0, and the
truncations lie in between, increasing with the rank."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

diffusers = pytest.importorskip("diffusers")

from lowrank_tools.adapter import Adapter  # noqa: E402
from lowrank_tools.cli import main  # noqa: E402
from lowrank_tools.errors import InvalidOption, UsageError  # noqa: E402
from lowrank_tools.evaluate import evaluate  # noqa: E402
from lowrank_tools.extract import extract  # noqa: E402
from lowrank_tools.io.models import find_denoiser, load_denoiser  # noqa: E402
from lowrank_tools.linalg import RankRule  # noqa: E402

PLANTED = (1.0, 0.5, 0.25, 0.125)


def tiny_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, norm_num_groups=4, attention_head_dim=4)


def tiny_flux():
    torch.manual_seed(0)
    return diffusers.FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                            pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(2, 2, 4))


def tiny_sd3():
    torch.manual_seed(0)
    return diffusers.SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1,
                                           attention_head_dim=8, num_attention_heads=2, caption_projection_dim=16, joint_attention_dim=16,
                                           pooled_projection_dim=16, out_channels=4, pos_embed_max_size=16)


@torch.no_grad()
def plant(model, seed: int = 1):
    """Every weight of 2 or more dimensions gets a rank-4 delta with singular values PLANTED x 0.3 ||W||."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.ndim < 2:
            continue
        out, inp = p.shape[0], p[0].numel()
        k = min(len(PLANTED), out, inp)
        u = torch.linalg.qr(torch.randn(out, k, generator=g, dtype=torch.float64)).Q
        v = torch.linalg.qr(torch.randn(inp, k, generator=g, dtype=torch.float64)).Q
        s = torch.tensor(PLANTED[:k], dtype=torch.float64) * 0.3 * float(p.norm())
        p.add_(((u * s) @ v.T).reshape(p.shape).to(p.dtype))
    return model


def _pair(root, make, component):
    base = make()
    base.save_pretrained(root / "base")
    plant(base).save_pretrained(root / "tuned")
    adapters = {r: extract(root / "base", root / "tuned", rule=RankRule(rank=r)).adapter for r in (1, 2, 4)}
    return {"root": root, "base": root / "base", "tuned": root / "tuned", "adapters": adapters,
            "component": component}


@pytest.fixture(scope="module")
def unet(tmp_path_factory):
    return _pair(tmp_path_factory.mktemp("eval_unet"), tiny_unet, "unet")


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    return _pair(tmp_path_factory.mktemp("eval_flux"), tiny_flux, "transformer")


def _curve(pair, **options):
    a = pair["adapters"]
    return evaluate(pair["base"], pair["tuned"], [("r4", a[4]), ("r2", a[2]), ("r1", a[1]), ("empty", Adapter())],
                    device="cpu", **{"samples": 3, "batch_size": 2, **options})


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    return _pair(tmp_path_factory.mktemp("eval_sd3"), tiny_sd3, "transformer")


@pytest.mark.parametrize("name", ["unet", "flux", "sd3"])
def test_full_rank_recovers_one_empty_zero_truncations_between_and_monotone(name, request):
    pair = request.getfixturevalue(name)
    ev = _curve(pair)
    r4, r2, r1, empty = ev.adapters
    assert ev.kind.value == "diffusion" and ev.samples == 3 and ev.base.noise_error > 1e-3
    assert r4.recovered == pytest.approx(1.0, abs=1e-6) and r4.noise_error < 1e-8
    assert empty.recovered == 0.0 and empty.noise_error == ev.base.noise_error and empty.params == 0
    assert 0.0 < r1.recovered < r2.recovered < r4.recovered
    assert r1.params < r2.params < r4.params
    assert ev.tokens == 3 * {"unet": 4 * 8 * 8, "flux": 32 * 32 * 4, "sd3": 4 * 8 * 8}[name]  # predicted values


def test_draws_do_not_depend_on_the_batch_size_and_follow_the_seed(unet):
    one, three = _curve(unet, batch_size=1), _curve(unet, batch_size=3)
    for a, b in zip([one.base, *one.adapters], [three.base, *three.adapters]):
        assert a.noise_error == pytest.approx(b.noise_error, rel=1e-4, abs=1e-12)
    other = _curve(unet, seed=5)
    assert other.base.noise_error != pytest.approx(one.base.noise_error, rel=1e-6)
    assert _curve(unet, seed=5).base.noise_error == other.base.noise_error


def _pipeline(folder, model_dir, component):
    """A pipeline folder holding the model as its ``component``, and a text encoder's weights beside it."""
    import shutil

    (folder / component).parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(model_dir, folder / component)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                         component: ["diffusers", "X"]}))
    return folder


def test_pipeline_folders_and_prefixed_adapters_give_the_component_numbers(unet, tmp_path):
    base = _pipeline(tmp_path / "base", unet["base"], "unet")
    tuned = _pipeline(tmp_path / "tuned", unet["tuned"], "unet")
    assert find_denoiser(base).folder == base / "unet"
    prefixed = extract(base, tuned, rule=RankRule(rank=2)).adapter
    assert all(name.startswith("unet.") for name in prefixed.modules)
    stray = Adapter(modules={**prefixed.modules, "text_encoder.layer.q": next(iter(prefixed.modules.values()))})
    warnings = []
    ev = evaluate(base, tuned, [("r2", stray)], samples=3, batch_size=2, device="cpu", warn=warnings.append)
    plain = _curve(unet)
    assert ev.adapters[0].recovered == pytest.approx(plain.adapters[1].recovered, rel=1e-5)
    assert any("text_encoder.layer.q" in w and "outside" in w for w in warnings)


def test_mismatched_or_unsupported_models_are_one_line(unet, flux, tmp_path):
    with pytest.raises(InvalidOption, match="FluxTransformer2DModel.*give the base"):
        evaluate(unet["base"], flux["tuned"], [], device="cpu")
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text('{"_class_name": "AutoencoderKL"}')
    with pytest.raises(UsageError, match="AutoencoderKL: evaluate measures the denoisers UNet2DConditionModel"):
        evaluate(tmp_path / "vae", tmp_path / "vae", [], device="cpu")
    (tmp_path / "llm").mkdir()
    (tmp_path / "llm" / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    with pytest.raises(UsageError, match="needs texts: give --data"):
        evaluate(tmp_path / "llm", tmp_path / "llm", [], device="cpu")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dtype_loads_half_weights_and_still_measures(unet, dtype):
    model = load_denoiser(find_denoiser(unet["base"]), torch.device("cpu"), dtype)
    assert {p.dtype for p in model.parameters()} == {dtype}
    ev = _curve(unet, dtype=dtype)
    r4, r2, r1, empty = ev.adapters
    assert empty.recovered == 0.0
    assert r4.recovered == pytest.approx(1.0, abs=1e-2) and r1.recovered < r2.recovered < r4.recovered


def test_cli_rank_curve_without_data(unet, tmp_path):
    out = tmp_path / "curve.json"
    result = CliRunner().invoke(main, ["evaluate", str(unet["base"]), str(unet["tuned"]), "--ranks", "1,2,4",
                                       "--max-samples", "2", "--device", "cpu", "--json", str(out), "--plot",
                                       str(tmp_path / "figs")])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["kind"] == "diffusion" and data["samples"] == 2 and data["base_noise_error"] > 0
    recovered = [row["recovered"] for row in data["adapters"]]
    assert [row["size"] for row in data["adapters"]] == [{"rank": 1}, {"rank": 2}, {"rank": 4}]
    assert recovered[0] < recovered[1] < recovered[2] == pytest.approx(1.0, abs=1e-6)
    assert data["reached"]["rank"]["0.99"] == "rank 4"
    assert "seeded draws" in result.output and (tmp_path / "figs" / "recovered_vs_params.png").is_file()


def test_cli_text_model_without_data_is_a_usage_error(tmp_path):
    (tmp_path / "llm").mkdir()
    (tmp_path / "llm" / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    result = CliRunner().invoke(main, ["evaluate", str(tmp_path / "llm"), str(tmp_path / "llm"), "--ranks", "2"])
    assert result.exit_code == 2 and "give --data TEXTS" in result.output
    assert len([line for line in result.output.splitlines() if line.startswith("Error")]) == 1


def test_cli_data_given_for_a_denoiser_is_named_unused(unet, tmp_path):
    (tmp_path / "texts.txt").write_text("a b c\n")
    result = CliRunner().invoke(main, ["evaluate", str(unet["base"]), str(unet["tuned"]), "--ranks", "4", "--data",
                                       str(tmp_path / "texts.txt"), "--max-samples", "1", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "texts.txt is not used" in result.output and "1 seeded draws" in result.output


def test_sdxl_conditioning_fits_the_model(tmp_path):
    """SDXL's added_cond_kwargs (text_embeds, time_ids) are shaped from the config: the model runs on them."""
    from lowrank_tools.evaluate.diffusion import denoiser_batches, predict

    torch.manual_seed(0)
    model = diffusers.UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, norm_num_groups=4, attention_head_dim=4, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=4, projection_class_embeddings_input_dim=4 * 6 + 12)
    model.save_pretrained(tmp_path / "sdxl")
    denoiser = find_denoiser(tmp_path / "sdxl")
    batch = next(denoiser_batches(denoiser, 3, 3, 0, torch.device("cpu"), torch.float32))
    assert batch["added_cond_kwargs"]["text_embeds"].shape == (3, 12)
    assert batch["added_cond_kwargs"]["time_ids"].tolist() == [[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * 3
    with torch.no_grad():
        assert predict(model.eval(), batch).shape == (3, 4, 8, 8)


def test_cli_dora_curve_on_a_denoiser(unet, tmp_path):
    out = tmp_path / "dora.json"
    result = CliRunner().invoke(main, ["evaluate", str(unet["base"]), str(unet["tuned"]), "--ranks", "2,4", "--dora",
                                       "--max-samples", "2", "--device", "cpu", "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert [row["rank"] for row in data["dora_vs_lora"]] == [2, 4]
    full_dora = next(row for row in data["adapters"] if row["size"] == {"dora_rank": 4})
    assert full_dora["recovered"] == pytest.approx(1.0, abs=1e-5)  # exact delta, m = ||W'||_row: W' itself
