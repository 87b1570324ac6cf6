"""``check --for diffusers`` names every module diffusers would silently leave out, and the files are loaded for real
here to compare (diffusers 0.42.1):

- a kohya/BFL Flux file with the modules outside the blocks (time_in, vector_in, guidance_in, txt_in, img_in,
  final_layer), a T5 (lora_te3_) and a bias delta (diff_b): FluxPipeline.load_lora_weights + fuse_lora changes
  exactly the weights of the block modules; check names each of the others, one line each, exit 1;
- an SD 1.x file in LDM UNet names (lora_unet_input_blocks_...): load_lora_weights misplaces them, check says so
  and its workaround (lora_state_dict(..., unet_config=) + load_lora_into_unet) loads them exactly."""

from __future__ import annotations

import warnings

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

from lowrank_tools.check import check_adapter  # noqa: E402
from lowrank_tools.cli import main  # noqa: E402
from lowrank_tools.io.architectures import Naming, architecture_named  # noqa: E402

pytestmark = pytest.mark.slow

D = 16
FLUX = dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=16, pooled_projection_dim=8, guidance_embeds=True, axes_dims_rope=(2, 2, 4))
# BFL module -> (out, in) of the tiny Flux (timestep / guidance projections are 256 wide)
BLOCKS = {"double_blocks.0.img_attn.qkv": (3 * D, D), "double_blocks.0.img_attn.proj": (D, D),
          "double_blocks.0.txt_mlp.0": (4 * D, D), "single_blocks.0.linear2": (D, 5 * D)}
OUTSIDE = {"time_in.in_layer": (D, 256), "time_in.out_layer": (D, D), "vector_in.in_layer": (D, 8),
           "vector_in.out_layer": (D, D), "guidance_in.in_layer": (D, 256), "guidance_in.out_layer": (D, D),
           "txt_in": (D, 16), "img_in": (D, 4), "final_layer.linear": (4, D),
           "final_layer.adaLN_modulation.1": (2 * D, D)}
T5 = "lora_te3_encoder_block_0_layer_0_SelfAttention_q"


def factors(key: str, out: int, inp: int, g, *, conv: bool = False) -> dict[str, torch.Tensor]:
    tail = (1, 1) if conv else ()
    return {f"{key}.lora_down.weight": torch.randn(2, inp, *tail, generator=g),
            f"{key}.lora_up.weight": torch.randn(out, 2, *tail, generator=g), f"{key}.alpha": torch.tensor(1.0)}


def kohya(name: str) -> str:
    return "lora_unet_" + name.replace(".", "_")


def fused_weights(model) -> dict[str, torch.Tensor]:
    return {k.replace(".base_layer", ""): v.clone() for k, v in model.state_dict().items() if ".lora_" not in k}


def test_check_names_each_module_flux_drops_and_only_those(tmp_path):
    g = torch.Generator().manual_seed(0)
    sd = {}
    for name, (o, i) in {**BLOCKS, **OUTSIDE}.items():
        sd.update(factors(kohya(name), o, i, g))
    sd.update(factors(T5, 8, 8, g))
    diff_b = "lora_unet_double_blocks_0_img_attn_proj.diff_b"
    sd[diff_b] = torch.randn(D, generator=g)  # a bias delta: diffusers filters it out (an info log line)
    path = tmp_path / "flux.safetensors"
    save_file(sd, str(path))

    result = CliRunner().invoke(main, ["check", str(path), "--for", "diffusers"], catch_exceptions=False)
    assert result.exit_code == 1
    said = {p.key for p in check_adapter(path, "diffusers").problems if p.code == "diffusers-dropped"}
    lines = [ln for ln in result.output.splitlines() if "silently drops it" in ln]
    assert len(lines) == len(said)  # one line each

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        model = diffusers.FluxTransformer2DModel(**FLUX)
        before = fused_weights(model)
        pipe = diffusers.FluxPipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=None,
                                      text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                      transformer=model)
        pipe.load_lora_weights(str(path))
        pipe.fuse_lora()
    after = fused_weights(pipe.transformer)
    bias = "transformer_blocks.0.attn.to_out.0.bias"
    assert torch.equal(before[bias], after[bias])  # the diff_b did not arrive
    changed = {k[:-len(".weight")] for k in before if k.endswith(".weight") and not torch.equal(before[k], after[k])}
    flux = architecture_named("flux")
    applied = set()
    for name in {**BLOCKS, **OUTSIDE}:
        rule, index, _ = flux.match(name, Naming.ORIGINAL)
        parts = {flux.module_name(rule, index, Naming.DIFFUSERS, j) for j in range(len(rule.parts))}
        if parts <= changed:
            applied.add(kohya(name))
        else:
            assert not parts & changed, name  # all or nothing
    assert applied == {kohya(n) for n in BLOCKS}
    assert said == {kohya(n) for n in OUTSIDE} | {T5, diff_b}  # what diffusers left out, exactly


def test_our_flux_kohya_output_has_no_module_diffusers_drops_beyond_the_outside_ones(tmp_path):
    """A file of block modules only: check finds nothing dropped (exit 0)."""
    g = torch.Generator().manual_seed(1)
    sd = {}
    for name, (o, i) in BLOCKS.items():
        sd.update(factors(kohya(name), o, i, g))
    save_file(sd, str(tmp_path / "blocks.safetensors"))
    result = CliRunner().invoke(main, ["check", str(tmp_path / "blocks.safetensors"), "--for", "diffusers"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output


UNET = dict(block_out_channels=(32, 64), layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, sample_size=8,
            attention_head_dim=4, norm_num_groups=8)
# LDM name -> diffusers name of the tiny UNet (layers_per_block 1: input_blocks 1 = down_blocks.0, output_blocks 2, 3
# = up_blocks.1's attentions 0, 1)
LDM = {"input_blocks.1.1.proj_in": "down_blocks.0.attentions.0.proj_in",
       "middle_block.1.proj_in": "mid_block.attentions.0.proj_in",
       "output_blocks.3.1.proj_in": "up_blocks.1.attentions.1.proj_in"}
WIDTH = {"input_blocks.1.1.proj_in": 32, "middle_block.1.proj_in": 64, "output_blocks.3.1.proj_in": 32}


def sd15_pipe():
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**UNET)
    return diffusers.StableDiffusionPipeline(vae=None, text_encoder=None, tokenizer=None, unet=unet,
                                             scheduler=diffusers.DDIMScheduler(), safety_checker=None,
                                             feature_extractor=None, requires_safety_checker=False)


def test_sd1_ldm_names_are_said_and_the_workaround_loads_them(tmp_path):
    g = torch.Generator().manual_seed(2)
    sd = {}
    for name, width in WIDTH.items():
        sd.update(factors(kohya(name), width, width, g, conv=True))
    path = tmp_path / "ldm.safetensors"
    save_file(sd, str(path))
    result = CliRunner().invoke(main, ["check", str(path), "--for", "diffusers"], catch_exceptions=False)
    assert result.exit_code == 1
    (line,) = [ln for ln in result.output.splitlines() if "LDM UNet names" in ln]
    assert "3 modules" in line and "unet_config" in line and "load_lora_into_unet" in line

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = sd15_pipe()
        with pytest.raises(Exception, match="not found in the base model"):  # what load_lora_weights does
            pipe.load_lora_weights(str(path))
        pipe = sd15_pipe()
        before = fused_weights(pipe.unet)
        state, alphas = pipe.lora_state_dict(str(path), unet_config=pipe.unet.config)  # the workaround check gives
        pipe.load_lora_into_unet(state, alphas, pipe.unet, adapter_name="x")
        pipe.fuse_lora(components=["unet"])
    after = fused_weights(pipe.unet)
    for ldm, name in LDM.items():
        key = kohya(ldm)
        delta = (sd[f"{key}.lora_up.weight"].flatten(1) @ sd[f"{key}.lora_down.weight"].flatten(1)) * 0.5  # alpha 1/r 2
        torch.testing.assert_close(after[f"{name}.weight"].flatten(1), before[f"{name}.weight"].flatten(1) + delta,
                                   rtol=1e-5, atol=1e-5)
