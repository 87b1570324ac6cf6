"""Block-wise fp8 (``weight_scale_inv``, DeepSeek-V3 / Qwen3-FP8 / transformers' FineGrainedFP8) read dequantized,
ragged last blocks included, the block size from config.json; scale keys found in another shard through the index;
apply writes bf16 and a config.json without ``quantization_config``."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import planted_delta
from lowrank_tools.apply import apply
from lowrank_tools.errors import CorruptCheckpoint, UnsupportedTensor
from lowrank_tools.extract import extract
from lowrank_tools.io.checkpoint import open_checkpoint
from lowrank_tools.linalg import RankRule

E4M3 = torch.float8_e4m3fn
SHAPES = {"layers.0.mlp.up": (256, 384), "layers.0.attn.o": (300, 200), "layers.1.mlp.down": (130, 257)}


def expand(scale: torch.Tensor, shape, block) -> torch.Tensor:
    """The scale of every element: each grid value copied over its block (this test's own formula: kron)."""
    bn, bk = block
    full = torch.kron(scale, torch.ones(bn, bk))
    return full[..., :shape[-2], :shape[-1]]


def quantize(W: torch.Tensor, block=(128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """(w8, weight_scale_inv) as DeepSeek-V3 / transformers store them: one float32 per block, W ~ w8 * scale."""
    bn, bk = block
    n, k = W.shape
    grid = torch.empty(-(-n // bn), -(-k // bk))
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            grid[i, j] = W[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk].abs().amax().clamp_min(1e-12) / 448.0
    return (W / expand(grid, W.shape, block)).to(E4M3), grid


def block_base(folder, *, block=(128, 128), config_block=True, shards=False):
    """An HF folder of a bf16 base quantized to block fp8 (config.json says the block unless ``config_block`` is
    False). ``shards``: two shards, each weight's scale in the other one. Returns (bf16 base, dequantized)."""
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    tensors, deq, bf16 = {}, {}, {}
    for mod, shape in SHAPES.items():
        W = (torch.randn(shape, generator=g) * 0.05).to(torch.bfloat16)
        w8, grid = quantize(W.float(), block)
        tensors[f"{mod}.weight"], tensors[f"{mod}.weight_scale_inv"] = w8, grid
        tensors[f"{mod}.bias"] = torch.randn(shape[0], generator=g).to(torch.bfloat16)
        bf16[f"{mod}.weight"], deq[f"{mod}.weight"] = W, w8.float() * expand(grid, shape, block)
    quant = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3"}
    if config_block:
        quant["weight_block_size"] = list(block)
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen3", "torch_dtype": "bfloat16",
                                                    "quantization_config": quant}))
    if not shards:
        save_file(tensors, str(folder / "model.safetensors"))
        return bf16, deq
    names = sorted(tensors)
    weights = [n for n in names if n.endswith(".weight")]
    one = {n: f"model-0000{1 + (weights.index(n) % 2)}-of-00002.safetensors" for n in weights}
    for n in names:  # a scale lies in the shard its weight is not in; a bias beside its weight
        if n.endswith(".weight_scale_inv"):
            w = one[n[:-len("_scale_inv")]]
            one[n] = w.replace("00001-of", "00002-of") if "00001-of" in w else w.replace("00002-of", "00001-of")
        elif n.endswith(".bias"):
            one[n] = one[n[:-len("bias")] + "weight"]
    for file in set(one.values()):
        save_file({n: tensors[n] for n in names if one[n] == file}, str(folder / file))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": one}))
    return bf16, deq


@pytest.mark.parametrize("shards", [False, True])
def test_block_fp8_reads_as_w8_times_its_block_scale_ragged_blocks_included(tmp_path, shards):
    _, deq = block_base(tmp_path / "base", shards=shards)
    ckpt = open_checkpoint(tmp_path / "base")
    assert ckpt.dequantized
    assert set(ckpt.keys()) == {f"{m}.{leaf}" for m in SHAPES for leaf in ("weight", "bias")}  # no scale key
    for name, want in deq.items():
        assert ckpt.dtype(name) == torch.float32 and ckpt.write_dtype(name) == torch.bfloat16
        assert torch.equal(ckpt.get(name), want), name


def test_block_dequantization_agrees_with_transformers_own(tmp_path):
    """transformers' FineGrainedFP8 dequantization (its backward's) is the consumer's definition of W: equal,
    for a ragged 2-D weight and a 3-D fused-experts one with a non-square block."""
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    g = torch.Generator().manual_seed(1)
    w8 = (torch.randn(2, 130, 129, generator=g) * 100).to(E4M3)
    scale = torch.rand(2, 3, 5, generator=g) + 0.1  # (ceil(130/64), ceil(129/32)) per expert
    save_file({"experts.w.weight": w8, "experts.w.weight_scale_inv": scale, "o.weight": w8[0].clone(),
               "o.weight_scale_inv": scale[0, :2, :2].clone()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"weight_block_size": [64, 32]}}))
    ckpt = open_checkpoint(tmp_path)
    want = _dequantize_fp8_weight(w8.clone(), scale, [64, 32], torch.float32)
    assert torch.equal(ckpt.get("experts.w.weight"), want)
    with pytest.raises(UnsupportedTensor, match=r"o\.weight of shape \(130, 129\) .* scale of shape \(2, 2\).*64x32 "
                                                r"block \(3, 5\)"):
        ckpt.get("o.weight")  # a wrong-shaped scale: refused by name, with the grid it should have


def test_block_size_comes_from_config_else_128(tmp_path):
    _, deq = block_base(tmp_path / "b64", block=(64, 64))
    name = "layers.0.attn.o.weight"
    assert torch.equal(open_checkpoint(tmp_path / "b64").get(name), deq[name])
    _, _ = block_base(tmp_path / "noconf", block=(64, 64), config_block=False)
    with pytest.raises(UnsupportedTensor, match=r"layers\.0\.attn\.o\.weight .*\(5, 4\).*128x128 block \(3, 2\).*"
                                                r"weight_block_size"):
        open_checkpoint(tmp_path / "noconf").get(name)
    save_file({"m.weight": torch.zeros(200, 130).to(E4M3), "m.weight_scale_inv": torch.full((2, 2), 0.5)},
              str(tmp_path / "single.safetensors"))  # a single file: 128x128, ragged
    assert torch.equal(open_checkpoint(tmp_path / "single.safetensors").get("m.weight"), torch.zeros(200, 130))


@pytest.mark.parametrize("bad", [[128], [128, 0], "128", [128.0, 128], [True, 128]])
def test_a_malformed_block_size_is_refused_by_field(tmp_path, bad):
    block_base(tmp_path / "base")
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    config["quantization_config"]["weight_block_size"] = bad
    (tmp_path / "base" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CorruptCheckpoint, match=r"config\.json: quantization_config\.weight_block_size is .*two "
                                                r"positive integers"):
        open_checkpoint(tmp_path / "base")


def test_compressed_tensors_block_structure_is_the_block(tmp_path):
    block_base(tmp_path / "base", block=(64, 64), config_block=False)
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "compressed-tensors", "config_groups": {"group_0": {
        "weights": {"num_bits": 8, "type": "float", "strategy": "block", "block_structure": [64, 64]}}}}
    (tmp_path / "base" / "config.json").write_text(json.dumps(config))
    assert open_checkpoint(tmp_path / "base").get("layers.0.attn.o.weight").shape == (300, 200)


def _tuned(tmp_path, start: dict, *, dtype, k=4, scale=0.05):
    tuned, deltas = {}, {}
    for i, (name, W) in enumerate(start.items()):
        d = planted_delta(W.shape[0], W.shape[1], k, seed=20 + i, scale=scale)
        deltas[name], tuned[name] = d, (W.float() + d).to(dtype)
    save_file(tuned, str(tmp_path / "tuned.safetensors"))
    return tmp_path / "tuned.safetensors", tuned, deltas


@pytest.mark.parametrize("shards", [False, True])
def test_extract_against_block_fp8_base_recovers_the_planted_delta(tmp_path, shards):
    """tuned = dequantized base + rank-4 delta: the delta exactly; a bf16 fine-tune of the bf16 model the fp8 base
    was quantized from: the delta to within twice the quantization + rounding error (best rank-4 of d + E)."""
    bf16, deq = block_base(tmp_path / "base", shards=shards)
    tuned, _, deltas = _tuned(tmp_path, deq, dtype=torch.float32)
    adapter = extract(tmp_path / "base", tuned, rule=RankRule(rank=4)).adapter
    assert set(adapter.modules) == set(SHAPES)
    for mod, m in adapter.modules.items():
        assert torch.allclose(m.delta(), deltas[f"{mod}.weight"], atol=2e-6), mod
    tuned, tuned_t, deltas = _tuned(tmp_path, bf16, dtype=torch.bfloat16)
    adapter = extract(tmp_path / "base", tuned, rule=RankRule(rank=4), dtype=torch.float32).adapter
    for mod, m in adapter.modules.items():
        name = f"{mod}.weight"
        E = tuned_t[name].float() - deq[name] - deltas[name]  # quantization error + bf16 rounding: full rank
        err = torch.linalg.matrix_norm(m.delta() - deltas[name])
        assert err <= 2 * torch.linalg.matrix_norm(E), mod
        assert err < 0.2 * torch.linalg.matrix_norm(deltas[name]), mod  # the bound says something


def test_apply_onto_block_fp8_folder_writes_bf16_without_scales_or_quantization_config(tmp_path):
    _, deq = block_base(tmp_path / "base", shards=True)
    tuned, _, _ = _tuned(tmp_path, deq, dtype=torch.float32)
    adapter = extract(tmp_path / "base", tuned, rule=RankRule(rank=4)).adapter
    out = tmp_path / "out"
    apply(tmp_path / "base", [adapter], out, shard_size="100KB")
    written = {}
    for f in sorted(out.glob("*.safetensors")):
        written.update(load_file(str(f)))
    assert set(written) == {f"{m}.{leaf}" for m in SHAPES for leaf in ("weight", "bias")}
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert not any("scale" in k for k in index["weight_map"])
    for name, W in deq.items():
        want = (W + adapter.modules[name[:-len(".weight")]].delta()).to(torch.bfloat16)
        assert written[name].dtype == torch.bfloat16 and torch.equal(written[name], want), name
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "qwen3"  # the rest kept
    source = json.loads((tmp_path / "base" / "config.json").read_text())
    assert "quantization_config" in source  # the input is never modified


def test_an_unquantized_base_config_is_copied_byte_for_byte(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    text = '{"model_type": "x",   "quantization_config": {"quant_method": "bitsandbytes"}}\n'  # odd spacing kept
    (base / "config.json").write_text(text)
    save_file({"m.weight": torch.randn(8, 8)}, str(base / "model.safetensors"))
    adapter = extract(base, {"m.weight": torch.randn(8, 8)}, rule=RankRule(rank=1)).adapter
    apply(base, [adapter], tmp_path / "out", shard_size="1MB")
    assert (tmp_path / "out" / "config.json").read_text() == text


def test_a_block_fp8_weight_whose_scale_is_in_no_shard_is_refused(tmp_path):
    """Read plainly, it would be 1/scale (~ hundreds of times) too large: named instead (DeepSeek's converter only
    warns and keeps the fp8)."""
    block_base(tmp_path / "base", shards=True)
    index = json.loads((tmp_path / "base" / "model.safetensors.index.json").read_text())
    dropped = "layers.0.attn.o.weight_scale_inv"
    shard = tmp_path / "base" / index["weight_map"].pop(dropped)
    save_file({k: v for k, v in load_file(str(shard)).items() if k != dropped}, str(shard))
    (tmp_path / "base" / "model.safetensors.index.json").write_text(json.dumps(index))
    ckpt = open_checkpoint(tmp_path / "base")
    assert ckpt.get("layers.0.mlp.up.weight").dtype == torch.float32  # the others still read
    with pytest.raises(UnsupportedTensor, match=r"layers\.0\.attn\.o\.weight in .* is fp8 without a scale"):
        ckpt.get("layers.0.attn.o.weight")


@pytest.mark.parametrize("leaf", ["scale_weight", "weight_scale"])
def test_comfyui_scale_in_the_other_shard_is_found_through_the_index(tmp_path, leaf):
    """Before: the weight read unscaled (~1/scale = 450x too large) and the scale listed as a tensor."""
    folder = tmp_path / "m"
    folder.mkdir()
    W = torch.randn(16, 8)
    s = W.abs().amax() / 448
    w8 = (W / s).to(E4M3)
    files = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    save_file({"m.weight": w8, "n.bias": torch.ones(3)}, str(folder / files[0]))
    save_file({f"m.{leaf}": s.reshape(())}, str(folder / files[1]))
    weight_map = {"m.weight": files[0], "n.bias": files[0], f"m.{leaf}": files[1]}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    ckpt = open_checkpoint(folder)
    assert sorted(ckpt.keys()) == ["m.weight", "n.bias"]
    assert torch.equal(ckpt.get("m.weight"), w8.float() * s)


def test_a_block_fp8_tuned_against_a_bf16_base_reads_the_same_way(tmp_path):
    """TUNED may be the fp8 side too: delta = dequantized tuned - base."""
    _, deq = block_base(tmp_path / "tuned")
    base = {name: W - planted_delta(W.shape[0], W.shape[1], 3, seed=i, scale=0.05)
            for i, (name, W) in enumerate(deq.items())}
    adapter = extract(base, tmp_path / "tuned", rule=RankRule(rank=3)).adapter
    for i, (name, W) in enumerate(deq.items()):
        want = planted_delta(W.shape[0], W.shape[1], 3, seed=i, scale=0.05)
        assert torch.allclose(adapter.modules[name[:-len(".weight")]].delta(), want, atol=2e-6), name
