"""evaluate with DoRA: adapters carrying magnitudes applied as DoRA in memory, and the ``--dora`` curve (DoRA at
each rank beside LoRA at ranks r and r + 1), on the tiny Llama pair of test_evaluate."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from test_evaluate import pair_with_texts  # noqa: E402

from lowrank_tools.adapter import Adapter, LoraModule  # noqa: E402
from lowrank_tools.cli import main  # noqa: E402
from lowrank_tools.errors import AdapterMismatch  # noqa: E402
from lowrank_tools.evaluate import evaluate  # noqa: E402
from lowrank_tools.evaluate.patch import applied, plan_patch  # noqa: E402
from lowrank_tools.extract import extract  # noqa: E402
from lowrank_tools.extract.extras import with_magnitudes  # noqa: E402
from lowrank_tools.linalg import RankRule  # noqa: E402


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return pair_with_texts(tmp_path_factory.mktemp("evaluate_dora"))


def _module(out=5, inp=6, r=2, seed=0, magnitude=True):
    g = torch.Generator().manual_seed(seed)
    return LoraModule(B=torch.randn(out, r, generator=g), A=torch.randn(r, inp, generator=g), alpha=4.0,
                      magnitude=torch.rand(out, generator=g) + 0.5 if magnitude else None)


def test_dora_module_rescales_rows_as_the_paper_says_and_restores_bit_for_bit():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5))
    w0 = model[0].weight.detach().clone()
    m = _module()
    patch = plan_patch(model, Adapter(modules={"0": m}), "dora")
    with applied(model, patch):
        merged = w0.double() + 2.0 * (m.B.double() @ m.A.double())  # scale = alpha / r = 2
        expected = m.magnitude.double()[:, None] * merged / merged.norm(dim=1, keepdim=True)
        assert torch.allclose(model[0].weight.double(), expected, rtol=1e-5, atol=1e-6)
        assert torch.allclose(model[0].weight.double().norm(dim=1), m.magnitude.double(), rtol=1e-5)
    assert torch.equal(model[0].weight, w0)


def test_two_dora_modules_on_one_weight_are_refused():
    model = torch.nn.Sequential(torch.nn.Linear(6, 5))
    adapter = Adapter(modules={"0": _module(seed=1), "model.0": _module(seed=2)})
    with pytest.raises(AdapterMismatch, match="two magnitudes for one weight"):
        plan_patch(model, adapter, "two", prefix="model")


def test_full_rank_dora_recovers_all_and_magnitudes_change_the_numbers(pair):
    full = extract(pair["base"], pair["tuned"], rule=RankRule(rank=64)).adapter
    low = extract(pair["base"], pair["tuned"], rule=RankRule(rank=1)).adapter
    ev = evaluate(pair["base"], pair["tuned"], [("full dora", with_magnitudes(full, pair["tuned"])), ("low", low),
                                                ("low dora", with_magnitudes(low, pair["tuned"]))],
                  texts=pair["texts"], batch_size=4, device="cpu")
    full_dora, low_lora, low_dora = ev.adapters
    assert full_dora.kl_recovered == pytest.approx(1.0, abs=1e-5)
    assert low_dora.kl_recovered != pytest.approx(low_lora.kl_recovered, abs=1e-6)  # the magnitudes act
    rows = sum(m.B.shape[0] for m in low.modules.values() if m.kind.value != "embedding")
    assert low_dora.params == low_lora.params + rows


def test_cli_dora_curve_compares_rank_r_dora_with_rank_r_plus_one_lora(pair, tmp_path):
    out, csv_path = tmp_path / "dora.json", tmp_path / "dora.csv"
    result = CliRunner().invoke(main, ["evaluate", str(pair["base"]), str(pair["tuned"]), "--data",
                                       str(pair["root"] / "texts.txt"), "--ranks", "1,2", "--dora", "--device", "cpu",
                                       "--json", str(out), "--csv", str(csv_path), "--plot", str(tmp_path / "figs")])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    sizes = [row["size"] for row in data["adapters"]]
    assert sizes == [{"rank": 1}, {"rank": 2}, {"rank": 3}, {"dora_rank": 1}, {"dora_rank": 2}]
    by = {json.dumps(row["size"]): row for row in data["adapters"]}
    rows = data["dora_vs_lora"]
    assert [row["rank"] for row in rows] == [1, 2]
    for row in rows:
        dora = by[json.dumps({"dora_rank": row["rank"]})]
        lora, nxt = by[json.dumps({"rank": row["rank"]})], by[json.dumps({"rank": row["rank"] + 1})]
        assert row["dora_recovered"] == dora["kl_recovered"] and row["lora_recovered"] == lora["kl_recovered"]
        assert row["lora_next_recovered"] == nxt["kl_recovered"] and row["lora_next_params"] == nxt["params"]
        assert lora["params"] < dora["params"] < nxt["params"]  # m adds one value per row, a rank adds out + in
    assert "DoRA rank 1" in result.output and "dora_rank" in data["reached"]
    assert "dora_rank" in csv_path.read_text().splitlines()[0]


def test_cli_dora_needs_a_curve(pair):
    result = CliRunner().invoke(main, ["evaluate", str(pair["base"]), str(pair["tuned"]), str(pair["tuned"]),
                                       "--data", str(pair["root"] / "texts.txt"), "--dora"])
    assert result.exit_code == 2 and "--dora makes DoRA twins" in result.output
