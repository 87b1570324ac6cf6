"""Layers a PEFT LoRA wrapper would break are saved whole (modules_to_save), told by the model's class: Whisper's
encoder reads ``conv1.stride`` and ``embed_positions.num_embeddings`` (the wrapper hides them), and its decoder's
positional embedding computes positions from (input_ids, cache_length) (the wrapper would look input_ids up)."""

from __future__ import annotations

import pytest
import torch

from zoo_models import SPECS, peft_folder, plant, save_model as saved
from lowrank_tools.extract import extract
from lowrank_tools.io.checkpoint import open_checkpoint
from lowrank_tools.io.model_config import wrapper_hidden
from lowrank_tools.linalg import RankRule

pytest.importorskip("transformers")

WHISPER_WHOLE = {"model.encoder.conv1", "model.encoder.conv2", "model.encoder.embed_positions",
                 "model.decoder.embed_positions"}


@pytest.fixture(scope="module")
def whisper(tmp_path_factory):
    root = tmp_path_factory.mktemp("whisper")
    model = SPECS["whisper"].build()
    base = saved(model, root / "base")
    plant(model, r".")
    return base, saved(model, root / "tuned")


@pytest.mark.parametrize("name, expected", [("whisper", WHISPER_WHOLE), ("llama", set()), ("gemma3", set()),
                                            ("opt", {"model.decoder.embed_positions"})])
def test_the_class_tells_which_layers_a_wrapper_breaks(tmp_path, name, expected):
    ckpt = open_checkpoint(saved(SPECS[name].build(), tmp_path / name))
    assert {n.rsplit(".", 1)[0] for n in wrapper_hidden(ckpt)} == expected  # gemma3's scaled embedding: one input


def test_extract_saves_them_whole_with_a_note(whisper):
    result = extract(*whisper, rule=RankRule(rank=2))
    tuned = open_checkpoint(whisper[1])
    whole = result.adapter.full_tensors
    assert {n.rsplit(".", 1)[0] for n in whole} == WHISPER_WHOLE
    assert "model.encoder.conv1.bias" in whole  # the whole module: modules_to_save replaces it all
    for name, t in whole.items():
        torch.testing.assert_close(t, tuned.get(name))
    assert not WHISPER_WHOLE & set(result.adapter.modules)
    assert any("model.encoder.conv1 is saved whole" in n and "stride" in n for n in result.report.notes)


def test_check_names_a_lora_on_a_layer_the_wrapper_breaks(whisper, tmp_path):
    from click.testing import CliRunner

    from lowrank_tools.cli import main

    conv = peft_folder(tmp_path / "conv", "model.encoder.conv1", torch.randn(2, 8, 3), torch.randn(16, 2, 1))
    linear = peft_folder(tmp_path / "q", "model.encoder.layers.0.self_attn.q_proj", torch.randn(2, 16),
                         torch.randn(16, 2))
    bad = CliRunner().invoke(main, ["check", str(conv), "--for", "peft", "--base", str(whisper[0])])
    assert bad.exit_code == 1 and "WhisperEncoder reads conv1.stride" in bad.output, bad.output
    good = CliRunner().invoke(main, ["check", str(linear), "--for", "peft", "--base", str(whisper[0])])
    assert good.exit_code == 0, good.output
