"""Benchmark resize and merge through the QR core against the dense method (B @ A, then a full SVD).

    python benchmarks/bench_resize_merge.py            # 4096x4096 and 4096x11008 modules (a minute or two on 2 cores)
    python benchmarks/bench_resize_merge.py --quick    # 1024x1024 and 1024x2752, for a smoke run

Side by side in one run, on the same adapters:
- resize: a rank-128 adapter (one 4096x4096 and one 4096x11008 module, kohya-style alpha 64) to rank 32,
  by `lowrank_tools.resize.resize` (report included) and by the dense method kohya's `resize_lora.py` and
  PEFT's `svd` combination use: `delta = scale * B @ A`, `torch.linalg.svd`, keep the top 32.
- merge: four rank-64 adapters (weights 1, 0.5, -0.7, 1.3) into rank 64, by `lowrank_tools.merge.merge`
  and by the dense weighted sum followed by the same SVD.
Factors have decaying spectra (B, A Gaussian, row i of A scaled by 0.97^i), as trained adapters do. Both
paths are warmed up on a small adapter first.

"max rel diff" is max over modules of ||P_ours - P_dense||_F / ||P_dense||_F (products compared without
densifying, in float64). Bars: >= 100x faster and max rel diff <= 1e-4. Prints a Markdown table and
exits 1 if a bar is missed (with --quick, no verdict: small shapes are all fixed costs).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lowrank_tools.adapter import Adapter, LoraModule  # noqa: E402
from lowrank_tools.linalg import RankRule  # noqa: E402
from lowrank_tools.linalg.norms import lowrank_frobenius_diff, lowrank_frobenius_norm  # noqa: E402
from lowrank_tools.merge import merge  # noqa: E402
from lowrank_tools.resize import resize  # noqa: E402
from benchmarks.verdict import verdict  # noqa: E402

SPEED_BAR, DIFF_BAR = 100.0, 1e-4


def make_adapter(shapes, r: int, *, alpha: float, seed: int) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    decay = 0.97 ** torch.arange(r, dtype=torch.float32)  # (r,)
    modules = {}
    for i, (m, n) in enumerate(shapes):
        B = torch.randn(m, r, generator=g) / m**0.5  # (m, r)
        A = torch.randn(r, n, generator=g) * decay.unsqueeze(1)  # (r, n)
        modules[f"layers.{i}.proj"] = LoraModule(B=B, A=A, alpha=alpha)
    return Adapter(modules=modules)


def dense_truncate(delta: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)  # what kohya / PEFT do
    return U[:, :r] * S[:r], Vh[:r]  # (m, r), (r, n)


def dense_resize(adapter: Adapter, r: int) -> dict:
    return {n: dense_truncate(m.scale * (m.B @ m.A), r) for n, m in adapter.modules.items()}


def dense_merge(adapters: list[Adapter], weights: list[float], r: int) -> dict:
    out = {}
    for name in adapters[0].modules:
        delta = sum(w * a.modules[name].scale * (a.modules[name].B @ a.modules[name].A) for a, w in zip(adapters, weights))
        out[name] = dense_truncate(delta, r)
    return out


def max_rel_diff(ours: Adapter, dense: dict) -> float:
    worst = 0.0
    for name, (B, A) in dense.items():
        m = ours.modules[name]
        diff = lowrank_frobenius_diff(m.B, m.A, m.scale, B, A, 1.0)
        worst = max(worst, diff / lowrank_frobenius_norm(B, A))
    return worst


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def warm_up() -> None:
    """One small call of each path first, so that neither side's timing holds one-time start-up costs."""
    small = make_adapter([(64, 96)], 16, alpha=16.0, seed=99)
    resize(small, rule=RankRule(rank=4))
    merge([small, small], rule=RankRule(rank=4))
    dense_resize(small, 4)


def rows(shapes) -> list[dict]:
    warm_up()
    out = []
    big = make_adapter(shapes, 128, alpha=64.0, seed=0)
    ours, t_ours = timed(lambda: resize(big, rule=RankRule(rank=32)).adapter)
    dense, t_dense = timed(lambda: dense_resize(big, 32))
    out.append({"case": "resize 128 -> 32", "dense_s": t_dense, "ours_s": t_ours, "diff": max_rel_diff(ours, dense)})
    weights = [1.0, 0.5, -0.7, 1.3]
    four = [make_adapter(shapes, 64, alpha=a, seed=s + 1) for s, a in enumerate([64.0, 32.0, 16.0, 128.0])]
    ours, t_ours = timed(lambda: merge(list(zip(four, weights)), rule=RankRule(rank=64)).adapter)
    dense, t_dense = timed(lambda: dense_merge(four, weights, 64))
    out.append({"case": "merge 4 x 64 -> 64", "dense_s": t_dense, "ours_s": t_ours, "diff": max_rel_diff(ours, dense)})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small shapes")
    args = ap.parse_args()
    shapes = [(1024, 1024), (1024, 2752)] if args.quick else [(4096, 4096), (4096, 11008)]
    table = rows(shapes)
    print(f"# resize / merge benchmark ({platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads)\n\ncommand: python benchmarks/bench_resize_merge.py"
          f"{' --quick' if args.quick else ''}; modules {', '.join(f'{m}x{n}' for m, n in shapes)}\n")
    print("| case | dense B@A + SVD s | QR core s | speedup | max rel diff |\n|---|---|---|---|---|")
    for r in table:
        print(f"| {r['case']} | {r['dense_s']:.2f} | {r['ours_s']:.3f} | {r['dense_s'] / r['ours_s']:.0f}x "
              f"| {r['diff']:.1e} |")
    failed = [f"{r['case']}: speedup {r['dense_s'] / r['ours_s']:.0f}x < {SPEED_BAR:.0f}x" for r in table
              if r["dense_s"] / r["ours_s"] < SPEED_BAR]
    failed += [f"{r['case']}: max rel diff {r['diff']:.1e} > {DIFF_BAR:.0e}" for r in table if r["diff"] > DIFF_BAR]
    return verdict(failed, quick=args.quick)


if __name__ == "__main__":
    sys.exit(main())
