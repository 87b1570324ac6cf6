"""Layers two at a time (extract.side_thread): with 2 threads every layer is factored on one of two worker threads
of one intra-op thread each, and the adapter file is byte for byte the one of a 1-thread run; a worker whose
layer is quick runs ahead of one held up (contention); errors surface in the caller; thread counts are restored."""

from __future__ import annotations

import importlib
import threading

import pytest
import torch

from conftest import make_pair
from lowrank_tools.errors import NumericalError
from lowrank_tools.extract import extract
from lowrank_tools.io.formats import save_adapter
from lowrank_tools.linalg import RankRule

streaming = importlib.import_module("lowrank_tools.extract.streaming")
side_thread = importlib.import_module("lowrank_tools.extract.side_thread")

SHAPES = {f"model.layers.{b}.{name}.weight": shape for b in range(3)
          for name, shape in (("self_attn.q_proj", (384, 384)), ("self_attn.k_proj", (128, 384)),
                              ("mlp.up_proj", (1024, 384)), ("mlp.down_proj", (384, 1024)))}
LARGE = "model.layers.1.mlp.gate_proj.weight"  # 2.1M entries: a worker's too, on its one thread


def _pair():
    shapes = {**SHAPES, LARGE: (5462, 384)}
    base, tuned = make_pair(shapes, k=4)
    gen = torch.Generator().manual_seed(1)
    for name in tuned:  # a full-rank tail, so that the rank-8 factors are a real truncation
        tuned[name] = tuned[name] + 0.01 * torch.randn(tuned[name].shape, generator=gen)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"):
        tuned[name] = tuned[name].bfloat16()  # against a float32 base: the delta is made in the stager's scratch
    return base, tuned  # buffer, the second's over the first's while that one is on a worker (unless copied)


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _run(tmp_path, n: int):
    torch.set_num_threads(n)
    base, tuned = _pair()
    result = extract(base, tuned, rule=RankRule(rank=8))
    out = tmp_path / f"t{n}.safetensors"
    save_adapter(result.adapter, out, format="kohya")
    return out.read_bytes(), [r.name for r in result.report.layers]


def _spy(monkeypatch) -> list[tuple[str, str, int]]:
    """(layer, thread name, intra-op threads) of every _factor_layer call."""
    seen = []
    real = streaming._factor_layer

    def factor(delta, *args, **kwargs):
        seen.append((delta.name, threading.current_thread().name, torch.get_num_threads()))
        return real(delta, *args, **kwargs)
    monkeypatch.setattr(streaming, "_factor_layer", factor)
    return seen


def test_two_threads_write_the_one_thread_bytes(tmp_path, monkeypatch, threads):
    seen = _spy(monkeypatch)
    one, order_one = _run(tmp_path, 1)
    assert all(t == "MainThread" for _, t, _ in seen)  # one thread allowed: no side threads
    seen.clear()
    two, order_two = _run(tmp_path, 2)
    assert one == two and order_one == order_two
    assert {t for _, t, _ in seen} == {"lowrank-tools-side_0", "lowrank-tools-side_1"} and {n for *_, n in seen} == {1}
    assert LARGE in {name for name, _, _ in seen}
    assert torch.get_num_threads() == 2  # the caller's count, and the default a new thread reads
    new = []
    worker = threading.Thread(target=lambda: new.append(torch.get_num_threads()))
    worker.start()
    worker.join()
    assert new == [2]


def test_a_worker_error_is_raised_in_the_caller_and_the_workers_end(monkeypatch, threads):
    torch.set_num_threads(2)
    real = streaming._factor_layer

    def factor(delta, *args, **kwargs):
        if delta.name == "model.layers.1.mlp.up_proj.weight":
            raise NumericalError("planted failure")
        return real(delta, *args, **kwargs)
    monkeypatch.setattr(streaming, "_factor_layer", factor)
    base, tuned = make_pair(SHAPES, k=4)
    with pytest.raises(NumericalError, match="planted failure"):
        extract(base, tuned, rule=RankRule(rank=8))
    assert not [t for t in threading.enumerate() if t.name.startswith("lowrank-tools-side")]
    assert torch.get_num_threads() == 2


def test_factored_in_order_keeps_the_order_with_uneven_work(threads):
    torch.set_num_threads(2)
    import time

    def factor(i: int) -> int:
        time.sleep(0.02 if i % 3 == 0 else 0.001)  # the older item finishes last
        return i * i
    items = [1, 2, 3, 100, 4, 5, 6]
    out = list(side_thread.factored_in_order(items, factor))
    assert out == [(i, i * i) for i in items]


def test_a_free_worker_runs_ahead_of_a_held_up_one(threads):
    """Item 0 is held up (its core shared with a busy process, say, or a large layer): the other worker goes on with
    every other item meanwhile (items are names: nothing waits but them); results still come in order."""
    import time

    torch.set_num_threads(2)
    finished = []

    def factor(i: int) -> int:
        time.sleep(0.5 if i == 0 else 0.01)
        finished.append(i)
        return i
    out = list(side_thread.factored_in_order(range(10), factor))
    assert [i for i, _ in out] == list(range(10))
    assert finished[-1] == 0  # items 1..9 all done while 0 was still running


def test_an_early_close_cancels_what_has_not_started(threads):
    torch.set_num_threads(2)
    import time

    started = []

    def factor(i: int) -> int:
        started.append(i)
        time.sleep(0.05)
        return i
    results = side_thread.factored_in_order(range(50), factor)
    assert next(results) == (0, 0)
    results.close()  # joins the workers: at most the items already running finish
    assert len(started) <= 4 and not [t for t in threading.enumerate() if t.name.startswith("lowrank-tools-side")]


def test_workers_read_their_own_layers_in_reused_buffers(monkeypatch, threads):
    """On side threads every layer is read and subtracted by the worker that factors it (no read-ahead thread),
    each worker reusing one float32 buffer for its deltas: a bf16 pair of many layers allocates no buffer per
    layer."""
    from lowrank_tools.extract import reading

    torch.set_num_threads(2)
    base, tuned = _pair()
    base = {n: w.bfloat16() for n, w in base.items()}
    tuned = {n: w.bfloat16() for n, w in tuned.items()}
    readers, taken = [], []
    real_take = reading.BufferPool.take

    def take(pool, numel):
        arr = real_take(pool, numel)
        taken.append((threading.current_thread().name, arr.__array_interface__["data"][0]))
        return arr
    monkeypatch.setattr(reading.BufferPool, "take", take)
    result = extract(base, tuned, rule=RankRule(rank=8))
    assert len(result.adapter.modules) == len(base)
    assert {t for t, _ in taken} <= {"lowrank-tools-side_0", "lowrank-tools-side_1"}
    assert not [t for t in threading.enumerate() if t.name == "lowrank-tools-prefetch"]
    for worker in {t for t, _ in taken}:
        addresses = [a for t, a in taken if t == worker]
        assert len(set(addresses)) <= 3 < len(addresses)  # grown a few times at most, then reused
