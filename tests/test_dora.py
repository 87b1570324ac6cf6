"""DoRA and whole-tensor deltas against real PEFT: apply equals PEFT's merged weights, PEFT loads what we write,
resize keeps the magnitude, merge refuses sums it cannot define."""

from __future__ import annotations

import warnings

import pytest
import torch

from safetensors.torch import load_file, save_file

from conftest import LinConvNet
from lowrank_tools.apply import apply
from lowrank_tools.errors import ConversionError
from lowrank_tools.io.formats import load_adapter, save_adapter
from lowrank_tools.linalg import RankRule
from lowrank_tools.resize import resize

peft = pytest.importorskip("peft")


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def _base_file(tmp_path):
    torch.manual_seed(0)
    net = LinConvNet()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "base.safetensors"))
    return net, tmp_path / "base.safetensors"


def _peft_dora(tmp_path, *, bias=False):
    """A PEFT DoRA (and/or lora_bias) adapter with random factors and a perturbed magnitude; its merged weights."""
    net, base = _base_file(tmp_path)
    targets = ["lin"] if bias else ["lin", "conv"]
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=not bias, lora_bias=bias,
                             init_lora_weights=False)
    torch.manual_seed(1)
    model = peft.get_peft_model(net, config)
    with torch.no_grad():
        for name in targets:
            layer = getattr(model.base_model.model, name)
            if bias:
                layer.lora_B["default"].bias.normal_()
            else:  # untouched, DoRA acts as plain LoRA: perturb m or the test proves nothing
                layer.lora_magnitude_vector["default"].weight.mul_(torch.linspace(0.5, 1.5, layer.out_features if
                                                                                  name == "lin" else 6).reshape(
                    layer.lora_magnitude_vector["default"].weight.shape))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(tmp_path / "adapter")
        x = torch.randn(3, 12, generator=torch.Generator().manual_seed(2))
        y = model(x).detach()
        merged = {k: v.clone() for k, v in model.merge_and_unload().state_dict().items()}
    return tmp_path / "adapter", base, merged, x, y


@pytest.mark.parametrize("bias", [False, True], ids=["dora", "lora_bias"])
def test_apply_equals_peft_merge(tmp_path, bias):
    folder, base, merged, _, _ = _peft_dora(tmp_path, bias=bias)
    adapter = load_adapter(folder)
    apply(base, [adapter], tmp_path / "out.safetensors")
    out = load_file(str(tmp_path / "out.safetensors"))
    for key, want in merged.items():
        assert _rel(out[key], want) < 1e-5, key


def test_peft_loads_what_we_write_with_no_missing_keys(tmp_path):
    folder, _, _, x, y = _peft_dora(tmp_path)
    adapter = load_adapter(folder)
    save_adapter(adapter, tmp_path / "ours", format="peft")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.PeftModel.from_pretrained(LinConvNet(), tmp_path / "ours")
    keys = set(load_file(str(tmp_path / "ours" / "adapter_model.safetensors")))
    assert any("lora_magnitude_vector" in k for k in keys)
    assert model.peft_config["default"].use_dora
    assert _rel(model(x).detach(), y) < 1e-5


def test_lora_bias_round_trip_through_peft(tmp_path):
    folder, _, _, x, y = _peft_dora(tmp_path, bias=True)
    save_adapter(load_adapter(folder), tmp_path / "ours", format="peft")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.PeftModel.from_pretrained(LinConvNet(), tmp_path / "ours")
    assert model.peft_config["default"].lora_bias
    assert _rel(model(x).detach(), y) < 1e-5


def test_resize_keeps_the_magnitude(tmp_path):
    folder, base, merged, _, _ = _peft_dora(tmp_path)
    adapter = load_adapter(folder)
    same = resize(adapter, rule=RankRule(rank=4)).adapter  # full rank: the same product, the same m
    apply(base, [same], tmp_path / "same.safetensors")
    assert _rel(load_file(str(tmp_path / "same.safetensors"))["lin.weight"], merged["lin.weight"]) < 1e-5
    small = resize(adapter, rule=RankRule(rank=2)).adapter
    for name, m in small.modules.items():
        assert m.rank == 2 and torch.equal(m.magnitude, adapter.modules[name].magnitude)


def test_legacy_input_axis_dora_applies_by_column_and_refuses_peft(tmp_path):
    net, base = _base_file(tmp_path)
    g = torch.Generator().manual_seed(3)
    down, up, scale = torch.randn(2, 12, generator=g), torch.randn(10, 2, generator=g), torch.rand(1, 12, generator=g) + 0.5
    save_file({"lin.lora_down.weight": down, "lin.lora_up.weight": up, "lin.dora_scale": scale},
              str(tmp_path / "legacy.safetensors"))
    adapter = load_adapter(tmp_path / "legacy.safetensors", base=base)
    apply(base, [adapter], tmp_path / "out.safetensors")
    W = net.lin.weight.detach() + up @ down
    want = W * scale / W.norm(dim=0, keepdim=True)  # LyCORIS wd_on_out=False: per input column
    assert _rel(load_file(str(tmp_path / "out.safetensors"))["lin.weight"], want) < 1e-5
    with pytest.raises(ConversionError, match="does not convert exactly"):
        save_adapter(adapter, tmp_path / "peft", format="peft")
    save_adapter(adapter, tmp_path / "back.safetensors", format="kohya")  # kohya keeps the legacy form
    back = load_file(str(tmp_path / "back.safetensors"))
    assert [tuple(v.shape) for k, v in back.items() if k.endswith(".dora_scale")] == [(1, 12)]
    assert load_adapter(tmp_path / "back.safetensors").modules["lin"].dora_axis == "in"


def test_dora_row_norms_without_forming_the_weight():
    from lowrank_tools.linalg.structured import dora_row_norms
    g = torch.Generator().manual_seed(4)
    W0, B, A = torch.randn(50, 30, generator=g), torch.randn(50, 3, generator=g), torch.randn(3, 30, generator=g)
    want = (W0.double() + 0.7 * (B.double() @ A.double())).norm(dim=1)
    assert torch.allclose(dora_row_norms(W0, B, A, 0.7, block=16), want, rtol=1e-12)


def test_lora_to_dora_is_exact_and_peft_loads_it(tmp_path):
    from lowrank_tools.dora import lora_to_dora
    folder, base, merged, x, y = _peft_dora(tmp_path, bias=False)
    plain = load_adapter(folder)
    for m in plain.modules.values():
        m.magnitude = None  # the same factors as plain LoRA
    dora = lora_to_dora(plain, base).adapter
    apply(base, [plain], tmp_path / "plain.safetensors")
    apply(base, [dora], tmp_path / "dora.safetensors")
    a, b = load_file(str(tmp_path / "plain.safetensors")), load_file(str(tmp_path / "dora.safetensors"))
    for key in a:
        assert _rel(b[key], a[key]) < 1e-6, key
    save_adapter(dora, tmp_path / "ours", format="peft")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.PeftModel.from_pretrained(LinConvNet(), tmp_path / "ours")
    W = model.merge_and_unload().state_dict()
    assert _rel(W["lin.weight"], a["lin.weight"]) < 1e-5 and _rel(W["conv.weight"], a["conv.weight"]) < 1e-5


def test_dora_to_lora_is_lossy_and_says_how_much(tmp_path):
    from lowrank_tools.dora import dora_to_lora
    folder, base, merged, _, _ = _peft_dora(tmp_path)
    adapter = load_adapter(folder)
    w0 = load_file(str(base))
    low = dora_to_lora(adapter, base)
    full = dora_to_lora(adapter, base, rule=RankRule(rank=1000))  # every singular value: exact
    for name in ("lin", "conv"):
        D = (merged[f"{name}.weight"] - w0[f"{name}.weight"]).double().reshape(merged[f"{name}.weight"].shape[0], -1)
        S = torch.linalg.svdvals(D)
        assert low.adapter.modules[name].rank == 4 and low.adapter.modules[name].magnitude is None
        assert abs(low.rel_errors[name] - float(S[4:].norm() / S.norm())) < 1e-4
        assert low.rel_errors[name] > 1e-3  # a row-scaled W0 is not low-rank: the loss is real
        assert full.rel_errors[name] < 1e-6
        got = full.adapter.modules[name].delta_matrix()
        assert _rel(got, D) < 1e-5


def test_cli_convert_dora_to_lora_reports_its_error(tmp_path):
    from click.testing import CliRunner
    from lowrank_tools.cli import main
    folder, base, *_ = _peft_dora(tmp_path)
    runner = CliRunner()
    res = runner.invoke(main, ["convert", str(folder), "-o", str(tmp_path / "plain"), "--format", "peft",
                               "--dora", "lora"])
    assert res.exit_code == 2 and "needs --base" in res.output
    res = runner.invoke(main, ["convert", str(folder), "-o", str(tmp_path / "plain"), "--format", "peft",
                               "--dora", "lora", "--base", str(base)])
    assert res.exit_code == 0, res.output
    assert "largest rel error" in res.output
    assert {m.kind_name for m in load_adapter(tmp_path / "plain").modules.values()} == {"lora"}
