"""A real producer: files written by lycoris-lora (LoHa, Tucker LoHa, LoKr, Tucker LoKr, Tucker LoCon, DoRA), read by
us and applied to the base, give the outputs of LyCORIS' own forward pass (its merge helpers apply the LoHa/LoKr
scale twice: the forward pass is the ground truth, FORMAT-FACTS.md)."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

from lowrank_tools.apply import apply
from lowrank_tools.io.formats import load_adapter, save_adapter

lycoris = pytest.importorskip("lycoris")
logging.getLogger("LyCORIS").setLevel(logging.ERROR)


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(64, 48)
        self.conv = torch.nn.Conv2d(16, 24, 3, padding=1)

    def forward(self, x, img):
        return self.lin(x), self.conv(img)


CASES = {
    "loha": dict(algo="loha"),
    "loha-tucker": dict(algo="loha", use_tucker=True),
    "lokr": dict(algo="lokr", factor=4),
    "lokr-tucker": dict(algo="lokr", factor=2, use_tucker=True),  # factor 2: conv gets lokr_t2
    "locon-tucker": dict(algo="locon", use_tucker=True),
    "dora": dict(algo="lora", dora_wd=True),
    "loha-dora": dict(algo="loha", dora_wd=True),
}


def _inputs():
    g = torch.Generator().manual_seed(5)
    return torch.randn(3, 64, generator=g), torch.randn(2, 16, 8, 8, generator=g)


def _lycoris_file(tmp_path, case):
    torch.manual_seed(0)
    model = _Net()
    save_file({k: v.clone().contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "base.safetensors"))
    lycoris.LycorisNetwork.apply_preset({"target_name": ["lin", "conv"]})
    options = dict(CASES[case])
    net = lycoris.create_lycoris(model, 1.0, linear_dim=4, linear_alpha=2, conv_dim=4, conv_alpha=2, **options)
    net.apply_to()
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for name, p in net.named_parameters():  # every factor random and non-zero (trained-like)
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if "dora_scale" in name else 0.0))
        y = model(*_inputs())
    net.save_weights(str(tmp_path / "raw.safetensors"), torch.float32, {})
    # LyCORIS names modules "lycoris_<path>"; kohya_names knows the kohya prefixes (lora_unet_, ...)
    raw = load_file(str(tmp_path / "raw.safetensors"))
    save_file({k.replace("lycoris_", "lora_unet_", 1): v for k, v in raw.items()}, str(tmp_path / "lyco.safetensors"))
    net.restore()
    return tmp_path / "lyco.safetensors", tmp_path / "base.safetensors", y, raw


def _outputs(weights):
    model = _Net()
    model.load_state_dict(load_file(str(weights)))
    with torch.no_grad():
        return model(*_inputs())


@pytest.mark.parametrize("case", list(CASES))
def test_lycoris_files_apply_like_the_lycoris_forward(tmp_path, case):
    path, base, want, raw = _lycoris_file(tmp_path, case)
    adapter = load_adapter(path, base=base)
    if "dora" in case:
        assert {m.kind_name for m in adapter.modules.values()} == {"dora"}
    if "tucker" in case:
        assert any(k.endswith(("hada_t1", "lokr_t2", "lora_mid.weight")) for k in raw)
    apply(base, [adapter], tmp_path / "out.safetensors")
    got = _outputs(tmp_path / "out.safetensors")
    for g, w in zip(got, want):
        assert float((g - w).norm() / w.norm()) < 1e-4, case


@pytest.mark.parametrize("case", ["loha", "lokr-tucker", "locon-tucker"])
def test_converted_to_plain_lora_is_exact(tmp_path, case):
    """convert: plain LoRA at the smallest exact rank, the same outputs through apply."""
    path, base, want, _ = _lycoris_file(tmp_path, case)
    save_adapter(load_adapter(path, base=base), tmp_path / "plain.safetensors", format="kohya")
    plain = load_adapter(tmp_path / "plain.safetensors", base=base)
    assert {m.param.value for m in plain.modules.values()} == {"lora"}
    apply(base, [plain], tmp_path / "out.safetensors")
    for g, w in zip(_outputs(tmp_path / "out.safetensors"), want):
        assert float((g - w).norm() / w.norm()) < 1e-4, case
