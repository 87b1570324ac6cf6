"""Small layers two at a time on the CPU: two worker threads, each on one intra-op thread, factor consecutive small
layers side by side; a large layer is factored on the calling thread with every intra-op thread, as before.

Why: a 576-wide layer's products and QRs are too small to split well over an OpenMP team (a QR of 576 x 18 spends
more in the team's barriers than in arithmetic), so two layers on one thread each beat one layer on two. How torch
takes it: ``torch.set_num_threads`` stores a process-wide default but sets OpenMP's and MKL's thread count for the
calling thread only (``omp_set_num_threads``, ``mkl_set_num_threads_local``), and a thread reads the default once,
at its first parallel op: so each worker sets one thread for itself, the caller keeps its count, and the caller
sets it again when the workers are done (threads started afterwards read that default). Used only where at least 2
intra-op threads are allowed (``torch.get_num_threads()``: ``OMP_NUM_THREADS``, ``torch.set_num_threads``), so
``OMP_NUM_THREADS=1`` keeps everything on one thread.

Results: each small layer is factored on one intra-op thread whichever worker takes it, the same computation as
with ``OMP_NUM_THREADS=1``, so the factors are the same bits for 1 and for 2 threads; results come back in the
order given. At most two layers are in flight, and one more waits in the caller: the read-ahead pool holds 4.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import torch

__all__ = ["SMALL_LAYER", "WORKERS", "side_threads_allowed", "factored_in_order"]

D = TypeVar("D")
R = TypeVar("R")

SMALL_LAYER = 1 << 21  # at most this many entries: a small layer (576 x 1536 = 0.9M; a 2048 x 2048 is not one)
WORKERS = 2  # small layers in flight, one intra-op thread each


def side_threads_allowed(device: torch.device) -> bool:
    """Small layers side by side: on the CPU, when 2 or more intra-op threads are allowed."""
    return device.type == "cpu" and torch.get_num_threads() >= 2


def _one_thread() -> None:
    torch.set_num_threads(1)  # this worker's OpenMP / MKL count only (see the module docstring)


def _no_grad(factor: Callable[[D], R]) -> Callable[[D], R]:
    def run(item: D) -> R:
        with torch.no_grad():  # grad mode is per thread: the worker's starts enabled
            return factor(item)
    return run


def factored_in_order(items: Iterable[D], factor: Callable[[D], R], small: Callable[[D], bool],
                      ) -> Iterator[tuple[D, R]]:
    """``(item, factor(item))`` for each of ``items``, in their order: runs of small items (``small(item)``) on
    :data:`WORKERS` worker threads of one intra-op thread each, the others on this thread (see the module
    docstring). An error in a worker is raised here, at its item's place; the workers are joined on the way out."""
    threads = torch.get_num_threads()
    run = _no_grad(factor)
    pending: deque[tuple[D, Future]] = deque()
    try:
        with ThreadPoolExecutor(WORKERS, thread_name_prefix="lowrank-tools-side", initializer=_one_thread) as pool:
            try:
                for item in items:
                    if small(item):
                        if len(pending) >= WORKERS:  # keep at most WORKERS in flight (memory stays flat)
                            yield _done(pending.popleft())
                        pending.append((item, pool.submit(run, item)))
                        del item
                        continue
                    while pending:  # a large layer: the small ones before it first, then all intra-op threads here
                        yield _done(pending.popleft())
                    yield item, factor(item)
                while pending:
                    yield _done(pending.popleft())
            finally:
                for _, future in pending:  # an error or an early close: what has not started never will
                    future.cancel()
                pending.clear()
    finally:
        torch.set_num_threads(threads)  # the process-wide default the workers lowered, for threads started later


def _done(entry: tuple[D, Future]) -> tuple[D, R]:
    item, future = entry
    return item, future.result()
