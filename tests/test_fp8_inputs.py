"""fp8 checkpoints (plain F8_E4M3 / F8_E5M2 and ComfyUI's scaled fp8) read dequantized: extract against them is
exact against W = fp8.float() * scale, their scale keys are not modules, apply writes them back as bfloat16."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import planted_delta
from lowrank_tools.apply import apply
from lowrank_tools.cli import main
from lowrank_tools.errors import UnsupportedTensor
from lowrank_tools.extract import extract
from lowrank_tools.io.checkpoint import open_checkpoint
from lowrank_tools.io.formats import load_adapter
from lowrank_tools.linalg import RankRule

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
SHAPES = {"blocks.0.attn.qkv": (48, 32), "blocks.0.mlp.fc": (40, 32), "blocks.1.conv": (16, 8, 3, 3)}


def _fp8_base(tmp_path, *, how: str, fp8=E4M3, name="base.safetensors"):
    """A checkpoint whose weights are fp8: ``how`` = plain | scale_weight (ComfyUI legacy, scalar scale, marker,
    input scales) | weight_scale (per-row scale, comfy_quant records, _quantization_metadata). Returns the path and
    the dequantized weights ({tensor: float32}) by this test's own formula."""
    g = torch.Generator().manual_seed(0)
    tensors, deq = {}, {}
    for mod, shape in SHAPES.items():
        W = torch.randn(shape, generator=g) * 0.05
        if how == "plain":
            w8, scale = W.to(fp8), None
        elif how == "scale_weight":
            scale = W.abs().amax() / 448.0  # float32 scalar, as ComfyUI writes it
            w8 = (W / scale).to(fp8)
            tensors[f"{mod}.scale_weight"] = scale.reshape(())
            tensors[f"{mod}.scale_input"] = torch.tensor(1.0)
        else:  # per output row
            scale = W.reshape(shape[0], -1).abs().amax(1) / 448.0  # (out,)
            w8 = (W / scale.reshape((-1,) + (1,) * (W.ndim - 1))).to(fp8)
            tensors[f"{mod}.weight_scale"] = scale
            tensors[f"{mod}.input_scale"] = torch.tensor(1.0)
            tensors[f"{mod}.comfy_quant"] = torch.tensor(list(b'{"format": "float8_e4m3fn"}'), dtype=torch.uint8)
        tensors[f"{mod}.weight"] = w8
        tensors[f"{mod}.bias"] = torch.randn(shape[0], generator=g).to(torch.bfloat16)  # stays bf16
        s = 1.0 if scale is None else scale.reshape((-1,) + (1,) * (W.ndim - 1)) if scale.ndim else scale
        deq[f"{mod}.weight"] = w8.float() * s
    if how == "scale_weight":
        tensors["scaled_fp8"] = torch.empty(0, dtype=fp8)
    quant = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": {}})}
    meta = quant if how == "weight_scale" else None
    save_file(tensors, str(tmp_path / name), metadata=meta)
    return tmp_path / name, deq, tensors


def _tuned(tmp_path, deq, *, dtype=torch.float32, k=3):
    """deq + a planted rank-k delta per weight, saved in ``dtype``; biases equal the base's (as bf16)."""
    tuned, deltas = {}, {}
    for i, (name, W) in enumerate(deq.items()):
        out = W.shape[0]
        d = planted_delta(out, W[0].numel(), k, seed=10 + i, scale=0.01).reshape(W.shape)
        deltas[name] = d
        tuned[name] = (W + d).to(dtype)
        tuned[name.replace(".weight", ".bias")] = torch.zeros(out, dtype=torch.bfloat16)
    save_file(tuned, str(tmp_path / "tuned.safetensors"))
    return tmp_path / "tuned.safetensors", tuned, deltas


@pytest.mark.parametrize("how", ["plain", "scale_weight", "weight_scale"])
def test_reader_dequantizes_and_hides_scale_keys(tmp_path, how):
    path, deq, stored = _fp8_base(tmp_path, how=how)
    ckpt = open_checkpoint(path)
    assert set(ckpt.keys()) == {f"{m}.{leaf}" for m in SHAPES for leaf in ("weight", "bias")}
    assert "_quantization_metadata" not in ckpt.metadata
    for name, want in deq.items():
        assert ckpt.dtype(name) == torch.float32 and ckpt.write_dtype(name) == torch.bfloat16
        got = ckpt.get(name)
        assert got.dtype == torch.float32 and torch.equal(got, want), name
    bias = "blocks.0.attn.qkv.bias"
    assert ckpt.dtype(bias) == ckpt.write_dtype(bias) == torch.bfloat16 and torch.equal(ckpt.get(bias), stored[bias])


def test_e5m2_and_in_memory_mappings_are_read_too(tmp_path):
    path, deq, stored = _fp8_base(tmp_path, how="plain", fp8=E5M2)
    name = "blocks.0.mlp.fc.weight"
    assert torch.equal(open_checkpoint(path).get(name), deq[name])
    from lowrank_tools.io.checkpoint import as_checkpoint
    mem = as_checkpoint(stored)
    assert mem.dtype(name) == torch.float32 and torch.equal(mem.get(name), deq[name])


@pytest.mark.parametrize("how", ["plain", "scale_weight", "weight_scale"])
def test_extract_against_fp8_base_is_exact_against_the_dequantized_weights(tmp_path, how):
    base, deq, _ = _fp8_base(tmp_path, how=how)
    tuned, _, deltas = _tuned(tmp_path, deq)
    result = extract(base, tuned, rule=RankRule(rank=3))
    assert set(result.adapter.modules) == set(SHAPES)  # the scale keys and the marker are no modules
    for mod, m in result.adapter.modules.items():
        want = deltas[f"{mod}.weight"]
        got = m.delta().reshape(want.shape)
        assert torch.allclose(got, want, atol=1e-6, rtol=0), mod  # the planted rank-3 delta, to float32 rounding
        assert m.rank == 3


def test_bf16_finetune_against_scaled_fp8_base_equals_the_full_rank_delta(tmp_path):
    """The common pair: a bf16 fine-tune, an fp8 base. At full rank the adapter is tuned - dequantized base."""
    base, deq, _ = _fp8_base(tmp_path, how="scale_weight")
    tuned, tuned_t, _ = _tuned(tmp_path, deq, dtype=torch.bfloat16)
    adapter = extract(base, tuned, rule=RankRule(rank=64), dtype=torch.float32).adapter  # factors kept float32
    for mod, m in adapter.modules.items():
        want = tuned_t[f"{mod}.weight"].float() - deq[f"{mod}.weight"]
        assert torch.allclose(m.delta().reshape(want.shape), want, atol=2e-6), mod


def test_apply_onto_fp8_base_writes_bfloat16_or_the_asked_dtype(tmp_path):
    base, deq, stored = _fp8_base(tmp_path, how="weight_scale")
    tuned, _, deltas = _tuned(tmp_path, deq)
    adapter = extract(base, tuned, rule=RankRule(rank=3)).adapter
    apply(base, [adapter], tmp_path / "out.safetensors")
    out = load_file(str(tmp_path / "out.safetensors"))
    assert set(out) == {f"{m}.{leaf}" for m in SHAPES for leaf in ("weight", "bias")}  # no scale, record, marker
    with safe_open(str(tmp_path / "out.safetensors"), "pt") as f:
        assert "_quantization_metadata" not in (f.metadata() or {})
    for name, W in deq.items():
        want = (W + adapter.modules[name[:-len(".weight")]].delta().reshape(W.shape)).to(torch.bfloat16)
        assert out[name].dtype == torch.bfloat16 and torch.equal(out[name], want), name
        bias = name.replace(".weight", ".bias")
        assert torch.equal(out[bias], stored[bias])  # untouched bf16 bias: the very bytes
    apply(base, [adapter], tmp_path / "f32.safetensors", dtype=torch.float32)
    f32 = load_file(str(tmp_path / "f32.safetensors"))
    name = "blocks.0.attn.qkv.weight"
    assert f32[name].dtype == torch.float32
    assert torch.allclose(f32[name], deq[name] + deltas[name], atol=1e-6)


def test_untouched_fp8_tensor_is_written_dequantized_as_bf16(tmp_path):
    base, deq, _ = _fp8_base(tmp_path, how="scale_weight")
    tuned, _, _ = _tuned(tmp_path, deq)
    adapter = extract(base, tuned, rule=RankRule(rank=3), exclude=["conv"]).adapter
    apply(base, [adapter], tmp_path / "out.safetensors")
    out = load_file(str(tmp_path / "out.safetensors"))
    assert torch.equal(out["blocks.1.conv.weight"], deq["blocks.1.conv.weight"].to(torch.bfloat16))


def test_scale_of_no_known_layout_is_refused_in_one_line(tmp_path):
    """(2, 2) for an (8, 8) weight: not a scalar, not per row, not the (1, 1) grid of 128x128 blocks."""
    w8 = torch.randn(8, 8).to(E4M3)
    save_file({"m.weight": w8, "m.weight_scale": torch.ones(2, 2)}, str(tmp_path / "b.safetensors"))
    with pytest.raises(UnsupportedTensor, match=r"m\.weight .* scale of shape \(2, 2\).*128x128 block \(1, 1\)"):
        open_checkpoint(tmp_path / "b.safetensors").get("m.weight")


def test_cli_extract_and_apply_with_fp8_base(tmp_path):
    base, deq, _ = _fp8_base(tmp_path, how="scale_weight")
    tuned, _, deltas = _tuned(tmp_path, deq)
    lora = tmp_path / "lora.safetensors"
    r = CliRunner().invoke(main, ["extract", str(base), str(tuned), "-o", str(lora), "-r", "3", "-q"])
    assert r.exit_code == 0, r.output
    adapter = load_adapter(lora)
    assert {k.split(".")[0] for k in load_file(str(lora))} == {
        "lora_unet_blocks_0_attn_qkv", "lora_unet_blocks_0_mlp_fc", "lora_unet_blocks_1_conv"}
    m = adapter.modules["blocks.0.mlp.fc"]
    assert torch.allclose(m.delta(), deltas["blocks.0.mlp.fc.weight"], atol=1e-6)
    out = tmp_path / "applied.safetensors"
    r = CliRunner().invoke(main, ["apply", str(base), str(lora), "-o", str(out), "-q"])
    assert r.exit_code == 0, r.output
    assert load_file(str(out))["blocks.0.mlp.fc.weight"].dtype == torch.bfloat16
