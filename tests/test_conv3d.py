"""Conv3d weights (5-D, HunyuanVideo's ``img_in.proj`` / diffusers' ``x_embedder.proj``) are factored like Conv2d: the
kernel in lora_A / lora_down (r, in, kt, kh, kw), lora_B / lora_up a 1x1x1 conv (out, r, 1, 1, 1). PEFT and diffusers
(through PEFT) load the file and merge exactly W0 + delta; apply and convert keep the product."""

from __future__ import annotations

import warnings

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from lowrank_tools.cli import main

RANK = 2


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Conv3d(4, 16, (2, 2, 2), stride=(1, 2, 2))
        self.lin = torch.nn.Linear(16, 16)


def planted(w: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(w.shape[0], RANK, generator=g) @ torch.randn(RANK, w[0].numel(), generator=g)).reshape(
        w.shape) * 0.1


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def pair(tmp_path):
    torch.manual_seed(0)
    base = {k: v.detach().clone() for k, v in Tiny().state_dict().items()}
    tuned = dict(base, **{"proj.weight": base["proj.weight"] + planted(base["proj.weight"], 1)})
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(tuned, str(tmp_path / "tuned.safetensors"))
    return tmp_path, base, tuned


def test_kohya_and_peft_hold_the_kernel_in_a_and_a_1x1x1_b(pair):
    tmp_path, base, tuned = pair
    for out, down, up in ((tmp_path / "k.safetensors", "lora_unet_proj.lora_down.weight",
                           "lora_unet_proj.lora_up.weight"),
                          (tmp_path / "peft", "base_model.model.proj.lora_A.weight",
                           "base_model.model.proj.lora_B.weight")):
        r = run("extract", tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", "-o", out, "-r", RANK, "-q")
        assert r.exit_code == 0, r.output
        f = load_file(str(out if out.suffix else out / "adapter_model.safetensors"))
        assert f[down].shape == (RANK, 4, 2, 2, 2) and f[up].shape == (16, RANK, 1, 1, 1)
        product = (f[up].flatten(1) @ f[down].flatten(1)).reshape(base["proj.weight"].shape)
        assert torch.allclose(product, tuned["proj.weight"] - base["proj.weight"], atol=1e-6)  # alpha = r: scale 1


def test_peft_loads_the_conv3d_lora_and_merges_the_tuned_weight(pair):
    from peft import PeftModel

    tmp_path, base, tuned = pair
    assert run("extract", tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", "-o", tmp_path / "peft",
               "-r", RANK, "-q").exit_code == 0
    model = Tiny()
    model.load_state_dict(base)
    merged = PeftModel.from_pretrained(model, str(tmp_path / "peft")).merge_and_unload()
    assert isinstance(merged.proj, torch.nn.Conv3d)
    assert torch.allclose(merged.proj.weight, tuned["proj.weight"], atol=1e-6)


def test_apply_and_convert_keep_the_product(pair):
    tmp_path, base, tuned = pair
    kohya = tmp_path / "k.safetensors"
    assert run("extract", tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", "-o", kohya, "-r", RANK,
               "-q").exit_code == 0
    assert run("convert", kohya, "-o", tmp_path / "p").exit_code == 0
    assert run("convert", tmp_path / "p", "-o", tmp_path / "k2.safetensors").exit_code == 0
    for adapter in (kohya, tmp_path / "p", tmp_path / "k2.safetensors"):
        out = tmp_path / f"applied-{adapter.stem}.safetensors"
        r = run("apply", tmp_path / "base.safetensors", adapter, "-o", out, "-q")
        assert r.exit_code == 0, r.output
        got = load_file(str(out))
        assert torch.allclose(got["proj.weight"], tuned["proj.weight"], atol=1e-6), adapter.name
        assert torch.equal(got["lin.weight"], base["lin.weight"])


def test_diffusers_hunyuan_video_loads_the_x_embedder_lora(tmp_path):
    """A tiny HunyuanVideoTransformer3DModel: its patch embedding is a Conv3d; diffusers' load_lora_adapter (PEFT
    underneath) takes our factors and fuse_lora gives the tuned weight."""
    diffusers = pytest.importorskip("diffusers")
    config = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
                  num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=16,
                  pooled_projection_dim=8, rope_axes_dim=(2, 2, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        diffusers.HunyuanVideoTransformer3DModel(**config).save_pretrained(tmp_path / "base")
        model = diffusers.HunyuanVideoTransformer3DModel.from_pretrained(tmp_path / "base")
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    name = "x_embedder.proj.weight"
    assert base[name].ndim == 5
    tuned = dict(base, **{name: base[name] + planted(base[name], 2)})
    save_file(tuned, str(tmp_path / "tuned.safetensors"))
    r = run("extract", tmp_path / "base", tmp_path / "tuned.safetensors", "-o", tmp_path / "peft", "-r", RANK, "-q")
    assert r.exit_code == 0, r.output
    state = {k.removeprefix("base_model.model."): v
             for k, v in load_file(str(tmp_path / "peft" / "adapter_model.safetensors")).items()}
    assert set(state) == {"x_embedder.proj.lora_A.weight", "x_embedder.proj.lora_B.weight"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.load_lora_adapter(state, prefix=None)
        model.fuse_lora()
        model.unload_lora()
    assert torch.allclose(model.state_dict()[name], tuned[name], atol=1e-6)
