"""`check ADAPTER --for CONSUMER`: our own outputs pass for every consumer they are meant for; a broken file names
the key (misspelled module, shape against --base, NaN factor, placeholder alpha, zero-padded rank, 3x rank with
unchanged alpha, float64); diffusers' own lora_state_dict is the judge for --for diffusers; exit 0/1/2; strict JSON."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from lowrank_tools.check import Severity, check_adapter
from lowrank_tools.cli import main
from lowrank_tools.io.consumer_keys import Consumer, key_accepted, split_key

from conftest import make_pair

# a small SD-UNet-named model (diffusers names, so diffusers' kohya converter routes it): linear, conv, 1x1 conv
SHAPES = {"down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight": (8, 8),
          "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k.weight": (8, 8),
          "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_v.weight": (8, 8),
          "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight": (8, 16),
          "down_blocks.0.resnets.0.conv1.weight": (4, 4, 3, 3),
          "mid_block.attentions.0.proj_in.weight": (8, 8, 1, 1)}
Q = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("check")
    base, tuned = make_pair(SHAPES, k=2)
    save_file(base, tmp / "base.safetensors")
    save_file(tuned, tmp / "tuned.safetensors")
    for fmt, out in (("kohya", tmp / "k.safetensors"), ("peft", tmp / "p")):
        res = run("extract", tmp / "base.safetensors", tmp / "tuned.safetensors", "-o", out, "--format", fmt,
                  "--rank", "2", "-q")
        assert res.exit_code == 0, res.output
    return tmp


def edited(made, name, edit):
    """A copy of our kohya file with ``edit(tensors)`` applied."""
    tensors = load_file(made / "k.safetensors")
    edit(tensors)
    path = made / name
    save_file(tensors, path)
    return path


@pytest.mark.parametrize("adapter,consumer", [("k.safetensors", "diffusers"), ("k.safetensors", "comfyui"),
                                              ("k.safetensors", "a1111"), ("p", "peft")])
def test_our_outputs_pass(made, adapter, consumer):
    res = run("check", made / adapter, "--for", consumer, "--base", made / "base.safetensors")
    assert res.exit_code == 0, res.output
    assert res.output.strip().splitlines()[-1].startswith("ok: ") and "6 modules" in res.output


def test_kohya_file_for_peft_says_convert(made):
    res = run("check", made / "k.safetensors", "--for", "peft")
    assert res.exit_code == 1
    lines = [x for x in res.output.splitlines() if x.startswith("error:")]
    assert any("kohya-named file" in x and "convert" in x for x in lines) and len(lines) <= 3, res.output


def test_peft_folder_for_a1111_is_one_line(made):
    res = run("check", made / "p", "--for", "a1111", "-q")
    assert res.exit_code == 1
    assert len(res.output.strip().splitlines()) == 1 and "base_model.model." in res.output


def test_misspelled_module_named_with_closest_base_tensor(made):
    path = edited(made, "typo.safetensors", lambda t: t.update(
        {k.replace("attn1_to_q", "attn1_to_qq"): t.pop(k) for k in [k for k in t if k.startswith(Q + ".")]}))
    res = run("check", path, "--for", "comfyui", "--base", made / "base.safetensors")
    assert res.exit_code == 1
    line = next(x for x in res.output.splitlines() if "missing-module" in x or "no such module" in x)
    assert "attn1_to_qq" in line and "attn1.to_q.weight" in line


def test_shape_against_base(made):
    base = load_file(made / "base.safetensors")
    base["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"] = torch.zeros(8, 12)
    save_file(base, made / "other_base.safetensors")
    res = run("check", made / "k.safetensors", "--for", "a1111", "--base", made / "other_base.safetensors")
    assert res.exit_code == 1
    (line,) = [x for x in res.output.splitlines() if x.startswith("error:")]
    assert Q in line and "(8, 8)" in line and "(8, 12)" in line


def _set(key, value):
    return lambda t: t.__setitem__(key, value)


@pytest.mark.parametrize("edit,key,words", [
    (lambda t: t[Q + ".lora_down.weight"].__setitem__((0, 0), float("nan")), Q + ".lora_down.weight", "NaN"),
    (_set(Q + ".alpha", torch.tensor(1e10)), Q + ".alpha", "placeholder"),
    (_set(Q + ".alpha", torch.tensor(0.0)), Q + ".alpha", "alpha is 0"),
    (_set(Q + ".alpha", torch.tensor(-2.0)), Q + ".alpha", "negative"),
    (lambda t: t.__setitem__(Q + ".lora_up.weight", t[Q + ".lora_up.weight"].double()), Q + ".lora_up.weight",
     "float64"),
    (lambda t: t.__setitem__(Q + ".lora_up.weight", t[Q + ".lora_up.weight"].to(torch.float8_e4m3fn)),
     Q + ".lora_up.weight", "not a float factor"),
])
def test_broken_tensor_names_the_key(made, edit, key, words):
    res = run("check", edited(made, "broken.safetensors", edit), "--for", "comfyui")
    assert res.exit_code == 1
    lines = [x for x in res.output.splitlines() if x.startswith(("error:", "warning:"))]
    assert any(key in x and words in x for x in lines), res.output


def test_zero_padded_rank(made):
    def pad(t):
        t[Q + ".lora_down.weight"] = torch.cat([t[Q + ".lora_down.weight"], torch.zeros(2, 8)])
        t[Q + ".lora_up.weight"] = torch.cat([t[Q + ".lora_up.weight"], torch.randn(8, 2)], 1)  # A rows zero: enough
    result = check_adapter(edited(made, "padded.safetensors", pad), "comfyui")
    (p,) = [p for p in result.problems if p.code == "zero-rank"]
    assert p.key == Q and "2 of its 4" in p.message and "--energy 1" in p.message


def test_fused_rank_with_unchanged_alpha_is_a_warning(made):
    def fuse(t):
        t[Q + ".lora_down.weight"] = torch.randn(6, 8)
        t[Q + ".lora_up.weight"] = torch.randn(8, 6)  # rank 6 = 3 x 2, alpha left at its siblings' 2
    result = check_adapter(edited(made, "fused.safetensors", fuse), "a1111")
    (p,) = result.problems
    assert (p.severity, p.code, p.key) == (Severity.WARNING, "alpha-3x", Q) and "#2204" in p.message


def test_missing_alpha_is_a_note_not_a_problem(made):
    res = run("check", edited(made, "noalpha.safetensors", lambda t: t.pop(Q + ".alpha")), "--for", "a1111")
    assert res.exit_code == 0, res.output
    assert "note:" in res.output and "scale 1" in res.output and "ok: " in res.output


def test_diffusers_is_the_judge(tmp_path):
    good = {"lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": torch.randn(2, 8),
            "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": torch.randn(8, 2),
            "lora_unet_double_blocks_0_img_attn_proj.alpha": torch.tensor(2.0)}
    save_file(good, tmp_path / "flux.safetensors")
    bad = {k.replace("attn_proj", "attn_projj"): v for k, v in good.items()}  # a name the Flux converter refuses
    save_file(bad, tmp_path / "flux_bad.safetensors")
    assert run("check", tmp_path / "flux.safetensors", "--for", "diffusers").exit_code == 0
    result = check_adapter(tmp_path / "flux_bad.safetensors", "diffusers")
    refused = [p for p in result.problems if p.code == "diffusers-refused"]
    assert {p.key for p in refused} == set(bad) and "FluxPipeline" in refused[0].message
    # the naming table alone accepts both (lora_unet_ + kohya suffixes): only diffusers knows the name is wrong
    assert check_adapter(tmp_path / "flux_bad.safetensors", "comfyui").ok


def test_json_is_strict_and_exit_codes(made):
    res = run("check", edited(made, "nan.safetensors", lambda t: t[Q + ".lora_up.weight"].fill_(float("inf"))),
              "--for", "comfyui", "--json")
    assert res.exit_code == 1
    doc = json.loads(res.output, parse_constant=lambda c: pytest.fail(f"non-strict JSON token {c}"))
    assert doc["ok"] is False and doc["consumer"] == "comfyui"
    assert any(p["key"] == Q + ".lora_up.weight" and p["code"] == "non-finite" for p in doc["problems"])
    ok = json.loads(run("check", made / "k.safetensors", "--for", "comfyui", "--json").output)
    assert ok["ok"] is True and ok["problems"] == [] and ok["modules"] == 6
    assert run("check", made / "k.safetensors").exit_code == 2                       # --for is required
    assert run("check", made / "k.safetensors", "--for", "invokeai").exit_code == 2
    assert run("check", made / "k.safetensors", "--for", "peft", "--include", "(").exit_code == 2
    assert run("check", made / "missing.safetensors", "--for", "peft").exit_code == 1


def test_include_exclude_narrow_the_check(made):
    path = edited(made, "nan2.safetensors", lambda t: t[Q + ".lora_up.weight"].fill_(float("nan")))
    assert run("check", path, "--for", "comfyui", "--exclude", "attn1_to_q").exit_code == 0
    assert run("check", path, "--for", "comfyui", "--include", "attn1_to_q").exit_code == 1


@pytest.mark.parametrize("consumer,key,accepted", [
    ("a1111", "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight", True),
    ("a1111", "lora_te1_text_model_encoder_layers_0_mlp_fc1.hada_w1_a", True),
    ("a1111", "lora_te2_text_model_encoder_layers_0_mlp_fc1.dora_scale", True),
    ("a1111", "lora_unet_input_blocks_1_0_in_layers_2.diff", True),
    ("a1111", "lora_unet_input_blocks_1_0_in_layers_2.diff_b", True),
    ("a1111", "lora_transformer_single_transformer_blocks_0_attn_to_q.lora_up.weight", False),
    ("a1111", "diffusion_model.input_blocks.1.0.in_layers.2.lora_up.weight", False),
    ("a1111", "lora_unet_down.blocks.0.lora_up.weight", False),
    ("comfyui", "lora_transformer_single_transformer_blocks_0_attn_to_q.lora_up.weight", True),
    ("comfyui", "lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight", True),
    ("comfyui", "lycoris_double_blocks_0_img_attn_qkv.lokr_w1", True),
    ("comfyui", "diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight", True),
    ("comfyui", "diffusion_model.blocks.0.self_attn.q.lora_down.weight", True),
    ("comfyui", "transformer.transformer_blocks.0.attn.to_q.lora_B.weight", True),
    ("comfyui", "unet.down_blocks.0.attentions.0.proj_in.lora.up.weight", True),
    ("comfyui", "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.up.weight", True),
    ("comfyui", "base_model.model.transformer_blocks.0.attn.to_q.lora_A.weight", True),
    ("comfyui", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.up.weight", True),
    ("comfyui", "lora_prior_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight", True),
    ("comfyui", "text_encoder_2.text_model.encoder.layers.0.mlp.fc1.lora_linear_layer.down.weight", True),
    ("comfyui", "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", False),
    ("comfyui", "lora_unet_double_blocks_0_img_attn_qkv.lora_A.weight", False),
    ("comfyui", "double_blocks.0.img_attn.qkv.lora_down.weight", False),
    ("comfyui", "lora_unet_double_blocks_0_img_attn_qkv.weight", False),
    ("peft", "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", True),
    ("peft", "base_model.model.model.embed_tokens.lora_embedding_A", True),
    ("peft", "model.layers.0.self_attn.q_proj.lora_A.weight", False),
    ("peft", "base_model.model.model.layers.0.self_attn.q_proj.lora_down.weight", False),
])
def test_naming_tables(consumer, key, accepted):
    module, suffix, _ = split_key(key)
    assert (key_accepted(Consumer(consumer), module, suffix) is None) is accepted


def test_peft_config_disagreements_name_the_module(made, tmp_path):
    import shutil
    folder = tmp_path / "p"
    shutil.copytree(made / "p", folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    targets = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "conv1", "proj_in"]  # not attn2's
    config.update(r=3, rank_pattern={}, target_modules=targets)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    result = check_adapter(folder, "peft")
    codes = {(p.code, p.key.split(".")[-1]) for p in result.problems}
    assert ("not-targeted", "to_k") in codes and ("rank", "to_q") in codes
    assert all("attn2" in p.key for p in result.problems if p.code == "not-targeted")


def test_peft_folder_is_not_routed_by_diffusers(made):
    """Keys under base_model.model. are no pipeline component: diffusers' load_lora_weights would drop them all."""
    result = check_adapter(made / "p", "diffusers")
    dropped = [p for p in result.problems if p.code == "diffusers-dropped"]
    assert dropped and all(p.key.startswith("base_model.model.") for p in dropped)


def test_tucker_conv_kernel_is_read_from_lora_mid(tmp_path):
    name = "lora_unet_down_blocks_0_resnets_0_conv1"
    base = {"down_blocks.0.resnets.0.conv1.weight": torch.zeros(4, 4, 3, 3)}
    save_file(base, tmp_path / "base.safetensors")
    lora = {f"{name}.lora_down.weight": torch.randn(2, 4, 1, 1), f"{name}.lora_mid.weight": torch.randn(2, 2, 3, 3),
            f"{name}.lora_up.weight": torch.randn(4, 2, 1, 1), f"{name}.alpha": torch.tensor(2.0)}
    save_file(lora, tmp_path / "tucker.safetensors")
    assert check_adapter(tmp_path / "tucker.safetensors", "comfyui", base=tmp_path / "base.safetensors").ok
    lora[f"{name}.lora_mid.weight"] = torch.randn(2, 2, 5, 5)
    save_file(lora, tmp_path / "tucker5.safetensors")
    (p,) = check_adapter(tmp_path / "tucker5.safetensors", "comfyui", base=tmp_path / "base.safetensors").problems
    assert p.code == "shape" and p.key == name and "(5, 5)" in p.message


@pytest.mark.parametrize("key, rank, ok", [
    (r"attn1\.to_q", 2, True),    # PEFT's escaped key (as it writes one): a plain name, matched at a dot boundary
    (r"attn1\.to_q", 3, False),   # the same key with another rank: PEFT refuses the size mismatch
    (r"^attn1\.to_q", 3, True),   # anchored: PEFT matches only the whole name, and no module is named just that
    (r"to_[qk]", 3, False),       # a regex: PEFT's re.match(rf"(.*\.)?({key})$") picks to_q and to_k
])
def test_rank_and_alpha_patterns_are_read_as_peft_matches_them(made, tmp_path, key, rank, ok):
    import shutil
    folder = tmp_path / "p"
    shutil.copytree(made / "p", folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(r=2, rank_pattern={key: rank}, alpha_pattern={key: -1.0})
    (folder / "adapter_config.json").write_text(json.dumps(config))
    result = check_adapter(folder, "peft")
    ranks = [p for p in result.problems if p.code == "rank"]
    alphas = {p.key.split(".")[-1] for p in result.problems if p.code == "alpha"}
    assert (not ranks) is ok, [p.line() for p in ranks]
    if key.startswith("^"):
        assert not alphas  # no module is named exactly attn1.to_q: PEFT's default alpha stands
    else:
        assert alphas and alphas <= {"to_q", "to_k"} and ("to_k" in alphas) is ("[" in key)


@pytest.mark.parametrize("listed", [True, False])
def test_peft_tensors_saved_whole_are_loaded_when_modules_to_save_lists_them(made, tmp_path, listed):
    import shutil
    folder = tmp_path / "p"
    shutil.copytree(made / "p", folder)
    tensors = load_file(folder / "adapter_model.safetensors")
    tensors["base_model.model.encoder.conv1.weight"] = torch.zeros(4, 4, 3)
    save_file(tensors, folder / "adapter_model.safetensors")
    config = json.loads((folder / "adapter_config.json").read_text())
    config["modules_to_save"] = ["encoder.conv1"] if listed else None
    (folder / "adapter_config.json").write_text(json.dumps(config))
    result = check_adapter(folder, "peft")
    assert result.ok is listed, [p.line() for p in result.problems]
    if not listed:
        assert [p.key for p in result.problems] == ["base_model.model.encoder.conv1.weight"]
