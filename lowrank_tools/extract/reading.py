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

__all__ = ["Pair", "DELTA_DTYPES", "BufferPool", "ReadBuffers", "LayerReader", "float32_delta", "oversized",
           "reusable", "read_pairs", "fused_pair"]

DELTA_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # subtracted where they are read


@dataclass
class Pair:
    """One layer as read in the read-ahead thread: W' and W0 as stored, or dW already (float32 pairs)."""

    name: str  # tensor name (``...weight``)
    kind: ModuleKind
    tuned: Tensor | None  # W' (a fresh CPU buffer we own), or dW when ``base`` is None; None once consumed
    base: Tensor | None  # W0; None when float32 W' was turned into dW as it was read
    dtype: torch.dtype  # the tuned tensor's stored dtype (default output dtype)
    sources: tuple[Checkpoint, Checkpoint]  # (base, tuned): read again to name a NaN/Inf


OVERSIZED = 4  # a reused buffer more than this many times the size a layer needs is let go (and one of the right
OVERSIZED_BYTES = 64 << 20  # size made) when it is larger than this: after an embedding of V x d, the buffers of
# the small layers that follow; kept, a worker's would hold 2 V d float32 bytes to the end, beside the other worker's
# lm_head (Llama-3-8B: 4 GB more at the peak)


def oversized(have: int, need: int) -> bool:
    """Whether a buffer of ``have`` bytes is too large to keep serving requests of ``need`` bytes."""
    return have > OVERSIZED_BYTES and have > OVERSIZED * need


def reusable(buffer: Tensor | None, numel: int) -> bool:
    """Whether a reused 1-D ``buffer`` may serve ``numel`` values of its dtype: large enough, not :func:`oversized`."""
    return (buffer is not None and buffer.numel() >= numel
            and not oversized(buffer.nbytes, numel * buffer.element_size()))


NUMPY_CHUNK = 1 << 16  # values widened and subtracted at a time by numpy (a 256 KiB temporary, in cache)
TORCH_CHUNK = 1 << 18  # ... by torch (1 MiB: fewer calls; torch's per-call cost is higher, its loops faster)


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
    """Float32 buffers for the deltas of one reading thread, reused once every tensor viewing them is gone.

    Each buffer is an mmap of its own (:func:`~lowrank_tools.linalg.memory.stream_large_buffers`), so a fresh one
    per layer pays a page fault per 4 KiB page: for a 135M bf16 model 130k faults, ~1 CPU s of the extract. A
    buffer is free when the pool holds the only reference to it (numpy counts the views and torch tensors made
    from it, and torch's storage keeps the array alive until its last view goes), so reuse never overwrites
    a delta in use; at most ``size`` are kept (for the read-ahead thread: the one being factored, the one queued,
    the one being read; for a side worker its one), none :func:`oversized` for the request at hand."""

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self._arrays: list[np.ndarray] = []

    def take(self, numel: int) -> np.ndarray:
        """A float32 array of ``numel`` values (contents undefined): a free pooled one when one is large enough."""
        for i in reversed(range(len(self._arrays))):  # an oversized free buffer goes (see OVERSIZED)
            if self._free(i) and oversized(self._arrays[i].nbytes, 4 * numel):
                self._arrays.pop(i)
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
    :func:`float32_delta` has subtracted it, so the next pair may overwrite it (a fresh buffer per tensor is an mmap
    of its own that pays a page fault per 4 KiB page: for a 135M bf16 model 130k faults)."""

    def __init__(self) -> None:
        self._bufs: list[Tensor | None] = [None, None]

    def read_pair(self, base: Checkpoint, tuned: Checkpoint, name: str, pool: BufferPool | None = None,
                  ) -> tuple[Tensor, Tensor]:
        """(W', W0) of ``name``: in the reused buffers when both are bf16 or fp16 (numpy subtracts them at once);
        a float32 pair's W' (which becomes dW in place) in a buffer of ``pool`` (else of its own) and its W0 in a
        reused one; other pairs each in a buffer of its own (they are handed to the consumer)."""
        dtype = tuned.dtype(name)
        if base.dtype(name) != dtype or dtype not in DELTA_DTYPES:
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
        if not reusable(self._bufs[i], nbytes):
            self._bufs[i] = None  # the small (or oversized) one goes first
            self._bufs[i] = empty_huge((nbytes,), torch.uint8)
        return self._bufs[i]


def float32_delta(W1: Tensor, W0: Tensor, pool: BufferPool | None = None, *, scratch: Tensor | None = None,
                  torch_ops: bool | None = None) -> Tensor:
    """dW = W' - W0 in float32 (a buffer of W1's shape: W1 itself when float32, else from ``pool`` when given, else
    fresh) from a float32, bf16 or fp16 pair of equal dtype, contiguous, on this thread, a chunk at a time (no
    second full-size float32 copy; ``scratch``: a float32 temporary to reuse). Exact either way, the bits of torch's
    ``W1.float() - W0.float()``.

    ``torch_ops`` (default: when this thread runs one intra-op thread, as extract's side workers do): torch's
    vectorised conversions and subtraction, 2-2.3x numpy's rate (a bf16 1536 x 576 pair: 0.35 against 0.81 ms).
    Otherwise numpy (bf16 widened by a 16-bit shift): a torch op on a thread allowed several intra-op threads would
    start an OpenMP team beside the factoring's (the read-ahead thread: on 2 cores that made the small QRs 10x
    slower)."""
    if torch_ops is None:
        torch_ops = torch.get_num_threads() == 1
    numel = W1.numel()
    if W1.dtype == torch.float32:
        out = W1.numpy()
    else:
        out = pool.take(numel) if pool is not None else np.empty(numel, dtype=np.float32)
    dst, new, old = torch.from_numpy(out).view(-1), W1.reshape(-1), W0.reshape(-1)
    step = TORCH_CHUNK if torch_ops else NUMPY_CHUNK
    size = min(step, numel)
    tmp = scratch[:size] if scratch is not None and scratch.numel() >= size else torch.empty(size)
    chunk = _torch_chunk if torch_ops else _numpy_chunk
    with np.errstate(all="ignore"):  # an overflow is reported by _subtract, naming the tensor
        for i in range(0, numel, step):
            d, n, o = dst[i:i + step], new[i:i + step], old[i:i + step]
            chunk(d, None if n.dtype == torch.float32 else n, o, tmp[:d.numel()])
    return torch.from_numpy(out).view(W1.shape)


def _torch_chunk(d: Tensor, new: Tensor | None, old: Tensor, tmp: Tensor) -> None:
    """``d = new - old`` (``new`` None: d holds it already, in float32), float32 ``d`` and ``tmp``, by torch."""
    if new is not None:
        d.copy_(new)
    d.sub_(old if old.dtype == torch.float32 else tmp.copy_(old))


def _numpy_chunk(d: Tensor, new: Tensor | None, old: Tensor, tmp: Tensor) -> None:
    """:func:`_torch_chunk` by numpy."""
    dn = d.numpy()
    if new is not None:
        as_float32(new, dn)
    np.subtract(dn, old.numpy() if old.dtype == torch.float32 else as_float32(old, tmp.numpy()), out=dn)


def read_pairs(base: Checkpoint, tuned: Checkpoint, selected: dict[str, ModuleKind]) -> Iterator[Pair]:
    """Runs in the read-ahead thread. Pairs of one dtype among float32, bf16 and fp16 are subtracted here into a
    float32 dW (:func:`float32_delta`, exact: the same bits as torch's float32 subtraction), on this one thread
    (by numpy unless torch runs one intra-op thread here: no OpenMP team to slow the factoring's small QRs down), so
    that only dW waits in the queue and the factoring thread does no elementwise work (for a 135M bf16 model that
    was 30% of its time); mixed or other dtypes wait as stored and are converted by the consumer."""
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
        self.scratch = torch.empty(TORCH_CHUNK)  # float32_delta's temporary (1 MiB: an mmap of its own, so reused)

    def pair(self, base: Checkpoint, tuned: Checkpoint, name: str, kind: ModuleKind) -> Pair:
        """The layer ``name`` as read, dW made here for a float32, bf16 or fp16 pair."""
        W1, W0 = self.reads.read_pair(base, tuned, name, self.pool)
        dtype = W1.dtype
        if W1.dtype == W0.dtype and W1.dtype in DELTA_DTYPES and W1.is_contiguous() and W0.is_contiguous():
            W1, W0 = float32_delta(W1, W0, self.pool, scratch=self.scratch), None
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
