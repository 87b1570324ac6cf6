"""One diffusers component extracted alone (``pipe/unet``): a PEFT folder, and beside it the diffusers file its own
``load_lora_adapter(prefix=None)`` reads, ranks and alphas from the LoraConfig in its metadata."""

from __future__ import annotations

import warnings

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from zoo_models import SPECS, plant, save_model
from lowrank_tools.cli import main
from lowrank_tools.io.formats import load_adapter

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def unet(tmp_path_factory):
    root = tmp_path_factory.mktemp("unet")
    model = SPECS["unet"].build()
    base = save_model(model, root / "base")
    plant(model, SPECS["unet"].plant)
    return base, save_model(model, root / "tuned")


def test_alpha_other_than_rank_reaches_diffusers(unet, tmp_path):
    base, tuned = unet
    result = CliRunner().invoke(main, ["extract", str(base), str(tuned), "-o", str(tmp_path / "ad"), "--rank", "2",
                                       "--method", "exact", "--alpha", "1", "-q"])
    assert result.exit_code == 0, result.output
    with safe_open(str(tmp_path / "ad" / "pytorch_lora_weights.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and not any(k.startswith(("base_model.", "unet.")) for k in keys)  # bare module names
    model = type(SPECS["unet"].build()).from_pretrained(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.load_lora_adapter(str(tmp_path / "ad"), weight_name="pytorch_lora_weights.safetensors", prefix=None)
        model.fuse_lora()
        model.unload_lora()
    want = type(model).from_pretrained(tuned).state_dict()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, want[key], rtol=1e-5, atol=1e-5, msg=key)
    again = load_adapter(tmp_path / "ad")  # read as the PEFT folder it also is
    assert again.modules and all(m.alpha == 1.0 for m in again.modules.values())
    for consumer in ("peft", "diffusers"):  # each reads its own file of the folder
        checked = CliRunner().invoke(main, ["check", str(tmp_path / "ad"), "--for", consumer, "--base", str(base)])
        assert checked.exit_code == 0, checked.output


def test_a_transformers_model_gets_no_diffusers_file(tmp_path):
    model = SPECS["llama"].build()
    base = save_model(model, tmp_path / "base")
    plant(model, ".")
    tuned = save_model(model, tmp_path / "tuned")
    assert CliRunner().invoke(main, ["extract", str(base), str(tuned), "-o", str(tmp_path / "ad"), "--rank", "2",
                                     "-q"]).exit_code == 0
    assert sorted(p.name for p in (tmp_path / "ad").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
