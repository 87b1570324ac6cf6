"""Scale projection (issue 16): extract a few blocks of a Llama-7B-shaped stack here, time each block, and project
the whole 32-block model.

    python benchmarks/bench_projection.py [--blocks 2] [--rank 64] [--vocab 32000] [--work DIR] [--device cpu]

The pair: ``llama_stack.py generate`` (q/k/v/o 4096x4096, gate/up 11008x4096, down 4096x11008 per block, bf16, a
rank-256 delta with singular values ~ 1/i plus bf16 rounding), ``--blocks`` blocks and, with ``--vocab``, the
embeddings and lm_head (V x 4096). One ``extract`` in this process, after a warm-up on a small pair; the progress
callback stamps the start of every layer, so a layer's time is from its start to the next one's (reading the next
pair overlaps it, as in a real run). Per block: the sum over its 7 layers. The projection:

    projected = fixed + 32 * median(block) + embeddings

``fixed`` is the measured wall time outside the layers (planning, the first read, the report), ``embeddings`` the
two V x 4096 layers as measured. Printed as one JSON line and a sentence. A projection, not a measurement: the
page cache (here: the pair was just written) and the load of a shared machine (recorded) move it. The OpenMP wait
policy is set as the command line sets it (``cli/threads.py``): without it, on a loaded 2-core machine, the same
blocks took 4x longer (330 s against ~80 s per block at load 12-16).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

FULL_BLOCKS = 32


def timed_extract(folder: Path, *, rank: int, device: str) -> tuple[float, list[tuple[str, float]]]:
    """(wall seconds, [(module, seconds)]) of one extract of folder's pair."""
    from lowrank_tools import RankRule, extract
    from llama_stack import _warm_up

    _warm_up(device)
    stamps: list[tuple[str, float]] = []
    start = time.perf_counter()
    extract(folder / "base.safetensors", folder / "tuned.safetensors", rule=RankRule(rank=rank), device=device,
            progress=lambda done, total, name: stamps.append((name, time.perf_counter())))
    wall = time.perf_counter() - start
    layers = [(name, stamps[i + 1][1] - t) for i, (name, t) in enumerate(stamps[:-1])]
    return wall, layers


def project(wall: float, layers: list[tuple[str, float]], blocks: int) -> dict:
    per_block: dict[int, float] = {}
    embeddings = 0.0
    for name, seconds in layers:
        found = re.search(r"\.layers\.(\d+)\.", name)
        if found:
            per_block[int(found.group(1))] = per_block.get(int(found.group(1)), 0.0) + seconds
        else:
            embeddings += seconds
    fixed = wall - sum(s for _, s in layers)
    block = statistics.median(per_block.values())
    return {"blocks_measured": blocks, "block_s": [round(per_block[b], 3) for b in sorted(per_block)],
            "embeddings_s": round(embeddings, 3), "fixed_s": round(fixed, 3), "wall_s": round(wall, 3),
            "projected_32_blocks_s": round(fixed + FULL_BLOCKS * block + embeddings, 1)}


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
        wall, layers = timed_extract(folder, rank=args.rank, device=args.device)
        out = project(wall, layers, args.blocks) | {"rank": args.rank, "device": args.device,
                                                    "threads": torch.get_num_threads(), "load_before": load,
                                                    "load_after": os.getloadavg()[0]}
    finally:
        if args.work is None:
            shutil.rmtree(folder, ignore_errors=True)
    print(json.dumps(out))
    print(f"{args.blocks} Llama-7B-shaped blocks at r={args.rank} on {args.device}: {out['block_s']} s per block, "
          f"embeddings {out['embeddings_s']} s, fixed {out['fixed_s']} s -> projected {FULL_BLOCKS} blocks + embeddings: "
          f"{out['projected_32_blocks_s']} s (load {load:.2f} before, {out['load_after']:.2f} after)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
