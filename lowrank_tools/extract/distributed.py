"""extract over the processes of a torch.distributed job: layers dealt by cost, one adapter written by rank 0.

    torchrun --nproc-per-node 4 -m lowrank_tools extract base/ tuned/ -o adapter --rank 64

Every process opens both checkpoints and plans the same layers. The work units (a layer, or a batch of
same-shape layers on CUDA, see :mod:`~lowrank_tools.pipeline`) are dealt by :func:`assign`: largest cost first,
each onto the least-loaded rank (Graham's LPT rule, within 4/3 of the best split), ties to the lower index
and rank, so every process computes the same split. The cost of a layer is ``out * in * (k + oversample)``
(capped at ``min(out, in)``): the randomized range finder's products are ``out * in * (k + p)`` each, and
reading and subtracting the pair are ``out * in``. Each rank reads and factors only its units; rank 0
gathers the factors and records, puts them back in the single-process order and writes one adapter. A
layer's arithmetic does not depend on who does it (same seed, same test matrix), so with the same number
of threads per process (``OMP_NUM_THREADS``; torchrun sets 1 unless told) the adapter is byte for byte the
one a single process writes. Ranks other than 0 write nothing.

The factors travel as pickled objects over gloo (a gloo side group when the job's backend is nccl), so
GPU memory is never used for them. A failure on one rank (a NaN weight in its share) is sent to the others
at their next exchange, and every rank raises it: no rank waits for one that will never come.

Python API: :func:`~lowrank_tools.extract.extract` works distributed when a default process group of more
than one process is initialised (``distributed=None``, the default), always with ``distributed=True``
(an error without a group) and never with ``distributed=False``. :func:`torchrun_group` initialises
and destroys the group from torchrun's environment, as the command line does.
"""

from __future__ import annotations

import heapq
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta

import torch

from ..errors import DistributedError, InvalidOption
from ..linalg.svd import resolve_device

__all__ = ["Share", "assign", "layer_cost", "current_share", "torchrun_group", "torchrun_world_size"]

TIMEOUT = timedelta(hours=2)  # a collective waits this long for the slowest rank (a 70B share can take an hour)
_OK, _FAILED = "ok", "failed"


def layer_cost(m: int, n: int, k: int, oversample: int) -> int:
    """Work of one layer of (m, n) with k singular values: ``m * n * min(k + oversample, min(m, n))``."""
    return int(m) * int(n) * min(int(k) + int(oversample), min(int(m), int(n)))


def assign(costs: Sequence[int], world_size: int) -> list[list[int]]:
    """Deal units 0..len(costs)-1 to ``world_size`` ranks: each rank's unit indices, ascending.

    Longest processing time first: units by cost descending (ties: lower index first), each onto the rank
    with the smallest load so far (ties: lower rank). Deterministic: integer costs, no hashing."""
    if world_size < 1:
        raise ValueError(f"world_size must be 1 or more, got {world_size}")
    heap = [(0, rank) for rank in range(world_size)]  # (load, rank)
    shares: list[list[int]] = [[] for _ in range(world_size)]
    for i in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        load, rank = heapq.heappop(heap)
        shares[rank].append(i)
        heapq.heappush(heap, (load + int(costs[i]), rank))
    return [sorted(share) for share in shares]


def _dist():
    import torch.distributed as dist

    return dist


class Share:
    """This process's part in a distributed extract: its rank, the exchanges with the others.

    Build it with :func:`current_share`. ``group``: the process group the objects travel in (None: the
    default group, when that is gloo). Close it (``with share:``) to release a gloo side group.
    """

    def __init__(self, rank: int, world_size: int, group=None, *, own_group: bool = False) -> None:
        self.rank, self.world_size, self.group = rank, world_size, group
        self._own_group = own_group
        self._failed = False  # set once a failure (ours or another rank's) has been exchanged

    @property
    def primary(self) -> bool:
        """True on rank 0, the process that gathers and writes."""
        return self.rank == 0

    def take(self, costs: Sequence[int], plan: object) -> list[int]:
        """The units this rank works on (ascending indices into ``costs``), after checking that every rank
        planned the same work (``plan``: anything comparable, e.g. the layer names, shapes and costs)."""
        plans = self.exchange(plan)
        for rank, other in enumerate(plans):
            if other != plans[0]:
                raise DistributedError(f"rank {rank} planned other layers than rank 0 (different checkpoints or "
                                       "options?): give every process the same inputs and options")
        return assign(costs, self.world_size)[self.rank]

    def exchange(self, payload: object) -> list:
        """Every rank's ``payload``, in rank order; raises another rank's failure if one was sent instead."""
        envelopes = self._all_gather((_OK, payload))
        for rank, (tag, value) in enumerate(envelopes):
            if tag == _FAILED:
                self._failed = True
                raise _rebuild(value, rank)
        return [value for _, value in envelopes]

    @contextmanager
    def guard(self) -> Iterator[None]:
        """Run local work; an exception raised in it is first sent to the other ranks (at whatever exchange
        they are waiting in), then raised here. Interrupts are not exchanged: torchrun stops every rank."""
        try:
            yield
        except Exception as exc:
            if not self._failed:
                self._failed = True
                try:
                    self._all_gather((_FAILED, _portable(exc)))
                except Exception:  # noqa: BLE001 - the others are gone already: raise ours
                    pass
            raise

    def gather(self, payload: object) -> list | None:
        """Every rank's ``payload`` on rank 0 (in rank order), None elsewhere. Call after an :meth:`exchange`
        that all ranks reached, so no failure can be pending."""
        dist = _dist()
        out = [None] * self.world_size if self.primary else None
        try:
            dist.gather_object(payload, out, dst=0, group=self.group)
        except RuntimeError as exc:
            raise self._lost(exc) from exc
        return out

    def _all_gather(self, obj: object) -> list:
        dist = _dist()
        out = [None] * self.world_size
        try:
            dist.all_gather_object(out, obj, group=self.group)
        except RuntimeError as exc:
            raise self._lost(exc) from exc
        return out

    def _lost(self, exc: BaseException) -> DistributedError:
        self._failed = True
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        return DistributedError(f"rank {self.rank} lost contact with the other processes ({reason}): one of them "
                                "failed or was stopped; see its message")

    def close(self) -> None:
        if self._own_group and self.group is not None:
            _dist().destroy_process_group(self.group)
            self.group = None

    def __enter__(self) -> Share:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _portable(exc: BaseException) -> BaseException:
    """``exc`` if it survives pickling as it is (our errors do), else a DistributedError with its message."""
    import pickle

    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 - any unpicklable exception
        return DistributedError(f"{type(exc).__name__}: {exc}")


def _rebuild(exc: BaseException, rank: int) -> BaseException:
    """Another rank's exception, its message saying where it happened."""
    if exc.args and isinstance(exc.args[0], str) and "(on rank " not in exc.args[0]:
        exc.args = (f"{exc.args[0]} (on rank {rank})", *exc.args[1:])
    return exc


def current_share(distributed: bool | None = None) -> Share | None:
    """The Share of this process, or None to work alone.

    ``None``: distributed when a default process group of more than one process is initialised.
    ``True``: such a group is required (:class:`~lowrank_tools.errors.DistributedError` otherwise).
    ``False``: alone, whatever exists."""
    if distributed is False:
        return None
    dist = _dist() if torch.distributed.is_available() else None
    if dist is None or not dist.is_initialized():
        if distributed:
            raise DistributedError("distributed=True but no torch.distributed process group is initialised: call "
                                   "torch.distributed.init_process_group() first, or use torchrun_group()")
        return None
    world, rank = dist.get_world_size(), dist.get_rank()
    if world == 1:
        return None
    if dist.get_backend() == "gloo":
        return Share(rank, world)
    # objects travel over gloo (CPU) whatever the job's backend: no GPU memory, no device to pick
    return Share(rank, world, dist.new_group(backend="gloo", timeout=TIMEOUT), own_group=True)


def torchrun_world_size() -> int:
    """``WORLD_SIZE`` from the environment torchrun sets (1 when absent)."""
    value = os.environ.get("WORLD_SIZE", "1").strip() or "1"
    try:
        size = int(value)
    except ValueError:
        raise InvalidOption(f"WORLD_SIZE={value!r} in the environment is not a whole number: "
                            "start the job with torchrun") from None
    if size < 1:
        raise InvalidOption(f"WORLD_SIZE={size} in the environment must be 1 or more: start the job with torchrun")
    return size


@contextmanager
def torchrun_group(device: str | torch.device = "cpu") -> Iterator[int]:
    """Under torchrun (``WORLD_SIZE`` > 1): initialise the default process group from its environment (nccl
    when ``device`` resolves to CUDA, pinning this process to ``cuda:LOCAL_RANK``; else gloo), yield this
    process's rank, destroy the group after. Otherwise (one process, or a group that exists already):
    yield the current rank and change nothing."""
    dist = _dist() if torch.distributed.is_available() else None
    if torchrun_world_size() == 1 or (dist is not None and dist.is_initialized()):
        yield dist.get_rank() if dist is not None and dist.is_initialized() else 0
        return
    if dist is None:
        raise DistributedError("WORLD_SIZE > 1 but this torch build has no torch.distributed: install a torch "
                               "with distributed support, or run one process")
    cuda = resolve_device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=TIMEOUT)
    try:
        yield dist.get_rank()
    finally:
        dist.destroy_process_group()
