"""Thread contention (issue 16): an extract-like workload alone and beside one competing busy process.

    python benchmarks/bench_contention.py [--size 1024] [--count 6] [--rank 64] [--repeats 2] [--json FILE]
    python benchmarks/bench_contention.py --llama DIR [--blocks 3] --policies "default,1 thread" [--repeats 3]

The workload: randomized truncated SVDs (``lowrank_tools.linalg.svd.truncated_svd``, the extract path's) of
``--count`` random ``--size`` x ``--size`` float32 matrices at ``--rank``, after a warm-up. Each thread policy runs in a
fresh child interpreter, its environment set before torch is imported (libgomp reads ``OMP_WAIT_POLICY`` and
``GOMP_SPINCOUNT`` once, when it loads): first alone, then while the benchmark keeps one busy process running (a
Python ``while True`` loop, pinned to nothing, started before and killed after the child). The slowdown is
contended / alone; the goal is <= 2x (one competing process takes about half of 2 cores). Every (policy, alone,
busy) triple runs ``--repeats`` times: the min and max of the slowdown are printed, since other load on a shared
machine moves the figures (the 1-minute load average is printed too).

``--llama DIR``: the workload is the command line itself, ``python -m lowrank_tools extract DIR/base.safetensors
DIR/tuned.safetensors --rank 64`` on the 3-block Llama-7B-shaped pair of ``llama_stack.py generate`` (made in DIR
when missing; ``--blocks``), timed from here including the interpreter and imports; a policy's thread count goes in
``OMP_NUM_THREADS`` (the CLI respects it) and ``default`` is the CLI's own choice (PASSIVE, torch's threads).

Policies: ``default`` (what torch picks: one thread per core, libgomp's spin-then-sleep wait), ``1 thread``
(``torch.set_num_threads(1)``), and 2 threads with ``OMP_WAIT_POLICY=PASSIVE`` / ``ACTIVE`` or
``GOMP_SPINCOUNT=0`` (PASSIVE: a thread that waits sleeps at once instead of spinning). The command line's own
choice is ``PASSIVE`` with torch's thread count (``lowrank_tools/cli/threads.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

POLICIES = {  # name -> (environment for the child, torch threads or None for torch's own choice)
    "default": ({}, None),
    "1 thread": ({}, 1),
    "2 threads PASSIVE": ({"OMP_WAIT_POLICY": "PASSIVE"}, 2),
    "2 threads GOMP_SPINCOUNT=0": ({"GOMP_SPINCOUNT": "0"}, 2),
    "2 threads ACTIVE": ({"OMP_WAIT_POLICY": "ACTIVE"}, 2),
    "1 thread PASSIVE": ({"OMP_WAIT_POLICY": "PASSIVE"}, 1),
}

CHILD = """
import sys, time
import torch
from lowrank_tools.linalg.svd import truncated_svd
threads, size, count, rank = (int(a) for a in sys.argv[1:5])
if threads:
    torch.set_num_threads(threads)
gen = torch.Generator().manual_seed(0)
mats = [torch.randn(size, size, generator=gen) for _ in range(count)]
truncated_svd(mats[0], rank, method="randomized")  # warm-up: allocator, thread pool
start = time.perf_counter()
for m in mats:
    truncated_svd(m, rank, method="randomized")
print(time.perf_counter() - start, torch.get_num_threads())
"""

BUSY = "while True:\n    pass\n"


def _child_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    return {**env, **extra, "PYTHONPATH": str(ROOT)}


def _cli_extract(args, extra: dict[str, str], threads: int | None) -> tuple[float, int]:
    """(seconds, threads) of one ``lowrank-tools extract`` of the Llama pair in ``args.llama``, timed from here."""
    env = _child_env({**extra, **({"OMP_NUM_THREADS": str(threads)} if threads else {})})
    with tempfile.TemporaryDirectory(prefix="lrt-contention-") as out:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "lowrank_tools", "extract", str(args.llama / "base.safetensors"),
                        str(args.llama / "tuned.safetensors"), "-o", str(Path(out) / "adapter"), "--rank",
                        str(args.rank), "-q"], env=env, check=True, capture_output=True, timeout=args.timeout)
        return time.perf_counter() - start, threads or (os.cpu_count() or 1)


def run_once(policy: str, args, *, busy: bool) -> tuple[float, int]:
    """(seconds of the workload, threads torch used) for one child, alone or beside one busy process; a child past
    ``--timeout`` counts as inf seconds (the collapse this benchmark is looking for)."""
    extra, threads = POLICIES[policy]
    competitor = subprocess.Popen([sys.executable, "-c", BUSY]) if busy else None
    try:
        if competitor:
            time.sleep(0.5)  # the competitor is running before the workload starts
        if args.llama:
            return _cli_extract(args, extra, threads)
        out = subprocess.run([sys.executable, "-c", CHILD, str(threads or 0), str(args.size), str(args.count),
                              str(args.rank)], env=_child_env(extra), capture_output=True, text=True, check=True,
                             timeout=args.timeout).stdout.split()
    except subprocess.TimeoutExpired:
        return float("inf"), threads or 0
    finally:
        if competitor:
            competitor.kill()
            competitor.wait()
    return float(out[0]), int(out[1])


def measure(policy: str, args) -> dict:
    alone, busy, ratios = [], [], []
    for _ in range(args.repeats):
        a, threads = run_once(policy, args, busy=False)
        b, _ = run_once(policy, args, busy=True)
        alone.append(a), busy.append(b), ratios.append(b / a)
    return {"policy": policy, "threads": threads, "alone_s": alone, "busy_s": busy, "slowdown": ratios,
            "load_1min": os.getloadavg()[0]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--count", type=int, default=6)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--policies", default=",".join(POLICIES), help="comma-separated names from the table")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--llama", type=Path, help="time the CLI's extract of a Llama-7B-shaped pair in this folder")
    parser.add_argument("--blocks", type=int, default=3, help="blocks of the --llama pair when it is generated")
    args = parser.parse_args(argv)
    if args.llama and not (args.llama / "tuned.safetensors").exists():
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "llama_stack.py"), "generate", str(args.llama),
                        "--blocks", str(args.blocks)], env=_child_env({}), check=True)
    what = (f"lowrank-tools extract of {args.llama} at rank {args.rank}" if args.llama else
            f"{args.count} randomized SVDs of {args.size}x{args.size} at rank {args.rank}")
    print(f"{os.cpu_count()} CPUs; {what}; "
          f"{args.repeats} repeats; load {os.getloadavg()[0]:.2f}", flush=True)
    rows = []
    for policy in args.policies.split(","):
        row = measure(policy, args)
        rows.append(row)
        print(f"{policy:38s} threads {row['threads']}  alone {min(row['alone_s']):6.2f}-{max(row['alone_s']):6.2f} s"
              f"  busy {min(row['busy_s']):6.2f}-{max(row['busy_s']):6.2f} s  slowdown "
              f"{min(row['slowdown']):5.2f}-{max(row['slowdown']):5.2f}x  load {row['load_1min']:.2f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
