"""Small layers two at a time (extract.side_thread): with 2 threads the small layers are factored on two worker
threads of one intra-op thread each, and the adapter file is byte for byte the one of a 1-thread run; a large
layer stays on the calling thread; errors surface in the caller; thread counts are restored."""

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
LARGE = "model.layers.1.mlp.gate_proj.weight"  # above SMALL_LAYER: on the calling thread, every intra-op thread


def _pair():
    shapes = {**SHAPES, LARGE: (side_thread.SMALL_LAYER // 384 + 1, 384)}
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
    small = [(t, n) for name, t, n in seen if name != LARGE]
    assert {t for t, _ in small} >= {"lowrank-tools-side_0", "lowrank-tools-side_1"} and {n for _, n in small} == {1}
    assert [(t, n) for name, t, n in seen if name == LARGE] == [("MainThread", 2)]
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
    out = list(side_thread.factored_in_order(items, factor, small=lambda i: i < 100))
    assert out == [(i, i * i) for i in items]
