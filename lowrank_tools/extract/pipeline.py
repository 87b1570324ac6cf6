"""The device side of extract: stage tensors onto the device, batch same-shape layers through the SVD, TF32 off.

    reading thread (prefetch)   W0, W' as stored, one pair ahead (float32 pairs: dW, subtracted there by
                                numpy on that one thread): no torch op there, so no second OpenMP team competes
                                with the factoring (on 2 cores, torch's elementwise work in that thread made
                                the factoring's small QRs 10x slower); memory stays flat
    staging (here)              W0, W' -> device: on CUDA through a ring of two page-locked host buffers and
                                non-blocking copies (half the bytes of dW for bf16 weights); the CPU fills one
                                buffer while the other is copied. Then dW = W' - W0 in float32 on the device
    batching (here)             consecutive layers of one matrix shape and k, ``batch`` at a time, in one
                                (b, m, n) device tensor, factored by one stacked randomized SVD (Halko et al.
                                2011, Alg. 4.4 + 5.1: the batched products and QRs of
                                :func:`~lowrank_tools.linalg.svd.truncated_svd`, the same test matrix for each)
    factoring (extract)         per layer: rank rule, balanced factors, cast, error on the factors as written

One code path for CPU and GPU: on the CPU the batch is 1 and staging moves nothing, so every layer goes
through :func:`~lowrank_tools.linalg.svd.truncated_svd` exactly as before, bit for bit (dW is exact in float32
wherever it is computed). On CUDA the default batch is :data:`CUDA_BATCH`; batches are planned on the whole
layer list (:func:`plan_batches`) before any reading, so a layer lands in the same batch whether one process or
several (:mod:`~lowrank_tools.extract.distributed`) do the work.

TF32: float32 matmuls on Ampere and later GPUs may round their inputs to 10-bit mantissas (~1e-3 relative),
which is the size of the errors extract reports. :func:`tf32` sets both switches for a run and restores them.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Protocol, TypeVar

import torch
from torch import Tensor

from ..errors import InvalidOption
from ..linalg.svd import Method, OutOfMemory, TruncatedSVD, fix_signs, randomized_svd, resolve_method
from .reading import reusable

__all__ = ["CUDA_BATCH", "MAX_BATCH_ELEMENTS", "Stager", "batch_size", "plan_batches", "staged", "batched_svds", "tf32"]

CUDA_BATCH = 4  # layers per stacked SVD on CUDA: enough to fill the GPU with 4096-wide layers
MAX_BATCH_ELEMENTS = 1 << 28  # a stack holds at most 2^28 float32 values (1 GiB of device memory)
T = TypeVar("T")
D = TypeVar("D", bound="_Delta")


class _Delta(Protocol):  # extract's _Delta: what batching needs of it
    matrix: Tensor  # (out, in_flat) float32 on the device


def batch_size(device: torch.device, requested: int | None = None) -> int:
    """Layers per stacked SVD: ``requested``, else 1 on the CPU (no gain there) and :data:`CUDA_BATCH` on CUDA."""
    if requested is None:
        return CUDA_BATCH if device.type == "cuda" else 1
    if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
        raise InvalidOption(f"svd_batch {requested!r} is outside [1, inf): give a whole number of layers, e.g. 4")
    return requested


def plan_batches(keys: Sequence[Hashable], sizes: Sequence[int], *, batch: int,
                 max_elements: int = MAX_BATCH_ELEMENTS) -> list[list[int]]:
    """Split layer indices 0..n-1 into batches: runs of consecutive equal ``keys`` (matrix shape and k), at most
    ``batch`` layers and ``max_elements`` values (``sizes[i]``: layer i's out * in_flat) each, in order."""
    groups: list[list[int]] = []
    for i, key in enumerate(keys):
        last = groups[-1] if groups else None
        if (last is not None and keys[last[0]] == key and len(last) < batch
                and sum(sizes[j] for j in last) + sizes[i] <= max_elements):
            last.append(i)
        else:
            groups.append([i])
    return groups


class _PinnedRing:
    """Host buffers used in turn: while the GPU copies from one, the CPU fills the next.

    ``pin``: page-locked (CUDA) so the copy runs asynchronously; a slot is reused only after the copy
    recorded on it has finished. Without ``pin`` (tests on the CPU) copies are synchronous and events unused.
    """

    def __init__(self, *, pin: bool, slots: int = 2) -> None:
        self.pin = pin
        self._buffers: list[Tensor | None] = [None] * slots
        self._events: list = [None] * slots
        self._next = 0

    def copy(self, dst: Tensor, src: Tensor) -> None:
        """``dst.copy_(src)`` through the next host buffer (dst on the device, src on the CPU, same shape)."""
        i, self._next = self._next, (self._next + 1) % len(self._buffers)
        if self._events[i] is not None:
            self._events[i].synchronize()  # the copy that last read this buffer has finished
        buffer = self._buffers[i]
        if buffer is None or buffer.numel() < src.numel() or buffer.dtype != src.dtype:
            self._buffers[i] = buffer = None  # free the small one first
            buffer = self._buffers[i] = torch.empty(src.numel(), dtype=src.dtype, pin_memory=self.pin)
        host = buffer[: src.numel()].view(src.shape)
        host.copy_(src)
        dst.copy_(host, non_blocking=self.pin)
        if self.pin:
            self._events[i] = torch.cuda.Event()
            self._events[i].record()


class Stager:
    """Moves tensors read on the CPU to ``device``: on CUDA through :class:`_PinnedRing` with non-blocking copies
    (``pinned``, default on CUDA), elsewhere as they are (on the CPU: not at all)."""

    def __init__(self, device: torch.device, *, pinned: bool | None = None) -> None:
        self.device = device
        pinned = device.type == "cuda" if pinned is None else pinned
        self._ring = _PinnedRing(pin=device.type == "cuda") if pinned else None
        self._scratch: Tensor | None = None

    def scratch(self, shape: Sequence[int]) -> Tensor:
        """A float32 tensor of ``shape`` on the device, the same memory at every call (grown when too small, made
        anew when not :func:`~lowrank_tools.extract.reading.reusable` for it: after an embedding): valid until the next
        call. Computing each delta in it spares the CPU a fresh, page-faulting
        allocation per layer (a third of the subtraction's time)."""
        numel = math.prod(shape)
        if not reusable(self._scratch, numel):
            self._scratch = None  # free the small (or, after an embedding, the oversized) one first
            self._scratch = torch.empty(numel, dtype=torch.float32, device=self.device)
        return self._scratch[:numel].view(*shape)

    def place(self, tensor: Tensor) -> Tensor:
        """``tensor`` on the device: the same tensor when it is there already and no ring is used."""
        if self._ring is None:
            return tensor.to(self.device)
        out = torch.empty(tensor.shape, dtype=tensor.dtype, device=self.device)
        self._ring.copy(out, tensor)
        return out


def staged(items: Iterable[T], *, sizes: Iterable[int], stager: Stager,
           make: Callable[[T, Stager, Tensor | None], D]) -> Iterator[tuple[list[D], Tensor | None]]:
    """``(group, stack)`` for groups of ``sizes`` consecutive items, each turned into a delta on the device by
    ``make(item, stager, out)`` (its ``matrix``: (m, n) float32, written into ``out`` when given).

    A group of one: ``stack`` is None. A larger group: ``stack`` is a (b, m, n) tensor on the device and each
    delta's matrix is a view of its slot. Items are pulled and made one at a time, so the host holds one
    item's tensors at a time whatever b is.
    """
    it = iter(items)
    for size in sizes:
        group: list[D] = []
        stack = None
        for slot, item in enumerate(itertools.islice(it, size)):
            delta = make(item, stager, None if stack is None else stack[slot])
            del item  # its CPU tensors go now
            if size > 1 and stack is None:  # the first of a batch fixes the shape
                stack = torch.empty((size, *delta.matrix.shape), dtype=delta.matrix.dtype, device=delta.matrix.device)
                stack[0].copy_(delta.matrix)
                delta.matrix = stack[0]
            group.append(delta)
        if not group:
            return
        yield group, stack
        del group, stack


@torch.no_grad()
def batched_svds(stack: Tensor, k: int, *, method: Method | str = Method.AUTO, oversample: int = 10, n_iter: int = 4,
                 seed: int = 0) -> list[TruncatedSVD | None]:
    """Top-k SVDs of a stack ``(b, m, n)`` by one batched randomized SVD; a None per matrix where the caller
    should call :func:`~lowrank_tools.linalg.svd.truncated_svd` on its own: when the method resolves to exact
    (see there), or when the batched run fails (no convergence, out of memory), which keeps that function's
    float64 and exact fallbacks. Results: as ``truncated_svd`` gives them (float32, signs fixed)."""
    b, m, n = stack.shape
    k = min(int(k), m, n)
    if resolve_method(Method(method), min(m, n), k, oversample) is not Method.RANDOMIZED:
        return [None] * b
    try:
        U, S, Vh = randomized_svd(stack.float(), k, oversample, n_iter, seed)  # (b, m, k), (b, k), (b, k, n)
    except (OutOfMemory, RuntimeError):  # the per-layer path needs 1/b of the memory and has the fallbacks
        if stack.is_cuda:
            torch.cuda.empty_cache()
        return [None] * b
    if not bool(torch.isfinite(S).all()):
        return [None] * b
    out = []
    for i in range(b):
        Ui, Vhi = fix_signs(U[i], Vh[i])  # (m, k), (k, n)
        out.append(TruncatedSVD(U=Ui, S=S[i].contiguous(), Vh=Vhi, method=Method.RANDOMIZED, spectrum=S[i],
                                power_iters=n_iter))  # a stack: always the full count
    return out


@contextmanager
def tf32(allow: bool) -> Iterator[None]:
    """Set ``torch.backends.cuda.matmul.allow_tf32`` and ``torch.backends.cudnn.allow_tf32`` to ``allow`` inside
    the block and restore both after (also on errors). Harmless without CUDA."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = bool(allow)
    torch.backends.cudnn.allow_tf32 = bool(allow)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.backends.cudnn.allow_tf32 = cudnn
