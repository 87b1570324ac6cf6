"""The tied output head, one implementation (io/base_model.py) for extract, apply and check: its name is the one
the model's transformers class ties (Whisper: proj_out, not lm_head), and the weight it adds to is the input
embedding the base stores."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from zoo_models import peft_folder
from lowrank_tools.cli import main
from lowrank_tools.io.base_model import tied_embedding, tied_head_name
from lowrank_tools.io.checkpoint import as_checkpoint

pytest.importorskip("transformers")


def folder(tmp_path, name, tensors: dict, config: dict):
    path = tmp_path / name
    path.mkdir()
    save_file({k: torch.randn(*s) for k, s in tensors.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config))
    return path


WHISPER = {"model.decoder.embed_tokens.weight": (48, 16), "model.decoder.embed_positions.weight": (8, 16),
           "model.encoder.embed_positions.weight": (8, 16)}
LLAMA = {"model.embed_tokens.weight": (48, 16), "model.layers.0.self_attn.q_proj.weight": (16, 16)}


@pytest.mark.parametrize("config, head", [
    ({"architectures": ["WhisperForConditionalGeneration"]}, "proj_out"),
    ({"architectures": ["LlamaForCausalLM"]}, "lm_head"),
    ({"architectures": ["T5ForConditionalGeneration"]}, "lm_head"),  # not its encoder.embed_tokens alias
    ({"architectures": ["NoSuchModelForCausalLM"]}, "lm_head"),
    ({}, "lm_head"), (None, "lm_head")])
def test_the_head_is_what_the_class_ties(config, head):
    assert tied_head_name(config) == head


def test_whisper_head_is_proj_out_on_the_decoder_embedding(tmp_path):
    base = as_checkpoint(folder(tmp_path, "w", WHISPER, {"architectures": ["WhisperForConditionalGeneration"]}))
    assert tied_embedding("proj_out", base) == "model.decoder.embed_tokens.weight"
    assert tied_embedding("proj_out", base, (48, 16)) == "model.decoder.embed_tokens.weight"
    assert tied_embedding("proj_out", base, (16, 48)) is None  # another shape: not this embedding
    assert tied_embedding("lm_head", base) is None  # Whisper has no lm_head: PEFT would drop it


def test_llama_head_and_an_untied_config(tmp_path):
    tied = as_checkpoint(folder(tmp_path, "t", LLAMA, {"architectures": ["LlamaForCausalLM"]}))
    untied = as_checkpoint(folder(tmp_path, "u", LLAMA, {"architectures": ["LlamaForCausalLM"],
                                                          "tie_word_embeddings": False}))
    assert tied_embedding("lm_head", tied) == "model.embed_tokens.weight"
    assert tied_embedding("model.layers.0.self_attn.q_proj", tied) is None  # no head
    assert tied_embedding("lm_head", untied) is None


@pytest.mark.parametrize("arch, tensors, head, tie, ok", [
    ("LlamaForCausalLM", LLAMA, "lm_head", True, True),
    ("LlamaForCausalLM", LLAMA, "lm_head", False, False),  # untied and not stored: no such module
    ("WhisperForConditionalGeneration", WHISPER, "proj_out", True, True),
    ("WhisperForConditionalGeneration", WHISPER, "lm_head", True, False)])
def test_check_and_apply_find_the_tied_head_alike(tmp_path, arch, tensors, head, tie, ok):
    base = folder(tmp_path, "base", tensors, {"architectures": [arch], "tie_word_embeddings": tie})
    adapter = peft_folder(tmp_path / "adapter", head, torch.randn(2, 16), torch.randn(48, 2))  # (vocab, dim) head
    checked = CliRunner().invoke(main, ["check", str(adapter), "--for", "peft", "--base", str(base)])
    applied = CliRunner().invoke(main, ["apply", str(base), str(adapter), "-o", str(tmp_path / "out"), "-q"])
    assert (checked.exit_code == 0) is ok, checked.output
    assert (applied.exit_code == 0) is ok, applied.output
    if not ok:
        assert "no such module in the base" in checked.output and head in applied.output
