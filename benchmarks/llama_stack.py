"""A synthetic Llama-shaped checkpoint pair, and the timed end-to-end extract on it (run as a child by run.py).

    python benchmarks/llama_stack.py generate DIR --blocks 3            # DIR/base.safetensors, DIR/tuned.safetensors
    python benchmarks/llama_stack.py time DIR --rank 64 --methods auto,exact
    python benchmarks/llama_stack.py resize-merge ADAPTER --device cuda

``generate``: per block q/k/v/o (H, H), gate/up (I, H), down (H, I) and two (H,) norms, Llama-7B sizes by default
(H = 4096, I = 11008), stored in bfloat16 as fine-tunes are; ``--embeddings`` adds embed_tokens, lm_head (V, H) and
the final norm (a whole 7B-shaped model with 32 blocks). W0 = 0.02 * N(0, 1); the fine-tune's delta is
dW = G1 diag(s) G2 with Gaussian G1 (m, 256) / sqrt(m), G2 (256, n) / sqrt(n) and s_i ~ 1 / i (the slowly
decaying spectrum of real fine-tunes: hard for a range finder), scaled to an RMS of 2e-3 per entry; W' = W0 + dW,
rounded to bfloat16, which adds the storage noise floor real deltas carry. Tensors are written one at a time,
straight to disk: generating a 13 GB checkpoint needs a few hundred MB of memory. ``--device cuda`` draws on the GPU.

``time``: the library end to end in this process -- ``extract`` (read both files, subtract, factor, measure) then
``save_adapter`` (a PEFT folder) -- for each method, after a warm-up on a small pair; prints one JSON line with the
wall times, the summary's norm-weighted rel_error and the 1-minute load average before and after each run.
Method ``exact`` is the peers' method: ``torch.linalg.svd`` of each delta on all CPU threads, as kohya's and
mergekit's extraction scripts run it (``extract --method exact`` pins that SVD to one thread so that its bits
repeat on every machine; the pin is lifted here so that the comparison is with what the peers really pay).
``--include REGEX`` restricts the layers (e.g. one block for the exact method on a GPU run); ``--out DIR`` keeps
the adapters (DIR/<method>).

``resize-merge``: the adapter resized to r/2 and merged with itself (weights 0.5, 0.5) back to rank r, through
the QR cores, timed on ``--device``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lowrank_tools import RankRule, extract, save_adapter  # noqa: E402
from lowrank_tools.io.checkpoint import ShardedWriter  # noqa: E402
from lowrank_tools.io.atomic import header_bound  # noqa: E402

DELTA_RANK, DELTA_RMS = 256, 2e-3


def block_shapes(hidden: int, inter: int) -> dict[str, tuple[int, ...]]:
    return {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (hidden, hidden),
            "self_attn.v_proj": (hidden, hidden), "self_attn.o_proj": (hidden, hidden),
            "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden), "mlp.down_proj": (hidden, inter),
            "input_layernorm": (hidden,), "post_attention_layernorm": (hidden,)}


def model_shapes(blocks: int, hidden: int, inter: int, vocab: int | None) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, in file order."""
    shapes = {}
    if vocab:
        shapes["model.embed_tokens.weight"] = (vocab, hidden)
    for b in range(blocks):
        shapes.update({f"model.layers.{b}.{name}.weight": s for name, s in block_shapes(hidden, inter).items()})
    if vocab:
        shapes["model.norm.weight"] = (hidden,)
        shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def _pair(shape: tuple[int, ...], gen: torch.Generator, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(W0, W') in bfloat16 for one tensor (see the module docstring)."""
    if len(shape) == 1:
        w0 = torch.ones(shape, device=device)
        return w0.bfloat16(), (w0 + 0.01 * torch.randn(shape, generator=gen, device=device)).bfloat16()
    m, n = shape
    w0 = 0.02 * torch.randn(m, n, generator=gen, device=device)
    k = min(DELTA_RANK, m, n)
    s = 1.0 / torch.arange(1, k + 1, dtype=torch.float32, device=device)
    s *= DELTA_RMS * math.sqrt(m * n) / float(s.norm())
    g1 = torch.randn(m, k, generator=gen, device=device) / math.sqrt(m)
    g2 = torch.randn(k, n, generator=gen, device=device) / math.sqrt(n)
    w1 = torch.addmm(w0, g1 * s, g2)  # W0 + G1 diag(s) G2
    return w0.bfloat16().cpu(), w1.bfloat16().cpu()


def generate(folder: Path, *, blocks: int, hidden: int, inter: int, vocab: int | None, seed: int, device: str) -> dict:
    start = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    shapes = model_shapes(blocks, hidden, inter, vocab)
    reserve = header_bound([(n, torch.bfloat16, s) for n, s in shapes.items()])
    gen = torch.Generator(device=device).manual_seed(seed)
    with ShardedWriter(folder / "base.safetensors", shard_size=None, header_reserve=reserve) as base, \
            ShardedWriter(folder / "tuned.safetensors", shard_size=None, header_reserve=reserve) as tuned:
        for name, shape in shapes.items():
            w0, w1 = _pair(shape, gen, device)
            base.add(name, w0)
            tuned.add(name, w1)
            del w0, w1
    size = (folder / "base.safetensors").stat().st_size
    return {"bytes_per_checkpoint": size, "tensors": len(shapes), "seconds": time.perf_counter() - start}


def _warm_up(device: str) -> None:
    """Load the BLAS/LAPACK paths both methods use on a small pair, outside the timing."""
    g = torch.Generator().manual_seed(1)
    base = {"a.weight": torch.randn(512, 384, generator=g)}
    tuned = {"a.weight": base["a.weight"] + torch.randn(512, 384, generator=g)}
    for method in ("randomized", "exact"):
        extract(base, tuned, rule=RankRule(rank=16), method=method, device=device)


@contextlib.contextmanager
def _peer_threads():
    """Lift linalg's one-thread pin of the exact SVD (if this version has one) for the peers' method."""
    from lowrank_tools.linalg import svd as linalg

    pin = getattr(linalg, "_one_cpu_thread", None)
    if pin is None:
        yield
        return
    linalg._one_cpu_thread = lambda device: contextlib.nullcontext()
    try:
        yield
    finally:
        linalg._one_cpu_thread = pin


def time_methods(folder: Path, *, rank: int, methods: list[str], repeats: dict[str, int], device: str,
                 include: list[str], keep: Path | None) -> dict:
    _warm_up(device)
    out = {"threads": torch.get_num_threads(), "runs": []}
    work = keep or Path(tempfile.mkdtemp(prefix="lrt-bench-out-", dir=folder))
    try:
        for method in methods:
            for _ in range(repeats.get(method, 1)):
                load = os.getloadavg()[0]
                with _peer_threads() if method == "exact" else contextlib.nullcontext():
                    start = time.perf_counter()
                    result = extract(folder / "base.safetensors", folder / "tuned.safetensors",
                                     rule=RankRule(rank=rank), method=method, device=device, include=include)
                    save_adapter(result.adapter, work / method, force=True)
                    seconds = time.perf_counter() - start
                out["runs"].append({"method": method, "seconds": seconds, "layers": result.report.summary["layers"],
                                    "rel_error": result.report.summary["rel_error"], "load_before": load,
                                    "load_after": os.getloadavg()[0]})
    finally:
        if keep is None:
            shutil.rmtree(work, ignore_errors=True)
    out["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # of this process, all runs
    cuda = device.startswith("cuda")
    out["gpu"] = torch.cuda.get_device_name() if cuda else f"no GPU ({device})"
    out["peak_gpu_memory"] = torch.cuda.max_memory_allocated() if cuda else 0
    return out


def resize_merge(adapter_path: Path, *, device: str) -> dict:
    from lowrank_tools import load_adapter, merge, resize

    adapter = load_adapter(adapter_path)
    r = max(m.rank for m in adapter.modules.values())
    timings = {"modules": len(adapter.modules), "rank": r}
    for name, run in (("resize", lambda: resize(adapter, rule=RankRule(rank=max(1, r // 2)), device=device)),
                      ("merge", lambda: merge([(adapter, 0.5), (adapter, 0.5)], rule=RankRule(rank=r), device=device))):
        start = time.perf_counter()
        result = run()
        timings[f"{name}_s"] = time.perf_counter() - start
        timings[f"{name}_rel_error"] = result.report.summary["rel_error"]
    return timings


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    g = sub.add_parser("generate")
    g.add_argument("folder", type=Path)
    g.add_argument("--blocks", type=int, default=3)
    g.add_argument("--hidden", type=int, default=4096)
    g.add_argument("--inter", type=int, default=11008)
    g.add_argument("--vocab", type=int, default=0, help="add embed_tokens and lm_head of this vocabulary")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="cpu")
    t = sub.add_parser("time")
    t.add_argument("folder", type=Path)
    t.add_argument("--rank", type=int, default=64)
    t.add_argument("--methods", default="auto,exact")
    t.add_argument("--repeats", default="auto=2,exact=1", help="runs per method; the best is judged")
    t.add_argument("--device", default="cpu")
    t.add_argument("--include", action="append", default=[])
    t.add_argument("--out", type=Path)
    rm = sub.add_parser("resize-merge")
    rm.add_argument("adapter", type=Path)
    rm.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.mode == "generate":
        got = generate(args.folder, blocks=args.blocks, hidden=args.hidden, inter=args.inter, vocab=args.vocab or None,
                       seed=args.seed, device=args.device)
    elif args.mode == "resize-merge":
        got = resize_merge(args.adapter, device=args.device)
    else:
        repeats = {k: int(v) for k, v in (item.split("=") for item in args.repeats.split(",") if item)}
        got = time_methods(args.folder, rank=args.rank, methods=args.methods.split(","), repeats=repeats,
                           device=args.device, include=args.include, keep=args.out)
    print(json.dumps(got))
    return 0


if __name__ == "__main__":
    sys.exit(main())
