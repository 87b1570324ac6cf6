"""HunyuanVideo: Tencent's names (``double_blocks.N.img_attn_qkv``, ``single_blocks.N.linear1``, the ``txt_in`` token
refiner) <-> diffusers' ``HunyuanVideoTransformer3DModel``, detected from a whole file, fused layers split and fused
exactly, and checked against diffusers' own converter (``_convert_hunyuan_video_lora_to_diffusers``) and a tiny
diffusers model (every diffusers name we write is one of its modules, with its shape)."""

from __future__ import annotations

import warnings

import pytest
import torch

from lowrank_tools.adapter import Adapter, LoraModule
from lowrank_tools.io.arch_convert import to_base_naming, to_diffusers, to_original
from lowrank_tools.io.architectures import Naming, architecture_named, detect_architecture

diffusers = pytest.importorskip("diffusers")

HY = architecture_named("hunyuan_video")
CONFIG = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
              num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, text_embed_dim=16,
              pooled_projection_dim=8, rope_axes_dim=(2, 2, 4))
FUSED = {"transformer_blocks.0.attn.to_", "transformer_blocks.0.attn.add_", "single_transformer_blocks.0.attn.to_",
         "single_transformer_blocks.0.proj_mlp", "refiner_blocks.0.attn.to_"}


@pytest.fixture(scope="module")
def shapes() -> dict[str, tuple[int, int]]:
    """The tiny diffusers model's linear layers: name -> (out, in)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = diffusers.HunyuanVideoTransformer3DModel(**CONFIG)
    return {n[:-len(".weight")]: tuple(p.shape) for n, p in model.named_parameters()
            if n.endswith(".weight") and p.ndim == 2}


def adapter_for(shapes: dict, seed: int = 0, rank: int = 2) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    return Adapter(modules={f"transformer.{n}": LoraModule(B=torch.randn(o, rank, generator=g),
                                                           A=torch.randn(rank, i, generator=g), alpha=float(rank))
                            for n, (o, i) in shapes.items()})


def products(adapter: Adapter) -> dict[str, torch.Tensor]:
    return {n: m.scale * m.B.double() @ m.A.double() for n, m in adapter.modules.items()}


def unfused(adapter: Adapter) -> Adapter:
    """The modules that are not parts of a fused original layer (diffusers' converter splits those its own way)."""
    return Adapter(modules={n: m for n, m in adapter.modules.items()
                            if not any(f in n for f in FUSED) and not n.endswith("to_v")})


def test_every_diffusers_module_has_a_tencent_name_and_back(shapes):
    split = adapter_for(shapes)
    assert detect_architecture(split.modules).architecture is HY
    original = to_original(split, HY)
    found = detect_architecture(original.modules)
    assert (found.architecture, found.naming) == (HY, Naming.ORIGINAL) and found.matched == len(original.modules)
    assert {"double_blocks.0.img_attn_qkv", "single_blocks.0.linear1", "txt_in.individual_token_refiner.blocks.0."
            "self_attn_qkv", "final_layer.adaLN_modulation.1", "txt_in.c_embedder.linear_1",
            "vector_in.in_layer", "guidance_in.mlp.2"} <= set(original.modules)
    qkv, lin1 = original.modules["double_blocks.0.img_attn_qkv"], original.modules["single_blocks.0.linear1"]
    assert qkv.B.shape == (48, 6) and lin1.B.shape == (112, 8)  # exact fuse: rank = sum of the parts'
    back = products(to_diffusers(original, HY))
    assert back.keys() == products(split).keys()
    for name, d in products(split).items():
        torch.testing.assert_close(back[name], d, rtol=0, atol=1e-9, msg=name)


def test_final_modulation_halves_swap(shapes):
    split = adapter_for({"norm_out.linear": shapes["norm_out.linear"]})
    d = products(split)["transformer.norm_out.linear"]
    got = products(to_original(split, HY))["final_layer.adaLN_modulation.1"]
    torch.testing.assert_close(got, torch.cat([d[16:], d[:16]]), rtol=0, atol=1e-9)


def test_tencent_names_match_diffusers_own_converter(shapes):
    """Our Tencent names read by diffusers' converter land on the same diffusers modules with the same products.
    Left out: the fused q/k/v and linear1 (diffusers hard-codes a 3072 hidden size for linear1, our split is checked
    above) and the final modulation (diffusers swaps lora_A's rank halves too, not only lora_B's rows)."""
    from diffusers.loaders.lora_conversion_utils import _convert_hunyuan_video_lora_to_diffusers

    split = unfused(adapter_for({n: s for n, s in shapes.items() if n != "norm_out.linear"}, seed=1))
    original = to_original(split, HY)
    state = {}
    for name, m in original.modules.items():
        state[f"diffusion_model.{name}.lora_A.weight"] = m.A
        state[f"diffusion_model.{name}.lora_B.weight"] = m.B * m.scale
    converted = _convert_hunyuan_video_lora_to_diffusers(state)
    theirs = {k[:-len(".lora_A.weight")]: converted[k[:-len("A.weight")] + "B.weight"].double() @ v.double()
              for k, v in converted.items() if k.endswith(".lora_A.weight")}
    ours = products(split)
    assert theirs.keys() == ours.keys()
    for name, d in ours.items():
        torch.testing.assert_close(theirs[name], d, rtol=0, atol=1e-9, msg=name)


def test_kohya_names_and_the_names_flux_shares(shapes):
    original = to_original(adapter_for(shapes), HY)
    kohya = [n.replace(".", "_") for n in original.modules]
    assert detect_architecture(kohya, sep="_").architecture is HY
    # kohya bodies both models name alike (BFL img_attn.qkv and Tencent img_attn_qkv are both ..._img_attn_qkv)
    shared = ["double_blocks_0_img_attn_qkv", "double_blocks_0_txt_attn_proj", "single_blocks_0_linear1"]
    assert detect_architecture(shared, sep="_").architecture.name == "flux"  # Flux's: the far more common file
    assert detect_architecture(shared, sep="_", base_names=list(shapes)).architecture is HY  # a HunyuanVideo base
    assert detect_architecture(["single_blocks.0.linear1"]).architecture.name == "flux"
    assert detect_architecture(["double_blocks.0.img_attn_qkv"]).architecture is HY  # Flux's is img_attn.qkv
    split = to_diffusers(Adapter(modules={n: original.modules[n] for n in ("double_blocks.0.img_attn_qkv",
                                                                            "single_blocks.0.linear1")}), HY)
    onto = to_base_naming(split, [f"diffusion_model.{n}" for n in original.modules])
    assert set(onto.modules) == {"diffusion_model.double_blocks.0.img_attn_qkv",
                                 "diffusion_model.single_blocks.0.linear1"}


def test_kohya_file_round_trip(shapes, tmp_path):
    """diffusers names -> a kohya file in Tencent names (musubi-tuner's ``lora_unet_double_blocks_0_img_attn_qkv``)
    -> read back by the file's own architecture -> split again: the same products."""
    from safetensors import safe_open

    from lowrank_tools.io.formats import load_adapter, save_adapter

    split = adapter_for(shapes, seed=2)
    save_adapter(split, tmp_path / "hy.safetensors", format="kohya")
    with safe_open(str(tmp_path / "hy.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight",
            "lora_unet_txt_in_individual_token_refiner_blocks_0_self_attn_qkv.lora_up.weight"} <= keys
    back = load_adapter(tmp_path / "hy.safetensors")
    assert detect_architecture(back.modules).architecture is HY
    got = products(to_diffusers(back, HY))
    for name, d in products(split).items():
        torch.testing.assert_close(got[name], d, rtol=0, atol=1e-4, msg=name)


def test_diffusers_converter_swaps_the_final_modulations_rank_halves():
    """Measured: diffusers' converter chunks and swaps lora_A of ``final_layer.adaLN_modulation.1`` as well as
    lora_B, so its product is not the swapped delta (rank >= 2). Our split swaps B's rows only (tested above).
    When this fails, diffusers fixed it: fold the module back into the converter comparison."""
    from diffusers.loaders.lora_conversion_utils import _convert_hunyuan_video_lora_to_diffusers

    g = torch.Generator().manual_seed(5)
    B, A = torch.randn(32, 2, generator=g), torch.randn(2, 16, generator=g)
    out = _convert_hunyuan_video_lora_to_diffusers({"final_layer.adaLN_modulation.1.lora_A.weight": A.clone(),
                                                    "final_layer.adaLN_modulation.1.lora_B.weight": B.clone()})
    d = B @ A
    theirs = out["transformer.norm_out.linear.lora_B.weight"] @ out["transformer.norm_out.linear.lora_A.weight"]
    assert not torch.allclose(theirs, torch.cat([d[16:], d[:16]]), atol=1e-3)
