"""Read ahead: run an iterator in a background thread so reading overlaps with the math.

A bounded queue (``depth`` items) keeps memory flat: at most ``depth`` items wait while one is used.
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


def prefetch(items: Iterable[T], *, depth: int = 1) -> Iterator[T]:
    """Yield ``items`` in order while the next ``depth`` are produced in a background thread.

    Exceptions raised by the producer are re-raised in the consumer at the same position.
    Closing the generator early (break, error) stops the producer after its current item.
    ``depth <= 0`` iterates in the calling thread (no overlap).
    """
    if depth <= 0:
        yield from items
        return
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(_DONE)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            q.put(_Failure(exc))

    thread = threading.Thread(target=produce, name="lowrank-tools-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.exc
            yield item
    finally:
        stop.set()
        while thread.is_alive():
            try:
                q.get(timeout=0.05)
            except queue.Empty:
                pass
            thread.join(timeout=0.05)
