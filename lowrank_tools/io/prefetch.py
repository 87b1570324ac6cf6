"""Read ahead: run an iterator in a background thread so reading overlaps with the math.

Memory stays flat: the producer starts on an item only when one of ``depth + 1`` slots is free (the
item in use holds one), and a slot frees when the consumer asks for its next item. With ``depth=1``
at most two items exist at once: the one being used and the one being read.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

__all__ = ["prefetch"]

T = TypeVar("T")
_DONE = object()


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def _produce(items: Iterable, q: queue.Queue, slots: threading.Semaphore, stop: threading.Event) -> None:
    try:
        iterator = iter(items)
        while True:
            while not slots.acquire(timeout=0.1):
                if stop.is_set():
                    return
            if stop.is_set():
                return
            try:
                item = next(iterator)
            except StopIteration:
                q.put(_DONE)
                return
            q.put(item)
            del item
    except BaseException as exc:  # noqa: BLE001 - handed to the consumer
        q.put(_Failure(exc))


def prefetch(items: Iterable[T], *, depth: int = 1) -> Iterator[T]:
    """Yield ``items`` in order while up to ``depth`` next ones are produced in a background thread.

    Exceptions raised by the producer are re-raised in the consumer at the same position. Closing
    the generator early (break, error) stops the producer after its current item. ``depth <= 0``
    iterates in the calling thread (no overlap).
    """
    if depth <= 0:
        yield from items
        return
    q: queue.Queue = queue.Queue()
    slots = threading.Semaphore(depth + 1)  # the item in use holds a slot too
    stop = threading.Event()
    thread = threading.Thread(target=_produce, args=(items, q, slots, stop), name="lowrank-tools-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.exc
            yield item
            del item  # drop our reference before the producer may read the next one
            slots.release()
    finally:
        stop.set()
        slots.release()
        thread.join()
