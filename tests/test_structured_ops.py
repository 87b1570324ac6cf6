"""resize / merge / convert / info on LoHa and LoKr modules: optimal truncations, exact sums, real consumers."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from lowrank_tools.adapter import Adapter, LoraModule
from lowrank_tools.cli import main
from lowrank_tools.io.formats import load_adapter, save_adapter
from lowrank_tools.linalg import RankRule
from lowrank_tools.io.lycoris import structured_module
from lowrank_tools.merge import merge
from lowrank_tools.resize import resize


def _r(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _loha(out, inp, r, seed):
    return {"hada_w1_a": _r(out, r, seed=seed), "hada_w1_b": _r(r, inp, seed=seed + 1),
            "hada_w2_a": _r(out, r, seed=seed + 2), "hada_w2_b": _r(r, inp, seed=seed + 3)}


def _lokr(seed):
    return {"lokr_w1": _r(3, 4, seed=seed), "lokr_w2_a": _r(8, 2, seed=seed + 1), "lokr_w2_b": _r(2, 6, seed=seed + 2)}


def _dense(t, scale=1.0):
    if "hada_w1_a" in t:
        return scale * (t["hada_w1_a"] @ t["hada_w1_b"]).double() * (t["hada_w2_a"] @ t["hada_w2_b"]).double()
    return scale * torch.kron(t["lokr_w1"].double(), (t["lokr_w2_a"] @ t["lokr_w2_b"]).double())


def _optimal_error(M, k):
    S = torch.linalg.svdvals(M)
    return float(S[k:].square().sum().sqrt())


@pytest.mark.parametrize("t", [_loha(20, 30, 3, 1), _loha(12, 40, 4, 5), _lokr(9)], ids=["loha", "loha-wide", "lokr"])
@pytest.mark.parametrize("k", [1, 4])
def test_resize_is_the_optimal_truncation(t, k):
    module = structured_module("m", t, alpha=None)
    out = resize(Adapter(modules={"m": module}), rule=RankRule(rank=k))
    new = out.adapter.modules["m"]
    M = _dense(t)
    err = float((M - new.scale * (new.B.double() @ new.A.double())).norm())
    assert new.rank == k
    assert abs(err - _optimal_error(M, k)) <= 1e-4 * _optimal_error(M, k)
    assert abs(out.report.layers[0].rel_error - err / float(M.norm())) < 1e-5  # the report says the same


def test_merge_mixes_loha_lokr_and_plain_lora_exactly():
    loha, plain = structured_module("m", _loha(24, 12, 2, 1), alpha=4.0), \
        LoraModule(B=_r(24, 3, seed=7), A=_r(3, 12, seed=8), alpha=6.0)
    t = {"lokr_w1": _r(3, 2, seed=3), "lokr_w2_a": _r(8, 2, seed=4), "lokr_w2_b": _r(2, 6, seed=5)}  # (24, 12)
    lokr = structured_module("m", t, alpha=None)
    merged = merge([(Adapter(modules={"m": loha}), 0.5), (Adapter(modules={"m": plain}), -1.0),
                    (Adapter(modules={"m": lokr}), 2.0)]).adapter.modules["m"]
    want = 0.5 * _dense(_loha(24, 12, 2, 1), 2.0) - 2.0 * (_r(24, 3, seed=7) @ _r(3, 12, seed=8)).double() \
        + 2.0 * _dense(t)
    got = merged.scale * (merged.B.double() @ merged.A.double())
    assert float((got - want).norm() / want.norm()) < 1e-6


def test_cli_convert_and_info(tmp_path):
    t = {f"lora_unet_a.{k}": v for k, v in _loha(10, 12, 3, 1).items()}
    t.update({f"lora_unet_b.{k}": v for k, v in _lokr(5).items()})
    save_file(t, str(tmp_path / "lyco.safetensors"))
    runner = CliRunner()
    res = runner.invoke(main, ["info", str(tmp_path / "lyco.safetensors"), "--json"])
    assert res.exit_code == 0, res.output
    facts = json.loads(res.output)
    assert facts["types"] == {"loha": 1, "lokr": 1} and facts["exact_ranks"] == {"loha": {"9": 1}, "lokr": {"6": 1}}
    res = runner.invoke(main, ["convert", str(tmp_path / "lyco.safetensors"), "-o", str(tmp_path / "peft"),
                               "--format", "peft", "-q"])
    assert res.exit_code == 0, res.output
    plain = load_adapter(tmp_path / "peft")
    original = load_adapter(tmp_path / "lyco.safetensors")
    for name, m in plain.modules.items():
        assert m.param.value == "lora" and m.rank == original.modules[name].rank
        want = original.modules[name].delta()
        assert float((m.delta() - want).norm() / want.norm()) < 1e-6


peft = pytest.importorskip("peft")


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(12, 10)
        self.conv = torch.nn.Conv2d(4, 6, 3)

    def forward(self, x, img):
        return self.lin(x), self.conv(img)


@pytest.mark.parametrize("config", [
    lambda: peft.LoHaConfig(r=2, alpha=3, target_modules=["lin", "conv"], init_weights=False),
    lambda: peft.LoKrConfig(r=2, alpha=3, target_modules=["lin", "conv"], init_weights=False),
], ids=["loha", "lokr"])
def test_peft_loha_lokr_converted_to_lora_load_in_peft(tmp_path, config):
    """PEFT's LoHa conv factors are flattened (r, in*k*k): the base gives the kernel back, PEFT loads the LoRA."""
    torch.manual_seed(0)
    net = _Net()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "base.safetensors"))
    model = peft.get_peft_model(net, config())
    g = torch.Generator().manual_seed(3)
    x, img = torch.randn(2, 12, generator=g), torch.randn(2, 4, 5, 5, generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(tmp_path / "structured")
        want = [y.detach() for y in model(x, img)]
        adapter = load_adapter(tmp_path / "structured", base=tmp_path / "base.safetensors")
        save_adapter(adapter, tmp_path / "lora", format="peft")
        torch.manual_seed(0)
        lora = peft.PeftModel.from_pretrained(_Net(), tmp_path / "lora")
    for got, w in zip(lora(x, img), want):
        assert float((got.detach() - w).norm() / w.norm()) < 1e-5
