"""LyCORIS-style modules read exactly: synthetic kohya files with hand-computed deltas, PEFT LoHa/LoKr/DoRA/lora_bias
folders checked against PEFT's own merged weights."""

from __future__ import annotations

import warnings

import pytest
import torch

from safetensors.torch import save_file

from conftest import LinConvNet
from lowrank_tools.adapter import ModuleKind, Param
from lowrank_tools.errors import AdapterFormatError
from lowrank_tools.io.formats import describe_adapter, detect_format, load_adapter


def _r(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def _kohya_file(tmp_path):
    """Every LyCORIS kind in one file, with its dense delta computed by hand (LyCORIS' formulas)."""
    t, want = {}, {}
    # LoHa linear (10, 12), r 3, alpha 6 -> scale 2
    w = {k: _r(*s, seed=i) for i, (k, s) in enumerate([("hada_w1_a", (10, 3)), ("hada_w1_b", (3, 12)),
                                                        ("hada_w2_a", (10, 3)), ("hada_w2_b", (3, 12))])}
    t.update({f"lora_unet_loha.{k}": v for k, v in w.items()}, **{"lora_unet_loha.alpha": torch.tensor(6.0)})
    want["loha"] = 2 * (w["hada_w1_a"] @ w["hada_w1_b"]) * (w["hada_w2_a"] @ w["hada_w2_b"])
    # Tucker LoHa conv (6, 4, 3, 3), r 2, no alpha -> scale 1
    w = {k: _r(*s, seed=10 + i) for i, (k, s) in enumerate([
        ("hada_w1_a", (2, 6)), ("hada_w1_b", (2, 4)), ("hada_t1", (2, 2, 3, 3)),
        ("hada_w2_a", (2, 6)), ("hada_w2_b", (2, 4)), ("hada_t2", (2, 2, 3, 3))])}
    t.update({f"lora_unet_tloha.{k}": v for k, v in w.items()})
    rebuild = lambda a, b, c: torch.einsum("i j k l, j r, i p -> p r k l", c, b, a)  # noqa: E731
    want["tloha"] = rebuild(w["hada_w1_a"], w["hada_w1_b"], w["hada_t1"]) * \
        rebuild(w["hada_w2_a"], w["hada_w2_b"], w["hada_t2"])
    # LoKr linear: w1 full (2, 3), w2 = (5, 2) @ (2, 4), alpha 1 -> scale 1/2
    w = {"lokr_w1": _r(2, 3, seed=20), "lokr_w2_a": _r(5, 2, seed=21), "lokr_w2_b": _r(2, 4, seed=22)}
    t.update({f"lora_unet_lokr.{k}": v for k, v in w.items()}, **{"lora_unet_lokr.alpha": torch.tensor(1.0)})
    want["lokr"] = 0.5 * torch.kron(w["lokr_w1"], w["lokr_w2_a"] @ w["lokr_w2_b"])
    # LoKr both full, placeholder alpha 1e10 -> scale 1
    w = {"lokr_w1": _r(4, 2, seed=23), "lokr_w2": _r(3, 5, seed=24)}
    t.update({f"lora_unet_full.{k}": v for k, v in w.items()}, **{"lora_unet_full.alpha": torch.tensor(1e10)})
    want["full"] = torch.kron(w["lokr_w1"], w["lokr_w2"])
    # LoKr Tucker conv: w1 (2, 2), t2 (2, 2, 3, 3), w2_a (2, 3), w2_b (2, 2): weight (6, 4, 3, 3), alpha 4 -> 2
    w = {"lokr_w1": _r(2, 2, seed=25), "lokr_t2": _r(2, 2, 3, 3, seed=26), "lokr_w2_a": _r(2, 3, seed=27),
         "lokr_w2_b": _r(2, 2, seed=28)}
    t.update({f"lora_unet_tlokr.{k}": v for k, v in w.items()}, **{"lora_unet_tlokr.alpha": torch.tensor(4.0)})
    w2 = torch.einsum("i j k l, i p, j r -> p r k l", w["lokr_t2"], w["lokr_w2_a"], w["lokr_w2_b"])
    want["tlokr"] = 2 * torch.kron(w["lokr_w1"][:, :, None, None], w2.contiguous())
    # Tucker LoCon (lora_mid) conv (5, 4, 3, 3), r 2, alpha 1 -> 1/2, with a DoRA scale
    w = {"lora_down.weight": _r(2, 4, 1, 1, seed=30), "lora_mid.weight": _r(2, 2, 3, 3, seed=31),
         "lora_up.weight": _r(5, 2, 1, 1, seed=32), "dora_scale": _r(5, 1, 1, 1, seed=33).abs()}
    t.update({f"lora_unet_locon.{k}": v for k, v in w.items()}, **{"lora_unet_locon.alpha": torch.tensor(1.0)})
    want["locon"] = 0.5 * torch.einsum("i j k l, i p, j r -> p r k l", w["lora_mid.weight"],
                                       w["lora_up.weight"].flatten(1).T, w["lora_down.weight"].flatten(1))
    # full diff with a bias diff, and a norm layer
    t.update({"lora_unet_d.diff": _r(7, 3, seed=40), "lora_unet_d.diff_b": _r(7, seed=41),
              "lora_unet_n.w_norm": _r(6, seed=42), "lora_unet_n.b_norm": _r(6, seed=43)})
    want["d"] = t["lora_unet_d.diff"]
    # a plain LoRA module beside them
    t.update({"lora_unet_p.lora_down.weight": _r(2, 5, seed=50), "lora_unet_p.lora_up.weight": _r(4, 2, seed=51)})
    want["p"] = t["lora_unet_p.lora_up.weight"] @ t["lora_unet_p.lora_down.weight"]
    save_file(t, str(tmp_path / "lyco.safetensors"))
    return tmp_path / "lyco.safetensors", want, t


def test_every_lycoris_kind_reads_to_its_exact_delta(tmp_path):
    path, want, raw = _kohya_file(tmp_path)
    assert detect_format(path) == "lycoris"
    adapter = load_adapter(path)
    adapter.modules = {n.rsplit(".", 1)[-1]: m for n, m in adapter.modules.items()}  # unet.loha -> loha
    adapter.tensor_deltas = {".".join(n.split(".")[-2:]): t for n, t in adapter.tensor_deltas.items()}
    kinds = {"loha": Param.LOHA, "tloha": Param.LOHA, "lokr": Param.LOKR, "full": Param.LOKR, "tlokr": Param.LOKR,
             "locon": Param.TUCKER, "d": Param.DIFF, "p": Param.LORA}
    for name, param in kinds.items():
        m = adapter.modules[name]
        assert m.param is param, name
        assert tuple(m.weight_shape) == tuple(want[name].shape), name
        assert _rel(m.delta(), want[name]) < 1e-6, name
    assert adapter.modules["tloha"].kind is ModuleKind.CONV and adapter.modules["tlokr"].kind is ModuleKind.CONV
    assert adapter.modules["loha"].rank == 9 and adapter.modules["lokr"].rank == 4 and adapter.modules["full"].rank == 6
    assert adapter.modules["locon"].kind_name == "dora"
    assert torch.equal(adapter.modules["locon"].magnitude, raw["lora_unet_locon.dora_scale"].reshape(5))
    assert torch.equal(adapter.tensor_deltas["d.bias"], raw["lora_unet_d.diff_b"])
    assert torch.equal(adapter.tensor_deltas["n.weight"], raw["lora_unet_n.w_norm"])
    assert torch.equal(adapter.tensor_deltas["n.bias"], raw["lora_unet_n.b_norm"])


def test_exact_rank_is_the_smallest(tmp_path):
    """A LoHa whose r1 r2 = 16 exceeds its 5 rows: exact rank 5; a LoKr rank-deficient W1: rank(W1) rank(W2)."""
    t = {"x.hada_w1_a": _r(5, 4, seed=1), "x.hada_w1_b": _r(4, 30, seed=2), "x.hada_w2_a": _r(5, 4, seed=3),
         "x.hada_w2_b": _r(4, 30, seed=4),
         "y.lokr_w1": torch.outer(_r(3, seed=5), _r(3, seed=6)), "y.lokr_w2": _r(4, 4, seed=7)}
    save_file(t, str(tmp_path / "a.safetensors"))
    adapter = load_adapter(tmp_path / "a.safetensors")
    assert adapter.modules["x"].rank == 5 and adapter.modules["y"].rank == 4
    dense = (t["x.hada_w1_a"] @ t["x.hada_w1_b"]) * (t["x.hada_w2_a"] @ t["x.hada_w2_b"])
    assert _rel(adapter.modules["x"].delta(), dense) < 1e-6


def test_info_names_kinds_and_exact_ranks(tmp_path):
    path, _, _ = _kohya_file(tmp_path)
    facts = describe_adapter(load_adapter(path), path)
    assert facts["types"] == {"diff": 1, "dora": 1, "lokr": 3, "loha": 2, "lora": 1}
    assert facts["exact_ranks"]["loha"] == {"4": 1, "9": 1} and facts["exact_ranks"]["lokr"]["6"] == 1
    assert facts["tensor_deltas"] == 3


@pytest.mark.parametrize(("tensors", "message"), [
    ({"x.hada_w1_a": torch.ones(2, 2), "x.hada_w1_b": torch.ones(2, 2)}, r"module x is a LoHa without hada_w2_a"),
    ({"x.lokr_w1": torch.ones(2, 2)}, r"module x is a LoKr without lokr_w2"),
    ({"x.hada_w1_a": torch.ones(4, 2), "x.hada_w1_b": torch.ones(3, 5), "x.hada_w2_a": torch.ones(4, 2),
      "x.hada_w2_b": torch.ones(2, 5)}, r"module x: its factors .* do not fit together"),
    ({"x.lora_down.weight": torch.ones(2, 3), "x.lora_up.weight": torch.ones(4, 2), "x.dora_scale": torch.ones(3, 1)},
     r"dora_scale \(3, 1\) fits neither"),
    ({"x.lora_down.weight": torch.ones(2, 3), "x.lora_up.weight": torch.ones(4, 2), "x.oft_r": torch.ones(3)},
     r"key x\.oft_r is not a LoRA/LyCORIS tensor"),
])
def test_bad_lycoris_files_name_the_module(tmp_path, tensors, message):
    tensors = {k: v for k, v in tensors.items()}
    tensors.setdefault("y.diff", torch.ones(2, 2))  # makes the file a LyCORIS one whatever the bad module is
    save_file(tensors, str(tmp_path / "bad.safetensors"))
    with pytest.raises(AdapterFormatError, match=message) as info:
        load_adapter(tmp_path / "bad.safetensors")
    assert "\n" not in str(info.value)


def test_legacy_input_axis_dora_is_read_and_flagged(tmp_path):
    t = {"x.lora_down.weight": _r(2, 3, seed=1), "x.lora_up.weight": _r(4, 2, seed=2), "x.dora_scale": _r(1, 3, seed=3)}
    save_file(t, str(tmp_path / "legacy.safetensors"))
    adapter = load_adapter(tmp_path / "legacy.safetensors")
    assert adapter.modules["x"].dora_axis == "in" and adapter.modules["x"].magnitude.shape == (3,)
    assert any("does not convert exactly" in n for n in adapter.notes)


# ------------------------------------------------------------------------------------------- real PEFT files

peft = pytest.importorskip("peft")


def _peft_folder(tmp_path, config, perturb=None):
    torch.manual_seed(0)
    base = LinConvNet()
    model = peft.get_peft_model(base, config)
    if perturb:
        perturb(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(tmp_path / "adapter")
        w0 = {k: v.clone() for k, v in model.get_base_model().state_dict().items() if "base_layer" in k}
        merged = model.merge_and_unload().state_dict()
    # merged - W0: the delta PEFT itself applies (for DoRA: the whole new weight)
    return tmp_path / "adapter", {k.replace(".base_layer", ""): v for k, v in w0.items()}, merged


@pytest.mark.parametrize("config", [
    lambda: peft.LoHaConfig(r=3, alpha=6, target_modules=["lin", "conv"], init_weights=False),
    lambda: peft.LoKrConfig(r=2, alpha=3, target_modules=["lin", "conv"], init_weights=False),
    lambda: peft.LoKrConfig(r=2, alpha=3, target_modules=["lin"], init_weights=False, decompose_both=True),
], ids=["loha", "lokr", "lokr-both"])
def test_peft_loha_lokr_match_peft_merged_weights(tmp_path, config):
    folder, w0, merged = _peft_folder(tmp_path, config())
    adapter = load_adapter(folder)
    for name, m in adapter.modules.items():
        want = merged[f"{name}.weight"] - w0[f"{name}.weight"]
        assert _rel(m.delta().reshape(want.shape), want) < 1e-5, name


def test_peft_lora_bias_is_a_bias_delta(tmp_path):
    def perturb(model):
        with torch.no_grad():
            model.base_model.model.lin.lora_B["default"].bias.normal_()
    folder, w0, merged = _peft_folder(
        tmp_path, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["lin"], lora_bias=True, init_lora_weights=False),
        perturb)
    adapter = load_adapter(folder)
    assert _rel(adapter.modules["lin"].delta(), merged["lin.weight"] - w0["lin.weight"]) < 1e-5
    assert _rel(adapter.tensor_deltas["lin.bias"], merged["lin.bias"] - w0["lin.bias"]) < 1e-5


def test_peft_dora_magnitude_is_read(tmp_path):
    def perturb(model):
        with torch.no_grad():
            for mod in (model.base_model.model.lin, model.base_model.model.conv):
                mod.lora_magnitude_vector["default"].weight.mul_(1.5)
    folder, _, _ = _peft_folder(tmp_path, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["lin", "conv"],
                                                          use_dora=True, init_lora_weights=False), perturb)
    adapter = load_adapter(folder)
    assert adapter.modules["lin"].magnitude.shape == (10,) and adapter.modules["conv"].magnitude.shape == (6,)
    assert adapter.modules["conv"].kind_name == "dora"


def test_peft_loha_rank_disagreeing_with_config_is_refused(tmp_path):
    import json
    folder = tmp_path / "a"
    folder.mkdir()
    save_file({f"base_model.model.x.{k}": v for k, v in {"hada_w1_a": _r(4, 2, seed=1), "hada_w1_b": _r(2, 5, seed=2),
                                                            "hada_w2_a": _r(4, 2, seed=3),
                                                            "hada_w2_b": _r(2, 5, seed=4)}.items()},
              str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LOHA", "r": 8, "alpha": 8}))
    with pytest.raises(AdapterFormatError, match=r"rank 8 for x .* factors have rank 2"):
        load_adapter(folder)
