"""Memory behaviour of large tensor buffers: freed ones go straight back to the OS, fresh ones can take huge pages.

glibc's malloc serves large blocks with mmap only up to a threshold that grows each time such a
block is freed (up to 32 MiB on 64-bit). Once it has grown, every tensor of a streamed checkpoint is
carved from a heap arena, and the arena of the read-ahead thread keeps what was freed: the peak RSS
then grows with the number of layers. Fixing the threshold (which also turns off its growth) makes
each tensor buffer an mmap of its own that ``free`` unmaps at once. Measured on 32 layers of
1024x1024 float32 read ahead and factored: peak RSS above baseline 139 MB with the default, 64 MB
with the threshold fixed (benchmarks/bench_extract.py measures it on every run).

A fresh buffer written once in full (the bf16 copy the sketch of :mod:`~lowrank_tools.linalg.sketch` multiplies by)
pays a page fault per 4 KiB page; :func:`empty_huge` asks for 2 MiB pages instead (``madvise``). Both use
libc through ctypes and are no-ops where it is not glibc on Linux.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

import torch
from torch import Tensor

__all__ = ["stream_large_buffers", "empty_huge"]

_M_MMAP_THRESHOLD = -3  # mallopt parameter number in glibc's malloc.h
_THRESHOLD = 1 << 18  # blocks of 256 KiB and more are mmapped; smaller ones stay in the heap (fast)
_done = False
_MADV_HUGEPAGE = 14  # madvise advice number in Linux's mman.h
_HUGE_PAGE = 1 << 21  # 2 MiB, the x86-64 / arm64 transparent huge page
_madvise = None  # libc's madvise, looked up on first use (False: not available)


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


def _libc_madvise():
    """libc's ``madvise`` with its C signature, or False where there is none (looked up once)."""
    global _madvise
    if _madvise is None:  # published once looked up: a second thread here meanwhile (extract's two workers) looks
        found = False  # it up too, where a False set first told it "not available" (its first buffer unadvised)
        if sys.platform.startswith("linux"):
            try:
                fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").madvise
                fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
                found = fn
            except (OSError, AttributeError):
                pass
        _madvise = found
    return _madvise


def empty_huge(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str = "cpu") -> Tensor:
    """``torch.empty``, with a CPU buffer of 4 MiB or more advised to the kernel as transparent huge pages.

    A fresh buffer is mapped page by page as it is first written: for the bf16 copy of a 4096 x 4096 delta
    (32 MiB) that is 8192 page faults, 11 ms of a 12 ms copy on 2 cores, against 512 faults with 2 MiB
    pages (7 ms in all; ``MADV_HUGEPAGE`` works where ``/sys/kernel/mm/transparent_hugepage/enabled`` is
    ``madvise`` or ``always``). Only the 2 MiB-aligned interior is advised; a refusal is ignored (the buffer
    is then an ordinary one). For buffers written in full at once: a huge page is mapped whole.
    """
    t = torch.empty(shape, dtype=dtype, device=device)
    _advise_huge_pages(t)
    return t


def _advise_huge_pages(t: Tensor) -> bool:
    """Advise the 2 MiB-aligned interior of a CPU tensor of 4 MiB or more as huge pages. True when madvise
    returned 0: the kernel took the advice, which it follows only where transparent huge pages are
    ``madvise`` or ``always`` and a huge page is free. On a heap block the advice outlives the tensor (the
    memory is then reused by later tensors, with the same effect)."""
    nbytes = t.numel() * t.element_size()
    madvise = _libc_madvise() if t.device.type == "cpu" and nbytes >= 2 * _HUGE_PAGE else False
    if not madvise:
        return False
    start = t.data_ptr()
    first = (start + _HUGE_PAGE - 1) & ~(_HUGE_PAGE - 1)
    last = (start + nbytes) & ~(_HUGE_PAGE - 1)
    return last > first and madvise(first, last - first, _MADV_HUGEPAGE) == 0
