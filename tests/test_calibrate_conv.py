"""calibrate on conv layers (issue 17): the statistics of a Conv1d/Conv2d are X X^T over its receptive-field patches
in the weight's flattened (out, in * kh * kw) layout, so the whitened algebra holds for convs as for Linear layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowrank_tools.calibrate.run import _Hooks, conv_patches
from lowrank_tools.extract import extract
from lowrank_tools.io.calibration import InputStats, write_calibration
from lowrank_tools.linalg import RankRule
from lowrank_tools.linalg.whiten import whitened_factors

CONVS = {
    "conv2d": lambda: nn.Conv2d(3, 5, 3, padding=1),
    "conv2d-strided-dilated": lambda: nn.Conv2d(3, 5, (3, 2), stride=(2, 1), dilation=(1, 2), padding=(1, 0)),
    "conv2d-reflect-same": lambda: nn.Conv2d(3, 5, 3, padding="same", padding_mode="reflect"),
    "conv1d": lambda: nn.Conv1d(3, 5, 4, padding=2, stride=2),
    "conv1d-circular": lambda: nn.Conv1d(3, 5, 3, padding=1, padding_mode="circular"),
}


def _inputs(conv: nn.Module, n: int = 6, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (n, 3, 9, 7) if isinstance(conv, nn.Conv2d) else (n, 3, 11)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    return x * torch.tensor([3.0, 1.0, 0.1], dtype=torch.float64).view(1, 3, *([1] * (x.ndim - 2)))  # anisotropic


def _conv(conv: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The module's own forward with another weight (no bias): padding modes and all."""
    return conv._conv_forward(x, weight.to(x.dtype), None)


@pytest.mark.parametrize("name", list(CONVS))
def test_patch_statistics_give_the_conv_output_energy(name):
    """For any weight W: ||conv(x, W)||^2 = tr(W_flat C W_flat^T), C summed by the calibrate hook."""
    conv = CONVS[name]().double()
    x = _inputs(conv)
    hooks = _Hooks(nn.Sequential(conv))
    nn.Sequential(conv)(x)
    hooks.close()
    (key, C), = hooks.sums.items()
    assert key == "0" and C.shape == (conv.weight[0].numel(),) * 2
    assert hooks.tokens[key] == conv_patches(conv, x).shape[0] == _conv(conv, x, conv.weight)[0, 0].numel() * len(x)
    W = torch.randn(conv.weight.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    energy = float(_conv(conv, x, W).square().sum())
    Wf = W.reshape(W.shape[0], -1)
    assert float(torch.trace(Wf @ C @ Wf.T)) == pytest.approx(energy, rel=1e-10)


@pytest.mark.parametrize("name", ["conv2d", "conv1d-circular"])
def test_discarded_whitened_energy_is_the_measured_conv_output_error(name, tmp_path):
    """extract --calibration on a conv kernel: the written factors' output error, run through the real conv on the
    calibration inputs, is the discarded whitened spectrum (damping 0: exact), and beats plain SVD's."""
    conv = CONVS[name]().double()
    x = _inputs(conv, n=12)
    C = conv_patches(conv, x).mT @ conv_patches(conv, x)  # (in*k, in*k)
    g = torch.Generator().manual_seed(2)
    base = {"net.conv.weight": torch.randn(conv.weight.shape, generator=g)}
    tuned = {"net.conv.weight": base["net.conv.weight"] + torch.randn(conv.weight.shape, generator=g)}
    stats = tmp_path / "stats.safetensors"
    write_calibration(stats, [InputStats(("net.conv",), C, conv_patches(conv, x).shape[0])])
    r = 2
    ours = extract(base, tuned, rule=RankRule(rank=r), method="exact", calibration=stats, damping=0.0)
    plain = extract(base, tuned, rule=RankRule(rank=r), method="exact")
    dW = (tuned["net.conv.weight"] - base["net.conv.weight"]).double()
    full = whitened_factors(dW.reshape(dW.shape[0], -1), C, min(dW.shape[0], C.shape[0]), damping=0.0,
                            method="exact").svd.S  # every singular value of dW L
    discarded = float(torch.sum(full[r:].double() ** 2))

    def output_error(result):
        return float(_conv(conv, x, dW - result.adapter.modules["net.conv"].delta().double()).square().sum())

    assert output_error(ours) == pytest.approx(discarded, rel=1e-4)
    assert output_error(ours) < output_error(plain)
    record = ours.report.layers[0]
    assert record.extra["whitened"] is True
    total = float(_conv(conv, x, dW).square().sum())
    assert record.extra["output_rel_error"] == pytest.approx((discarded / total) ** 0.5, rel=1e-4)
    assert ours.adapter.modules["net.conv"].A.shape == (r, dW[0].numel())


def test_grouped_convs_are_not_hooked_and_geometry_splits_groups():
    """A depthwise conv is left to plain SVD; two convs reading one tensor share statistics only when their
    patches are the same (same kernel, stride, padding, dilation)."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 1)
            self.depthwise = nn.Conv2d(3, 3, 3, groups=3)

        def forward(self, x):
            return self.a(x), self.b(x), self.c(x), self.depthwise(x)

    net = Net()
    hooks = _Hooks(net)
    net(torch.randn(2, 3, 6, 6))
    hooks.close()
    assert hooks.groups == {"a": ["a", "b"], "c": ["c"]}
    assert hooks.sums["a"].shape == (27, 27) and hooks.sums["c"].shape == (3, 3)
