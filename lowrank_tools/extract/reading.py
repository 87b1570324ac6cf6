"""extract's reading side: read a layer's tensor pair (W', W0) and, for float32/bf16/fp16 pairs, subtract them
into a float32 dW on the reading thread, in reused buffers (no page fault per 4 KiB page of a fresh one).

One :class:`LayerReader` per reading thread: the read-ahead thread of :func:`read_pairs` (one layer at a time), or
each worker of :mod:`~lowrank_tools.extract.side_thread`, which reads, subtracts and factors its own layers."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..adapter import ModuleKind
from ..io.arch_checkpoint import in_original_naming
from ..io.checkpoint import Checkpoint, as_checkpoint
from ..linalg.memory import empty_huge

__all__ = ["Pair", "NUMPY_DTYPES", "BufferPool", "ReadBuffers", "LayerReader", "numpy_delta", "read_pairs", "fused_pair"]

NUMPY_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # subtracted in the read-ahead thread


@dataclass
class Pair:
    """One layer as read in the read-ahead thread: W' and W0 as stored, or dW already (float32 pairs)."""

    name: str  # tensor name (``...weight``)
    kind: ModuleKind
    tuned: Tensor | None  # W' (a fresh CPU buffer we own), or dW when ``base`` is None; None once consumed
    base: Tensor | None  # W0; None when float32 W' was turned into dW as it was read
    dtype: torch.dtype  # the tuned tensor's stored dtype (default output dtype)
    sources: tuple[Checkpoint, Checkpoint]  # (base, tuned): read again to name a NaN/Inf


NUMPY_CHUNK = 1 << 16  # values of W0 widened to float32 at a time (a 256 KiB temporary, in cache)


def as_float32(t: Tensor, out: np.ndarray) -> np.ndarray:
    """``t`` (bf16 or fp16, contiguous) widened into the float32 array ``out`` (same size) by numpy: bf16 is the top
    half of a float32, so a 16-bit shift is exact; fp16 is numpy's own type."""
    if t.dtype == torch.bfloat16:
        np.left_shift(t.reshape(-1).view(torch.int16).numpy().view(np.uint16), 16, out=out.view(np.uint32),
                      dtype=np.uint32)
    else:
        out[...] = t.reshape(-1).numpy()
    return out


class BufferPool:
    """Float32 buffers for the deltas, reused once every tensor viewing them is gone (the read-ahead thread only).

    Each buffer is an mmap of its own (:func:`~lowrank_tools.linalg.memory.stream_large_buffers`), so a fresh one
    per layer pays a page fault per 4 KiB page: for a 135M bf16 model 130k faults, ~1 CPU s of the extract. A
    buffer is free when the pool holds the only reference to it (numpy counts the views and torch tensors made
    from it, and torch's storage keeps the array alive until its last view goes), so reuse never overwrites
    a delta in use; at most ``size`` are kept (the one being factored (two on side threads, see
    :mod:`~lowrank_tools.extract.side_thread`), the one queued, the one being read)."""

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self._arrays: list[np.ndarray] = []

    def take(self, numel: int) -> np.ndarray:
        """A float32 array of ``numel`` values (contents undefined): a free pooled one when one is large enough."""
        free = [i for i in range(len(self._arrays)) if self._free(i)]
        for i in free:
            if self._arrays[i].size >= numel:
                return self._arrays[i][:numel]  # the view refers to the pooled array: it is in use until it goes
        arr = empty_huge((numel,), torch.float32).numpy()  # 2 MiB pages from 4 MiB up (the embedding)
        if len(self._arrays) >= self.size and free:
            self._arrays.pop(min(free, key=lambda i: self._arrays[i].size))  # the smallest free one makes room
        if len(self._arrays) < self.size:
            self._arrays.append(arr)
        return arr

    def _free(self, i: int) -> bool:
        return sys.getrefcount(self._arrays[i]) <= 2  # the list's reference and getrefcount's argument only


class ReadBuffers:
    """Two byte buffers the read-ahead thread reads a bf16/fp16 pair into (grown as needed): the pair is dead once
    :func:`numpy_delta` has subtracted it, so the next pair may overwrite it (a fresh buffer per tensor is an mmap
    of its own that pays a page fault per 4 KiB page: for a 135M bf16 model 130k faults)."""

    def __init__(self) -> None:
        self._bufs: list[Tensor | None] = [None, None]

    def read_pair(self, base: Checkpoint, tuned: Checkpoint, name: str, pool: BufferPool | None = None,
                  ) -> tuple[Tensor, Tensor]:
        """(W', W0) of ``name``: in the reused buffers when both are bf16 or fp16 (numpy subtracts them at once);
        a float32 pair's W' (which becomes dW in place) in a buffer of ``pool`` (else of its own) and its W0 in a
        reused one; other pairs each in a buffer of its own (they are handed to the consumer)."""
        dtype = tuned.dtype(name)
        if base.dtype(name) != dtype or dtype not in NUMPY_DTYPES:
            return tuned.get(name), base.get(name)
        if dtype == torch.float32:
            into = None if pool is None else torch.from_numpy(pool.take(tuned.nbytes(name) // 4)).view(torch.uint8)
            return tuned.get(name, out=into), base.get(name, out=self._buffer(1, base.nbytes(name)))
        return (tuned.get(name, out=self._buffer(0, tuned.nbytes(name))),
                base.get(name, out=self._buffer(1, base.nbytes(name))))

    def holds(self, t: Tensor) -> bool:
        """Whether ``t`` lives in one of the reused buffers."""
        ptr = t.untyped_storage().data_ptr()
        return any(b is not None and b.untyped_storage().data_ptr() == ptr for b in self._bufs)

    def _buffer(self, i: int, nbytes: int) -> Tensor:
        if self._bufs[i] is None or self._bufs[i].numel() < nbytes:
            self._bufs[i] = None  # the small one goes first
            self._bufs[i] = empty_huge((nbytes,), torch.uint8)
        return self._bufs[i]


def numpy_delta(W1: Tensor, W0: Tensor, pool: BufferPool | None = None) -> Tensor:
    """dW = W' - W0 in float32 (a buffer of W1's shape: from ``pool`` when given, else fresh) from a float32, bf16
    or fp16 pair of equal dtype, on this thread by numpy; W0 is widened a chunk at a time (no second full-size
    float32 copy)."""
    if W1.dtype == torch.float32:
        out = W1.numpy()
    else:
        out = as_float32(W1, pool.take(W1.numel()) if pool is not None else np.empty(W1.numel(), dtype=np.float32))
    flat, base = out.reshape(-1), W0.reshape(-1)
    tmp = np.empty(min(NUMPY_CHUNK, flat.size), dtype=np.float32)
    with np.errstate(all="ignore"):  # an overflow is reported by _subtract, naming the tensor
        if W0.dtype == torch.float32:
            np.subtract(flat, base.numpy(), out=flat)
        else:
            for i in range(0, flat.size, NUMPY_CHUNK):
                part = base[i:i + NUMPY_CHUNK]
                np.subtract(flat[i:i + part.numel()], as_float32(part, tmp[:part.numel()]), out=flat[i:i + part.numel()])
    return torch.from_numpy(out).view(W1.shape)


def read_pairs(base: Checkpoint, tuned: Checkpoint, selected: dict[str, ModuleKind]) -> Iterator[Pair]:
    """Runs in the read-ahead thread. Pairs of one dtype among float32, bf16 and fp16 are subtracted here into a
    float32 dW (:func:`numpy_delta`, exact: the same bits as torch's float32 subtraction), on this one thread
    (numpy: no OpenMP team to slow the factoring's small QRs down), so that only dW waits in the queue and the
    factoring thread does no elementwise work (for a 135M bf16 model that was 30% of its time); mixed or other
    dtypes wait as stored and are converted by the consumer."""
    reader = LayerReader()
    for name, kind in selected.items():
        yield reader.pair(base, tuned, name, kind)


class LayerReader:
    """One thread's reading of layers: each pair read into reused buffers (:class:`ReadBuffers`) and, for a float32,
    bf16 or fp16 pair, subtracted into a float32 dW in a buffer of a :class:`BufferPool` of ``pool_size`` (the
    deltas of this thread that may be alive at once: 4 for the read-ahead thread, see there; 1 for a worker that
    factors its own layers). No buffer per layer: a fresh one pays a page fault per 4 KiB page (for a 135M bf16
    model 130k faults, ~0.5 s of system time)."""

    def __init__(self, pool_size: int = 4) -> None:
        self.pool, self.reads = BufferPool(pool_size), ReadBuffers()

    def pair(self, base: Checkpoint, tuned: Checkpoint, name: str, kind: ModuleKind) -> Pair:
        """The layer ``name`` as read, dW made here when numpy can."""
        W1, W0 = self.reads.read_pair(base, tuned, name, self.pool)
        dtype = W1.dtype
        if W1.dtype == W0.dtype and W1.dtype in NUMPY_DTYPES and W1.is_contiguous() and W0.is_contiguous():
            W1, W0 = numpy_delta(W1, W0, self.pool), None
        elif self.reads.holds(W1) or self.reads.holds(W0):  # never hand on a reused buffer: the next read overwrites it
            W1, W0 = W1.clone(), W0.clone()
        return Pair(name, kind, W1, W0, dtype, (base, tuned))


def fused_pair(base, tuned) -> tuple[Checkpoint, Checkpoint]:
    """(base, tuned) as a kohya output names them: a diffusers-named transformer model (Flux, SD3, Wan, HunyuanVideo)
    in its original names, each fused layer one stacked tensor (:func:`~lowrank_tools.io.arch_checkpoint.in_original_
    naming`), so that extract factors the module the file holds, [dW_q; dW_k; dW_v], at the rank asked (not three
    rank-r parts concatenated to rank 3r). Both as opened when the tuned one is no such model or the base is not in
    the same naming (a pairing of other names reports what does not pair)."""
    base, tuned = as_checkpoint(base), as_checkpoint(tuned)
    tuned_view, arch = in_original_naming(tuned)
    if arch is None:
        return base, tuned
    base_view, base_arch = in_original_naming(base)
    return (base_view, tuned_view) if base_arch is arch else (base, tuned)
