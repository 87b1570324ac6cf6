"""Real consumers of transformer diffusion models' adapters: tiny diffusers Flux, SD3 and Wan transformers built from
small configs, fine-tuned by a planted rank-2 change, extracted to kohya (BFL / SAI / Wan names, fused where the
original model is fused), and loaded by diffusers' own converters and loaders: fused weights = W0 + the delta.

diffusers hard-codes Flux's ``linear1`` split as [3072, 3072, 3072, 12288] (FORMAT-FACTS), so a tiny Flux's
``linear1`` is checked by our own algebra against the planted delta and through our split (BFL -> diffusers names);
and its kohya-Flux converter names the modules outside the blocks without ``transformer.``, which
``load_lora_adapter(prefix="transformer")`` then drops silently: the test adds the prefix to load them."""

from __future__ import annotations

import warnings

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

from lowrank_tools.cli import main  # noqa: E402
from lowrank_tools.io.kohya import NAMES_KEY  # noqa: E402

pytestmark = pytest.mark.slow

FLUX = dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=16, pooled_projection_dim=8, guidance_embeds=False, axes_dims_rope=(2, 2, 4))
SD3 = dict(sample_size=8, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
           caption_projection_dim=16, joint_attention_dim=16, pooled_projection_dim=8, out_channels=4,
           pos_embed_max_size=16, dual_attention_layers=(0,))
WAN = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, text_dim=16,
           freq_dim=16, ffn_dim=32, num_layers=1, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
           rope_max_seq_len=32)
MODELS = {"flux": ("FluxTransformer2DModel", FLUX), "sd3": ("SD3Transformer2DModel", SD3),
          "wan": ("WanTransformer3DModel", WAN)}


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def build(kind: str):
    cls, config = MODELS[kind]
    torch.manual_seed(0)
    return getattr(diffusers, cls)(**config)


def matrices(model) -> dict[str, torch.Tensor]:
    return {k[:-len(".weight")].replace(".base_layer", ""): v.clone() for k, v in model.state_dict().items()
            if k.endswith(".weight") and v.ndim >= 2 and ".lora_" not in k}


def make_pair(kind: str, tmp):
    """(kind, folder, base weights, planted deltas): a transformer folder pair whose difference is rank 2."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build(kind)
        model.save_pretrained(tmp / "base")
        base = matrices(model)
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.ndim >= 2 and name[:-len(".weight")] in base:
                    m = p.view(p.shape[0], -1)
                    m += 0.1 * torch.randn(m.shape[0], 2, generator=g) @ torch.randn(2, m.shape[1], generator=g)
        model.save_pretrained(tmp / "tuned")
    deltas = {n: w - base[n] for n, w in matrices(model).items()}
    return kind, tmp, base, deltas


@pytest.fixture(scope="module", params=list(MODELS))
def pair(request, tmp_path_factory):
    return make_pair(request.param, tmp_path_factory.mktemp(request.param))


def diffusers_file(folder):
    """(state dict, LoRA metadata) of the diffusers file we wrote in ``folder``, read by diffusers itself."""
    return diffusers.FluxPipeline.lora_state_dict(str(folder), return_lora_metadata=True)


def load_and_fuse(kind: str, state_dict: dict, metadata=None) -> dict[str, torch.Tensor]:
    """diffusers loads ``state_dict`` (``transformer.*`` lora_A/B keys) into a fresh base model and fuses it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build(kind)
        model.load_lora_adapter(state_dict, prefix="transformer", adapter_name="x", metadata=metadata)
        model.fuse_lora(adapter_names=["x"])
    return matrices(model)


def assert_fused(fused, base, deltas, names):
    assert names
    for name in names:
        torch.testing.assert_close(fused[name], base[name] + deltas[name].reshape(base[name].shape), rtol=1e-4,
                                   atol=1e-4, msg=name)


def products(path) -> dict[str, torch.Tensor]:
    """{kohya key: (alpha / r) up @ down} of a file, flattened to matrices."""
    sd = load_file(str(path))
    out = {}
    for key in (k[:-len(".lora_down.weight")] for k in sd if k.endswith(".lora_down.weight")):
        down, up = sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"]
        r = down.shape[0]
        out[key] = float(sd[f"{key}.alpha"]) / r * up.reshape(up.shape[0], r) @ down.reshape(r, -1)
    return out


def test_extract_to_kohya_writes_original_names_and_diffusers_loads_it(pair, tmp_path):
    kind, tmp, base, deltas = pair
    out = tmp_path / "k.safetensors"
    include = ("--include", r"^blocks\.") if kind == "wan" else ()  # musubi's Wan converter reads blocks only
    # rank 8: a fused module is factored as one matrix (tests/test_fused_extract.py), and the stacked planted deltas
    # of q, k, v (linear1: q, k, v, mlp) are rank 6 (8): kept whole
    assert run("extract", tmp / "base", tmp / "tuned", "-o", out, "--rank", 8, "-q", *include).exit_code == 0
    keys = set(products(out))
    expected = {"flux": {"lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_0_linear1",
                         "lora_unet_final_layer_adaLN_modulation_1", "lora_unet_img_in"},
                "sd3": {"lora_unet_joint_blocks_0_x_block_attn2_qkv", "lora_unet_joint_blocks_1_context_block_attn_qkv",
                        "lora_unet_joint_blocks_1_context_block_adaLN_modulation_1", "lora_unet_t_embedder_mlp_0"},
                "wan": {"lora_unet_blocks_0_self_attn_q", "lora_unet_blocks_0_cross_attn_o", "lora_unet_blocks_0_ffn_0"}}
    assert expected[kind] <= keys and not any("transformer_blocks" in k or "attn1" in k for k in keys)
    if kind == "sd3":  # diffusers has no kohya-SD3 converter: its loader judges our diffusers output instead
        folder = tmp_path / "peft"
        assert run("convert", out, "-o", folder, "--format", "peft", "-q").exit_code == 0
        state, metadata = diffusers_file(folder)
    else:
        metadata = None
        sd = {k: v for k, v in load_file(str(out)).items() if "linear1" not in k}  # diffusers' hard-coded Flux widths
        pipeline = diffusers.FluxPipeline if kind == "flux" else diffusers.WanPipeline
        state = {(k if k.startswith("transformer.") else f"transformer.{k}"): v
                 for k, v in pipeline.lora_state_dict(sd).items()}  # raises 'Incompatible keys' for a wrong name
    fused = load_and_fuse(kind, state, metadata)
    names = [n for n in deltas if not n.startswith("single_transformer_blocks") or n.endswith(("proj_out", "norm.linear"))]
    assert_fused(fused, base, deltas, [n for n in names if kind != "wan" or n.startswith("blocks.")])
    if kind == "flux":  # linear1 by our own algebra: the stacked deltas of q, k, v and the MLP
        parts = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
        stacked = torch.cat([deltas[f"single_transformer_blocks.0.{p}"] for p in parts])
        torch.testing.assert_close(products(out)["lora_unet_single_blocks_0_linear1"], stacked, rtol=1e-4, atol=1e-4)


def test_a_hand_made_bfl_flux_file_converts_to_diffusers_names_exactly(tmp_path):
    """One down shared by q, k, v (sd-scripts' layout), linear1 at the tiny model's widths, the final modulation's
    (shift, scale) halves: converted to diffusers names, diffusers loads and fuses exactly the planted delta."""
    g = torch.Generator().manual_seed(5)
    d, r = 16, 3
    shapes = {"double_blocks_0_img_attn_qkv": (3 * d, d), "double_blocks_0_txt_attn_qkv": (3 * d, d),
              "double_blocks_0_img_mlp_0": (4 * d, d), "double_blocks_0_txt_mod_lin": (6 * d, d),
              "single_blocks_0_linear1": (7 * d, d), "single_blocks_0_linear2": (d, 5 * d),
              "final_layer_adaLN_modulation_1": (2 * d, d), "final_layer_linear": (4, d), "img_in": (d, 4)}
    tensors = {}
    for key, (out, inp) in shapes.items():
        tensors[f"lora_unet_{key}.lora_down.weight"] = torch.randn(r, inp, generator=g)
        tensors[f"lora_unet_{key}.lora_up.weight"] = torch.randn(out, r, generator=g)
        tensors[f"lora_unet_{key}.alpha"] = torch.tensor(1.5)
    save_file(tensors, str(tmp_path / "bfl.safetensors"))
    assert run("convert", tmp_path / "bfl.safetensors", "-o", tmp_path / "out", "--format", "peft", "-q").exit_code == 0
    state, metadata = diffusers_file(tmp_path / "out")
    assert "transformer.single_transformer_blocks.0.proj_mlp.lora_A.weight" in state
    fused = load_and_fuse("flux", state, metadata)
    base = matrices(build("flux"))
    bfl = products(tmp_path / "bfl.safetensors")
    swap = bfl["lora_unet_final_layer_adaLN_modulation_1"]
    expect = {"x_embedder": bfl["lora_unet_img_in"], "proj_out": bfl["lora_unet_final_layer_linear"],
              "norm_out.linear": torch.cat([swap[d:], swap[:d]]),
              "transformer_blocks.0.norm1_context.linear": bfl["lora_unet_double_blocks_0_txt_mod_lin"],
              "transformer_blocks.0.ff.net.0.proj": bfl["lora_unet_double_blocks_0_img_mlp_0"],
              "single_transformer_blocks.0.proj_out": bfl["lora_unet_single_blocks_0_linear2"]}
    for fused_key, names in (("double_blocks_0_img_attn_qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),
                             ("double_blocks_0_txt_attn_qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"))):
        expect.update({f"transformer_blocks.0.{n}": p for n, p in zip(names, bfl[f"lora_unet_{fused_key}"].split(d))})
    linear1 = bfl["lora_unet_single_blocks_0_linear1"].split([d, d, d, 4 * d])
    expect.update({f"single_transformer_blocks.0.{n}": p
                   for n, p in zip(("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), linear1)})
    for name, delta in expect.items():
        torch.testing.assert_close(fused[name], base[name] + delta, rtol=1e-4, atol=1e-4, msg=name)
    assert state["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"].shape[0] == r  # rank r each, not 3r
    result = run("check", tmp_path / "out", "--for", "diffusers")
    assert result.exit_code == 0, result.output


def test_check_passes_our_flux_file_and_names_a_misspelled_key(tmp_path):
    _, tmp, _, _ = make_pair("flux", tmp_path)
    out = tmp_path / "k.safetensors"
    assert run("extract", tmp / "base", tmp / "tuned", "-o", out, "--rank", 2, "-q").exit_code == 0
    assert run("check", out, "--for", "comfyui").exit_code == 0
    sd = load_file(str(out))
    bad = {k.replace("img_attn_proj", "img_atn_proj"): v for k, v in sd.items()}
    save_file(bad, str(tmp_path / "bad.safetensors"))
    result = run("check", tmp_path / "bad.safetensors", "--for", "comfyui")
    assert result.exit_code == 1 and "lora_unet_double_blocks_0_img_atn_proj" in result.output
    assert "did you mean lora_unet_double_blocks_0_img_attn_proj" in result.output
    result = run("check", out, "--for", "diffusers")  # diffusers' own converter: full-size Flux widths only
    assert result.exit_code == 1 and "full-size Flux widths" in result.output
