"""Keep the resident set flat while streaming tensors: large buffers go straight back to the OS.

glibc's malloc serves large blocks with mmap only up to a threshold that grows each time such a
block is freed (up to 32 MiB on 64-bit). Once it has grown, every tensor of a streamed checkpoint is
carved from a heap arena, and the arena of the read-ahead thread keeps what was freed: the peak RSS
then grows with the number of layers. Fixing the threshold (which also turns off its growth) makes
each tensor buffer an mmap of its own that ``free`` unmaps at once. Measured on 32 layers of
1024x1024 float32 read ahead and factored: peak RSS above baseline 139 MB with the default, 64 MB
with the threshold fixed (benchmarks/bench_extract.py measures it on every run).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["stream_large_buffers"]

_M_MMAP_THRESHOLD = -3  # mallopt parameter number in glibc's malloc.h
_THRESHOLD = 1 << 18  # blocks of 256 KiB and more are mmapped; smaller ones stay in the heap (fast)
_done = False


def stream_large_buffers() -> bool:
    """Make freed tensor buffers of 256 KiB or more return to the OS at once (glibc only; a no-op elsewhere).

    Called by the streaming operations (extract, apply, analyze) before they read a checkpoint.
    Returns True when the setting is in force.
    """
    global _done
    if _done or not sys.platform.startswith("linux"):
        return _done
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        _done = bool(libc.mallopt(_M_MMAP_THRESHOLD, _THRESHOLD))
    except (OSError, AttributeError):  # musl or another libc without mallopt
        _done = False
    return _done
