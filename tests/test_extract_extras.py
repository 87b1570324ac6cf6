"""extract --dora / --keep-bias / --keep-norms: what is carried comes back exactly through apply."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from lowrank_tools.cli import main
from lowrank_tools.io.formats import load_adapter


def _pair(tmp_path, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = {"l.weight": torch.randn(16, 12, generator=g), "l.bias": torch.randn(16, generator=g),
            "norm.weight": torch.ones(12), "norm.bias": torch.zeros(12)}
    tuned = {k: v.clone() for k, v in base.items()}
    tuned["l.weight"] += (torch.randn(16, 3, generator=g) @ torch.randn(3, 12, generator=g)) * 0.3 \
        + 0.01 * torch.randn(16, 12, generator=g)  # rank 3 and a small full-rank rest: a truncation loses something
    tuned["l.bias"] += 0.1 * torch.randn(16, generator=g)
    tuned["norm.weight"] += 0.05 * torch.randn(12, generator=g)
    tuned["norm.bias"] += 0.05 * torch.randn(12, generator=g)
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(tuned, str(tmp_path / "tuned.safetensors"))
    return tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", tuned


def _run(*args):
    res = CliRunner().invoke(main, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res


@pytest.mark.parametrize("fmt,out", [("kohya", "a.safetensors"), ("peft", "a")])
def test_dora_bias_and_norms_come_back_through_apply(tmp_path, fmt, out):
    base, tuned, want = _pair(tmp_path)
    _run("extract", base, tuned, "-o", tmp_path / out, "--rank", "2", "--format", fmt, "--dora", "--keep-bias",
         "--keep-norms", "-q")
    adapter = load_adapter(tmp_path / out, base=base)
    assert adapter.modules["l"].kind_name == "dora"
    _run("apply", base, tmp_path / out, "-o", tmp_path / "applied.safetensors", "-q")
    got = load_file(str(tmp_path / "applied.safetensors"))
    for key in ("l.bias", "norm.weight", "norm.bias"):
        assert torch.allclose(got[key], want[key], atol=1e-6), key
    # DoRA: the tuned row norms exactly, only the direction approximated
    assert torch.allclose(got["l.weight"].norm(dim=1), want["l.weight"].norm(dim=1), rtol=1e-5)


def test_without_the_options_nothing_is_carried(tmp_path):
    base, tuned, want = _pair(tmp_path)
    _run("extract", base, tuned, "-o", tmp_path / "a.safetensors", "--rank", "2", "--format", "kohya", "-q")
    adapter = load_adapter(tmp_path / "a.safetensors", base=base)
    assert not adapter.tensor_deltas and adapter.modules["l"].magnitude is None


def _error(tmp_path, base, out, tuned):
    _run("apply", base, out, "-o", tmp_path / "x.safetensors", "-q", "--force")
    return float((load_file(str(tmp_path / "x.safetensors"))["l.weight"] - tuned["l.weight"]).norm())


def test_rank_r_dora_against_rank_r_plus_1_lora(tmp_path):
    """Equal parameters (m costs one rank's worth of rows): on this pair DoRA at rank 2 beats plain LoRA at rank 2
    and we record how it compares with LoRA at rank 3 (which recovers the planted rank: DoRA loses there)."""
    base, tuned, want = _pair(tmp_path)
    errs = {}
    for name, args in {"lora2": ["--rank", "2"], "lora3": ["--rank", "3"], "dora2": ["--rank", "2", "--dora"]}.items():
        _run("extract", base, tuned, "-o", tmp_path / f"{name}.safetensors", "--format", "kohya", "-q", *args)
        errs[name] = _error(tmp_path, base, tmp_path / f"{name}.safetensors", want)
    assert errs["dora2"] < errs["lora2"]
    assert errs["lora3"] < errs["dora2"]  # honest: the extra rank wins when the delta has that rank
