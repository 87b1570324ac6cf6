"""Benchmark LoHa / LoKr -> plain LoRA at rank 32 by the exact algebra against densify + torch.linalg.svd.

    python benchmarks/bench_structured.py            # 3072x3072 and 3072x12288 modules
    python benchmarks/bench_structured.py --quick    # 768x768 and 768x3072, for a smoke run

Side by side in one run, on the same modules (float32 factors, decaying spectra as trained adapters have):
- LoHa r16 x r16 (R = 256): ours = Khatri-Rao factors + QR core (``lycoris_format.structured_module``: the exact
  SVD) then ``resize`` to rank 32 (a column slice of the exact SVD);
- LoKr, W1 (4, 4) full and W2 factored at rank 16 (R = 64), and W1 (4, 4) with W2 full (R = min side): ours =
  the Kronecker SVD (top products s1_i s2_j; a full W2 gives only its top 32 triplets, from the eigen-decomposition
  of its smaller Gram: ``linalg.structured.top_svd``), then ``resize`` to rank 32;
- ours is what ``convert -r 32`` does: the module read with ``rank_cap=32``, then resized;
- dense = ``delta`` formed (out, in), ``torch.linalg.svd``, top 32 (what kohya's resize_lora and PEFT do).

"err diff" = |E_ours - E_dense| / E_dense with E = ||delta - P||_F (float64, dense: benchmark only): both must be the
optimal truncation error. Bars: >= 50x faster, err diff <= 1e-4. Prints a Markdown table; exits 1 if a bar is
missed (with --quick, no verdict: small shapes are all fixed costs).
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
from lowrank_tools.adapter import Adapter  # noqa: E402
from lowrank_tools.linalg import RankRule  # noqa: E402
from lowrank_tools.io.lycoris import structured_module  # noqa: E402
from lowrank_tools.resize import resize  # noqa: E402
from benchmarks.verdict import verdict  # noqa: E402

SPEED_BAR, DIFF_BAR, RANK = 50.0, 1e-4, 32


def _decaying(m: int, r: int, g, *, rows: bool) -> torch.Tensor:
    decay = 0.9 ** torch.arange(r, dtype=torch.float32)
    X = torch.randn(m, r, generator=g) / m**0.5
    return (X * decay).T.contiguous() if rows else X  # (r, m) rows decaying, else (m, r)


def loha(out: int, inp: int, g) -> dict:
    return {"hada_w1_a": _decaying(out, 16, g, rows=False), "hada_w1_b": _decaying(inp, 16, g, rows=True),
            "hada_w2_a": _decaying(out, 16, g, rows=False), "hada_w2_b": _decaying(inp, 16, g, rows=True)}


def lokr(out: int, inp: int, g, *, full_w2: bool) -> dict:
    c, d = out // 4, inp // 4
    t = {"lokr_w1": torch.randn(4, 4, generator=g)}
    if full_w2:
        t["lokr_w2"] = torch.randn(c, d, generator=g) / c**0.5
    else:
        t.update(lokr_w2_a=_decaying(c, 16, g, rows=False), lokr_w2_b=_decaying(d, 16, g, rows=True))
    return t


def dense_delta(t: dict) -> torch.Tensor:
    if "hada_w1_a" in t:
        return (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
    w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
    return torch.kron(t["lokr_w1"], w2)


def ours(t: dict):
    module = structured_module("m", t, alpha=None, rank_cap=RANK)  # as convert -r: the structure's top-RANK SVD
    return resize(Adapter(modules={"m": module}), rule=RankRule(rank=RANK)).adapter.modules["m"]


def dense(t: dict):
    U, S, Vh = torch.linalg.svd(dense_delta(t), full_matrices=False)
    return U[:, :RANK] * S[:RANK], Vh[:RANK]


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def row(case: str, t: dict) -> dict:
    m, t_ours = timed(lambda: ours(t))
    (B, A), t_dense = timed(lambda: dense(t))
    M = dense_delta(t).double()
    e_ours = float((M - m.scale * (m.B.double() @ m.A.double())).norm())
    e_dense = float((M - B.double() @ A.double()).norm())
    return {"case": case, "ours_s": t_ours, "dense_s": t_dense, "diff": abs(e_ours - e_dense) / e_dense}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small shapes")
    args = ap.parse_args()
    side = 768 if args.quick else 3072
    g = torch.Generator().manual_seed(0)
    ours(loha(64, 96, g)), dense(loha(64, 96, g))  # warm up both paths
    table = []
    for out, inp in [(side, side), (side, 4 * side)]:
        table.append(row(f"LoHa 16x16 {out}x{inp}", loha(out, inp, g)))
        table.append(row(f"LoKr 4x4 (x) r16 {out}x{inp}", lokr(out, inp, g, full_w2=False)))
        table.append(row(f"LoKr 4x4 (x) full {out}x{inp}", lokr(out, inp, g, full_w2=True)))
    print(f"# structured -> LoRA rank {RANK} ({platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads)\n\ncommand: python benchmarks/bench_structured.py"
          f"{' --quick' if args.quick else ''}\n")
    print("| case | densify + SVD s | exact algebra s | speedup | err diff |\n|---|---|---|---|---|")
    for r in table:
        print(f"| {r['case']} | {r['dense_s']:.2f} | {r['ours_s']:.4f} | {r['dense_s'] / r['ours_s']:.0f}x "
              f"| {r['diff']:.1e} |")
    failed = [f"{r['case']}: speedup {r['dense_s'] / r['ours_s']:.0f}x < {SPEED_BAR:.0f}x" for r in table
              if r["dense_s"] / r["ours_s"] < SPEED_BAR]
    failed += [f"{r['case']}: err diff {r['diff']:.1e} > {DIFF_BAR:.0e}" for r in table if r["diff"] > DIFF_BAR]
    return verdict(failed, quick=args.quick)


if __name__ == "__main__":
    sys.exit(main())
