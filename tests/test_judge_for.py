"""Which diffusers loader judges an adapter in ``check --for diffusers``: the base's pipeline (model_index.json),
a lone component's family loader (its config's _class_name), else the adapter's names."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from lowrank_tools.io.diffusers_judge import judge_for

diffusers = pytest.importorskip("diffusers")

FLUX_KEYS = ["transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight"]
SD_KEYS = ["unet.down_blocks.0.attentions.0.proj_in.lora_A.weight"]


def pipeline_folder(tmp_path, class_name):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": class_name}))
    return SimpleNamespace(path=tmp_path, config=None)


@pytest.mark.parametrize("class_name, components", [("WanPipeline", ("transformer.", "transformer_2.")),
                                                     ("SanaPipeline", ("transformer.",)),
                                                     ("FluxPipeline", ("transformer.", "text_encoder."))])
def test_the_base_pipeline_decides_over_the_names(tmp_path, class_name, components):
    judge = judge_for(diffusers, SD_KEYS, pipeline_folder(tmp_path, class_name))
    assert (judge.name, judge.components) == (class_name, components)
    assert judge.loader is getattr(diffusers, class_name) and "model_index.json" in judge.evidence


@pytest.mark.parametrize("class_name, loader", [("SanaTransformer2DModel", "SanaLoraLoaderMixin"),
                                                ("WanTransformer3DModel", "WanLoraLoaderMixin"),
                                                ("LTXVideoTransformer3DModel", "LTXVideoLoraLoaderMixin")])
def test_a_pipeline_file_on_a_lone_component_is_judged_by_its_family_loader(tmp_path, class_name, loader):
    judge = judge_for(diffusers, SD_KEYS, SimpleNamespace(path=tmp_path, config={"_class_name": class_name}))
    assert judge.name == loader and judge.loader is getattr(diffusers.loaders, loader)
    assert judge.components[0] == "transformer."


@pytest.mark.parametrize("class_name", ["SanaTransformer2DModel", "UNet2DConditionModel"])
def test_a_bare_file_on_a_lone_component_is_judged_by_its_load_lora_adapter(tmp_path, class_name):
    bare = ["down_blocks.0.attentions.0.proj_in.lora_A.weight"]
    judge = judge_for(diffusers, bare, SimpleNamespace(path=tmp_path, config={"_class_name": class_name}))
    assert judge.name == class_name and judge.components == ("",) and "load_lora_adapter" in judge.evidence
    state = {"x.lora_A.weight": 1, "x.lora_B.weight": 2}
    assert judge.loader.lora_state_dict(state) == state  # PEFT names: taken as they are


@pytest.mark.parametrize("key", ["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight",
                                 "lora_transformer_single_transformer_blocks_0_attn_to_q.lora_down.weight"])
def test_a_kohya_file_on_a_lone_component_goes_through_its_family_loader(tmp_path, key):
    """Only a pipeline loader's converter reads kohya names: taken as they are by the component's load_lora_adapter,
    none of its modules would exist (the first version judged such a file 'ok' against a lone Flux transformer)."""
    judge = judge_for(diffusers, [key], SimpleNamespace(path=tmp_path, config={"_class_name": "FluxTransformer2DModel"}))
    assert judge.name == "FluxLoraLoaderMixin" and judge.loader is diffusers.loaders.FluxLoraLoaderMixin


def test_no_loader_is_said_not_guessed(tmp_path):
    judge = judge_for(diffusers, FLUX_KEYS, pipeline_folder(tmp_path, "PixArtSigmaPipeline"))
    assert judge.name == "PixArtSigmaPipeline" and judge.loader is None
    lone = judge_for(diffusers, FLUX_KEYS, SimpleNamespace(path=tmp_path / "x", config={
        "_class_name": "PixArtTransformer2DModel"}))
    assert lone.name == "PixArtLoraLoaderMixin" and lone.loader is None
    bare = judge_for(diffusers, ["proj_out.lora_A.weight"], SimpleNamespace(path=tmp_path / "x", config={
        "_class_name": "PixArtTransformer2DModel"}))
    assert bare.name == "PixArtTransformer2DModel" and bare.loader is None  # no load_lora_adapter either


@pytest.mark.parametrize("base", [None, SimpleNamespace(path="nowhere", config={"_class_name": "UNet2DConditionModel"}),
                                  SimpleNamespace(path="nowhere", config={"model_type": "llama"})])
def test_without_a_pipeline_the_names_decide(base):
    assert judge_for(diffusers, FLUX_KEYS, base).name == "FluxPipeline"
    judge = judge_for(diffusers, SD_KEYS, base)
    assert judge.name == "StableDiffusionPipeline" and judge.evidence == "the adapter's names"


def test_without_a_base_a_table_architecture_names_its_pipeline():
    wan = ["transformer.blocks.0.attn1.to_q.lora_A.weight", "transformer.blocks.0.ffn.net.0.proj.lora_A.weight"]
    judge = judge_for(diffusers, wan)
    assert judge.name == "WanPipeline" and judge.components[0] == "transformer."
    sana = ["transformer.transformer_blocks.0.attn1.to_q.lora_A.weight"]  # in no table: the fallback, which says so
    judge = judge_for(diffusers, sana)
    assert judge.name == "StableDiffusionPipeline" and "--base" in judge.evidence
