"""Benchmark extract: default randomized SVD against the exact SVD the peers use, and peak memory.

    python benchmarks/bench_extract.py            # 4096x4096 and 4096x11008 at r=64 (a few minutes on 2 cores)
    python benchmarks/bench_extract.py --quick    # smaller shapes, for a smoke run

Part 1, side by side in one run on the same matrices: deltas with a slowly decaying spectrum
(s_i = 1/i, random singular vectors), truncated to r=64 by `truncated_svd(method=randomized)` with the
default settings and by `torch.linalg.svd` (kohya, LyCORIS, mergekit and PEFT run a full dense SVD).
Bar: randomized >= 30x faster, relative error at most 1% above exact.

Part 2: peak memory of extracting a 64-layer checkpoint pair, in a fresh subprocess: the peak RSS
(VmHWM, reset once imports are done) minus the RSS at that moment. Bar: under 3 x (largest base tensor + its tuned
twin) + the size of the output factors.

Prints a Markdown table and exits 1 if a bar is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.verdict import verdict  # noqa: E402
from lowrank_tools.linalg import truncated_svd  # noqa: E402


def slow_decay_matrix(m: int, n: int, seed: int = 0) -> torch.Tensor:
    """(m, n) with singular values 1/i and Haar-like random singular vectors."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U = torch.linalg.qr(torch.randn(m, k, generator=g)).Q  # (m, k)
    V = torch.linalg.qr(torch.randn(n, k, generator=g)).Q  # (n, k)
    s = 1.0 / torch.arange(1, k + 1, dtype=torch.float32)
    return (U * s) @ V.T


class _Dense:
    def __init__(self, U, S, Vh):
        self.U, self.S, self.Vh = U, S, Vh


def rel_error(M: torch.Tensor, svd, r: int) -> float:
    approx = (svd.U[:, :r] * svd.S[:r]) @ svd.Vh[:r]
    return float((M - approx).norm() / M.norm())


def time_it(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def speed_rows(shapes, r: int) -> list[dict]:
    rows = []
    for m, n in shapes:
        M = slow_decay_matrix(m, n)
        rand, t_rand = time_it(lambda: truncated_svd(M, r, method="randomized"))
        # the peers' method: a dense torch.linalg.svd on all threads (extract --method exact pins one thread
        # so that its bits repeat; that would flatter the ratio)
        exact, t_exact = time_it(lambda: _Dense(*torch.linalg.svd(M, full_matrices=False)))
        e_rand, e_exact = rel_error(M, rand, r), rel_error(M, exact, r)
        rows.append({"shape": f"{m}x{n}", "r": r, "exact_s": t_exact, "randomized_s": t_rand,
                     "speedup": t_exact / t_rand, "err_exact": e_exact, "err_randomized": e_rand,
                     "excess": e_rand / e_exact - 1})
    return rows


# Baseline: VmRSS once imports are done, with the high-water mark reset (clear_refs 5) so that the
# peak (VmHWM) counts only what the extraction adds.
_CHILD = r"""
import json, sys, torch
from pathlib import Path
from lowrank_tools.extract import extract
from lowrank_tools.linalg import RankRule
from lowrank_tools.io.formats import save_adapter
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
open("/proc/self/clear_refs", "w").write("5")
before = status("VmRSS:")
res = extract(sys.argv[1], sys.argv[2], rule=RankRule(rank=int(sys.argv[4])))
save_adapter(res.adapter, sys.argv[3])
print(json.dumps({"baseline": before, "peak": status("VmHWM:"), "params": res.adapter.params}))
"""


def make_stack(folder: Path, layers: int, side: int, dtype=torch.float32) -> tuple[Path, Path, int]:
    """A 64-layer pair of (side, side) weights written tensor by tensor (never the whole model in memory twice)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    base, tuned = {}, {}
    for i in range(layers):
        w0 = torch.randn(side, side, generator=g).to(dtype)
        base[f"model.layers.{i}.proj.weight"] = w0
        tuned[f"model.layers.{i}.proj.weight"] = (w0 + 0.01 * torch.randn(side, side, generator=g)).to(dtype)
    save_file(base, str(folder / "base.safetensors"))
    save_file(tuned, str(folder / "tuned.safetensors"))
    return folder / "base.safetensors", folder / "tuned.safetensors", side * side * torch.tensor([], dtype=dtype).element_size()


def memory_row(layers: int, side: int, r: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        base, tuned, tensor_bytes = make_stack(Path(tmp), layers, side)
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
        proc = subprocess.run([sys.executable, "-c", _CHILD, str(base), str(tuned), str(Path(tmp) / "out"), str(r)],
                              capture_output=True, text=True, env=env, check=True)
        got = json.loads(proc.stdout.strip().splitlines()[-1])
    output_bytes = got["params"] * 4
    bound = 3 * (2 * tensor_bytes) + output_bytes
    return {"layers": layers, "tensor": f"{side}x{side} fp32", "checkpoint_MB": layers * tensor_bytes / 2**20,
            "peak_above_baseline_MB": (got["peak"] - got["baseline"]) / 2**20, "bound_MB": bound / 2**20}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small shapes")
    args = ap.parse_args()
    shapes = [(1024, 1024), (1024, 2752)] if args.quick else [(4096, 4096), (4096, 11008)]
    rows = speed_rows(shapes, 64)
    mem = memory_row(64, 512 if args.quick else 2048, 64)
    print(f"# extract benchmark ({platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads)\n\ncommand: python benchmarks/bench_extract.py{' --quick' if args.quick else ''}\n")
    print("| shape | r | exact SVD s | randomized s | speedup | rel err exact | rel err randomized | excess |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['shape']} | {row['r']} | {row['exact_s']:.2f} | {row['randomized_s']:.3f} | {row['speedup']:.0f}x "
              f"| {row['err_exact']:.5f} | {row['err_randomized']:.5f} | {100 * row['excess']:.3f}% |")
    print(f"\n| layers | tensor | checkpoint MB | peak above baseline MB | bound MB |\n|---|---|---|---|---|\n"
          f"| {mem['layers']} | {mem['tensor']} | {mem['checkpoint_MB']:.0f} | {mem['peak_above_baseline_MB']:.1f} "
          f"| {mem['bound_MB']:.1f} |")
    failed = [f"{r['shape']}: speedup {r['speedup']:.1f}x < 30x" for r in rows if r["speedup"] < 30]
    failed += [f"{r['shape']}: excess error {100 * r['excess']:.2f}% > 1%" for r in rows if r["excess"] > 0.01]
    if mem["peak_above_baseline_MB"] > mem["bound_MB"]:
        failed.append(f"peak memory {mem['peak_above_baseline_MB']:.1f} MB > bound {mem['bound_MB']:.1f} MB")
    return verdict(failed, quick=args.quick)


if __name__ == "__main__":
    sys.exit(main())
