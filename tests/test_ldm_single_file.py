"""Single-file LDM checkpoints (model.diffusion_model. / cond_stage_model. / first_stage_model.) as extract BASE/TUNED
and apply BASE: the kohya file carries LDM UNet names (lora_unet_input_blocks_1_1_...) and A1111 text-encoder names,
diffusers' own loader reads it into the diffusers pipeline, and the fused weights are the fine-tuned ones."""

from __future__ import annotations

import warnings

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from test_diffusers_consumer import COMPONENTS, fine_tune, load_and_fuse, tiny_pipeline, weights  # noqa: E402
from lowrank_tools.cli import main  # noqa: E402
from lowrank_tools.errors import AdapterMismatch  # noqa: E402
from lowrank_tools.io.kohya import NAMES_KEY  # noqa: E402
from lowrank_tools.io.kohya_names import kohya_key, match_keys  # noqa: E402
from lowrank_tools.io.ldm_names import is_vae, ldm_split  # noqa: E402

_RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3"),
           ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]
_SIMPLE = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
           "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


def ldm_unet_names(unet) -> dict[str, str]:
    """diffusers UNet2DConditionModel key -> LDM key (without ``model.diffusion_model.``): the test's own table,
    checked against diffusers' LDM -> diffusers converter below."""
    cfg, blocks = unet.config, {}
    lpb = cfg.layers_per_block
    for i in range(len(cfg.down_block_types)):
        for j in range(lpb):
            blocks[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{(lpb + 1) * i + j + 1}.0."
            blocks[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{(lpb + 1) * i + j + 1}.1."
        blocks[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{(lpb + 1) * (i + 1)}.0.op."
    for i, kind in enumerate(cfg.up_block_types):
        for j in range(lpb + 1):
            blocks[f"up_blocks.{i}.resnets.{j}."] = f"output_blocks.{(lpb + 1) * i + j}.0."
            blocks[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{(lpb + 1) * i + j}.1."
        blocks[f"up_blocks.{i}.upsamplers.0."] = f"output_blocks.{(lpb + 1) * i + lpb}.{2 if 'Attn' in kind else 1}."
    blocks["mid_block.attentions.0."] = "middle_block.1."
    blocks.update({f"mid_block.resnets.{j}.": f"middle_block.{2 * j}." for j in range(2)})
    out = {}
    for key in unet.state_dict():
        new = next((ldm + key[len(d):] for d, ldm in _SIMPLE.items() if key.startswith(d + ".")), key)
        for d, ldm in blocks.items():
            if key.startswith(d):
                rest = key[len(d):]
                if ".resnets." in d:
                    rest = next((b + rest[len(a):] for a, b in _RESNET if rest.startswith(a + ".")), rest)
                new = ldm + rest
        out[key] = new
    return out


def single_file(pipe, vae: torch.Tensor) -> dict[str, torch.Tensor]:
    """The pipeline as an SD 1.x single file: LDM UNet, CLIP under cond_stage_model.transformer., a VAE tensor."""
    names = ldm_unet_names(pipe.unet)
    sd = {f"model.diffusion_model.{names[k]}": v.clone() for k, v in pipe.unet.state_dict().items()}
    for k, v in pipe.text_encoder.state_dict().items():
        k = k if k.startswith("text_model.") else f"text_model.{k}"  # transformers >= 5 drops it
        sd[f"cond_stage_model.transformer.{k}"] = v.clone()
    sd["first_stage_model.encoder.conv_in.weight"] = vae.clone()
    return sd


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ldm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = tiny_pipeline(tmp, sdxl=False)
        pipe.save_pretrained(tmp / "base")
        before = weights(pipe)
        vae = torch.randn(4, 3, 3, 3, generator=torch.Generator().manual_seed(3))
        base = single_file(pipe, vae)
        fine_tune(pipe)
        tuned = single_file(pipe, vae + 1.0)  # the VAE changed too: it must be left out
    save_file(base, str(tmp / "base.safetensors"))
    save_file(tuned, str(tmp / "tuned.safetensors"))
    return tmp, pipe, before, weights(pipe), base, tuned


def test_the_test_table_is_diffusers_own_conversion(sd15):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    _, pipe, *_ = sd15
    ldm = {f"model.diffusion_model.{v}": pipe.unet.state_dict()[k] for k, v in ldm_unet_names(pipe.unet).items()}
    back = convert_ldm_unet_checkpoint(ldm, dict(pipe.unet.config))
    assert back.keys() == pipe.unet.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in pipe.unet.state_dict().items())


def load_and_fuse_sgm(folder, adapter):
    """diffusers' SD 1.x ``load_lora_weights`` does not pass the UNet config its SGM (LDM) block renaming needs (its
    SDXL one does): read the file with ``lora_state_dict(path, unet_config=...)``, then load that."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
        w0 = weights(pipe)
        state_dict, alphas = pipe.lora_state_dict(str(adapter), unet_config=pipe.unet.config)
        pipe.load_lora_into_unet(state_dict, alphas, pipe.unet, adapter_name="x")
        pipe.load_lora_into_text_encoder(state_dict, alphas, pipe.text_encoder, prefix="text_encoder",
                                         adapter_name="x")
        pipe.fuse_lora(components=[c for c in COMPONENTS if getattr(pipe, c, None) is not None])
    return w0, weights(pipe)


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_extract_single_file_kohya_loads_in_diffusers_and_fuses_to_the_tuned_weights(sd15, tmp_path):
    tmp, _, _, tuned_w, _, _ = sd15
    out = tmp_path / "lora.safetensors"
    r = run("extract", tmp / "base.safetensors", tmp / "tuned.safetensors", "-o", out, "--rank", "4", "-q")
    assert r.exit_code == 0, r.output
    keys = {k.split(".")[0] for k in load_file(str(out))}
    assert not any("first_stage" in k or "encoder_conv_in" in k for k in keys)  # the VAE is left out
    unet = {k for k in keys if k.startswith("lora_unet_")}
    assert "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q" in unet  # LDM names, as A1111/ComfyUI read
    assert {"lora_unet_input_blocks_0_0", "lora_unet_out_2", "lora_unet_time_embed_0",
            "lora_unet_middle_block_1_proj_in", "lora_unet_input_blocks_1_0_in_layers_2"} <= unet
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in keys
    assert not any("down_blocks" in k for k in keys)
    w0, fused = load_and_fuse_sgm(tmp / "base", out)
    changed = 0
    for name, w in fused.items():
        if name.endswith("embedding.weight"):  # token / position embeddings: kohya cannot hold them
            assert torch.equal(w, w0[name]), name
        elif w.ndim >= 2:  # every other weight: planted rank 2 < 4, so the fused model is the tuned one
            assert torch.allclose(w, tuned_w[name], atol=1e-4), name
            changed += 1
    assert changed == sum(1 for k in keys if k.startswith(("lora_unet_", "lora_te_")))


def test_apply_onto_the_single_file_with_and_without_recorded_names(sd15, tmp_path):
    tmp, _, _, _, base, tuned = sd15
    lora = tmp_path / "lora.safetensors"
    r = run("extract", tmp / "base.safetensors", tmp / "tuned.safetensors", "-o", lora, "-r", "4", "-q")
    assert r.exit_code == 0, r.output
    bare = tmp_path / "bare.safetensors"  # as another tool writes it: no record of the module names
    save_file(load_file(str(lora)), str(bare))
    for adapter in (lora, bare):
        out = tmp_path / f"applied-{adapter.stem}.safetensors"
        r = run("apply", tmp / "base.safetensors", adapter, "-o", out, "-q")
        assert r.exit_code == 0, r.output
        got = load_file(str(out))
        assert got.keys() == base.keys()
        for name, t in got.items():
            if is_vae(name) or name.endswith("embedding.weight") or t.ndim < 2:
                assert torch.equal(t, base[name]), name
            else:
                assert torch.allclose(t, tuned[name], atol=1e-4), name
    with safe_open(str(bare), "pt") as f:
        assert NAMES_KEY not in (f.metadata() or {})


def test_sdxl_prefixes_and_openclip_names():
    te2 = "conditioner.embedders.1.model.transformer.resblocks.3."
    assert ldm_split("conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj") == \
        ("text_encoder.", "lora_te1_", "text_model.encoder.layers.0.self_attn.q_proj")
    assert kohya_key(te2 + "attn.out_proj") == "lora_te2_text_model_encoder_layers_3_self_attn_out_proj"
    assert kohya_key(te2 + "mlp.c_fc") == "lora_te2_text_model_encoder_layers_3_mlp_fc1"
    assert kohya_key(te2 + "mlp.c_proj") == "lora_te2_text_model_encoder_layers_3_mlp_fc2"
    assert kohya_key("model.diffusion_model.label_emb.0.0") == "lora_unet_label_emb_0_0"
    assert kohya_key("model.diffusion_model.double_blocks.0.img_attn.qkv") == "lora_unet_double_blocks_0_img_attn_qkv"
    assert ldm_split("first_stage_model.decoder.conv_in") is None and is_vae("first_stage_model.decoder.conv_in.weight")
    names = [te2 + "mlp.c_fc", "conditioner.embedders.0.transformer.text_model.encoder.layers.3.mlp.fc1",
             "model.diffusion_model.input_blocks.4.1.proj_in"]
    keys = ["lora_te2_text_model_encoder_layers_3_mlp_fc1", "lora_te1_text_model_encoder_layers_3_mlp_fc1",
            "lora_unet_input_blocks_4_1_proj_in"]
    assert match_keys(keys, names, where="x", base="b") == dict(zip(keys, names))
    with pytest.raises(AdapterMismatch, match="lora_unet_down_blocks_0_attentions_0_proj_in matches no module"):
        match_keys(["lora_unet_down_blocks_0_attentions_0_proj_in"], names, where="x", base="b")


_OPENCLIP_LAYER = [("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                   ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")]


def openclip_state_dict(te) -> dict[str, torch.Tensor]:
    """A transformers CLIPTextModelWithProjection as OpenCLIP's text tower names it (q/k/v fused in in_proj)."""
    sd = {(k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}"): v
          for k, v in te.state_dict().items()}
    out = {"token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
           "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
           "ln_final.weight": sd["text_model.final_layer_norm.weight"],
           "ln_final.bias": sd["text_model.final_layer_norm.bias"],
           "text_projection": sd["text_projection.weight"].T.contiguous()}
    for i in range(te.config.num_hidden_layers):
        hf, oc = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for leaf in ("weight", "bias"):
            out[f"{oc}attn.in_proj_{leaf}"] = torch.cat([sd[f"{hf}self_attn.{p}_proj.{leaf}"] for p in "qkv"])
            out.update({f"{oc}{b}.{leaf}": sd[f"{hf}{a}.{leaf}"] for a, b in _OPENCLIP_LAYER})
    return {k: v.clone() for k, v in out.items()}


def sdxl_single_file(pipe) -> dict[str, torch.Tensor]:
    names = ldm_unet_names(pipe.unet)
    names.update({k: k.replace("add_embedding.linear_1", "label_emb.0.0").replace("add_embedding.linear_2",
                                                                                  "label_emb.0.2")
                  for k in names if k.startswith("add_embedding.")})
    sd = {f"model.diffusion_model.{names[k]}": v.clone() for k, v in pipe.unet.state_dict().items()}
    for k, v in pipe.text_encoder.state_dict().items():
        k = k if k.startswith("text_model.") else f"text_model.{k}"
        sd[f"conditioner.embedders.0.transformer.{k}"] = v.clone()
    sd.update({f"conditioner.embedders.1.model.{k}": v for k, v in openclip_state_dict(pipe.text_encoder_2).items()})
    return sd


def test_sdxl_single_file_kohya_loads_in_diffusers(tmp_path):
    """SDXL: UNet (label_emb), CLIP-L as lora_te1_, OpenCLIP-bigG as lora_te2_ (transformers names; the fused
    attn.in_proj_weight as q/k/v): diffusers' SDXL loader reads the file and the fused weights are the tuned ones;
    apply onto the single file writes its own layout (in_proj_weight fused) with the tuned values."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = tiny_pipeline(tmp_path, sdxl=True)
        pipe.save_pretrained(tmp_path / "base")
        base = sdxl_single_file(pipe)
        hf = convert_open_clip_checkpoint(pipe.text_encoder_2, base, prefix="conditioner.embedders.1.model.")
        own = pipe.text_encoder_2.state_dict()
        for k, v in hf.items():  # the test's OpenCLIP layout is the one diffusers converts back
            assert torch.equal(v, own[k] if k in own else own[k.removeprefix("text_model.")]), k
        fine_tune(pipe)
        tuned_w = weights(pipe)
        tuned = sdxl_single_file(pipe)
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(tuned, str(tmp_path / "tuned.safetensors"))
    out = tmp_path / "lora.safetensors"
    r = run("extract", tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", "-o", out, "-r", "4", "-q")
    assert r.exit_code == 0, r.output
    keys = {k.split(".")[0] for k in load_file(str(out))}
    assert {"lora_unet_label_emb_0_0", "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
            "lora_te2_text_model_encoder_layers_0_self_attn_out_proj",
            "lora_te2_text_model_encoder_layers_0_mlp_fc1",
            "lora_te2_text_model_encoder_layers_0_self_attn_k_proj"} <= keys
    w0, fused = load_and_fuse(tmp_path / "base", out, sdxl=True)
    for name, w in fused.items():
        if name == "text_encoder_2.text_projection.weight" or name.endswith("embedding.weight"):
            assert torch.equal(w, w0[name]), name  # OpenCLIP's text_projection (no .weight), embeddings: not held
        elif w.ndim >= 2:
            assert torch.allclose(w, tuned_w[name], atol=1e-4), name
    applied = tmp_path / "applied.safetensors"
    assert run("apply", tmp_path / "base.safetensors", out, "-o", applied, "-q").exit_code == 0
    got = load_file(str(applied))
    assert got.keys() == base.keys()  # the single file's own layout: in_proj_weight stays fused
    in_proj = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"
    assert torch.allclose(got[in_proj], tuned[in_proj], atol=1e-4) and not torch.allclose(got[in_proj], base[in_proj])
    for name, t in got.items():
        if t.ndim >= 2 and not name.endswith(("embedding.weight", "positional_embedding", "text_projection")):
            assert torch.allclose(t, tuned[name], atol=1e-4), name


def test_openclip_fused_projection_reads_as_q_k_v_in_place(tmp_path):
    from lowrank_tools.io.checkpoint import open_checkpoint

    tower = "conditioner.embedders.1.model.transformer.resblocks.0.attn."
    fused = torch.arange(6 * 4, dtype=torch.float32).reshape(6, 4)
    tensors = {"a.weight": torch.ones(2, 2), tower + "in_proj_weight": fused, tower + "in_proj_bias": torch.arange(6.0),
               tower + "out_proj.weight": torch.zeros(2, 2), "other.attn.in_proj_weight": fused.clone()}
    save_file(tensors, str(tmp_path / "m.safetensors"))
    ckpt = open_checkpoint(tmp_path / "m.safetensors")
    split = [tower + f"{p}_proj.{leaf}" for leaf in ("weight", "bias") for p in "qkv"]
    assert set(ckpt.keys()) == {"a.weight", tower + "out_proj.weight", "other.attn.in_proj_weight", *split}
    for i, p in enumerate("qkv"):
        assert ckpt.shape(tower + f"{p}_proj.weight") == (2, 4)
        assert torch.equal(ckpt.get(tower + f"{p}_proj.weight"), fused[2 * i:2 * i + 2])
        assert torch.equal(ckpt.get(tower + f"{p}_proj.bias"), torch.arange(6.0)[2 * i:2 * i + 2])
    raw = open_checkpoint(tmp_path / "m.safetensors", split_qkv=False)  # what apply writes back
    plain = open_checkpoint(tmp_path / "m.safetensors", dequantize=False, split_qkv=False)
    assert list(raw.keys()) == list(plain.keys())
    assert tower + "in_proj_weight" in raw and tower + "q_proj.weight" not in raw
