"""GPT-2 and kin: transformers ``Conv1D`` layers (weight stored (in, out)) and ``transformer.*`` names that are not a
diffusers pipeline. Tiny real models, planted deltas, real consumers (PEFT, transformers)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytest.importorskip("tokenizers")

from test_evaluate import make_texts, make_tokenizer  # noqa: E402

from lowrank_tools.adapter import Adapter, LoraModule, ModuleKind  # noqa: E402
from lowrank_tools.cli import main  # noqa: E402
from lowrank_tools.errors import ConversionError  # noqa: E402
from lowrank_tools.extract import extract  # noqa: E402
from lowrank_tools.io.diffusers_lora import is_diffusers_adapter  # noqa: E402
from lowrank_tools.io.formats import describe_adapter, in_output_naming, load_adapter, save_adapter  # noqa: E402
from lowrank_tools.io.model_config import CONV1D_LAYERS  # noqa: E402
from lowrank_tools.linalg import RankRule  # noqa: E402

ATTN, MLP = "transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_fc"


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _rank2(out: int, inp: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 0.3 * torch.randn(out, 2, generator=g) @ torch.randn(2, inp, generator=g)  # (out, in), rank 2


def _gpt2():
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=32,
                                     architectures=["GPT2LMHeadModel"])
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """base/ and tuned/ GPT-2 folders (with a tokenizer): rank-2 (out, in) deltas on c_attn (32 -> 96) and c_fc
    (32 -> 128), added to their (in, out) Conv1D weights transposed; the rank-4 adapter extracted by the CLI."""
    root = tmp_path_factory.mktemp("gpt2")
    texts = make_texts(16, seed=5)
    tokenizer = make_tokenizer(texts)
    torch.manual_seed(0)
    model = _gpt2()
    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    deltas = {ATTN: _rank2(96, 32, 1), MLP: _rank2(128, 32, 2)}
    with torch.no_grad():
        for name, d in deltas.items():
            model.get_submodule(name).weight += d.T  # Conv1D weight (in, out)
    model.save_pretrained(root / "tuned")
    tokenizer.save_pretrained(root / "tuned")
    (root / "texts.txt").write_text("\n".join(texts) + "\n")
    result = run("extract", root / "base", root / "tuned", "-o", root / "ad", "-r", 4, "-q")
    assert result.exit_code == 0, result.output
    return {"root": root, "base": root / "base", "tuned": root / "tuned", "ad": root / "ad", "deltas": deltas,
            "texts": texts}


def _weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


# ------------------------------------------------------------------------------------------------ the rule


def _conv1d_and_linear_leaves(model) -> tuple[set[str], set[str]]:
    from transformers.pytorch_utils import Conv1D
    conv = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, Conv1D)}
    linear = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    return conv, linear


def _tiny_models():
    small = dict(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16)
    yield transformers.GPT2LMHeadModel(transformers.GPT2Config(add_cross_attention=True, **small))
    yield transformers.OpenAIGPTLMHeadModel(transformers.OpenAIGPTConfig(**small))
    yield transformers.ImageGPTForCausalImageModeling(transformers.ImageGPTConfig(add_cross_attention=True, **small))
    yield transformers.DecisionTransformerModel(transformers.DecisionTransformerConfig(
        state_dim=3, act_dim=2, hidden_size=16, n_layer=1, n_head=2, n_positions=16, max_ep_len=10,
        add_cross_attention=True))
    decoder = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, vocab_size=30,
                   max_position_embeddings=32, max_text_tokens=16, num_mel_attn_blocks=1, feature_size=8)
    yield transformers.ClvpForCausalLM(transformers.ClvpDecoderConfig(**decoder))
    encoder = dict(hidden_size=16, intermediate_size=32, projection_dim=16, num_hidden_layers=1,
                   num_attention_heads=2, vocab_size=30)
    yield transformers.ClvpModelForConditionalGeneration(transformers.ClvpConfig(
        text_config=encoder, speech_config=encoder, decoder_config=decoder))


def test_conv1d_table_is_what_transformers_builds():
    """Every model type of the table builds exactly its Conv1D leaves, none of them an nn.Linear elsewhere in the
    model; gpt_bigcode, with the same names, builds nn.Linear (hence model_type, never names)."""
    seen = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for model in _tiny_models():
            conv, linear = _conv1d_and_linear_leaves(model)
            model_type = model.config.model_type
            assert conv == CONV1D_LAYERS[model_type], model_type
            assert not conv & linear, model_type
            seen.add(model_type)
        bigcode = transformers.GPTBigCodeForCausalLM(transformers.GPTBigCodeConfig(n_layer=1, n_embd=16, n_head=2,
                                                                                  vocab_size=50, n_positions=16))
    assert seen == set(CONV1D_LAYERS)
    conv, linear = _conv1d_and_linear_leaves(bigcode)
    assert not conv and {"c_attn", "c_fc", "c_proj"} <= linear and "gpt_bigcode" not in CONV1D_LAYERS


def test_pipeline_decision_follows_the_evidence():
    m = LoraModule(B=torch.ones(4, 1), A=torch.ones(1, 3), alpha=1.0)
    names = {"transformer.transformer_blocks.0.attn.to_q": m}
    assert is_diffusers_adapter(Adapter(modules=names))  # no evidence: the names (a Flux / SD3 pipeline)
    assert is_diffusers_adapter(Adapter(modules=names, pipeline=True))
    assert not is_diffusers_adapter(Adapter(modules=names, pipeline=False))  # a transformers model's config
    conv1d = LoraModule(B=torch.ones(4, 1), A=torch.ones(1, 3), alpha=1.0, kind=ModuleKind.CONV1D)
    assert conv1d.weight_shape == (3, 4) and conv1d.matrix_shape == (4, 3)
    assert not is_diffusers_adapter(Adapter(modules={"transformer.h.0.attn.c_attn": conv1d}))
    flux = {n: m for n in ("double_blocks.0.img_attn.proj", "single_blocks.0.linear2", "double_blocks.0.txt_mlp.0")}
    renamed = in_output_naming(Adapter(modules=flux, pipeline=False), "peft")  # BFL names read from a PEFT folder
    assert all(n.startswith(("transformer.transformer_blocks.", "transformer.single_")) for n in renamed.modules)
    assert is_diffusers_adapter(renamed)  # renamed into the pipeline's transformer.: a diffusers file, as before


# ------------------------------------------------------------------------------------------- extract, PEFT


def test_extract_writes_a_peft_folder_with_fan_in_fan_out(gpt2):
    ad = gpt2["ad"]
    assert sorted(p.name for p in ad.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((ad / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True and config["task_type"] == "CAUSAL_LM"
    assert sorted(config["target_modules"]) == [ATTN, MLP]
    tensors = load_file(str(ad / "adapter_model.safetensors"))
    assert tuple(tensors[f"base_model.model.{ATTN}.lora_A.weight"].shape) == (4, 32)  # (r, in)
    assert tuple(tensors[f"base_model.model.{ATTN}.lora_B.weight"].shape) == (96, 4)  # (out, r)
    adapter = load_adapter(ad)
    for name, d in gpt2["deltas"].items():
        m = adapter.modules[name]
        assert m.kind is ModuleKind.CONV1D and m.weight_shape == (32, d.shape[0])
        torch.testing.assert_close(m.delta_matrix(), d, rtol=0, atol=1e-5)  # the (out, in) delta
        torch.testing.assert_close(m.delta(), d.T, rtol=0, atol=1e-5)  # laid out as the stored weight
    info = describe_adapter(adapter, ad)
    assert info["components"] == {} and info["kinds"] == {"conv1d": 2} and info["format"] == "peft"


def test_peft_loads_it_without_warnings_and_merges_to_the_tuned_model(gpt2):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(transformers.GPT2LMHeadModel.from_pretrained(gpt2["base"]),
                                               str(gpt2["ad"]))
    assert not [w for w in caught if "fan_in_fan_out" in str(w.message)]
    tuned = transformers.GPT2LMHeadModel.from_pretrained(gpt2["tuned"]).eval()
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        adapted = model.eval()(input_ids=ids).logits
        merged = model.merge_and_unload().eval()
        torch.testing.assert_close(adapted, tuned(input_ids=ids).logits, rtol=0, atol=1e-4)
        torch.testing.assert_close(merged(input_ids=ids).logits, tuned(input_ids=ids).logits, rtol=0, atol=1e-4)
    want = tuned.state_dict()
    for name, value in merged.state_dict().items():
        torch.testing.assert_close(value, want[name], rtol=0, atol=1e-5, msg=name)


def test_tied_embedding_and_head_beside_conv1d_layers(gpt2, tmp_path):
    """A fine-tune that also moved the tied wte: the adapter carries wte (embedding) and lm_head (an nn.Linear, not
    Conv1D though fan_in_fan_out is set); PEFT's unmerged model and apply both give the fine-tune."""
    model = transformers.GPT2LMHeadModel.from_pretrained(gpt2["tuned"])
    with torch.no_grad():
        model.transformer.wte.weight += _rank2(100, 32, 4)
    model.save_pretrained(tmp_path / "tuned")
    result = run("extract", gpt2["base"], tmp_path / "tuned", "-o", tmp_path / "ad", "-r", 4, "-q")
    assert result.exit_code == 0, result.output
    kinds = {n: m.kind for n, m in load_adapter(tmp_path / "ad").modules.items()}
    assert kinds == {ATTN: ModuleKind.CONV1D, MLP: ModuleKind.CONV1D, "transformer.wte": ModuleKind.EMBEDDING,
                     "lm_head": ModuleKind.LINEAR}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT resets fan_in_fan_out for the nn.Linear lm_head, with a warning
        adapted = peft.PeftModel.from_pretrained(transformers.GPT2LMHeadModel.from_pretrained(gpt2["base"]),
                                                 str(tmp_path / "ad")).eval()
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(adapted(input_ids=ids).logits, model.eval()(input_ids=ids).logits, rtol=0,
                                   atol=1e-4)
    assert run("apply", gpt2["base"], tmp_path / "ad", "-o", tmp_path / "out", "-q").exit_code == 0
    out = _weights(tmp_path / "out")
    for name, value in model.state_dict().items():
        if name in out:
            torch.testing.assert_close(out[name], value, rtol=0, atol=1e-5, msg=name)


def test_apply_on_the_base_folder_gives_the_tuned_weights(gpt2, tmp_path):
    result = run("apply", gpt2["base"], gpt2["ad"], "-o", tmp_path / "out", "-q")
    assert result.exit_code == 0, result.output
    out, tuned, base = _weights(tmp_path / "out"), _weights(gpt2["tuned"]), _weights(gpt2["base"])
    assert set(out) == set(tuned)
    for name in tuned:
        torch.testing.assert_close(out[name], tuned[name], rtol=0, atol=1e-5, msg=name)
    assert not torch.equal(out[f"{ATTN}.weight"], base[f"{ATTN}.weight"])


def test_apply_follows_the_base_when_the_adapter_does_not_say_fan_in_fan_out(gpt2, tmp_path):
    """A PEFT folder written without fan_in_fan_out (by hand, or by PEFT's own save of a config that lacks it):
    the base's Conv1D decides, as in PEFT, with a warning."""
    bare = tmp_path / "bare"
    bare.mkdir()
    config = json.loads((gpt2["ad"] / "adapter_config.json").read_text())
    (bare / "adapter_config.json").write_text(json.dumps({**config, "fan_in_fan_out": False}))
    (bare / "adapter_model.safetensors").write_bytes((gpt2["ad"] / "adapter_model.safetensors").read_bytes())
    assert load_adapter(bare).modules[ATTN].kind is ModuleKind.LINEAR
    notes = json.loads(run("check", bare, "--for", "peft", "--base", gpt2["base"], "--json").output)["notes"]
    assert [n["code"] for n in notes] == ["fan-in-fan-out"]
    result = run("apply", gpt2["base"], bare, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "not marked fan_in_fan_out" in result.output
    torch.testing.assert_close(_weights(tmp_path / "out")[f"{ATTN}.weight"], _weights(gpt2["tuned"])[f"{ATTN}.weight"],
                               rtol=0, atol=1e-5)


def test_check_against_the_base_fits_the_transposed_weights(gpt2, tmp_path):
    result = run("check", gpt2["ad"], "--for", "peft", "--base", gpt2["base"], "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["ok"] and data["problems"] == [] and data["modules"] == 2, data
    wrong = tmp_path / "wrong"  # the factors of the stored (in, out) weight, as before the fix: c_attn cannot fit
    wrong.mkdir()
    tensors = load_file(str(gpt2["ad"] / "adapter_model.safetensors"))
    A, B = f"base_model.model.{ATTN}.lora_A.weight", f"base_model.model.{ATTN}.lora_B.weight"
    tensors[A], tensors[B] = tensors[B].T.contiguous(), tensors[A].T.contiguous()
    save_file(tensors, str(wrong / "adapter_model.safetensors"))
    (wrong / "adapter_config.json").write_text((gpt2["ad"] / "adapter_config.json").read_text())
    result = run("check", wrong, "--for", "peft", "--base", gpt2["base"], "--json")
    problems = json.loads(result.output)["problems"]
    assert [(p["code"], ATTN in json.dumps(p)) for p in problems] == [("shape", True)], problems


def test_bare_weight_files_are_taken_as_linear_with_a_note(gpt2):
    """No config.json: nothing says Conv1D (gpt_bigcode's c_attn is an nn.Linear), so nothing is guessed, but the
    report says what was assumed."""
    base, tuned = _weights(gpt2["base"]), _weights(gpt2["tuned"])
    result = extract(base, tuned, rule=RankRule(rank=4))
    assert result.adapter.modules[ATTN].kind is ModuleKind.LINEAR and result.adapter.pipeline is None
    assert any("no config.json" in n and "Conv1D" in n for n in result.report.notes)


def test_analyze_reads_the_out_in_delta(gpt2, tmp_path):
    result = run("analyze", gpt2["base"], gpt2["tuned"], "--json", tmp_path / "a.json")
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads((tmp_path / "a.json").read_text())["layers"]}
    assert set(rows) == {ATTN, MLP}
    assert rows[ATTN]["kind"] == "conv1d" and rows[ATTN]["shape"] == [32, 96] and rows[ATTN]["matrix_shape"] == [96, 32]
    assert rows[ATTN]["energy_rank"]["0.99"] <= 2  # the planted rank


def test_kohya_is_refused_before_any_work(gpt2, tmp_path):
    result = run("extract", gpt2["base"], gpt2["tuned"], "-o", tmp_path / "k.safetensors", "-r", 4, "-q")
    assert result.exit_code == 1 and "Conv1D" in result.output and "PEFT folder" in result.output
    result = run("convert", gpt2["ad"], "-o", tmp_path / "k2.safetensors", "-q")
    assert result.exit_code == 1 and "Conv1D" in result.output
    assert not (tmp_path / "k.safetensors").exists() and not (tmp_path / "k2.safetensors").exists()
    with pytest.raises(ConversionError, match="transformers Conv1D"):
        save_adapter(load_adapter(gpt2["ad"]), tmp_path / "k3.safetensors")


def test_dora_on_conv1d_agrees_with_peft(gpt2, tmp_path):
    """Magnitudes per output (a Conv1D's columns), perturbed so that DoRA is no plain LoRA: PEFT's merge, apply and
    evaluate's in-memory patch give the same weights."""
    from dataclasses import replace

    from lowrank_tools.evaluate.patch import applied, plan_patch
    result = run("extract", gpt2["base"], gpt2["tuned"], "-o", tmp_path / "dora", "-r", 4, "--dora", "-q")
    assert result.exit_code == 0, result.output
    adapter = load_adapter(tmp_path / "dora")
    assert adapter.modules[ATTN].magnitude.shape == (96,)
    g = torch.Generator().manual_seed(7)
    adapter = replace(adapter, modules={n: replace(m, magnitude=m.magnitude * (1 + 0.5 * torch.rand(
        m.magnitude.shape, generator=g))) for n, m in adapter.modules.items()})
    save_adapter(adapter, tmp_path / "dora2")
    merged = peft.PeftModel.from_pretrained(transformers.GPT2LMHeadModel.from_pretrained(gpt2["base"]),
                                            str(tmp_path / "dora2")).merge_and_unload().state_dict()
    assert run("apply", gpt2["base"], tmp_path / "dora2", "-o", tmp_path / "out", "-q").exit_code == 0
    model = transformers.GPT2LMHeadModel.from_pretrained(gpt2["base"])
    with applied(model, plan_patch(model, load_adapter(tmp_path / "dora2"), "dora2")):
        patched = {n: p.detach().clone() for n, p in model.named_parameters()}
    out, base = _weights(tmp_path / "out"), _weights(gpt2["base"])
    for name in (f"{ATTN}.weight", f"{MLP}.weight"):
        assert not torch.allclose(out[name], _weights(gpt2["tuned"])[name], atol=1e-3)  # the magnitudes count
        torch.testing.assert_close(out[name], merged[name], rtol=0, atol=1e-5, msg=name)
        torch.testing.assert_close(patched[name], merged[name], rtol=0, atol=1e-5, msg=name)
    assert torch.equal(out["transformer.h.1.attn.c_attn.weight"], base["transformer.h.1.attn.c_attn.weight"])


def test_convert_to_dora_norms_the_outputs_of_conv1d(gpt2, tmp_path):
    """convert --dora dora --base: m = ||W0 + s B A|| per output, i.e. per column of the stored (in, out) weight,
    which at the planted rank is the tuned weight's; back to LoRA (--dora lora) the delta is unchanged."""
    result = run("convert", gpt2["ad"], "-o", tmp_path / "dora", "--dora", "dora", "--base", gpt2["base"], "-q")
    assert result.exit_code == 0, result.output
    dora, tuned = load_adapter(tmp_path / "dora"), _weights(gpt2["tuned"])
    for name in (ATTN, MLP):
        torch.testing.assert_close(dora.modules[name].magnitude, tuned[f"{name}.weight"].norm(dim=0), rtol=1e-5,
                                   atol=1e-5)
    result = run("convert", tmp_path / "dora", "-o", tmp_path / "lora", "--dora", "lora", "--base", gpt2["base"], "-q")
    assert result.exit_code == 0, result.output
    back = load_adapter(tmp_path / "lora")
    for name, d in gpt2["deltas"].items():
        assert back.modules[name].kind is ModuleKind.CONV1D
        torch.testing.assert_close(back.modules[name].delta_matrix(), d, rtol=0, atol=1e-4)


# ------------------------------------------------------------------------------- evaluate and calibrate


def test_evaluate_recovers_the_planted_delta(gpt2, tmp_path):
    out = tmp_path / "eval.json"
    result = run("evaluate", gpt2["base"], gpt2["tuned"], gpt2["ad"], "--data", gpt2["root"] / "texts.txt",
                 "--device", "cpu", "--json", out)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["base_kl"] > 1e-4  # the planted change is visible in the outputs
    assert data["adapters"][0]["kl_recovered"] == pytest.approx(1.0, abs=1e-4)


def test_calibrate_hooks_conv1d_and_extract_whitens_c_attn(gpt2, tmp_path):
    stats = tmp_path / "stats.safetensors"
    result = run("calibrate", gpt2["base"], "--data", gpt2["root"] / "texts.txt", "-o", stats, "--device", "cpu",
                 "-q")
    assert result.exit_code == 0, result.output
    from lowrank_tools.io.calibration import read_calibration
    read = read_calibration(stats)
    assert read.in_features(read.module_key[ATTN]) == 32 and read.in_features(read.module_key[MLP]) == 32
    assert read.in_features(read.module_key["transformer.h.0.mlp.c_proj"]) == 128  # (in, out) = (128, 32)
    result = extract(gpt2["base"], gpt2["tuned"], rule=RankRule(rank=1), calibration=stats)
    records = {r.name: r for r in result.report.layers}
    assert records[ATTN].extra["whitened"] is True and records[MLP].extra["whitened"] is True
    assert 0 < records[ATTN].extra["output_rel_error"] < 1


# ------------------------------------------------------------------------------ transformers under transformer.


def test_gptj_linear_layers_under_transformer_get_a_peft_folder(tmp_path):
    config = transformers.GPTJConfig(n_layer=1, n_embd=32, n_head=2, rotary_dim=8, vocab_size=100, n_positions=32,
                                     architectures=["GPTJForCausalLM"])
    torch.manual_seed(0)
    model = transformers.GPTJForCausalLM(config).eval()
    model.save_pretrained(tmp_path / "base")
    name = "transformer.h.0.attn.q_proj"
    with torch.no_grad():
        model.get_submodule(name).weight += _rank2(32, 32, 3)  # nn.Linear (out, in)
    model.save_pretrained(tmp_path / "tuned")
    result = run("extract", tmp_path / "base", tmp_path / "tuned", "-o", tmp_path / "ad", "-r", 4, "-q")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "ad").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["fan_in_fan_out"] is False
    assert describe_adapter(load_adapter(tmp_path / "ad"), tmp_path / "ad")["components"] == {}
    assert run("convert", tmp_path / "ad", "-o", tmp_path / "again", "-q").exit_code == 0  # a PEFT folder stays one
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    merged = peft.PeftModel.from_pretrained(transformers.GPTJForCausalLM.from_pretrained(tmp_path / "base"),
                                            str(tmp_path / "ad")).merge_and_unload()
    torch.testing.assert_close(merged.get_submodule(name).weight, model.get_submodule(name).weight, rtol=0, atol=1e-5)
