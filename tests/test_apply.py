"""apply: W0 + sum_i w_i scale_i B_i A_i, streamed; reproduces the tuned model and PEFT's merge_and_unload."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from conftest import LLAMA_SHAPES, make_pair
from lowrank_tools.adapter import Adapter, LoraModule, ModuleKind
from lowrank_tools.apply import applied_tensors, apply, plan_apply
from lowrank_tools.io.checkpoint import as_checkpoint, open_checkpoint
from lowrank_tools.cli import main
from lowrank_tools.errors import AdapterMismatch, OutputError, UsageError
from lowrank_tools.extract import extract
from lowrank_tools.io.formats import load_adapter
from lowrank_tools.linalg import RankRule
from lowrank_tools.weighted import WeightedAdapter
from test_resize import random_module


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_full_rank_extract_then_apply_reproduces_tuned(planted_files, tmp_path):
    base_path, tuned_path, base, tuned = planted_files
    adapter = extract(base_path, tuned_path, rule=RankRule(rank=64)).adapter
    result = apply(base_path, [adapter], tmp_path / "out.safetensors")
    out = load_file(str(tmp_path / "out.safetensors"))
    assert list(out) == list(open_checkpoint(base_path).keys())  # every tensor, in the base's order
    for name, t in out.items():
        if t.ndim == 2:
            assert torch.allclose(t, tuned[name], atol=1e-5, rtol=1e-5), name
        else:  # not in the adapter: copied unchanged
            assert torch.equal(t, base[name])
    assert set(result.modified) == {n for n, s in LLAMA_SHAPES.items() if len(s) == 2}
    assert result.files == [tmp_path / "out.safetensors"] and result.tensors == len(LLAMA_SHAPES)


def test_weighted_adapters_add_up_and_dtype_is_kept(tmp_path):
    base, _ = make_pair(LLAMA_SHAPES, dtype=torch.bfloat16)
    q, up = "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj"
    a = Adapter(modules={q: random_module(32, 32, 4, alpha=8.0, seed=1), up: random_module(48, 32, 2, seed=2)})
    b = Adapter(modules={q: random_module(32, 32, 6, alpha=2.0, seed=3, rslora=True)})
    apply(base, [(a, 0.5), (b, -1.0)], tmp_path / "out.safetensors")
    out = load_file(str(tmp_path / "out.safetensors"))
    assert {t.dtype for t in out.values()} == {torch.bfloat16}
    want = base[f"{q}.weight"].float() + 0.5 * a.modules[q].delta() - b.modules[q].delta()
    assert torch.allclose(out[f"{q}.weight"].float(), want, rtol=2**-7, atol=1e-6)  # one bf16 rounding
    assert torch.equal(out["model.layers.0.self_attn.v_proj.weight"], base["model.layers.0.self_attn.v_proj.weight"])
    apply(base, [(a, 0.5)], tmp_path / "f32.safetensors", dtype=torch.float32)
    f32 = load_file(str(tmp_path / "f32.safetensors"))
    assert {t.dtype for t in f32.values()} == {torch.float32}
    assert torch.allclose(f32[f"{up}.weight"], base[f"{up}.weight"].float() + 0.5 * a.modules[up].delta(), atol=1e-6)


def test_conv_embedding_and_linear_on_1x1_conv(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {"conv.weight": torch.randn(12, 6, 3, 3, generator=g), "proj.weight": torch.randn(8, 6, 1, 1, generator=g),
            "embed.weight": torch.randn(50, 24, generator=g)}
    adapter = Adapter(modules={
        "conv": random_module(12, 54, 4, kind=ModuleKind.CONV, weight_shape=(12, 6, 3, 3)),
        "proj": random_module(8, 6, 2, seed=1),  # a linear LoRA on a 1x1 conv kernel
        "embed": random_module(24, 50, 3, seed=2, kind=ModuleKind.EMBEDDING, weight_shape=(50, 24))})
    stream = dict(applied_tensors(as_checkpoint(base), plan_apply(as_checkpoint(base), [WeightedAdapter(adapter)])[0]))
    for name, m in adapter.modules.items():
        assert torch.allclose(stream[f"{name}.weight"], base[f"{name}.weight"] + m.delta().reshape(base[f"{name}.weight"].shape),
                              atol=1e-6)


@pytest.mark.parametrize("module, make, pattern", [
    ("model.layers.9.q_proj", lambda: random_module(32, 32, 2), r"module model\.layers\.9\.q_proj is not in base"),
    ("model.layers.0.self_attn.q_proj", lambda: random_module(32, 48, 2),
     r"module model\.layers\.0\.self_attn\.q_proj is linear \(32, 48\) but base tensor .* is float32 \(32, 32\)"),
])
def test_mismatched_adapters_are_refused_before_writing(tmp_path, module, make, pattern):
    base, _ = make_pair(LLAMA_SHAPES)
    with pytest.raises(AdapterMismatch, match=pattern):
        apply(base, [Adapter(modules={module: make()})], tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_output_equal_to_base_and_pipeline_base_are_refused(planted_files, tmp_path):
    base_path = planted_files[0]
    before = base_path.read_bytes()
    with pytest.raises(OutputError, match="also an input"):
        apply(base_path, [], base_path, force=True)
    assert base_path.read_bytes() == before
    pipe = tmp_path / "pipe"
    (pipe / "unet").mkdir(parents=True)
    (pipe / "model_index.json").write_text("{}")
    save_file({"a.weight": torch.zeros(2, 2)}, str(pipe / "unet" / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(UsageError, match="is a diffusers pipeline: .* give one component folder"):
        apply(pipe, [], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_shard_size_needs_a_folder(tmp_path):
    base = {"a.weight": torch.randn(4, 4)}
    with pytest.raises(UsageError, match=r"--shard-size 1MB needs a folder output, but -o .*x\.safetensors is one"):
        apply(base, [], tmp_path / "x.safetensors", shard_size="1MB")
    assert not (tmp_path / "x.safetensors").exists()
    assert apply(base, [], tmp_path / "y.safetensors").files == [tmp_path / "y.safetensors"]  # no size: one file


def test_component_folder_keeps_diffusers_names_and_config(tmp_path):
    unet = tmp_path / "unet"
    unet.mkdir()
    base = {"down.0.proj.weight": torch.randn(16, 8), "down.0.norm.weight": torch.ones(16)}
    save_file(base, str(unet / "diffusion_pytorch_model.safetensors"))
    (unet / "config.json").write_text('{"_class_name": "UNet2DConditionModel"}')
    adapter = Adapter(modules={"unet.down.0.proj": random_module(16, 8, 2)})  # a pipeline adapter's names
    result = apply(unet, [adapter], tmp_path / "out", shard_size="200")
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["config.json", "diffusion_pytorch_model-00001-of-00002.safetensors",
                     "diffusion_pytorch_model-00002-of-00002.safetensors", "diffusion_pytorch_model.safetensors.index.json"]
    assert result.copied == ["config.json"]
    merged = open_checkpoint(tmp_path / "out")
    assert torch.allclose(merged.get("down.0.proj.weight"),
                          base["down.0.proj.weight"] + adapter.modules["unet.down.0.proj"].delta(), atol=1e-6)


# ---------------------------------------------------------------------------------- a real consumer: PEFT

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def llama_with_lora(tmp_path_factory):
    """A tiny Llama saved in shards, and a PEFT LoRA on it (random B, rsLoRA, embeddings and lm_head too)."""
    root = tmp_path_factory.mktemp("llama-lora")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=96, max_position_embeddings=64)
    transformers.LlamaForCausalLM(config).save_pretrained(root / "base", max_shard_size="40KB")
    lora = peft.LoraConfig(r=4, lora_alpha=8, use_rslora=True, init_lora_weights=False,
                           target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens", "lm_head"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(root / "base"), lora)
        model.save_pretrained(root / "adapter")
        merged = model.merge_and_unload().eval()
    return root, merged


def test_apply_equals_peft_merge_and_unload(llama_with_lora, tmp_path):
    root, merged = llama_with_lora
    assert (root / "base" / "model.safetensors.index.json").is_file()  # a sharded base
    res = run("apply", root / "base", root / "adapter", "-o", tmp_path / "out", "--shard-size", "40KB", "-q")
    assert res.exit_code == 0, res.output
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and (tmp_path / "out" / "config.json").is_file()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    want = merged.state_dict()
    for name, t in ours.state_dict().items():
        assert torch.allclose(t, want[name], atol=1e-6, rtol=1e-6), name
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(ours(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-5)


def test_cli_apply_weights_single_file_and_bad_input(llama_with_lora, tmp_path):
    root, merged = llama_with_lora
    out = tmp_path / "half.safetensors"
    res = run("apply", root / "base", f"{root / 'adapter'}:0.5", "-o", out, "-q")
    assert res.exit_code == 0, res.output
    base = open_checkpoint(root / "base")
    adapter = load_adapter(root / "adapter")
    name = "model.layers.1.mlp.down_proj"
    want = base.get(f"{name}.weight") + 0.5 * adapter.modules[name].delta()
    assert torch.allclose(load_file(str(out))[f"{name}.weight"], want, atol=1e-6)
    for args, code, pattern in [
        ([f"{root / 'adapter'}:x"], 2, "weight 'x' is not a number"),
        ([root / "adapter", "--shard-size", "5 parsecs"], 2, "is not a size"),
        ([root / "adapter", "--force", "-o", root / "base"], 1, "also an input"),
        ([root / "adapter", "--shard-size", "1MB", "-o", tmp_path / "bad.safetensors"], 2, "needs a folder output"),
    ]:
        target = tmp_path / "bad"
        res = run("apply", root / "base", *args, *([] if "-o" in args else ["-o", target]))
        assert res.exit_code == code, res.output
        assert pattern in res.output and "Traceback" not in res.output
        assert not target.exists() and not (tmp_path / "bad.safetensors").exists()


def test_cli_apply_foreign_kohya_file_matches_base_names(tmp_path):
    """A kohya file without our name record: its keys are matched to the base's module names."""
    base, _ = make_pair(LLAMA_SHAPES)
    save_file(base, str(tmp_path / "base.safetensors"))
    m = random_module(48, 32, 4, alpha=2.0)
    key = "lora_unet_model_layers_0_mlp_up_proj"
    save_file({f"{key}.lora_down.weight": m.A, f"{key}.lora_up.weight": m.B, f"{key}.alpha": torch.tensor(2.0)},
              str(tmp_path / "lora.safetensors"))
    res = run("apply", tmp_path / "base.safetensors", f"{tmp_path / 'lora.safetensors'}:2", "-o", tmp_path / "out.safetensors", "-q")
    assert res.exit_code == 0, res.output
    out = load_file(str(tmp_path / "out.safetensors"))
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.allclose(out[name], base[name] + 2 * m.delta(), atol=1e-6)


def test_float16_overflow_is_an_error_and_writes_nothing(tmp_path):
    from lowrank_tools.errors import NumericalError

    base = {"w.weight": torch.full((4, 4), 60000.0, dtype=torch.float16)}
    adapter = Adapter(modules={"w": LoraModule(B=torch.ones(4, 1), A=torch.full((1, 4), 10000.0), alpha=1.0)})
    with pytest.raises(NumericalError, match=r"w\.weight overflows torch\.float16: pass --dtype float32"):
        apply(base, [adapter], tmp_path / "out.safetensors")
    assert list(tmp_path.iterdir()) == []
    apply(base, [adapter], tmp_path / "out.safetensors", dtype=torch.float32)
    assert torch.equal(load_file(str(tmp_path / "out.safetensors"))["w.weight"], torch.full((4, 4), 70000.0))


def test_header_bound_holds_every_header(tmp_path):
    """apply reserves the safetensors header up front (header_bound): it must never be smaller than the header."""
    import struct

    from lowrank_tools.io.atomic import ShardedWriter, header_bound

    tensors = {"a": torch.zeros(()), "b" * 200: torch.zeros(3, dtype=torch.int8), "é.weight": torch.zeros(7, 1, 2),
               **{f"model.layers.{i}.mlp.up_proj.weight": torch.zeros(2, 3, dtype=torch.bfloat16) for i in range(300)}}
    meta = {"lowrank_tools.applied": json.dumps([{"adapter": "x", "weight": 0.5}])}
    bound = header_bound([(k, t.dtype, t.shape) for k, t in tensors.items()], meta)
    with ShardedWriter(tmp_path / "x.safetensors", shard_size=None, metadata=meta, header_reserve=bound) as writer:
        for k, t in tensors.items():
            writer.add(k, t)
    raw = (tmp_path / "x.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = raw[8:8 + length].rstrip(b" ")
    assert len(header) <= bound <= length  # reserved at once, never shifted
    assert load_file(str(tmp_path / "x.safetensors")).keys() == tensors.keys()


def test_tied_head_without_stored_weight_gets_the_delta_once(tmp_path):
    """extract on a tied model writes the delta on both sides; apply adds it once to the shared weight."""
    from test_peft_consumer import fine_tuned_copy, tiny_llama

    base = tiny_llama(tie=True)
    tuned = fine_tuned_copy(base)
    base.save_pretrained(tmp_path / "base")
    tuned.save_pretrained(tmp_path / "tuned")
    assert "lm_head.weight" not in open_checkpoint(tmp_path / "base")
    adapter = extract(tmp_path / "base", tmp_path / "tuned", rule=RankRule(rank=96)).adapter
    assert {"lm_head", "model.embed_tokens"} <= set(adapter.modules)
    apply(tmp_path / "base", [adapter], tmp_path / "out")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    want = tuned.state_dict()
    for name, t in ours.state_dict().items():
        assert torch.allclose(t, want[name], atol=1e-5), name
    untied = Adapter(modules={"lm_head": random_module(96, 32, 2)})  # a head LoRA of its own: added to the shared weight
    apply(tmp_path / "base", [untied], tmp_path / "own.safetensors")
    emb = "model.embed_tokens.weight"
    got = load_file(str(tmp_path / "own.safetensors"))[emb]
    assert torch.allclose(got, base.state_dict()[emb] + untied.modules["lm_head"].delta(), atol=1e-6)
