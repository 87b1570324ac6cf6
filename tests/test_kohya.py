"""kohya / A1111 / ComfyUI names and files: exact writing, recorded names, guesses, matching against a base."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lowrank_tools.adapter import Adapter, LoraModule, ModuleKind
from lowrank_tools.errors import AdapterFormatError, AdapterMismatch, ConversionError, InvalidOption
from lowrank_tools.io.formats import load_adapter, save_adapter
from lowrank_tools.io.kohya import NAMES_KEY
from lowrank_tools.io.kohya_names import check_prefix, guess_module_name, kohya_key, match_keys


@pytest.mark.parametrize(("name", "options", "key"), [
    ("unet.down_blocks.0.attentions.0.proj_in", {}, "lora_unet_down_blocks_0_attentions_0_proj_in"),
    ("unet.add_embedding.linear_1", {}, "lora_unet_label_emb_0_0"),
    ("text_encoder.encoder.layers.0.self_attn.q_proj", {}, "lora_te_text_model_encoder_layers_0_self_attn_q_proj"),
    ("text_encoder.text_model.encoder.layers.0.mlp.fc1", {}, "lora_te_text_model_encoder_layers_0_mlp_fc1"),
    ("text_encoder.encoder.layers.1.mlp.fc2", {"two_encoders": True}, "lora_te1_text_model_encoder_layers_1_mlp_fc2"),
    ("text_encoder_2.text_projection", {"two_encoders": True}, "lora_te2_text_projection"),
    ("mid_block.resnets.0.conv1", {}, "lora_unet_mid_block_resnets_0_conv1"),
    ("encoder.layers.0.self_attn.k_proj", {"prefix": "lora_te_"}, "lora_te_text_model_encoder_layers_0_self_attn_k_proj"),
    ("model.layers.0.self_attn.q_proj", {"prefix": "lora_te2_"}, "lora_te2_model_layers_0_self_attn_q_proj"),
])
def test_kohya_key(name, options, key):
    assert kohya_key(name, **options) == key


@pytest.mark.parametrize(("key", "name"), [
    ("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out_0",
     "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0"),
    ("lora_unet_up_blocks_0_resnets_1_conv_shortcut", "unet.up_blocks.0.resnets.1.conv_shortcut"),
    ("lora_unet_time_embedding_linear_1", "unet.time_embedding.linear_1"),
    ("lora_unet_label_emb_0_2", "unet.add_embedding.linear_2"),
    ("lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj",
     "unet.mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj"),
    ("lora_te_text_model_encoder_layers_11_self_attn_out_proj", "text_encoder.text_model.encoder.layers.11.self_attn.out_proj"),
    ("lora_te2_text_model_encoder_layers_0_mlp_fc1", "text_encoder_2.text_model.encoder.layers.0.mlp.fc1"),
    ("lora_unet_model_layers_3_mlp_gate_proj", "unet.model.layers.3.mlp.gate_proj"),
])
def test_guess_module_name(key, name):
    assert guess_module_name(key) == name


def test_match_keys_against_base_names():
    pipeline = ["unet.conv_in", "unet.down_blocks.0.resnets.0.conv1", "text_encoder.encoder.layers.0.self_attn.q_proj",
                "unet.add_embedding.linear_1"]
    keys = ["lora_unet_down_blocks_0_resnets_0_conv1", "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
            "lora_unet_label_emb_0_0"]
    assert match_keys(keys, pipeline, where="f", base="b") == dict(zip(keys, [pipeline[1], pipeline[2], pipeline[3]]))
    single = ["down_blocks.0.resnets.0.conv1", "proj.in_x", "proj_in.x"]  # a lone component: any prefix
    assert match_keys(["lora_unet_down_blocks_0_resnets_0_conv1"], single, where="f", base="b") == {
        "lora_unet_down_blocks_0_resnets_0_conv1": "down_blocks.0.resnets.0.conv1"}
    with pytest.raises(AdapterMismatch, match=r"f: key lora_unet_proj_in_x matches 2 modules"):
        match_keys(["lora_unet_proj_in_x"], single, where="f", base="b")
    with pytest.raises(AdapterMismatch, match="key lora_unet_nope matches no module of b"):
        match_keys(["lora_unet_nope"], single, where="f", base="b")


def test_prefix_is_checked():
    assert check_prefix("lora_te1_") == "lora_te1_"
    for bad in ("lora_unet", "unet_", "lora__", "LORA_UNET_"):
        with pytest.raises(InvalidOption, match="--prefix"):
            check_prefix(bad)


def _adapter(dtype=torch.float32) -> Adapter:
    g = torch.Generator().manual_seed(0)
    mods = {
        "unet.down_blocks.0.resnets.0.conv1": LoraModule(B=torch.randn(8, 3, generator=g), A=torch.randn(3, 4 * 9, generator=g),
                                                         alpha=1.5, kind=ModuleKind.CONV, weight_shape=(8, 4, 3, 3)),
        "unet.mid_block.attentions.0.proj_in": LoraModule(B=torch.randn(8, 2, generator=g), A=torch.randn(2, 8, generator=g),
                                                          alpha=2.0, kind=ModuleKind.CONV, weight_shape=(8, 8, 1, 1)),
        "text_encoder.encoder.layers.0.self_attn.q_proj": LoraModule(B=torch.randn(16, 4, generator=g),
                                                                     A=torch.randn(4, 16, generator=g), alpha=8.0),
        "text_encoder.encoder.layers.0.mlp.fc1": LoraModule(B=torch.randn(24, 2, generator=g), A=torch.randn(2, 16, generator=g),
                                                            alpha=0.5, rslora=True),
    }
    return Adapter(modules={n: m.to(dtype=dtype) for n, m in mods.items()}, base_model="tiny-sd")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_read_round_trip(tmp_path, dtype):
    adapter = _adapter(dtype)
    save_adapter(adapter, tmp_path / "k.safetensors", format="kohya")
    with safe_open(str(tmp_path / "k.safetensors"), "pt") as f:
        assert f.get_tensor("lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight").shape == (3, 4, 3, 3)
        assert f.get_tensor("lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight").shape == (8, 3, 1, 1)
        # rsLoRA alpha 0.5 at r=2 is scale 0.5/sqrt(2); kohya's alpha / r rule needs alpha = scale * r
        assert float(f.get_tensor("lora_te_text_model_encoder_layers_0_mlp_fc1.alpha")) == pytest.approx(2 ** 0.5 / 2)
        assert f.metadata()["ss_sd_model_name"] == "tiny-sd"
    back = load_adapter(tmp_path / "k.safetensors")
    assert back.source_format == "kohya" and back.notes == [] and back.base_model == "tiny-sd"
    assert list(back.modules) == list(adapter.modules)  # names and their order, from the record
    for name, m in adapter.modules.items():
        got = back.modules[name]
        assert got.A.dtype == dtype and got.kind is m.kind and got.weight_shape == m.weight_shape
        assert torch.allclose(got.delta(), m.delta(), atol=1e-6)


def test_missing_alpha_means_scale_one(tmp_path):
    save_file({"lora_unet_proj_in.lora_down.weight": torch.ones(2, 3), "lora_unet_proj_in.lora_up.weight": torch.ones(4, 2)},
              str(tmp_path / "k.safetensors"))
    adapter = load_adapter(tmp_path / "k.safetensors")
    m = adapter.modules["unet.proj_in"]
    assert m.alpha == 2 and m.scale == 1 and torch.equal(m.delta(), torch.full((4, 3), 2.0))
    assert any("no .alpha" in n and "scale 1" in n for n in adapter.notes)


@pytest.mark.parametrize(("tensors", "message"), [
    ({"lora_unet_a.lora_down.weight": torch.ones(2, 3)}, r"key lora_unet_a\.lora_down\.weight has no matching lora_up"),
    ({"lora_unet_a.lora_down.weight": torch.ones(2, 3), "lora_unet_a.lora_up.weight": torch.ones(4, 2),
      "lora_unet_a.alpha": torch.ones(2)}, r"key lora_unet_a\.alpha has shape \(2,\), expected a scalar"),
    ({"lora_unet_a.lora_down.weight": torch.ones(2, 3), "lora_unet_a.lora_up.weight": torch.ones(4, 3)},
     r"lora_unet_a\.lora_down\.weight \(2, 3\) and lora_unet_a\.lora_up\.weight \(4, 3\) do not fit"),
    ({"lora_unet_a.lora_down.weight": torch.ones(2, 3), "lora_unet_a.lora_up.weight": torch.ones(4, 2),
      "lora_unet_a.hada_w1_a": torch.ones(2, 2)}, r"key lora_unet_a\.hada_w1_a is not a LoRA factor"),
    ({"lora_unet_a.lora_down.weight": torch.ones(2, 3), "lora_unet_a.lora_up.weight": torch.ones(4, 2),
      "lora_unet_b.alpha": torch.tensor(1.0)}, r"key lora_unet_b\.alpha has no lora_down"),
])
def test_bad_files_name_the_key(tmp_path, tensors, message):
    save_file(tensors, str(tmp_path / "bad.safetensors"))
    with pytest.raises(AdapterFormatError, match=message) as info:
        load_adapter(tmp_path / "bad.safetensors")
    assert str(tmp_path / "bad.safetensors") in str(info.value) and "\n" not in str(info.value)


def test_what_kohya_cannot_hold(tmp_path):
    emb = LoraModule(B=torch.ones(8, 2), A=torch.ones(2, 30), alpha=2, kind=ModuleKind.EMBEDDING)
    with pytest.raises(ConversionError, match="module text_encoder.embeddings.token_embedding is an embedding"):
        save_adapter(Adapter(modules={"text_encoder.embeddings.token_embedding": emb}), tmp_path / "k.safetensors",
                     format="kohya")
    whole = Adapter(modules=dict(_adapter().modules), full_tensors={"lm_head.weight": torch.ones(3, 3)})
    with pytest.raises(ConversionError, match="tensor lm_head.weight is saved whole"):
        save_adapter(whole, tmp_path / "k.safetensors", format="kohya")
    clash = Adapter(modules={"a.b_c": LoraModule(B=torch.ones(2, 1), A=torch.ones(1, 2), alpha=1),
                             "a_b.c": LoraModule(B=torch.ones(2, 1), A=torch.ones(1, 2), alpha=1)})
    with pytest.raises(ConversionError, match="both map to kohya key lora_unet_a_b_c"):
        save_adapter(clash, tmp_path / "k.safetensors", format="kohya")
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_names_record_is_what_restores_ambiguous_names(tmp_path):
    m = LoraModule(B=torch.ones(2, 1), A=torch.ones(1, 2), alpha=1)
    save_adapter(Adapter(modules={"blocks.0.my_layer": m}), tmp_path / "k.safetensors", format="kohya",
                 prefix="lora_te2_")
    with safe_open(str(tmp_path / "k.safetensors"), "pt") as f:
        assert json.loads(f.metadata()[NAMES_KEY]) == {"lora_te2_blocks_0_my_layer": "blocks.0.my_layer"}
    assert list(load_adapter(tmp_path / "k.safetensors").modules) == ["blocks.0.my_layer"]
