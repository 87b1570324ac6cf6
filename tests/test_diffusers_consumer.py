"""A real consumer: diffusers' pipelines load the kohya and diffusers files extract writes from a diffusers pipeline
folder (tiny UNet + CLIP text encoders built from configs), and after fuse_lora() every adapted weight is
W0 + (alpha / r) up @ down, conv kernels and embeddings included."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import save_file

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

from lowrank_tools.cli import main  # noqa: E402
from lowrank_tools.io.formats import load_adapter  # noqa: E402
from lowrank_tools.io.kohya import NAMES_KEY  # noqa: E402


def tiny_unet(*, sdxl: bool):
    torch.manual_seed(0)
    extra = dict(use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=4,
                 projection_class_embeddings_input_dim=4 * 6 + 16, transformer_layers_per_block=(1, 2)) if sdxl else {}
    return diffusers.UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32 if sdxl else 16, norm_num_groups=2, attention_head_dim=2, **extra)


def tiny_text_encoder(*, projection: bool = False):
    torch.manual_seed(1)
    config = transformers.CLIPTextConfig(hidden_size=16, intermediate_size=24, num_attention_heads=2, num_hidden_layers=1,
                                         vocab_size=60, max_position_embeddings=16, projection_dim=16, bos_token_id=0,
                                         eos_token_id=1, pad_token_id=1)
    return (transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel)(config)


def tiny_tokenizer(folder):
    """A CLIPTokenizer from a vocabulary written here: nothing is downloaded."""
    folder.mkdir(exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab.update({c: len(vocab), f"{c}</w>": len(vocab) + 1})
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return transformers.CLIPTokenizer(vocab_file=str(folder / "vocab.json"), merges_file=str(folder / "merges.txt"))


def tiny_pipeline(tmp, *, sdxl: bool):
    vae = diffusers.AutoencoderKL(block_out_channels=(4,), in_channels=3, out_channels=3, latent_channels=4,
                                  down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                                  norm_num_groups=2, layers_per_block=1)
    scheduler = diffusers.DDIMScheduler(steps_offset=1, clip_sample=False)
    tokenizer = tiny_tokenizer(tmp / "tok")
    if sdxl:
        return diffusers.StableDiffusionXLPipeline(vae=vae, text_encoder=tiny_text_encoder(), tokenizer=tokenizer,
                                                   text_encoder_2=tiny_text_encoder(projection=True),
                                                   tokenizer_2=tokenizer, unet=tiny_unet(sdxl=True),
                                                   scheduler=scheduler)
    return diffusers.StableDiffusionPipeline(vae=vae, text_encoder=tiny_text_encoder(), tokenizer=tokenizer,
                                             unet=tiny_unet(sdxl=False), scheduler=scheduler, safety_checker=None,
                                             feature_extractor=None, requires_safety_checker=False)


COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


def fine_tune(pipe, seed: int = 7) -> None:
    """A rank-2 change of every weight of ndim >= 2 of the UNet and text encoders (a known, exact answer)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for comp in COMPONENTS:
            for p in getattr(pipe, comp).parameters() if hasattr(pipe, comp) else ():
                if p.ndim >= 2:
                    m = p.view(p.shape[0], -1)
                    m += 0.1 * torch.randn(m.shape[0], 2, generator=g) @ torch.randn(2, m.shape[1], generator=g)


def weights(pipe) -> dict[str, torch.Tensor]:
    """Every weight by ``component.module.weight``, LoRA wrappers (base_layer) seen through."""
    out = {}
    for comp in COMPONENTS:
        if getattr(pipe, comp, None) is not None:
            for k, v in getattr(pipe, comp).state_dict().items():
                if ".lora_" not in k:
                    out[f"{comp}.{k.replace('.base_layer.', '.')}"] = v.clone()
    return out


@pytest.fixture(scope="module", params=[False, True], ids=["sd", "sdxl"])
def pipelines(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sdxl" if request.param else "sd")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = tiny_pipeline(tmp, sdxl=request.param)
        pipe.save_pretrained(tmp / "base")
        before = weights(pipe)
        fine_tune(pipe)
        pipe.save_pretrained(tmp / "tuned")
    return tmp, request.param, before, weights(pipe)


def load_and_fuse(folder, adapter, sdxl: bool):
    cls = diffusers.StableDiffusionXLPipeline if sdxl else diffusers.StableDiffusionPipeline
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = cls.from_pretrained(folder, **({} if sdxl else {"safety_checker": None}))
        w0 = weights(pipe)
        pipe.load_lora_weights(str(adapter))
        pipe.fuse_lora(components=[c for c in COMPONENTS if getattr(pipe, c, None) is not None])
    return w0, weights(pipe)


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def kohya_products(path) -> dict[str, torch.Tensor]:
    """{module name: (alpha / r) up @ down in the weight's layout}, read from the file itself."""
    out = {}
    with safe_open(str(path), "pt") as f:
        names = json.loads(f.metadata()[NAMES_KEY])
        for key, name in names.items():
            down, up = f.get_tensor(f"{key}.lora_down.weight").float(), f.get_tensor(f"{key}.lora_up.weight").float()
            alpha, r = float(f.get_tensor(f"{key}.alpha")), down.shape[0]
            product = (alpha / r) * up.reshape(up.shape[0], r) @ down.reshape(r, -1)
            out[name] = product.reshape(up.shape[0], *down.shape[1:])
    return out


@pytest.mark.parametrize("options", [("--rank", 4), ("--rank", 3, "--conv-rank", 2, "--alpha", 8)])
def test_kohya_file_loads_and_fuses(pipelines, tmp_path, options):
    tmp, sdxl, w_base, w_tuned = pipelines
    out = tmp_path / "lora.safetensors"
    result = run("extract", tmp / "base", tmp / "tuned", "-o", out, "--format", "kohya", "-q", *options)
    assert result.exit_code == 0, result.output
    products = kohya_products(out)
    with safe_open(str(out), "pt") as f:
        prefixes = {k.split("_")[1] for k in f.keys()}
        keys = set(f.keys())
    assert prefixes == ({"unet", "te1", "te2"} if sdxl else {"unet", "te"})
    assert ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha" if sdxl
            else "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha") in keys  # A1111 naming
    assert any(n.startswith("unet.") and products[n].ndim == 4 and products[n].shape[-1] == 3 for n in products)
    if sdxl:
        assert "lora_unet_label_emb_0_0.lora_down.weight" in keys  # the spelling diffusers maps to add_embedding
    w0, fused = load_and_fuse(tmp / "base", out, sdxl)
    for name, product in products.items():
        assert torch.allclose(fused[f"{name}.weight"], w0[f"{name}.weight"] + product, atol=1e-5), name
        if options == ("--rank", 4):  # planted rank 2: the fused pipeline is the fine-tuned one
            assert torch.allclose(fused[f"{name}.weight"], w_tuned[f"{name}.weight"], atol=1e-4), name
    untouched = [n for n in fused if n[: -len(".weight")] not in products and n.endswith(".weight")]
    assert all(torch.equal(fused[n], w0[n]) for n in untouched)  # embeddings etc. left as they were


def test_diffusers_lora_file_loads_and_fuses_embeddings_included(pipelines, tmp_path):
    tmp, sdxl, _, w_tuned = pipelines
    out = tmp_path / "lora"
    assert run("extract", tmp / "base", tmp / "tuned", "-o", out, "--rank", 4, "--conv-rank", 3, "-q").exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == ["pytorch_lora_weights.safetensors"]
    adapter = load_adapter(out)
    assert adapter.source_format == "diffusers"
    assert adapter.modules["text_encoder.embeddings.token_embedding"].kind.value == "embedding"
    w0, fused = load_and_fuse(tmp / "base", out, sdxl)
    for name, m in adapter.modules.items():
        assert torch.allclose(fused[f"{name}.weight"], w0[f"{name}.weight"] + m.delta(), atol=1e-5), name
        assert torch.allclose(fused[f"{name}.weight"], w_tuned[f"{name}.weight"], atol=1e-4), name


def test_a1111_file_without_our_names(pipelines, tmp_path):
    """A kohya file with no record of module names: diffusers loads it; names are guessed, or matched to a base."""
    tmp, sdxl, _, _ = pipelines
    ours = tmp_path / "ours.safetensors"
    assert run("extract", tmp / "base", tmp / "tuned", "-o", ours, "--format", "kohya", "-r", 2, "-q").exit_code == 0
    with safe_open(str(ours), "pt") as f:
        plain = {k: f.get_tensor(k) for k in f.keys()}
    save_file(plain, str(tmp_path / "a1111.safetensors"), metadata={"ss_network_dim": "2"})
    recorded = load_adapter(ours)
    guessed = load_adapter(tmp_path / "a1111.safetensors")
    assert any("guesses" in n for n in guessed.notes)
    unet = {n for n in recorded.modules if n.startswith("unet.")}
    assert unet <= set(guessed.modules)  # the UNet's names come back from the known naming
    matched = load_adapter(tmp_path / "a1111.safetensors", base=tmp / "base")
    assert set(matched.modules) == set(recorded.modules)  # the base model resolves every name exactly
    for name, m in recorded.modules.items():
        assert torch.equal(matched.modules[name].delta(), m.delta())
    w0, fused = load_and_fuse(tmp / "base", tmp_path / "a1111.safetensors", sdxl)
    for name, m in recorded.modules.items():
        assert torch.allclose(fused[f"{name}.weight"], w0[f"{name}.weight"] + m.delta(), atol=1e-5), name
    # converted with guessed (A1111, text_model.) names to a diffusers file: still loads into either CLIP layout
    assert run("convert", tmp_path / "a1111.safetensors", "-o", tmp_path / "conv", "--format", "peft", "-q").exit_code == 0
    _, fused_again = load_and_fuse(tmp / "base", tmp_path / "conv", sdxl)
    for name in recorded.modules:
        assert torch.allclose(fused_again[f"{name}.weight"], fused[f"{name}.weight"], atol=1e-6), name
