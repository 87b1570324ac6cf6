"""The command line's process settings, made before torch is imported: the OpenMP wait policy (issue 16's
contention item) and the garbage collector's threshold (:func:`set_gc_threshold`); and at its exit, no final
collection of what torch's import made (:func:`skip_final_collection`).

With its default wait policy, an OpenMP thread that reaches a barrier first spins for a while before sleeping;
when another busy process shares the cores, the thread it waits for is often not running, and the spinning one
burns the time slice that thread needed: two threads on 2 busy cores ran 5-30x slower than alone, where one
thread slowed down about 2x (``benchmarks/bench_contention.py``). ``OMP_WAIT_POLICY=PASSIVE`` makes a waiting
thread sleep at once. libgomp reads it once, when torch loads it, so it is set here, before any command imports
torch, and only where the user has set none of ``OMP_WAIT_POLICY`` / ``GOMP_SPINCOUNT`` (``OMP_NUM_THREADS`` is
never touched).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, MutableMapping

import gc

WAIT_POLICY = {"OMP_WAIT_POLICY": "PASSIVE"}
GC_FIRST_GENERATION = 50_000  # allocations between young collections (Python's default: 700)
USER_KNOBS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def set_wait_policy(environ: MutableMapping[str, str] | None = None, modules: Mapping[str, object] | None = None
                    ) -> dict[str, str]:
    """Set :data:`WAIT_POLICY` in ``environ`` (default ``os.environ``) unless torch is already imported (too late to
    matter) or the user chose a policy; return what was set."""
    environ = os.environ if environ is None else environ
    modules = sys.modules if modules is None else modules
    if "torch" in modules or any(knob in environ for knob in USER_KNOBS):
        return {}
    environ.update(WAIT_POLICY)
    return dict(WAIT_POLICY)


def set_gc_threshold() -> None:
    """A command's process: Python's cyclic collector runs after every :data:`GC_FIRST_GENERATION` net allocations
    instead of 700. Importing torch allocates hundreds of thousands of objects, and each older collection then
    walks them all: ~400 collections, 0.14 CPU s of a 135M extract, against 5 and 0.04 s (cycles are rare in
    the commands' loops; memory is the arrays', which reference counting frees). The library leaves it alone."""
    gc.set_threshold(GC_FIRST_GENERATION, *gc.get_threshold()[1:])


def skip_final_collection() -> None:
    """At the end of a command's process: :func:`gc.freeze` everything, so that the interpreter's last cyclic
    collection at shutdown does not walk torch's objects. That walk took 0.30-0.37 s of every command that imported
    torch, a tenth of a 135M extract (``python -c "import torch"`` exits in 1.66 s, 1.29 s with ``os._exit`` and
    1.36 s after ``gc.freeze()``). Nothing else changes: atexit handlers run, modules are torn down, files are
    closed and streams flushed as usual; only cyclic garbage left at exit is not collected (the OS takes the
    memory back). Only where the process is about to end (the command line's own ``main``, not a test runner's
    call): frozen objects are never collected."""
    gc.freeze()
