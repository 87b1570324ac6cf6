"""Benchmark analyze: top-K spectra against exact svdvals, and adapters through the QR core against densifying.

    python benchmarks/bench_analyze.py            # 4096x4096 (top 64) and 4096x11008 rank 64 (a few minutes on 2 cores)
    python benchmarks/bench_analyze.py --quick    # 1024-sized shapes, for a smoke run
    python benchmarks/bench_analyze.py --threads 1  # both sides on one thread (steadier on a shared machine)

Side by side in one run, on the same matrices. Each side is timed as its best run: the top-64 step and its
svdvals baseline in five interleaved rounds (one svdvals, three sketches), the others best of 1-3. A 50 ms
call on 2 shared cores varies by +-30% (at times 2x) from run to run, in spells that last seconds.

1. The spectrum step of ``analyze --top 64`` (``sketch.top_singular_values``, as analyze calls it) against
   ``torch.linalg.svdvals`` of the same 4096 x 4096 delta, which has a slowly decaying spectrum, s_i = 1/i,
   with random singular vectors. Bars: >= 30x faster, each of the top 64 values within 0.1 % (relative).
   For context, not a bar: the whole ``analyze_delta`` call on the in-memory pair, --top 64 against the
   default exact analyze. Both pay the same per-layer cost (reading both tensors, the delta, two norms,
   ~0.1-0.2 s on 2 cores), which caps that end-to-end ratio.
2. ``analyze_adapter`` (the whole call) of a rank-64 module of 4096 x 11008 against densifying
   ``scale * B @ A`` and running ``torch.linalg.svdvals``. Bars: >= 100x faster, the 64 values within 0.1 %.

With ``--quick`` the accuracy bars are enforced and the speed ratios reported only: small shapes cannot
show the asymptotic speed-ups. Prints a Markdown table; exits 1 if a bar is missed.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lowrank_tools.adapter import Adapter, LoraModule  # noqa: E402
from lowrank_tools.analyze import analyze_adapter, analyze_delta  # noqa: E402
from lowrank_tools.linalg.sketch import top_singular_values  # noqa: E402

TOP_SPEEDUP, ADAPTER_SPEEDUP, ACCURACY = 30.0, 100.0, 1e-3


def decaying_delta(m: int, n: int, seed: int = 0) -> torch.Tensor:
    """(m, n) float32 with singular values 1/i and random orthonormal singular vectors."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U = torch.linalg.qr(torch.randn(m, k, generator=g)).Q  # (m, k)
    V = torch.linalg.qr(torch.randn(n, k, generator=g)).Q  # (n, k)
    return (U * (1.0 / torch.arange(1, k + 1, dtype=torch.float32))) @ V.T


def timed(fn, repeats: int = 1):
    """(result, best wall time over ``repeats`` runs)."""
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return out, best


def interleaved(base_fn, ours_fn, *, rounds: int = 5, ours_per_round: int = 3):
    """``(base result, best base time, our result, best our time)``: ``rounds`` rounds of one baseline run then
    ``ours_per_round`` of ours, so that a slow spell of the machine (they last seconds here) meets both sides
    rather than all of one side's runs."""
    t_base = t_ours = float("inf")
    for _ in range(rounds):
        base, t = timed(base_fn)
        t_base = min(t_base, t)
        ours, t = timed(ours_fn, repeats=ours_per_round)
        t_ours = min(t_ours, t)
    return base, t_base, ours, t_ours


def max_rel(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float(((a - b).abs() / b.abs()).max())


def bench_top(m: int, n: int, k: int) -> list[dict]:
    """Two rows on one delta: the spectrum step (the part --top replaces) and the whole analyze call."""
    delta = decaying_delta(m, n)
    g = torch.Generator().manual_seed(1)
    base = {"model.layers.0.mlp.proj.weight": torch.randn(m, n, generator=g)}
    tuned = {name: w + delta for name, w in base.items()}
    norm = float(torch.linalg.vector_norm(delta, dtype=torch.float64))
    exact, t_exact, (top, how), t_top = interleaved(lambda: torch.linalg.svdvals(delta),
                                                    lambda: top_singular_values(delta, k, frobenius=norm))
    full, t_full = timed(lambda: analyze_delta(base, tuned))
    result, t_analyze = timed(lambda: analyze_delta(base, tuned, top=k), repeats=3)
    rel = max_rel(result.layers[0].singular_values, exact[:k])
    return [{"case": f"top {k} of a {m}x{n} delta ({how})", "baseline": "svdvals (exact)", "t_base": t_exact,
             "t_ours": t_top, "rel": max_rel(top, exact[:k]), "bar": TOP_SPEEDUP},
            {"case": f"whole analyze --top {k}, {m}x{n} pair in memory", "baseline": "whole analyze (svdvals)",
             "t_base": t_full, "t_ours": t_analyze, "rel": rel, "bar": None}]


def bench_adapter(m: int, n: int, r: int) -> dict:
    g = torch.Generator().manual_seed(2)
    module = LoraModule(B=torch.randn(m, r, generator=g) / r**0.5, A=torch.randn(r, n, generator=g), alpha=16.0)
    adapter = Adapter(modules={"model.layers.0.mlp.up_proj": module})
    dense, t_dense = timed(lambda: torch.linalg.svdvals(module.delta_matrix()))  # densify + svdvals
    result, t_core = timed(lambda: analyze_adapter(adapter), repeats=3)
    return {"case": f"analyze ADAPTER rank {r}, {m}x{n}", "baseline": "densify + svdvals", "t_base": t_dense,
            "t_ours": t_core, "rel": max_rel(result.layers[0].singular_values, dense[:r]), "bar": ADAPTER_SPEEDUP}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes; speed ratios reported, not enforced")
    parser.add_argument("--threads", type=int, help="torch threads for both sides (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    warm = torch.randn(256, 256)  # first LAPACK / BLAS calls pay one-off set-up costs: not part of either side
    torch.linalg.svdvals(warm), torch.linalg.qr(warm), analyze_delta({"w.weight": warm}, {"w.weight": 2 * warm}, top=8)
    side, wide = (1024, 2752) if args.quick else (4096, 11008)
    rows = [*bench_top(side, side, 64), bench_adapter(side, wide, 64)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
          f"{' (--quick: speed bars not enforced)' if args.quick else ''}\n")
    print("| case | baseline | baseline s | analyze s | speed-up | bar | max rel. diff of top values | ok |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    failed = False
    for row in rows:
        speedup = row["t_base"] / row["t_ours"]
        ok = row["rel"] <= ACCURACY and (args.quick or row["bar"] is None or speedup >= row["bar"])
        failed |= not ok
        bar = "(context)" if row["bar"] is None else f">= {row['bar']:g}x"
        print(f"| {row['case']} | {row['baseline']} | {row['t_base']:.3f} | {row['t_ours']:.4f} | {speedup:.1f}x | "
              f"{bar} | {row['rel']:.2e} (<= {ACCURACY:g}) | {'yes' if ok else 'NO'} |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
