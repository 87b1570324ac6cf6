"""Grouped convolutions (groups > 1: Sana's depthwise ff.conv_depth, Mamba's conv1d) are told by the model's class,
built from its config on the meta device, never by the weight's shape; extract leaves them out with a warning
naming them (PEFT refuses a LoRA on one), or saves them whole with --full-modules."""

from __future__ import annotations

import pytest
import torch

from zoo_models import SPECS, peft_folder, plant, save_model as saved
from lowrank_tools.extract import extract
from lowrank_tools.io.checkpoint import open_checkpoint
from lowrank_tools.io.layers import GROUPED
from lowrank_tools.io.model_config import grouped_convs
from lowrank_tools.linalg import RankRule

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def mamba(tmp_path_factory):
    """A tiny Mamba (its mixer's conv1d is depthwise: groups = 2 * hidden) and a fine-tune moving every weight."""
    root = tmp_path_factory.mktemp("mamba")
    torch.manual_seed(0)
    config = transformers.MambaConfig(hidden_size=16, num_hidden_layers=1, vocab_size=48, state_size=4, expand=2,
                                      conv_kernel=4)
    model = transformers.MambaForCausalLM(config)
    base = saved(model, root / "base")
    plant(model, r"mixer\.(conv1d|in_proj)")
    return base, saved(model, root / "tuned")


def test_the_class_tells_grouped_convs(mamba, tmp_path):
    assert grouped_convs(open_checkpoint(mamba[0])) == {"backbone.layers.0.mixer.conv1d.weight": 32}
    (tmp_path / "config.json").write_text('{"architectures": ["NoSuchModel"], "model_type": "nothing"}')
    from safetensors.torch import save_file
    save_file({"conv.weight": torch.zeros(4, 1, 3)}, str(tmp_path / "model.safetensors"))
    assert grouped_convs(open_checkpoint(tmp_path)) == {}  # nothing builds it: no evidence, no guess


def test_extract_leaves_them_out_with_a_warning_or_saves_them_whole(mamba):
    said = []
    result = extract(*mamba, rule=RankRule(rank=2), warn=said.append)
    modules = set(result.adapter.modules)
    assert "backbone.layers.0.mixer.in_proj" in modules and "backbone.layers.0.mixer.conv1d" not in modules
    assert result.report.skipped[GROUPED] == ["backbone.layers.0.mixer.conv1d.weight"]
    warning = next(w for w in said if "grouped conv" in w)
    assert "backbone.layers.0.mixer.conv1d" in warning and "--full-modules" in warning
    whole = extract(*mamba, rule=RankRule(rank=2), full_modules=[r"mixer\.conv1d$"])
    tuned = open_checkpoint(mamba[1]).get("backbone.layers.0.mixer.conv1d.weight")
    torch.testing.assert_close(whole.adapter.full_tensors["backbone.layers.0.mixer.conv1d.weight"], tuned)
    assert GROUPED not in whole.report.skipped


def test_sana_depthwise_conv_is_one_of_them(tmp_path):
    pytest.importorskip("diffusers")
    model = SPECS["sana"].build()
    ckpt = open_checkpoint(saved(model, tmp_path / "sana"))
    groups = model.transformer_blocks[0].ff.conv_depth.groups
    assert groups > 1 and grouped_convs(ckpt) == {"transformer_blocks.0.ff.conv_depth.weight": groups}


@pytest.mark.parametrize("rank, ok", [(2, False), (32, True)])  # PEFT takes a rank that is a multiple of groups
def test_check_names_a_lora_on_a_grouped_conv(mamba, tmp_path, rank, ok):
    from click.testing import CliRunner

    from lowrank_tools.cli import main

    adapter = peft_folder(tmp_path / "a", "backbone.layers.0.mixer.conv1d", torch.randn(rank, 1, 4),
                          torch.randn(32, rank, 1))
    result = CliRunner().invoke(main, ["check", str(adapter), "--for", "peft", "--base", str(mamba[0])])
    assert (result.exit_code == 0) is ok, result.output
    assert ok or "grouped conv (groups=32)" in result.output


def test_a_kohya_target_keeps_them(mamba):
    """kohya consumers (ComfyUI, A1111) merge the dense delta into the (out, in / groups, k) weight: only PEFT
    refuses a grouped conv, so a kohya extract keeps it."""
    result = extract(*mamba, rule=RankRule(rank=2), embeddings=False)
    assert "backbone.layers.0.mixer.conv1d" in result.adapter.modules and GROUPED not in result.report.skipped
