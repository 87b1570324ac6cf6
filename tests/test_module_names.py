"""io/module_names.py: the names a transformers v5 model has once loaded (renames, tied aliases, routers), which a
PEFT adapter must use, and the way back to the checkpoint's names for apply and check."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors import safe_open

from lowrank_tools.adapter import Adapter, LoraModule, ModuleKind
from lowrank_tools.io.checkpoint import open_checkpoint
from lowrank_tools.io.formats import load_adapter, save_adapter
from lowrank_tools.io.module_names import (CHECKPOINT_NAMES_KEY, in_checkpoint_names, in_model_names, model_names)

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

SMALL = dict(num_hidden_layers=1, num_attention_heads=2, vocab_size=48)


def _save(tmp_path_factory, name: str, cls: str, config: str, **kwargs):
    folder = tmp_path_factory.mktemp(name)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        getattr(transformers, cls)(getattr(transformers, config)(**kwargs)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def neox(tmp_path_factory):
    return _save(tmp_path_factory, "neox", "GPTNeoXForCausalLM", "GPTNeoXConfig", hidden_size=16,
                 intermediate_size=32, max_position_embeddings=32, **SMALL)


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    return _save(tmp_path_factory, "t5", "T5ForConditionalGeneration", "T5Config", d_model=16, d_ff=32, d_kv=8,
                 num_layers=1, num_heads=2, vocab_size=48, relative_attention_num_buckets=8)


def _lora(out: int, inp: int, *, kind=ModuleKind.LINEAR, seed: int = 0) -> LoraModule:
    g = torch.Generator().manual_seed(seed)
    if kind is ModuleKind.EMBEDDING:  # PEFT's layout: B (dim, r), A (r, vocab)
        return LoraModule(B=torch.randn(inp, 2, generator=g), A=torch.randn(2, out, generator=g), alpha=2.0, kind=kind)
    return LoraModule(B=torch.randn(out, 2, generator=g), A=torch.randn(2, inp, generator=g), alpha=2.0)


def test_gpt_neox_head_is_lm_head_once_loaded(neox):
    ckpt = open_checkpoint(neox)
    assert "embed_out.weight" in ckpt
    assert model_names(ckpt).renamed == {"embed_out": "lm_head"}  # transformers' own WeightRenaming, nothing else
    adapter = Adapter(modules={"embed_out": _lora(48, 16), "gpt_neox.layers.0.mlp.dense_h_to_4h": _lora(32, 16)})
    renamed, note = in_model_names(adapter, ckpt)
    assert set(renamed.modules) == {"lm_head", "gpt_neox.layers.0.mlp.dense_h_to_4h"}
    assert renamed.model_names == {"lm_head": "embed_out"} and "embed_out -> lm_head" in note
    back = in_checkpoint_names(renamed, ckpt)  # apply's way back, by the record
    assert set(back.modules) == set(adapter.modules) and back.modules["embed_out"] is adapter.modules["embed_out"]
    unrecorded = Adapter(modules={"lm_head": adapter.modules["embed_out"]})  # PEFT-trained: names only, no record
    assert set(in_checkpoint_names(unrecorded, ckpt).modules) == {"embed_out"}


def test_peft_loads_the_head_written_in_the_models_name(neox, tmp_path):
    """The file's keys and target_modules name lm_head: PEFT wraps it and adds the delta (it matched nothing as
    embed_out); the record in the file's metadata reads back."""
    ckpt = open_checkpoint(neox)
    module = _lora(48, 16, seed=3)
    adapter, _ = in_model_names(Adapter(modules={"embed_out": module}, base_model=str(neox)), ckpt)
    save_adapter(adapter, tmp_path / "ad")
    with safe_open(str(tmp_path / "ad" / "adapter_model.safetensors"), "pt") as f:
        assert json.loads(f.metadata()[CHECKPOINT_NAMES_KEY]) == {"lm_head": "embed_out"}
    read = load_adapter(tmp_path / "ad")
    assert read.model_names == {"lm_head": "embed_out"} and "lm_head (checkpoint: embed_out)" in read.notes[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.GPTNeoXForCausalLM.from_pretrained(neox)
        W0 = model.lm_head.weight.detach().clone()
        merged = peft.PeftModel.from_pretrained(model, tmp_path / "ad").merge_and_unload()
    torch.testing.assert_close(merged.lm_head.weight, W0 + module.delta(), rtol=1e-5, atol=1e-6)


def test_t5_shared_embedding_reaches_its_tied_aliases(t5, tmp_path):
    """shared is encoder.embed_tokens and decoder.embed_tokens (one weight): the file repeats its factors on both,
    reading folds them back into one module, and apply's way back adds the delta once."""
    ckpt = open_checkpoint(t5)
    names = model_names(ckpt)
    assert names.renamed == {} and names.aliases == {"shared": ("encoder.embed_tokens", "decoder.embed_tokens")}
    emb = _lora(48, 16, kind=ModuleKind.EMBEDDING)
    adapter, note = in_model_names(Adapter(modules={"shared": emb}), ckpt)
    assert set(adapter.modules) == {"shared"} and "encoder.embed_tokens" in note
    save_adapter(adapter, tmp_path / "ad")
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == {"shared", "encoder.embed_tokens", "decoder.embed_tokens"}
    back = load_adapter(tmp_path / "ad")
    assert set(back.modules) == {"shared"} and any("tied to shared" in n for n in back.notes)
    with safe_open(str(tmp_path / "ad" / "adapter_model.safetensors"), "pt") as f:
        raw = {k: f.get_tensor(k) for k in f.keys()}
    unfolded = Adapter(modules={n: emb for n in ("shared", "encoder.embed_tokens", "decoder.embed_tokens")})
    assert set(in_checkpoint_names(unfolded, ckpt).modules) == {"shared"}  # once, not three times
    assert torch.equal(raw["base_model.model.encoder.embed_tokens.lora_embedding_A"], emb.A)
    from click.testing import CliRunner
    from lowrank_tools.cli import main
    merge = ["merge", f"{tmp_path / 'ad'}:0.5", f"{tmp_path / 'ad'}:0.5"]
    for command in (merge, ["resize", tmp_path / "ad", "--rank", 1]):
        out = tmp_path / command[0]
        assert CliRunner().invoke(main, [*map(str, command), "-o", str(out), "-q"]).exit_code == 0
        config = json.loads((out / "adapter_config.json").read_text())  # the aliases still get the (new) factors
        assert set(config["target_modules"]) == {"shared", "encoder.embed_tokens", "decoder.embed_tokens"}


def test_models_that_need_no_renaming_are_left_alone(tmp_path_factory):
    llama = _save(tmp_path_factory, "llama", "LlamaForCausalLM", "LlamaConfig", hidden_size=16, intermediate_size=32,
                  num_key_value_heads=1, tie_word_embeddings=False, **SMALL)
    adapter = Adapter(modules={"model.layers.0.self_attn.q_proj": _lora(16, 16)})
    same, note = in_model_names(adapter, open_checkpoint(llama))
    assert same is adapter and note is None
    bare = tmp_path_factory.mktemp("bare")
    from safetensors.torch import save_file
    save_file({"embed_out.weight": torch.zeros(48, 16)}, str(bare / "model.safetensors"))
    assert model_names(open_checkpoint(bare / "model.safetensors")) is None  # no config.json: nothing is built
    assert in_checkpoint_names(Adapter(modules={"embed_out": _lora(48, 16)}), open_checkpoint(bare)).modules


def test_moe_models_whose_experts_fuse_on_load_keep_their_names(tmp_path_factory):
    """Mixtral's block_sparse_moe.* become mlp.* with fused experts: PEFT converts those names itself, so nothing is
    renamed; the router is no nn.Linear (MixtralTopKRouter) but its checkpoint name is not the model's: kept."""
    mixtral = _save(tmp_path_factory, "mixtral", "MixtralForCausalLM", "MixtralConfig", hidden_size=16,
                    intermediate_size=32, num_key_value_heads=1, num_local_experts=2, num_experts_per_tok=1, **SMALL)
    names = model_names(open_checkpoint(mixtral))
    assert names.renamed == {} and names.unadaptable == frozenset()


def test_a_router_named_alike_in_checkpoint_and_model_is_unadaptable(tmp_path_factory):
    qwen = _save(tmp_path_factory, "qwen2_moe", "Qwen2MoeForCausalLM", "Qwen2MoeConfig", hidden_size=16,
                 intermediate_size=32, num_key_value_heads=1, num_experts=2, num_experts_per_tok=1,
                 moe_intermediate_size=32, shared_expert_intermediate_size=32, **SMALL)
    names = model_names(open_checkpoint(qwen))
    assert names.unadaptable == {"model.layers.0.mlp.gate"}  # Qwen2MoeTopKRouter; shared_expert_gate is a Linear


def test_an_alias_the_checkpoint_stores_is_a_layer_of_its_own(t5):
    """An older T5 save stores encoder.embed_tokens.weight beside shared.weight: extract factors it as its own
    layer and apply adds to it, so it is no alias to repeat or fold."""
    ckpt = open_checkpoint(t5)

    class Older:
        config = ckpt.config

        @staticmethod
        def keys():
            return [*ckpt.keys(), "encoder.embed_tokens.weight"]

    assert model_names(Older).aliases == {"shared": ("decoder.embed_tokens",)}


def _plain_specs():
    from zoo_models import SPECS

    return [s for s in SPECS.values() if s.library == "transformers"]


@pytest.mark.slow
def test_plain_model_types_are_still_plain_in_this_transformers(monkeypatch):
    """Every model type extract skips the class build for (PLAIN_MODEL_TYPES) is built here with the installed
    transformers (the model zoo's tiny config) and must rename nothing, tie no alias, hold no LoRA-less module, no
    grouped conv and no layer a LoRA wrapper would hide; every listed type has a zoo case, so none is listed
    unchecked."""
    from types import SimpleNamespace

    from lowrank_tools.io import model_config
    from lowrank_tools.io.model_config import PLAIN_MODEL_TYPES, grouped_convs, wrapper_hidden
    from lowrank_tools.io.module_names import _model_names

    monkeypatch.setattr(model_config, "is_plain", lambda config: False)  # build them all
    checked = set()
    for spec in _plain_specs():
        model = spec.build()
        config = model.config.to_dict()
        if config.get("model_type") not in PLAIN_MODEL_TYPES:
            continue
        config["architectures"] = [type(model).__name__]
        keys = tuple(sorted(model.state_dict()))
        names = _model_names(json.dumps(config, sort_keys=True), type(model).__name__, keys)
        assert names is not None, spec.name
        assert (names.renamed, names.aliases, names.unadaptable) == ({}, {}, frozenset()), spec.name
        ckpt = SimpleNamespace(config=config, components={})
        assert grouped_convs(ckpt) == {} and wrapper_hidden(ckpt) == {}, spec.name
        heads = {k.removesuffix(".weight") for k in (getattr(type(model), "_tied_weights_keys", None) or ())}
        assert heads <= {"lm_head"}, spec.name  # what tied_head_name answers for them unbuilt
        assert getattr(type(model), "main_input_name", "input_ids") == "input_ids", spec.name  # task_type's rule
        checked.add(config["model_type"])
    assert checked == PLAIN_MODEL_TYPES


def test_a_plain_model_type_builds_nothing(tmp_path, monkeypatch):
    """A Llama checkpoint gets the empty answers without the class build (the import alone costs seconds)."""
    from safetensors.torch import save_file

    from lowrank_tools.io import model_config
    from lowrank_tools.io import module_names as mn

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    save_file({"model.embed_tokens.weight": torch.zeros(4, 2)}, str(tmp_path / "model.safetensors"))
    monkeypatch.setattr(model_config, "_built", lambda *a: pytest.fail("built a model for a plain type"))
    ckpt = open_checkpoint(tmp_path)
    names = mn.model_names(ckpt)
    assert names is not None and not (names.renamed or names.aliases or names.unadaptable)
    assert model_config.grouped_convs(ckpt) == {} and model_config.wrapper_hidden(ckpt) == {}
