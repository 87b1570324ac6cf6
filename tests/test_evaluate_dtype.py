"""evaluate --dtype: transformers models loaded in bfloat16 / float16 (half the memory), the measures still float64."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from test_evaluate import pair_with_texts  # noqa: E402

from lowrank_tools.adapter import Adapter  # noqa: E402
from lowrank_tools.cli import main  # noqa: E402
from lowrank_tools.evaluate import evaluate  # noqa: E402
from lowrank_tools.extract import extract  # noqa: E402
from lowrank_tools.io.models import ModelKind, load_model  # noqa: E402
from lowrank_tools.linalg import RankRule  # noqa: E402


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return pair_with_texts(tmp_path_factory.mktemp("evaluate_dtype"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_models_load_in_the_dtype_asked(pair, dtype):
    model = load_model(pair["base"], ModelKind.CAUSAL, torch.device("cpu"), dtype)
    assert {p.dtype for p in model.parameters()} == {dtype}


def test_bfloat16_measures_stay_close_to_float32(pair):
    full = extract(pair["base"], pair["tuned"], rule=RankRule(rank=64)).adapter
    low = extract(pair["base"], pair["tuned"], rule=RankRule(rank=2)).adapter
    adapters = [("full", full), ("low", low), ("empty", Adapter())]
    f32 = evaluate(pair["base"], pair["tuned"], adapters, texts=pair["texts"], batch_size=4, device="cpu")
    b16 = evaluate(pair["base"], pair["tuned"], adapters, texts=pair["texts"], batch_size=4, device="cpu",
                   dtype=torch.bfloat16)
    assert b16.base.kl == pytest.approx(f32.base.kl, rel=0.05)
    assert b16.adapters[2].kl_recovered == 0.0  # the same weights as the base: exactly nothing recovered
    assert b16.adapters[0].kl_recovered > 0.97  # bf16 rounding of W0 + delta costs a little of the exact delta
    assert b16.adapters[1].kl_recovered == pytest.approx(f32.adapters[1].kl_recovered, abs=0.03)


def test_cli_dtype_option(pair, tmp_path):
    out = tmp_path / "e.json"
    result = CliRunner().invoke(main, ["evaluate", str(pair["base"]), str(pair["tuned"]), "--data",
                                       str(pair["root"] / "texts.txt"), "--ranks", "2", "--dtype", "bfloat16",
                                       "--device", "cpu", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["adapters"][0]["kl_recovered"] > 0
    bad = CliRunner().invoke(main, ["evaluate", str(pair["base"]), str(pair["tuned"]), "--data",
                                    str(pair["root"] / "texts.txt"), "--ranks", "2", "--dtype", "float64"])
    assert bad.exit_code == 2 and "float64" in bad.output
