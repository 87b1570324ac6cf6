"""Benchmark the peak memory of apply on a generated 64-layer checkpoint, next to the load-everything method.

    python benchmarks/bench_apply_memory.py            # 64 layers of 4096x4096 bf16 (2 GiB), a rank-16 adapter
    python benchmarks/bench_apply_memory.py --quick    # 64 layers of 1024x1024 bf16, for a smoke run

Side by side in one run, each in a fresh subprocess:
- ours: `load_weighted([adapter])` then `apply(base, adapters, out.safetensors)` (streams tensor by tensor);
- naive: `safetensors.torch.load_file` of the whole base, `W += scale * B @ A` per module, `save_file`
  (what merging a loaded model and saving it amounts to).
Peak memory above the baseline once imports are done, by `resource.getrusage(RUSAGE_SELF).ru_maxrss` read after
the imports and at the end (this orchestrating process never imports torch, so the child's ru_maxrss, which
inherits its parent's at exec, starts small), cross-checked with /proc's VmHWM reset after the imports; the
larger of the two is judged. Bar: ours under 3 x the largest tensor + the adapter in memory. "max rel diff":
max over tensors of ||ours - naive||_F / ||naive||_F. Prints a Markdown table and exits 1 if the bar is missed
(with --quick, no verdict: fixed costs, allocator arenas and thread stacks, dominate 2 MiB tensors).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.verdict import verdict  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RANK = 16


def _child(*args: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"child {args[0]} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------ subprocess modes


def generate(folder: str, layers: int, side: int) -> dict:
    """Base checkpoint written one tensor at a time (bf16 weights + norms) and a rank-16 float32 PEFT adapter."""
    import torch

    from lowrank_tools.adapter import Adapter, LoraModule
    from lowrank_tools.io.checkpoint import ShardedWriter
    from lowrank_tools.io.formats import save_adapter

    g = torch.Generator().manual_seed(0)
    modules = {}
    with ShardedWriter(Path(folder) / "base.safetensors", shard_size=None) as writer:
        for i in range(layers):
            writer.add(f"model.layers.{i}.proj.weight", (0.02 * torch.randn(side, side, generator=g)).bfloat16())
            writer.add(f"model.layers.{i}.norm.weight", torch.ones(side, dtype=torch.bfloat16))
            modules[f"model.layers.{i}.proj"] = LoraModule(B=0.01 * torch.randn(side, RANK, generator=g),
                                                           A=torch.randn(RANK, side, generator=g), alpha=2.0 * RANK)
    save_adapter(Adapter(modules=modules), Path(folder) / "adapter")
    return {"largest": side * side * 2, "checkpoint": layers * (side * side + side) * 2, "torch": torch.__version__}


def _vm(key: str) -> int:
    try:
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def measure(mode: str, base: str, adapter: str, out: str) -> dict:
    import resource
    import time

    import torch
    from safetensors.torch import load_file, save_file

    from lowrank_tools.apply import apply
    from lowrank_tools.weighted import load_weighted

    def maxrss() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux

    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS now
    except OSError:
        pass
    max0, rss0 = maxrss(), _vm("VmRSS:")
    start = time.perf_counter()
    loaded = load_weighted([adapter])
    adapter_bytes = sum(t.numel() * t.element_size() for m in loaded[0].adapter.modules.values() for t in (m.B, m.A))
    if mode == "ours":
        apply(base, loaded, out)
    else:
        state = load_file(base)
        for name, m in loaded[0].adapter.modules.items():
            W = state[f"{name}.weight"]
            state[f"{name}.weight"] = (W.float() + m.scale * (m.B.float() @ m.A.float())).to(W.dtype)
        save_file(state, out)
        del state
    return {"seconds": time.perf_counter() - start, "ru_maxrss_delta": maxrss() - max0,
            "vmhwm_delta": _vm("VmHWM:") - rss0 if rss0 else 0, "adapter_bytes": adapter_bytes,
            "threads": torch.get_num_threads()}


def compare(ours: str, naive: str) -> dict:
    """Max over tensors of ||ours - naive|| / ||naive||, one tensor pair at a time."""
    from lowrank_tools.io.checkpoint import open_checkpoint

    a, b = open_checkpoint(ours), open_checkpoint(naive)
    worst = 0.0
    for name in b.keys():
        x, y = a.get(name).double(), b.get(name).double()
        worst = max(worst, float((x - y).norm() / y.norm()) if y.norm() > 0 else float((x - y).norm()))
    return {"max_rel_diff": worst, "same_names": sorted(a.keys()) == sorted(b.keys()), "tensors": len(b.keys())}


# ------------------------------------------------------------------------------------------ orchestration


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1].startswith("--_"):
        mode, *args = sys.argv[1:]
        func = {"--_generate": lambda f, l, s: generate(f, int(l), int(s)), "--_measure": measure,
                "--_compare": compare}[mode]
        print(json.dumps(func(*args)))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="64 layers of 1024x1024")
    ap.add_argument("--layers", type=int, default=64)
    args = ap.parse_args()
    side = 1024 if args.quick else 4096
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        gen = _child("--_generate", tmp, str(args.layers), str(side))
        base, adapter = f"{tmp}/base.safetensors", f"{tmp}/adapter"
        ours = _child("--_measure", "ours", base, adapter, f"{tmp}/ours.safetensors")
        naive = _child("--_measure", "naive", base, adapter, f"{tmp}/naive.safetensors")
        diff = _child("--_compare", f"{tmp}/ours.safetensors", f"{tmp}/naive.safetensors")
    mb = 2**20
    bar = 3 * gen["largest"] + ours["adapter_bytes"]
    peak = {k: max(v["ru_maxrss_delta"], v["vmhwm_delta"]) for k, v in (("ours", ours), ("naive", naive))}
    print(f"# apply peak-memory benchmark ({platform.machine()}, {os.cpu_count()} cores, torch {gen['torch']}, "
          f"{ours['threads']} threads)\n\ncommand: python benchmarks/bench_apply_memory.py"
          f"{' --quick' if args.quick else ''}; {args.layers} layers of {side}x{side} bf16 + norms "
          f"({gen['checkpoint'] / mb:.0f} MiB), largest tensor {gen['largest'] / mb:.0f} MiB, rank-{RANK} float32 adapter "
          f"{ours['adapter_bytes'] / mb:.0f} MiB\n")
    print("| method | peak above baseline MiB (ru_maxrss / VmHWM) | s | bar MiB |\n|---|---|---|---|")
    for name, row in (("apply (streaming)", ours), ("load_file + add + save_file", naive)):
        print(f"| {name} | {row['ru_maxrss_delta'] / mb:.0f} / {row['vmhwm_delta'] / mb:.0f} | {row['seconds']:.1f} "
              f"| {bar / mb:.0f} |")
    print(f"\nnaive / ours peak: {peak['naive'] / max(peak['ours'], 1):.1f}x; max rel diff ours vs naive over "
          f"{diff['tensors']} tensors: {diff['max_rel_diff']:.1e}; same tensor names: {diff['same_names']}")
    failed = [f"peak {peak['ours'] / mb:.0f} MiB >= bar {bar / mb:.0f} MiB"] if peak["ours"] >= bar else []
    failed += [f"max rel diff {diff['max_rel_diff']:.1e} > 1e-2 (bf16 rounding)"] if diff["max_rel_diff"] > 1e-2 else []
    failed += ["tensor names differ"] if not diff["same_names"] else []
    return verdict(failed, quick=args.quick, what='the bar is')


if __name__ == "__main__":
    sys.exit(main())
