"""Adapters from other tools (PEFT itself, mergekit-style configs, diffusers files), convert, info and bad input."""

from __future__ import annotations

import json
import re
import warnings

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lowrank_tools.adapter import Adapter, LoraModule, ModuleKind
from lowrank_tools.cli import main
from lowrank_tools.io.formats import describe_adapter, detect_format, load_adapter, save_adapter

peft = pytest.importorskip("peft")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(20, 6)
        self.conv = nn.Conv2d(3, 5, kernel_size=3)
        self.q_proj = nn.Linear(6, 8)
        self.mlp = nn.ModuleDict({"up_proj": nn.Linear(8, 12), "down_proj": nn.Linear(12, 8)})
        self.norm = nn.LayerNorm(8)


def peft_written(tmp_path, **config) -> tuple[nn.Module, object]:
    """An adapter saved by PEFT itself, with random (non-zero) factors."""
    model = peft.get_peft_model(Net(), peft.LoraConfig(init_lora_weights=False, **config))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(tmp_path / "peft")
    return model, load_adapter(tmp_path / "peft")


def peft_delta(model, name: str) -> torch.Tensor:
    return model.base_model.model.get_submodule(name).get_delta_weight("default")


def test_reads_what_peft_writes(tmp_path):
    targets = ["embed", "conv", "q_proj", "up_proj", "down_proj"]
    model, adapter = peft_written(tmp_path, r=4, lora_alpha=8, target_modules=targets, modules_to_save=["norm"],
                                  rank_pattern={"up_proj": 2}, alpha_pattern={"mlp\\..*": 3.0})
    assert set(adapter.modules) == {"embed", "conv", "q_proj", "mlp.up_proj", "mlp.down_proj"}
    assert adapter.modules["embed"].kind is ModuleKind.EMBEDDING and adapter.modules["conv"].kind is ModuleKind.CONV
    assert adapter.ranks["mlp.up_proj"] == 2 and adapter.modules["mlp.down_proj"].alpha == 3.0
    assert set(adapter.full_tensors) == {"norm.weight", "norm.bias"}
    for name, m in adapter.modules.items():
        assert torch.allclose(m.delta(), peft_delta(model, name), atol=1e-6), name
    # PEFT also saves a transformers model's base embedding beside its LoRA ("save_embedding_layers"): not a delta
    weights = tmp_path / "peft" / "adapter_model.safetensors"
    with safe_open(str(weights), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file({**tensors, "base_model.model.embed.base_layer.weight": torch.ones(20, 6)}, str(weights))
    again = load_adapter(tmp_path / "peft")
    assert set(again.modules) == set(adapter.modules) and any("base-layer tensors" in n for n in again.notes)


def test_mergekit_style_config_regex_patterns_and_rslora(tmp_path):
    """mergekit writes rank_pattern / alpha_pattern keyed by (regex) module names and may set use_rslora."""
    model, _ = peft_written(tmp_path, r=4, target_modules=["q_proj", "up_proj", "down_proj"],
                            rank_pattern={"up_proj": 3})
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    config.update(use_rslora=True, lora_alpha=6, alpha_pattern={r"mlp\.(up|down)_proj": 2.5, "down_proj": 99})
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps(config))
    adapter = load_adapter(tmp_path / "peft")
    reloaded = peft.PeftModel.from_pretrained(Net(), tmp_path / "peft")  # PEFT's own reading of the same config
    for name, m in adapter.modules.items():
        assert m.rslora and m.scale == pytest.approx(reloaded.base_model.model.get_submodule(name).scaling["default"])
        assert torch.allclose(m.delta(), peft_delta(reloaded, name), atol=1e-6)
    assert adapter.modules["mlp.down_proj"].alpha == 2.5  # the first matching pattern wins, as in PEFT
    assert adapter.modules["q_proj"].scale == pytest.approx(6 / 4 ** 0.5)


def test_reads_diffusers_files_with_and_without_lora_metadata(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    g = torch.Generator().manual_seed(0)
    unet = {"down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.randn(4, 8, 1, 1, generator=g),
            "down_blocks.0.attentions.0.proj_in.lora_B.weight": torch.randn(8, 4, 1, 1, generator=g),
            "mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.randn(2, 8, generator=g),
            "mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.randn(8, 2, generator=g)}
    te = {"text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(4, 16, generator=g),
          "text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(16, 4, generator=g)}
    meta = {"r": 4, "lora_alpha": 2, "rank_pattern": {"mid_block.attentions.0.transformer_blocks.0.attn1.to_q": 2},
            "alpha_pattern": {}, "target_modules": ["proj_in", "to_q"]}
    for folder, unet_meta in (("with", meta), ("without", None)):
        diffusers.StableDiffusionPipeline.save_lora_weights(tmp_path / folder, unet_lora_layers=unet,
                                                            text_encoder_lora_layers=te,
                                                            unet_lora_adapter_metadata=unet_meta)
    with_meta, without = load_adapter(tmp_path / "with"), load_adapter(tmp_path / "without")
    assert with_meta.source_format == "diffusers" and detect_format(tmp_path / "with") == "peft-file"
    proj_in, to_q = "unet.down_blocks.0.attentions.0.proj_in", "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q"
    assert with_meta.modules[proj_in].scale == 0.5 and with_meta.modules[to_q].scale == 1.0
    assert with_meta.modules[proj_in].kind is ModuleKind.CONV
    assert all(m.scale == 1.0 for m in without.modules.values())  # no alphas anywhere: diffusers' alpha = r
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj" in without.modules


# ------------------------------------------------------------------------------------------- CLI: convert / info


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result, *patterns: str) -> None:
    assert result.exit_code == 1, result.output
    errors = [ln for ln in result.output.strip().splitlines() if ln.startswith("Error")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    for pattern in patterns:
        assert re.search(pattern, errors[0]), errors[0]


def sample_adapter(dtype=torch.bfloat16) -> Adapter:
    g = torch.Generator().manual_seed(1)
    mods = {
        "model.layers.0.self_attn.q_proj": LoraModule(B=torch.randn(16, 4, generator=g), A=torch.randn(4, 16, generator=g),
                                                      alpha=8),
        "model.layers.0.mlp.gate_proj": LoraModule(B=torch.randn(24, 2, generator=g), A=torch.randn(2, 16, generator=g),
                                                   alpha=1, rslora=True),
        "conv_in": LoraModule(B=torch.randn(8, 3, generator=g), A=torch.randn(3, 36, generator=g), alpha=3,
                              kind=ModuleKind.CONV, weight_shape=(8, 4, 3, 3)),
    }
    return Adapter(modules={n: m.to(dtype=dtype) for n, m in mods.items()}, base_model="tiny-llama")


def test_convert_round_trip_keeps_products_names_dtype(tmp_path):
    adapter = sample_adapter()
    save_adapter(adapter, tmp_path / "peft")
    assert run("convert", tmp_path / "peft", "-o", tmp_path / "k.safetensors", "--format", "kohya", "-q").exit_code == 0
    assert run("convert", tmp_path / "k.safetensors", "-o", tmp_path / "back", "--format", "peft", "-q").exit_code == 0
    back = load_adapter(tmp_path / "back")
    assert set(back.modules) == set(adapter.modules) and back.base_model == "tiny-llama"
    for name, m in adapter.modules.items():
        got = back.modules[name]
        assert got.A.dtype == torch.bfloat16 and got.kind is m.kind and got.weight_shape == m.weight_shape
        assert torch.allclose(got.delta(), m.delta(), rtol=1e-5, atol=1e-6), name


def test_convert_to_kohya_with_prefix(tmp_path):
    m = LoraModule(B=torch.ones(16, 2), A=torch.ones(2, 16), alpha=2)
    save_adapter(Adapter(modules={"encoder.layers.0.self_attn.q_proj": m}), tmp_path / "te")
    result = run("convert", tmp_path / "te", "-o", tmp_path / "te.safetensors", "--format", "kohya", "--prefix", "lora_te_")
    assert result.exit_code == 0, result.output
    with safe_open(str(tmp_path / "te.safetensors"), "pt") as f:
        assert sorted(f.keys())[0] == "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha"
    bad = run("convert", tmp_path / "te", "-o", tmp_path / "x.safetensors", "--format", "kohya", "--prefix", "te")
    assert bad.exit_code == 2 and "--prefix 'te' is not a kohya prefix" in bad.output
    assert not (tmp_path / "x.safetensors").exists()


def test_info_facts_and_json(tmp_path):
    save_adapter(sample_adapter(), tmp_path / "a")
    result = run("info", tmp_path / "a", "--json")
    assert result.exit_code == 0, result.output
    facts = json.loads(result.output)
    assert facts["format"] == "peft" and facts["modules"] == 3 and facts["dtype"] == "bfloat16"
    assert facts["ranks"] == {"2": 1, "3": 1, "4": 1} and facts["kinds"] == {"conv": 1, "linear": 2}
    assert facts["params"] == 4 * 32 + 2 * 40 + 3 * 44 and facts["base_model"] == "tiny-llama"
    assert facts["scale_rule"] == "alpha / r"  # rsLoRA is folded into alpha when written
    assert facts == describe_adapter(load_adapter(tmp_path / "a"), tmp_path / "a")
    text = run("info", tmp_path / "a")
    assert text.exit_code == 0 and re.search(r"format: peft", text.output) and "base_model: tiny-llama" in text.output


# ------------------------------------------------------------------------------------------------ bad input


def _peft_folder(tmp_path, tensors, config=None):
    folder = tmp_path / "bad"
    folder.mkdir()
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(config or {"peft_type": "LORA", "r": 2, "lora_alpha": 2}))
    return folder


A_KEY, B_KEY = "base_model.model.layer.lora_A.weight", "base_model.model.layer.lora_B.weight"


@pytest.mark.parametrize("case", ["unknown", "shapes", "no_b", "alpha", "alpha_config", "embedding_to_kohya"])
def test_bad_input_one_line_error_nothing_written(tmp_path, case):
    out = tmp_path / ("out.safetensors" if case == "embedding_to_kohya" else "out")
    fmt = "kohya" if case == "embedding_to_kohya" else "peft"
    if case == "unknown":
        save_file({"foo.hada_w1_a": torch.ones(2, 2), "foo.hada_w1_b": torch.ones(2, 2)}, str(tmp_path / "in.safetensors"))
        source, patterns = tmp_path / "in.safetensors", [r"in\.safetensors: unknown adapter layout", r"\*foo\.hada_wN_a"]
    elif case == "shapes":
        source = _peft_folder(tmp_path, {A_KEY: torch.ones(2, 8), B_KEY: torch.ones(8, 3)})
        patterns = [re.escape(A_KEY) + r" \(2, 8\) and " + re.escape(B_KEY) + r" \(8, 3\) do not fit"]
    elif case == "no_b":
        source = _peft_folder(tmp_path, {A_KEY: torch.ones(2, 8)})
        patterns = [r"adapter_model\.safetensors: key " + re.escape(A_KEY) + " has no matching lora_B"]
    elif case == "alpha":
        save_file({"lora_unet_x.lora_down.weight": torch.ones(2, 3), "lora_unet_x.lora_up.weight": torch.ones(3, 2),
                   "lora_unet_x.alpha": torch.ones(1, 2)}, str(tmp_path / "in.safetensors"))
        source, patterns = tmp_path / "in.safetensors", [r"in\.safetensors: key lora_unet_x\.alpha .*expected a scalar"]
    elif case == "alpha_config":
        source = _peft_folder(tmp_path, {A_KEY: torch.ones(2, 8), B_KEY: torch.ones(8, 2)},
                              {"peft_type": "LORA", "r": 2, "lora_alpha": [1, 2]})
        patterns = [r"adapter_config\.json: lora_alpha \[1, 2\] is not a number"]
    else:
        emb = LoraModule(B=torch.ones(6, 2), A=torch.ones(2, 20), alpha=2, kind=ModuleKind.EMBEDDING)
        save_adapter(Adapter(modules={"model.embed_tokens": emb}), tmp_path / "in")
        source, patterns = tmp_path / "in", [r"module model\.embed_tokens is an embedding.*kohya files cannot hold"]
    commands = [["convert", source, "-o", out, "--format", fmt]] + ([["info", source]] if fmt == "peft" else [])
    for command in commands:
        assert_one_line_error(run(*command), *patterns)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if ".lrt-tmp-" in p.name]
