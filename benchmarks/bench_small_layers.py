"""Small layers (issue 16): the exact SVD against the randomized one, one matrix at a time and stacked, by CPU time.

    python benchmarks/bench_small_layers.py [--ks 8,32,64] [--batch 8] [--threads 1] [--json FILE]

For each shape and k: ``truncated_svd(M, k, method=...)`` (exact; randomized with oversample 10 and 4 power
iterations), then per layer of a stack of ``--batch`` equal shapes: ``torch.linalg.svd`` of the (b, m, n) stack and
``randomized_svd`` of it (what ``extract --svd-batch`` runs). CPU time of this process (``time.process_time``, best of
3): on a shared machine wall time measures the neighbours, CPU time on one thread (the default here) the work. These
figures set ``linalg.svd``'s cost rule for ``--method auto`` (``_AUTO_MIN_SIDE``, ``_AUTO_MAX_SKETCH``) and the CPU's
default of one layer per SVD (the stacked randomized SVD gained 0-30% per layer on 576-wide shapes and lost on
576 x 1536; in a model's file order few same-shape layers are consecutive anyway).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = [(96, 96), (128, 128), (192, 576), (192, 192), (256, 256), (384, 384), (576, 576), (1536, 576),
          (576, 1536), (1024, 1024)]


def cpu_time(f, reps: int = 3) -> float:
    best = float("inf")
    for _ in range(reps):
        start = time.process_time()
        f()
        best = min(best, time.process_time() - start)
    return best


def measure(m: int, n: int, k: int, batch: int) -> dict:
    import torch
    from lowrank_tools.linalg.svd import randomized_svd, truncated_svd

    X = torch.randn(batch, m, n, generator=torch.Generator().manual_seed(m * n + k))
    M = X[0].contiguous()
    row = {"shape": [m, n], "k": k, "l_over_side": (k + 10) / min(m, n),
           "exact_ms": 1e3 * cpu_time(lambda: truncated_svd(M, k, method="exact")),
           "randomized_ms": 1e3 * cpu_time(lambda: truncated_svd(M, k, method="randomized")),
           "stacked_exact_ms_per_layer": 1e3 * cpu_time(lambda: torch.linalg.svd(X, full_matrices=False), 2) / batch,
           "stacked_randomized_ms_per_layer": 1e3 * cpu_time(lambda: randomized_svd(X, k, 10, 4, 0)) / batch}
    row["exact_over_randomized"] = row["exact_ms"] / row["randomized_ms"]
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ks", default="8,32,64")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    import os

    import torch

    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), load {os.getloadavg()[0]:.2f}; CPU ms")
    print("| shape | k | l/side | exact | randomized | exact/randomized | stacked exact /layer | stacked randomized /layer |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for k in (int(x) for x in args.ks.split(",")):
        for m, n in SHAPES:
            if k + 10 > min(m, n):
                continue
            r = measure(m, n, k, args.batch)
            rows.append(r)
            print(f"| {m}x{n} | {k} | {r['l_over_side']:.2f} | {r['exact_ms']:.1f} | {r['randomized_ms']:.1f} | "
                  f"{r['exact_over_randomized']:.2f} | {r['stacked_exact_ms_per_layer']:.1f} | "
                  f"{r['stacked_randomized_ms_per_layer']:.1f} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
