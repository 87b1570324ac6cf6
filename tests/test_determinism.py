"""Same inputs, options and seed: byte-identical output files, run after run (separate processes, so Python's hash
randomisation is in play) and, for the exact method, on 1 and on 2 torch threads; the randomized method is
byte-identical for the same thread count and within 1e-5 relative across thread counts.

Each child process sets its thread count (OMP_NUM_THREADS, MKL_NUM_THREADS and torch.set_num_threads) and runs the
real CLI for every command that writes: extract (exact, PEFT and kohya; randomized), resize, merge and apply.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import make_pair

# big enough that MKL splits the SVD's products differently on 1 and 2 threads (without the one-thread exact SVD,
# the exact factors then differ in their last bits)
SHAPES = {"model.layers.0.self_attn.q_proj.weight": (512, 384), "model.layers.0.mlp.up_proj.weight": (768, 512),
          "model.layers.0.mlp.down_proj.weight": (384, 768)}
CHILD = """
import sys, torch
threads = int(sys.argv[1])
torch.set_num_threads(threads)
assert torch.get_num_threads() == threads
from lowrank_tools.cli import main
for args in {commands!r}:
    main(args, prog_name="lowrank-tools", standalone_mode=False)
print("threads", torch.get_num_threads())
"""
COMMANDS = [
    ["extract", "{in}/base.safetensors", "{in}/tuned.safetensors", "-o", "exact", "--method", "exact", "-r", "12",
     "-q"],
    ["extract", "{in}/base.safetensors", "{in}/tuned.safetensors", "-o", "exact.safetensors", "--format", "kohya",
     "--method", "exact", "-r", "12", "-q"],
    ["extract", "{in}/base.safetensors", "{in}/tuned.safetensors", "-o", "randomized", "--method", "randomized",
     "-r", "12", "--seed", "7", "-q"],
    ["resize", "exact", "-o", "resized.safetensors", "-r", "5", "-q"],
    ["merge", "exact:0.7", "exact.safetensors:0.3", "-o", "merged", "--format", "peft", "-r", "6", "-q"],
    ["apply", "{in}/base.safetensors", "exact", "-o", "applied.safetensors", "-q"],
    # extract's seed counts (resize, merge and apply use no randomness and take no --seed: test_cli_contract)
    ["extract", "{in}/base.safetensors", "{in}/tuned.safetensors", "-o", "randomized-seed", "--method", "randomized",
     "-r", "12", "--seed", "8", "-q"],
]
EXACT = ["exact/adapter_model.safetensors", "exact/adapter_config.json", "exact.safetensors"]


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _run(inp: Path, out: Path, threads: int) -> dict[str, bytes]:
    out.mkdir()
    commands = [[a.replace("{in}", str(inp)) for a in c] for c in COMMANDS]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run([sys.executable, "-c", CHILD.format(commands=commands), str(threads)], cwd=out, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and f"threads {threads}" in proc.stdout, proc.stderr
    return _files(out)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict[str, bytes]]:
    inp = tmp_path_factory.mktemp("det-in")
    base, tuned = make_pair(SHAPES, k=12)  # rank 12 planted, rank 12 kept: a clear gap, so the subspace is stable
    g = torch.Generator().manual_seed(5)
    for name in tuned:  # plus full-rank noise: a real truncation, every spectrum has a tail
        tuned[name] = tuned[name] + 0.01 * torch.randn(tuned[name].shape, generator=g)
    save_file(base, str(inp / "base.safetensors"))
    save_file(tuned, str(inp / "tuned.safetensors"))
    root = tmp_path_factory.mktemp("det")
    with ThreadPoolExecutor(2) as pool:
        jobs = {name: pool.submit(_run, inp, root / name, threads)
                for name, threads in [("one", 1), ("two", 2), ("one-again", 1)]}
        return {name: job.result() for name, job in jobs.items()}


def test_every_output_repeats_byte_for_byte(runs):
    """Same thread count, another process: every file identical (adapters, configs, kohya metadata, applied model)."""
    one, again = runs["one"], runs["one-again"]
    assert sorted(one) == sorted(again)
    assert len(one) >= 9  # 3 PEFT folders x 2 files, 3 .safetensors files
    for name in one:
        assert one[name] == again[name], f"{name} differs between two runs"


def test_exact_method_is_thread_count_independent(runs):
    for name in EXACT:
        assert runs["one"][name] == runs["two"][name], f"{name} differs between 1 and 2 threads"


def _tensors(blob: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(blob)


def test_randomized_is_close_across_thread_counts(runs):
    """Each module's product B @ A (what the adapter adds to the weight) within 1e-5 relative."""
    a = _tensors(runs["one"]["randomized/adapter_model.safetensors"])
    b = _tensors(runs["two"]["randomized/adapter_model.safetensors"])
    assert sorted(a) == sorted(b) and len(a) == 6
    for key in (k for k in a if "lora_A" in k):
        up = key.replace("lora_A", "lora_B")
        pa, pb = a[up].double() @ a[key].double(), b[up].double() @ b[key].double()
        rel = float((pa - pb).norm() / pa.norm())
        assert rel < 1e-5, f"{key}: {rel:.2e} relative between 1 and 2 threads"


def test_derived_outputs_close_across_thread_counts(runs):
    """resize, merge and apply of the (identical) exact adapter: the same up to float rounding on any thread count."""
    for name in ["resized.safetensors", "merged/adapter_model.safetensors", "applied.safetensors"]:
        a, b = _tensors(runs["one"][name]), _tensors(runs["two"][name])
        assert sorted(a) == sorted(b)
        for key in a:
            if a[key].is_floating_point() and a[key].norm() > 0:
                assert float((a[key] - b[key]).norm() / a[key].norm()) < 1e-5, (name, key)


def test_the_check_is_not_vacuous(runs):
    """The factors are real: rank 12 of a rank-40 delta, every layer present, so identical bytes mean something."""
    factors = _tensors(runs["one"]["exact/adapter_model.safetensors"])
    assert {tuple(t.shape) for k, t in factors.items() if "lora_A" in k} == {(12, 384), (12, 512), (12, 768)}
    weights = {k: v for k, v in runs["one"].items() if k.endswith(".safetensors") and "-seed" not in k}
    assert len({hashlib.sha256(b).hexdigest() for b in weights.values()}) == len(weights) == 6  # no two the same


def test_the_seed_reaches_the_sketch(runs):
    files, weights = runs["one"], "adapter_model.safetensors"
    assert files[f"randomized-seed/{weights}"] != files[f"randomized/{weights}"]
