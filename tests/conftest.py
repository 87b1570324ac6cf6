"""Shared fixtures: checkpoints with planted low-rank deltas whose answer is known."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file


def planted_delta(out: int, inp: int, k: int, *, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    """An exactly rank-k (out, in) matrix B @ C."""
    g = torch.Generator().manual_seed(seed)
    return scale * (torch.randn(out, k, generator=g) @ torch.randn(k, inp, generator=g)) / k**0.5


def planted(values, m: int, n: int, seed: int = 0) -> torch.Tensor:
    """(m, n) float32 with exactly the singular values ``values`` (orthonormal random U, V)."""
    g = torch.Generator().manual_seed(seed)
    k = len(values)
    U = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64)).Q
    return ((U * torch.tensor(values, dtype=torch.float64)) @ V.T).float()


def make_pair(shapes: dict[str, tuple[int, ...]], *, k: int = 3, seed: int = 0,
              dtype: torch.dtype = torch.float32) -> tuple[dict, dict]:
    """Base and tuned state dicts: every tensor of ndim >= 2 gets a planted rank-k delta (1-D: a small change)."""
    g = torch.Generator().manual_seed(seed)
    base, tuned = {}, {}
    for i, (name, shape) in enumerate(shapes.items()):
        w0 = torch.randn(*shape, generator=g)
        if len(shape) >= 2:
            d = planted_delta(shape[0], int(torch.tensor(shape[1:]).prod()), k, seed=seed + i + 1).reshape(shape)
        else:
            d = 0.01 * torch.randn(*shape, generator=g)
        base[name] = w0.to(dtype).contiguous()
        tuned[name] = (w0 + d).to(dtype).contiguous()
    return base, tuned


LLAMA_SHAPES = {
    "model.layers.0.self_attn.q_proj.weight": (32, 32),
    "model.layers.0.self_attn.v_proj.weight": (16, 32),
    "model.layers.0.mlp.up_proj.weight": (48, 32),
    "model.layers.0.mlp.down_proj.weight": (32, 48),
    "model.layers.0.input_layernorm.weight": (32,),
}


@pytest.fixture
def planted_files(tmp_path: Path):
    """(base.safetensors, tuned.safetensors, base dict, tuned dict) with rank-3 deltas."""
    base, tuned = make_pair(LLAMA_SHAPES, k=3)
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(tuned, str(tmp_path / "tuned.safetensors"))
    return tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", base, tuned


class LinConvNet(torch.nn.Module):
    """A Linear(12 -> 10) and a Conv2d(4 -> 6, 3x3): the smallest model PEFT's LoRA/LoHa/LoKr/DoRA configs wrap."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(12, 10)
        self.conv = torch.nn.Conv2d(4, 6, 3)

    def forward(self, x):
        return self.lin(x)
