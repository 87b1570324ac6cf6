"""ComfyUI-saved single files (SD 1.5, SDXL, the SDXL refiner, Flux), built from the key list in
tests/fixtures/comfyui_checkpoint_keys.txt: extract writes kohya keys ComfyUI's LoRA key map loads, each onto a
weight of the right shape, nothing of the VAE; apply writes the file's own layout back with the tuned values.

ComfyUI cannot be installed here: :func:`comfy_state_dict` and :func:`comfy_lora_key_map` transcribe what its
source does (comfy/supported_models.py ``process_clip_state_dict``, comfy/utils.py
``clip_text_transformers_convert``, comfy/lora.py ``model_lora_keys_unet`` / ``model_lora_keys_clip``)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from lowrank_tools.cli import main

FIXTURE = Path(__file__).parent / "fixtures" / "comfyui_checkpoint_keys.txt"
DTYPES = {"F32": torch.float32, "I64": torch.int64}
MODELS = ("sd15", "sdxl", "sdxl_refiner", "flux")
LORA_CLIP_MAP = {"mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2", "self_attn.k_proj": "self_attn_k_proj",
                 "self_attn.q_proj": "self_attn_q_proj", "self_attn.v_proj": "self_attn_v_proj",
                 "self_attn.out_proj": "self_attn_out_proj"}


def fixture(model: str) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    out = {}
    for line in FIXTURE.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, key, dtype, shape = line.split(" ")
        if name == model:
            out[key] = (DTYPES[dtype], tuple(int(d) for d in shape.split(",") if d))
    return out


def pair(model: str) -> tuple[dict, dict]:
    """Base (random) and tuned: every float tensor of 2+ dims, the VAE's included, changed by a rank-2 delta."""
    g = torch.Generator().manual_seed(0)
    base, tuned = {}, {}
    for key, (dtype, shape) in fixture(model).items():
        if dtype == torch.int64:
            base[key] = torch.arange(shape[-1]).expand(shape).contiguous()  # position_ids, as ComfyUI writes them
            tuned[key] = base[key].clone()
            continue
        base[key] = torch.randn(shape, generator=g) * 0.1
        d = torch.zeros(shape)
        if len(shape) >= 2:
            flat = (torch.randn(shape[0], 2, generator=g) @ torch.randn(2, int(torch.tensor(shape[1:]).prod()),
                                                                      generator=g)) * 0.05
            d = flat.reshape(shape)
        tuned[key] = base[key] + d
    return base, tuned


_LAYER = r"transformer.text_model.encoder.layers.\1."
_OPENCLIP = [(r"transformer\.resblocks\.(\d+)\.attn\.out_proj\.", _LAYER + "self_attn.out_proj."),
             (r"transformer\.resblocks\.(\d+)\.mlp\.c_fc\.", _LAYER + "mlp.fc1."),
             (r"transformer\.resblocks\.(\d+)\.mlp\.c_proj\.", _LAYER + "mlp.fc2."),
             (r"transformer\.resblocks\.(\d+)\.ln_(\d)\.", _LAYER + r"layer_norm\2.")]
_GS = {("sdxl", "conditioner.embedders.1.model."), ("sdxl_refiner", "conditioner.embedders.0.model.")}  # OpenCLIP


def comfy_state_dict(model: str, sd: dict) -> dict[str, tuple[int, ...]]:
    """The model state dict ComfyUI loads the checkpoint into: {name: shape} (the weights the LoRA keys target)."""
    out = {}
    for key, t in sd.items():
        if key.startswith("model.diffusion_model."):
            out[key[len("model."):]] = t.shape
            continue
        new = None
        if model == "sd15" and key.startswith("cond_stage_model."):
            new = "clip_l." + key[len("cond_stage_model."):]
        elif model == "sdxl" and key.startswith("conditioner.embedders.0.transformer.text_model"):
            new = "clip_l.transformer.text_model" + key[len("conditioner.embedders.0.transformer.text_model"):]
        elif (model, key[:len("conditioner.embedders.0.model.")]) in _GS:
            new = "clip_g." + key[len("conditioner.embedders.0.model."):]  # then clip_text_transformers_convert
            match = re.match(r"clip_g\.transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$", new)
            if match:
                d = t.shape[0] // 3
                for p in "qkv":
                    out[f"clip_g.transformer.text_model.encoder.layers.{match[1]}.self_attn.{p}_proj.{match[2]}"] = \
                        (d, *t.shape[1:])
                continue
            for pattern, repl in _OPENCLIP:
                new = re.sub(pattern, repl, new)
            if new == "clip_g.text_projection":
                new, t = "clip_g.transformer.text_projection.weight", t.T
        elif model == "flux" and key.startswith("text_encoders."):
            new = key[len("text_encoders."):]
        if new is not None:
            out[new] = t.shape
    return out


def comfy_lora_key_map(sdk) -> dict[str, str]:
    """comfy/lora.py: kohya key -> the model weight it patches (the kohya branches of model_lora_keys_clip / _unet)."""
    key_map, clip_l, clip_g = {}, False, False
    for b in range(32):
        for c, short in LORA_CLIP_MAP.items():
            k = f"clip_l.transformer.text_model.encoder.layers.{b}.{c}.weight"
            if k in sdk:
                key_map[f"lora_te_text_model_encoder_layers_{b}_{short}"] = k
                key_map[f"lora_te1_text_model_encoder_layers_{b}_{short}"] = k
                clip_l = True
            k = f"clip_g.transformer.text_model.encoder.layers.{b}.{c}.weight"
            if k in sdk:
                clip_g = True
                prefix = "lora_te2_" if clip_l else "lora_te_"  # the refiner: clip_g alone
                key_map[f"{prefix}text_model_encoder_layers_{b}_{short}"] = k
    for k in sdk:
        if k.endswith(".weight") and k.startswith("t5xxl.transformer."):
            body = k[len("t5xxl.transformer."):-len(".weight")].replace(".", "_")
            index = 1 + clip_g + clip_l
            if clip_l and index == 2:
                key_map[f"lora_te2_{body}"] = k
                index += 1
            key_map[f"lora_te{index}_{body}"] = k
        if k.startswith("diffusion_model.") and k.endswith(".weight"):
            key_map["lora_unet_" + k[len("diffusion_model."):-len(".weight")].replace(".", "_")] = k
    if "clip_g.transformer.text_projection.weight" in sdk:
        key_map["lora_te2_text_projection"] = "clip_g.transformer.text_projection.weight"
    if "clip_l.transformer.text_projection.weight" in sdk:
        key_map["lora_te1_text_projection"] = "clip_l.transformer.text_projection.weight"
    return key_map


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize("model", MODELS)
def test_extract_writes_the_keys_comfyui_loads_and_apply_writes_the_files_layout(tmp_path, model):
    base, tuned = pair(model)
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(tuned, str(tmp_path / "tuned.safetensors"))
    lora = tmp_path / "lora.safetensors"
    r = run("extract", tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", "-o", lora, "-r", "2", "-q")
    assert r.exit_code == 0, r.output
    factors = load_file(str(lora))
    modules = {k.split(".")[0] for k in factors}
    sdk = comfy_state_dict(model, base)
    key_map = comfy_lora_key_map(sdk)
    lost = sorted(modules - set(key_map))
    assert not lost, f"ComfyUI would not load: {lost[:5]}"  # "lora key not loaded"
    for module in modules:  # each patch fits the weight it patches
        down, up = factors[f"{module}.lora_down.weight"], factors[f"{module}.lora_up.weight"]
        target = sdk[key_map[module]]
        assert up.shape[0] == target[0] and down.flatten(1).shape[1] == torch.Size(target[1:]).numel(), module
    assert not any(k.startswith(("lora_unet_vae", "lora_unet_first_stage", "lora_unet_text_encoders",
                                 "lora_unet_conditioner", "lora_unet_cond_stage")) for k in modules)
    # every attention / MLP layer of the text towers and every UNet / transformer linear or conv was extracted
    wanted = {k for k, w in key_map.items() if len(sdk[w]) >= 2 and "embed" not in w and "shared" not in w
              and "relative_attention_bias" not in w and "text_projection" not in w}
    targets = {key_map[m] for m in modules}
    assert {key_map[k] for k in wanted} <= targets
    applied = tmp_path / "applied.safetensors"
    r = run("apply", tmp_path / "base.safetensors", lora, "-o", applied, "-q")
    assert r.exit_code == 0, r.output
    got = load_file(str(applied))
    assert got.keys() == base.keys()  # the file's own layout: in_proj fused, VAE and position_ids kept
    for key, t in got.items():
        if key.startswith(("first_stage_model.", "vae.")) or t.dtype == torch.int64 or t.ndim < 2:
            assert torch.equal(t, base[key]), key  # never adapted: the very values
        elif not torch.equal(t, base[key]):
            assert torch.allclose(t, tuned[key], atol=1e-5), key


def test_fixture_holds_each_models_marker_keys():
    """The keys ComfyUI's and diffusers' detection look for are in the list (a list that lost them tests nothing)."""
    assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in fixture("sdxl")
    assert "conditioner.embedders.0.model.text_projection" in fixture("sdxl_refiner")  # diffusers' refiner marker
    assert not any(k.startswith("conditioner.embedders.0.transformer.") for k in fixture("sdxl_refiner"))
    assert "model.diffusion_model.double_blocks.0.img_attn.qkv.weight" in fixture("flux")
    assert {k.split(".")[0] for k in fixture("flux")} == {"model", "text_encoders", "vae"}


def test_refiner_tower_is_named_by_what_its_names_say():
    """SDXL refiner: conditioner.embedders.0 is OpenCLIP bigG (``.model.``), not CLIP-L: lora_te_ (ComfyUI's key for
    a clip_g without clip_l); the base's embedders.0.transformer stays CLIP-L (lora_te1_)."""
    from lowrank_tools.io.kohya_names import kohya_key, match_keys
    from lowrank_tools.io.ldm_names import is_vae, ldm_split

    tower = "conditioner.embedders.0.model.transformer.resblocks.5."
    assert ldm_split(tower + "mlp.c_fc") == ("text_encoder.", "lora_te_", "text_model.encoder.layers.5.mlp.fc1")
    assert kohya_key(tower + "attn.q_proj") == "lora_te_text_model_encoder_layers_5_self_attn_q_proj"
    assert kohya_key("conditioner.embedders.0.transformer.text_model.encoder.layers.5.mlp.fc1") == \
        "lora_te1_text_model_encoder_layers_5_mlp_fc1"
    assert kohya_key("text_encoders.t5xxl.transformer.encoder.block.1.layer.1.DenseReluDense.wi_0") == \
        "lora_te3_encoder_block_1_layer_1_DenseReluDense_wi_0"
    names = [tower + "mlp.c_fc", "model.diffusion_model.input_blocks.4.1.proj_in"]
    keys = ["lora_te_text_model_encoder_layers_5_mlp_fc1", "lora_unet_input_blocks_4_1_proj_in"]
    assert match_keys(keys, names, where="x", base="b") == dict(zip(keys, names))
    assert is_vae("vae.decoder.conv_in.weight") and is_vae("first_stage_model.encoder.conv_in.weight")
    assert not is_vae("model.diffusion_model.vae_like.weight")
