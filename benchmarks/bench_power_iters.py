"""Adaptive power iterations (issue 16): what stopping early costs in error and saves in time.

    python benchmarks/bench_power_iters.py [--ks 8,32] [--max-iters 4] [--tol 0.003] [--pair /tmp/i16/m135] [--json F]

For each matrix and k: the randomized SVD with the full count (``truncated_svd(..., power_tol=None)``, what
extract did before) and with the adaptive stop (``power_tol=--tol``, :class:`lowrank_tools.linalg.sketch.PowerStop`),
and the exact rank-k error (``svdvals`` in float64). Reported per case: the power iterations used, the relative
excess of the adaptive error over the full count's and over the exact optimum (``(e - e_ref) / e_ref``, errors
``||M - U S Vh||_F`` in float64), the adaptive relative error (``err``: for the planted rank the "excess" is a
ratio of roundings), and CPU ms (one thread, ``time.process_time``, best of 3) of both.

Matrices: the delta of ``llama_stack.py`` (rank 256, s_i ~ 1/i, RMS 2e-3, plus the bf16 storage rounding of W'),
a slower decay (s_i ~ 1/sqrt(i), full rank), flat spectra (Gaussian noise: the worst case for a range finder),
planted exact rank 8 and rank 8 plus a 1e-4 noise floor; with ``--pair DIR`` (the bench_mergekit.py pair) also the
seven matrices of block 3 and the embedding of a real-shaped 135M fine-tune delta.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_small_layers import cpu_time  # noqa: E402  (best of 3 of time.process_time)


def cpu_ms(f) -> float:
    return 1e3 * cpu_time(f)


def synthetic(gen):
    """(name, M) for the synthetic cases."""
    import torch

    def spectrum_matrix(m, n, s):
        g1 = torch.linalg.qr(torch.randn(m, len(s), generator=gen)).Q
        g2 = torch.linalg.qr(torch.randn(n, len(s), generator=gen)).Q
        return (g1 * s) @ g2.T

    def llama_delta(m, n):  # llama_stack._pair's delta, with the bf16 rounding of W'
        k = min(256, m, n)
        s = 1.0 / torch.arange(1, k + 1, dtype=torch.float32)
        s *= 2e-3 * math.sqrt(m * n) / float(s.norm())
        w0 = 0.02 * torch.randn(m, n, generator=gen)
        g1, g2 = torch.randn(m, k, generator=gen) / math.sqrt(m), torch.randn(k, n, generator=gen) / math.sqrt(n)
        w1 = torch.addmm(w0, g1 * s, g2)
        return w1.bfloat16().float() - w0.bfloat16().float()

    for m, n in [(576, 576), (1536, 576), (2048, 2048)]:
        yield f"llama 1/i {m}x{n}", llama_delta(m, n)
    for m, n in [(576, 576), (1536, 576)]:
        p = min(m, n)
        yield f"1/sqrt(i) {m}x{n}", spectrum_matrix(m, n, torch.arange(1, p + 1).float().rsqrt())
    for m, n in [(576, 576), (1536, 576), (1024, 1024)]:
        yield f"flat (noise) {m}x{n}", torch.randn(m, n, generator=gen)
    planted = spectrum_matrix(1024, 768, torch.linspace(2.0, 1.0, 8))
    yield "planted rank 8 1024x768", planted
    yield "rank 8 + 1e-4 noise 1024x768", planted + 1e-4 * torch.randn(1024, 768, generator=gen) / math.sqrt(768)


def real_pair(folder: Path):
    """(name, delta) of block 3 and the embedding of the bench_mergekit.py pair in ``folder``."""
    from safetensors import safe_open

    with safe_open(folder / "base" / "model.safetensors", "pt") as fa, \
            safe_open(folder / "tuned" / "model.safetensors", "pt") as fb:
        names = [n for n in fa.keys() if ("layers.3." in n or "embed_tokens" in n) and n.endswith("weight")
                 and len(fa.get_slice(n).get_shape()) == 2]
        for name in names:
            yield f"135M {name.removeprefix('model.').removesuffix('.weight')}", \
                fb.get_tensor(name).float() - fa.get_tensor(name).float()


def measure(name: str, M, k: int, n_iter: int, tol: float) -> dict:
    import torch
    from lowrank_tools.linalg.svd import truncated_svd

    Md = M.double()
    S = torch.linalg.svdvals(Md) if max(M.shape) <= 4096 else None
    exact = math.sqrt(float((S[k:] ** 2).sum())) if S is not None else float("nan")

    def run(power_tol):
        return truncated_svd(M, k, method="randomized", n_iter=n_iter, power_tol=power_tol)

    def error(svd):
        return float(torch.linalg.matrix_norm(Md - (svd.U.double() * svd.S.double()) @ svd.Vh.double()))

    full, adaptive = run(None), run(tol)
    e_full, e_adapt = error(full), error(adaptive)
    rel = lambda e, ref: (e - ref) / ref if ref > 0 else float("nan")  # noqa: E731
    return {"case": name, "shape": list(M.shape), "k": k, "rel_error_exact": exact / float(Md.norm()),
            "rel_error_adaptive": e_adapt / float(Md.norm()),
            "iters": adaptive.power_iters, "excess_vs_full": rel(e_adapt, e_full),
            "excess_vs_exact": rel(e_adapt, exact),
            "full_excess_vs_exact": rel(e_full, exact), "full_ms": cpu_ms(lambda: run(None)),
            "adaptive_ms": cpu_ms(lambda: run(tol))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ks", default="8,32")
    ap.add_argument("--max-iters", type=int, default=4)
    ap.add_argument("--tol", type=float, default=3e-3)
    ap.add_argument("--pair", type=Path, help="a bench_mergekit.py pair folder (base/, tuned/)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    cases = list(synthetic(gen)) + (list(real_pair(args.pair)) if args.pair else [])
    rows = []
    print(f"{'case':34} {'k':>3} {'opt err':>8} {'err':>8} {'iters':>5} {'vs full':>9} {'vs exact':>9} "
          f"{'full vs ex':>10} {'full ms':>8} {'adapt ms':>8}")
    for name, M in cases:
        for k in [int(x) for x in args.ks.split(",")]:
            row = measure(name, M.contiguous(), k, args.max_iters, args.tol)
            rows.append(row)
            print(f"{name:34} {k:3d} {row['rel_error_exact']:8.4f} {row['rel_error_adaptive']:8.1e} "
                  f"{row['iters']:5d} {row['excess_vs_full']:9.1e} {row['excess_vs_exact']:9.1e} "
                  f"{row['full_excess_vs_exact']:10.1e} {row['full_ms']:8.1f} {row['adaptive_ms']:8.1f}", flush=True)
    worst = max(rows, key=lambda r: r["excess_vs_full"])
    print(f"worst excess over the full count: {worst['excess_vs_full']:.2e} ({worst['case']}, k={worst['k']}); "
          f"CPU ms full {sum(r['full_ms'] for r in rows):.0f}, adaptive {sum(r['adaptive_ms'] for r in rows):.0f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
