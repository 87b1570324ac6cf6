"""``lora_te3_`` (T5) keys: Flux's T5 is diffusers' ``text_encoder_2``, SD3's ``text_encoder_3`` (sd-scripts'
networks/lora_flux.py and lora_sd3.py write lora_te3_ for both). Read by the architecture of the whole file (its
transformer keys), else by what it records of its base, else as SD3's with a note ``info`` shows; written lora_te3_
from either component."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import save_file

from lowrank_tools.adapter import Adapter, LoraModule
from lowrank_tools.cli import main
from lowrank_tools.io.formats import load_adapter, save_adapter

D = 8
T5_KEYS = ("lora_te3_encoder_block_0_layer_0_SelfAttention_q", "lora_te3_encoder_block_0_layer_1_DenseReluDense_wi_0")
T5_BODIES = ("encoder.block.0.layer.0.SelfAttention.q", "encoder.block.0.layer.1.DenseReluDense.wi_0")


def kohya_file(path, keys, *, metadata=None):
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for key, (out, inp) in keys.items():
        tensors[f"{key}.lora_down.weight"] = torch.randn(2, inp, generator=g)
        tensors[f"{key}.lora_up.weight"] = torch.randn(out, 2, generator=g)
    save_file(tensors, str(path), metadata=metadata)
    return path


def t5_names(adapter) -> set[str]:
    return {n for n in adapter.modules if "encoder.block" in n}


@pytest.mark.parametrize("transformer_key, component", [
    ("lora_unet_double_blocks_0_img_attn_qkv", "text_encoder_2"),
    ("lora_unet_single_blocks_0_linear2", "text_encoder_2"),
    ("lora_unet_joint_blocks_0_x_block_attn_qkv", "text_encoder_3"),
], ids=["flux-double", "flux-single", "sd3"])
def test_the_transformer_keys_decide_the_t5_component(tmp_path, transformer_key, component):
    keys = {transformer_key: (3 * D, D), **{k: (D, D) for k in T5_KEYS},
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (D, D)}
    adapter = load_adapter(kohya_file(tmp_path / "a.safetensors", keys))
    assert t5_names(adapter) == {f"{component}.{b}" for b in T5_BODIES}
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj" in adapter.modules
    assert any(f"read as {component}" in n for n in adapter.notes)


@pytest.mark.parametrize("metadata, component", [
    ({"modelspec.architecture": "flux-1-dev/lora"}, "text_encoder_2"),
    ({"ss_base_model_version": "flux1"}, "text_encoder_2"),
    ({"ss_sd_model_name": "flux1-dev.safetensors"}, "text_encoder_2"),
    ({"modelspec.architecture": "stable-diffusion-3-m/lora"}, "text_encoder_3"),
], ids=["modelspec-flux", "version-flux", "model-name-flux", "modelspec-sd3"])
def test_a_text_encoder_only_file_is_read_by_its_recorded_base(tmp_path, metadata, component):
    adapter = load_adapter(kohya_file(tmp_path / "a.safetensors", {k: (D, D) for k in T5_KEYS}, metadata=metadata))
    assert t5_names(adapter) == {f"{component}.{b}" for b in T5_BODIES}


def test_nothing_decides_reads_sd3s_and_info_says_so(tmp_path):
    path = kohya_file(tmp_path / "a.safetensors", {k: (D, D) for k in T5_KEYS})
    assert t5_names(load_adapter(path)) == {f"text_encoder_3.{b}" for b in T5_BODIES}
    result = CliRunner().invoke(main, ["info", str(path), "--json"], catch_exceptions=False)
    notes = json.loads(result.output)["notes"]
    assert any("lora_te3_ (T5)" in n and "text_encoder_3" in n and "--base" in n for n in notes)


def test_a_base_decides_too(tmp_path):
    """--base: a Flux pipeline's T5 is under text_encoder_2 (an SD3 one's text_encoder_2 is CLIP-G: no match)."""
    pipeline = {f"text_encoder_2.{b}.weight": torch.zeros(D, D) for b in T5_BODIES}
    pipeline["text_encoder_2.shared.weight"] = torch.zeros(32, D)
    save_file(pipeline, str(tmp_path / "base.safetensors"))
    path = kohya_file(tmp_path / "a.safetensors", {k: (D, D) for k in T5_KEYS})
    adapter = load_adapter(path, base=tmp_path / "base.safetensors")
    assert t5_names(adapter) == {f"text_encoder_2.{b}" for b in T5_BODIES}


@pytest.mark.parametrize("component, transformer", [
    ("text_encoder_2", "transformer.single_transformer_blocks.0.proj_out"),
    ("text_encoder_3", "transformer.transformer_blocks.0.ff_context.net.2"),
], ids=["flux", "sd3"])
def test_written_lora_te3_and_read_back_without_the_record(tmp_path, component, transformer):
    """Our file read by another tool has no name record: stripped here, the transformer part decides."""
    g = torch.Generator().manual_seed(1)
    modules = {f"{component}.{b}": LoraModule(B=torch.randn(D, 1, generator=g), A=torch.randn(1, D, generator=g),
                                             alpha=1.0) for b in T5_BODIES}
    modules[transformer] = LoraModule(B=torch.randn(D, 1, generator=g), A=torch.randn(1, 5 * D, generator=g), alpha=1.0)
    if component == "text_encoder_3":  # an SD3 model: its joint blocks tell it apart from Flux
        modules["transformer.transformer_blocks.0.attn.add_q_proj"] = LoraModule(
            B=torch.randn(D, 1, generator=g), A=torch.randn(1, D, generator=g), alpha=1.0)
        modules.pop(transformer)
        modules["transformer.pos_embed.proj"] = LoraModule(B=torch.randn(D, 1, generator=g),
                                                          A=torch.randn(1, D, generator=g), alpha=1.0)
    path = save_adapter(Adapter(modules=modules), tmp_path / "k.safetensors")
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert set(T5_KEYS) <= {k.split(".")[0] for k in tensors}
    save_file(tensors, str(tmp_path / "bare.safetensors"))  # no lowrank_tools.modules record
    adapter = load_adapter(tmp_path / "bare.safetensors")
    assert t5_names(adapter) == {f"{component}.{b}" for b in T5_BODIES}
    label = {"text_encoder_2": "Flux", "text_encoder_3": "SD3"}[component]
    assert any(f"read as {component} (its transformer keys are {label}'s)" in n for n in adapter.notes)
