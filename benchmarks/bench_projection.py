"""Scale projection (issue 16): extract a few blocks of a Llama-7B-shaped stack here, time each block, and project
the whole 32-block model.

    python benchmarks/bench_projection.py [--blocks 2] [--rank 64] [--vocab 32000] [--work DIR] [--device cpu]

The pair: ``llama_stack.py generate`` (q/k/v/o 4096x4096, gate/up 11008x4096, down 4096x11008 per block, bf16, a
rank-256 delta with singular values ~ 1/i plus bf16 rounding), ``--blocks`` blocks and, with ``--vocab``, the
embeddings and lm_head (V x 4096). In this process, after a warm-up on a small pair, one ``extract`` per k = 1 ..
``--blocks`` of the first k blocks (and the embeddings: later blocks excluded by ``exclude``), each timed whole. A
block costs the difference between consecutive runs (the median of them), and the projection is

    projected = T(blocks) + (32 - blocks) * block

(everything outside the blocks, the embeddings, planning, the first read and the report, is in T(blocks) once). Per
layer progress stamps cannot time layers when two workers factor them side by side (the first version of this
benchmark did so: its "block" and "embeddings" times moved between each other). Printed as one JSON line and a
sentence. A projection, not a measurement: the page cache (here: the pair was just written) and the load of a
shared machine (recorded) move it. The OpenMP wait policy is set as the command line sets it (``cli/threads.py``):
without it, on a loaded 2-core machine, the same blocks took 4x longer (330 s against ~80 s per block at load
12-16).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

FULL_BLOCKS = 32


def timed_extract(folder: Path, *, blocks: int, total: int, rank: int, device: str) -> float:
    """Wall seconds of one extract of the first ``blocks`` of folder's ``total`` blocks (and its embeddings)."""
    from lowrank_tools import RankRule, extract

    start = time.perf_counter()
    extract(folder / "base.safetensors", folder / "tuned.safetensors", rule=RankRule(rank=rank), device=device,
            exclude=[rf"\.layers\.{b}\." for b in range(blocks, total)])
    return time.perf_counter() - start


def project(walls: list[float]) -> dict:
    """``walls[k - 1]``: the time of the first k blocks."""
    steps = [b - a for a, b in zip(walls, walls[1:])]
    block = statistics.median(steps) if steps else walls[0]
    return {"blocks_measured": len(walls), "wall_s": [round(w, 3) for w in walls], "block_s": round(block, 3),
            "projected_32_blocks_s": round(walls[-1] + (FULL_BLOCKS - len(walls)) * block, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=32000, help="0: no embeddings")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--inter", type=int, default=11008)
    ap.add_argument("--work", type=Path, help="keep the pair here (default: a temporary folder, deleted after)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    import shutil

    from lowrank_tools.cli.threads import set_wait_policy

    set_wait_policy()  # OMP_WAIT_POLICY=PASSIVE as the command line sets it (unless chosen): before torch loads
    import torch
    from llama_stack import generate

    folder = args.work or Path(tempfile.mkdtemp(prefix="lrt-projection-"))
    try:
        if not (folder / "tuned.safetensors").exists():
            generate(folder, blocks=args.blocks, hidden=args.hidden, inter=args.inter, vocab=args.vocab or None, seed=0,
                     device=args.device)
        load = os.getloadavg()[0]
        from llama_stack import _warm_up

        _warm_up(args.device)
        walls = [timed_extract(folder, blocks=k, total=args.blocks, rank=args.rank, device=args.device)
                 for k in range(1, args.blocks + 1)]
        out = project(walls) | {"rank": args.rank, "device": args.device, "threads": torch.get_num_threads(),
                                "load_before": load, "load_after": os.getloadavg()[0]}
    finally:
        if args.work is None:
            shutil.rmtree(folder, ignore_errors=True)
    print(json.dumps(out))
    print(f"Llama-7B-shaped pair at r={args.rank} on {args.device}: the first 1..{args.blocks} blocks and the "
          f"embeddings in {out['wall_s']} s, {out['block_s']} s per block -> projected {FULL_BLOCKS} blocks + "
          f"embeddings: {out['projected_32_blocks_s']} s (load {load:.2f} before, {out['load_after']:.2f} after)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
