"""Layers two at a time on the CPU: two worker threads, each on one intra-op thread, read, subtract and factor
layers side by side, each taking the next layer when it is free, so that a worker whose core is free goes on while
the other's core is shared with another busy process.

Why: a 576-wide layer's products and QRs are too small to split well over an OpenMP team (a QR of 576 x 18 spends
more in the team's barriers than in arithmetic), so two layers on one thread each beat one layer on two. And under
contention an OpenMP team runs at the pace of its slowest thread: one busy process on one of two cores slowed a
two-thread extract 2.2-2.4x, where two single-thread workers lose only the share of the core they lost
(``benchmarks/bench_contention.py --llama``). How torch takes it: ``torch.set_num_threads`` stores a process-wide
default but sets OpenMP's and MKL's thread count for the calling thread only (``omp_set_num_threads``,
``mkl_set_num_threads_local``), and a thread reads the default once, at its first parallel op: so each worker sets
one thread for itself, the caller keeps its count, and the caller sets it again when the workers are done (threads
started afterwards read that default). Used only where at least 2 intra-op threads are allowed
(``torch.get_num_threads()``: ``OMP_NUM_THREADS``, ``torch.set_num_threads``), so ``OMP_NUM_THREADS=1`` keeps
everything on one thread.

Results: every layer is factored on one intra-op thread whichever worker takes it, the same computation as with
``OMP_NUM_THREADS=1``, so the factors are the same bits for 1 and for 2 threads, and on a busy machine as on a quiet
one; results come back in the order given. Memory: an item is a layer's name; each worker reads its layer itself
into buffers of its own (:func:`~lowrank_tools.extract.streaming._side_worker`), so nothing waits but names and
every item is handed out at once: a worker never stands idle behind a slow one (with at most 4 layers allowed to
wait, the worker that did not take a 135M model's embedding finished the 4 next layers and then waited for it:
0.5 s of 1.2 s idle).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

__all__ = ["WORKERS", "side_threads_allowed", "factored_in_order"]

D = TypeVar("D")
R = TypeVar("R")

WORKERS = 2  # layers being factored, one intra-op thread each


def side_threads_allowed(device: torch.device) -> bool:
    """Layers side by side: on the CPU, when 2 or more intra-op threads are allowed."""
    return device.type == "cpu" and torch.get_num_threads() >= 2


def _one_thread() -> None:
    torch.set_num_threads(1)  # this worker's OpenMP / MKL count only (see the module docstring)


def _no_grad(factor: Callable[[D], R]) -> Callable[[D], R]:
    def run(item: D) -> R:
        with torch.no_grad():  # grad mode is per thread: the worker's starts enabled
            return factor(item)
    return run


def factored_in_order(items: Iterable[D], factor: Callable[[D], R]) -> Iterator[tuple[D, R]]:
    """``(item, factor(item))`` for each of ``items``, in their order, factored on :data:`WORKERS` worker threads of
    one intra-op thread each, every item handed out at once (see the module docstring). An error in a worker is
    raised here, at its item's place; what has not started is cancelled and the workers are joined on the way
    out."""
    threads = torch.get_num_threads()
    run = _no_grad(factor)
    try:
        with ThreadPoolExecutor(WORKERS, thread_name_prefix="lowrank-tools-side", initializer=_one_thread) as pool:
            pending = deque((item, pool.submit(run, item)) for item in items)
            try:
                while pending:
                    item, future = pending.popleft()
                    yield item, future.result()
            finally:
                for _, future in pending:  # an error or an early close: what has not started never will
                    future.cancel()
                pending.clear()
    finally:
        torch.set_num_threads(threads)  # the process-wide default the workers lowered, for threads started later
