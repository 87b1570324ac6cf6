"""merge of DoRA modules: the direction update is PEFT's exact "cat" sum, the magnitude the weighted mean of the
inputs' magnitudes (PEFT's add_weighted_adapter re-initialises it to ||W0||_row instead: PEFT #3761)."""

from __future__ import annotations

import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import LinConvNet
from lowrank_tools.adapter import Adapter, LoraModule
from lowrank_tools.apply import apply
from lowrank_tools.errors import AdapterMismatch
from lowrank_tools.io.formats import load_adapter
from lowrank_tools.linalg import RankRule
from lowrank_tools.merge import merge

peft = pytest.importorskip("peft")
TARGETS = ("lin", "conv")


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def two_dora(tmp_path_factory):
    """PEFT DoRA adapters "default" and "b" (random factors, perturbed magnitudes) on one model, saved; and PEFT's
    own add_weighted_adapter(cat, 0.7 / 0.3) merged layer state."""
    tmp = tmp_path_factory.mktemp("dora")
    torch.manual_seed(0)
    net = LinConvNet()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp / "base.safetensors"))
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(TARGETS), use_dora=True, init_lora_weights=False)
    torch.manual_seed(1)
    model = peft.get_peft_model(net, config)
    model.add_adapter("b", peft.LoraConfig(r=3, lora_alpha=5, target_modules=list(TARGETS), use_dora=True,
                                           init_lora_weights=False))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name in TARGETS:
            layer = getattr(model.base_model.model, name)
            for adapter in ("default", "b"):
                mag = layer.lora_magnitude_vector[adapter].weight
                mag.mul_(0.5 + torch.rand(mag.shape, generator=g))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(tmp / "adapters")
        model.add_weighted_adapter(["default", "b"], [0.7, 0.3], "m", combination_type="cat")
    peft_state = {}
    for name in TARGETS:
        layer = getattr(model.base_model.model, name)
        direction = layer.scaling["m"] * (layer.lora_B["m"].weight.flatten(1) @ layer.lora_A["m"].weight.flatten(1))
        peft_state[name] = {"direction": direction.detach(), "m": layer.lora_magnitude_vector["m"].weight.detach(),
                            "W0": layer.base_layer.weight.detach().flatten(1)}
    a, b = load_adapter(tmp / "adapters"), load_adapter(tmp / "adapters" / "b")
    return tmp / "base.safetensors", a, b, peft_state


def test_direction_is_peft_cat_and_magnitude_the_weighted_mean(two_dora):
    _, a, b, peft_state = two_dora
    merged = merge([(a, 0.7), (b, 0.3)]).adapter
    for name in TARGETS:
        m = merged.modules[name]
        assert _rel(m.delta_matrix(), peft_state[name]["direction"]) < 1e-5, name
        want = 0.7 * a.modules[name].magnitude.double() + 0.3 * b.modules[name].magnitude.double()
        assert torch.allclose(m.magnitude.double().reshape(-1), want.reshape(-1), rtol=1e-6), name
        # PEFT (#3761) re-initialises m (the row norms of its freshly initialised layer), a function of neither
        # input's magnitude: where we knowingly differ
        assert not torch.allclose(peft_state[name]["m"].reshape(-1).double(), want.reshape(-1), rtol=1e-2)


def test_applied_merge_is_the_dora_weight_of_the_sum(two_dora, tmp_path):
    base, a, b, peft_state = two_dora
    merged = merge([(a, 0.7), (b, 0.3)]).adapter
    apply(base, [merged], tmp_path / "out.safetensors")
    out = load_file(str(tmp_path / "out.safetensors"))
    for name in TARGETS:
        W = peft_state[name]["W0"].double() + peft_state[name]["direction"].double()
        m = 0.7 * a.modules[name].magnitude.double().reshape(-1) + 0.3 * b.modules[name].magnitude.double().reshape(-1)
        want = (m / W.norm(dim=1)).unsqueeze(1) * W
        assert _rel(out[f"{name}.weight"].flatten(1), want) < 1e-5, name


@pytest.mark.parametrize("weight", [1.0, 0.5, -2.0])
def test_one_dora_input_keeps_its_magnitude(two_dora, weight):
    _, a, _, _ = two_dora
    merged = merge([(a, weight)]).adapter
    for name in TARGETS:
        assert torch.allclose(merged.modules[name].magnitude, a.modules[name].magnitude), name
        assert _rel(merged.modules[name].delta_matrix(), weight * a.modules[name].delta_matrix()) < 1e-6


def test_truncated_merge_keeps_the_mean_magnitude(two_dora):
    _, a, b, _ = two_dora
    exact = merge([(a, 0.7), (b, 0.3)]).adapter
    small = merge([(a, 0.7), (b, 0.3)], rule=RankRule(rank=2)).adapter
    for name in TARGETS:
        assert small.modules[name].rank == 2
        assert torch.equal(small.modules[name].magnitude, exact.modules[name].magnitude)


def test_refusals_name_the_module(two_dora):
    _, a, b, _ = two_dora
    with pytest.raises(AdapterMismatch, match=r"module (lin|conv): the weights of its DoRA inputs sum to 0"):
        merge([(a, 1.0), (b, -1.0)])
    plain = Adapter(modules={n: LoraModule(B=m.B, A=m.A, alpha=m.alpha, kind=m.kind, weight_shape=m.weight_shape)
                             for n, m in b.modules.items()})
    with pytest.raises(AdapterMismatch, match=r"module (lin|conv) is DoRA .* but plain LoRA .*convert --dora dora"):
        merge([(a, 0.5), (plain, 0.5)])
