"""The extract pipeline: batching plans, staging (the pinned-ring logic runs on the CPU too), the stacked SVD
against the per-layer one, TF32 switches, the cheap finiteness check; CUDA paths where a GPU is present."""

from __future__ import annotations

from dataclasses import dataclass
from unittest import mock

import pytest
import torch
from safetensors.torch import save_file

from conftest import make_pair, planted_delta
from lowrank_tools import RankRule, extract
from lowrank_tools.extract import pipeline
from lowrank_tools.errors import InvalidOption, NonFiniteWeight
from lowrank_tools.linalg import Method, truncated_svd
from lowrank_tools.extract.pipeline import (CUDA_BATCH, Stager, _PinnedRing, batch_size, batched_svds, plan_batches, staged,
                                    tf32)

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@dataclass
class _D:
    name: str
    matrix: torch.Tensor


def _deltas(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [_D(f"l{i}", torch.randn(*s, generator=g)) for i, s in enumerate(shapes)]


def test_batch_size_defaults_and_checks():
    assert batch_size(torch.device("cpu")) == 1
    assert batch_size(torch.device("cuda")) == CUDA_BATCH  # only the device type is looked at
    assert batch_size(torch.device("cpu"), 3) == 3
    for bad in (0, -1, 1.5, True):
        with pytest.raises(InvalidOption, match="svd_batch"):
            batch_size(torch.device("cpu"), bad)


def test_plan_batches_groups_consecutive_equal_keys_within_limits():
    keys = ["a", "a", "a", "b", "a", "a", "c", "c"]
    sizes = [10] * len(keys)
    assert plan_batches(keys, sizes, batch=2) == [[0, 1], [2], [3], [4, 5], [6, 7]]
    assert plan_batches(keys, sizes, batch=8) == [[0, 1, 2], [3], [4, 5], [6, 7]]
    assert plan_batches(keys, sizes, batch=1) == [[i] for i in range(len(keys))]
    assert plan_batches(keys, sizes, batch=8, max_elements=25) == [[0, 1], [2], [3], [4, 5], [6, 7]]
    assert plan_batches(["a"], [100], batch=4, max_elements=10) == [[0]]  # one layer over the limit still goes
    assert plan_batches([], [], batch=4) == []


def _make(item, stager, out):
    """What extract's _subtract does, minus the subtraction: the matrix on the device, into ``out`` if given."""
    placed = stager.place(item.matrix)
    return _D(item.name, placed if out is None else out.copy_(placed))


def test_stager_on_cpu_moves_nothing_unless_pinned():
    t = torch.randn(5, 4)
    assert Stager(torch.device("cpu")).place(t) is t
    ring = Stager(torch.device("cpu"), pinned=True)  # the CUDA code path, synchronous on the CPU
    placed = [ring.place(torch.full((5, 4), float(i))) for i in range(3)]
    assert [float(p[0, 0]) for p in placed] == [0.0, 1.0, 2.0]  # a reused host buffer never shows through


def test_staged_single_layers_are_the_items_themselves():
    items = _deltas([(8, 6), (8, 6), (5, 7)])
    originals = [d.matrix for d in items]
    groups = list(staged(iter(items), sizes=[1, 1, 1], stager=Stager(torch.device("cpu")), make=_make))
    assert [stack for _, stack in groups] == [None, None, None]
    assert all(g[0].matrix is m for (g, _), m in zip(groups, originals))  # no copy on the CPU


@pytest.mark.parametrize("pinned", [False, True])
def test_staged_stacks_groups_and_keeps_every_value(pinned):
    items = _deltas([(8, 6), (8, 6), (8, 6), (5, 7), (5, 7)])
    expected = [d.matrix.clone() for d in items]
    out = []
    stager = Stager(torch.device("cpu"), pinned=pinned)
    for group, stack in staged(iter(items), sizes=[3, 1, 1], stager=stager, make=_make):
        if len(group) > 1:
            assert stack.shape == (3, 8, 6)
            assert all(d.matrix.data_ptr() == stack[i].data_ptr() for i, d in enumerate(group))  # views
        else:
            assert stack is None
        out += [d.matrix for d in group]
    assert len(out) == 5
    for got, want in zip(out, expected):
        assert torch.equal(got, want)


def test_staged_stops_when_the_items_run_out():
    groups = list(staged(iter(_deltas([(4, 4)] * 3)), sizes=[2, 2, 2], stager=Stager(torch.device("cpu")),
                         make=_make))
    assert [len(g) for g, _ in groups] == [2, 1]


def test_pinned_ring_reuses_buffers_in_turn():
    ring = _PinnedRing(pin=False)
    dst = [torch.empty(4, 4) for _ in range(3)]
    srcs = [torch.full((4, 4), float(i)) for i in range(3)]
    for d, s in zip(dst, srcs):
        ring.copy(d, s)
    assert [float(d[0, 0]) for d in dst] == [0.0, 1.0, 2.0]
    assert ring._buffers[0].numel() == 16 and ring._buffers[1].numel() == 16  # two slots, the first reused
    ring.copy(torch.empty(2, 3, dtype=torch.float64), torch.ones(2, 3, dtype=torch.float64))
    assert ring._buffers[1].dtype == torch.float64  # a slot of another dtype is replaced


def _stack(b, m, n, k=6, seed=0):
    return torch.stack([planted_delta(m, n, k, seed=seed + i) + 1e-3 * torch.randn(m, n) for i in range(b)])


@pytest.mark.parametrize("shape", [(300, 260), (260, 300)])  # tall, wide (worked transposed)
def test_batched_svds_match_the_per_layer_svd(shape):
    stack = _stack(3, *shape)
    got = batched_svds(stack, 8, method="randomized", seed=5)
    for i, svd in enumerate(got):
        ref = truncated_svd(stack[i], 8, method="randomized", seed=5)
        assert svd.method is Method.RANDOMIZED and svd.U.shape == ref.U.shape and svd.Vh.shape == ref.Vh.shape
        assert torch.allclose(svd.S, ref.S, rtol=1e-4)
        assert torch.allclose(svd.U * svd.S @ svd.Vh, ref.U * ref.S @ ref.Vh, atol=1e-4)
        assert torch.allclose(svd.U, ref.U, atol=1e-3)  # same signs: the largest entry of each column positive


def test_batched_svds_defer_to_the_per_layer_path():
    small = _stack(2, 40, 30)
    assert batched_svds(small, 4, method="auto") == [None, None]  # auto resolves to exact on small sides
    assert batched_svds(_stack(2, 300, 260), 8, method="exact") == [None, None]
    with mock.patch.object(pipeline, "randomized_svd", side_effect=RuntimeError("failed to converge")):
        assert batched_svds(_stack(2, 300, 260), 8, method="randomized") == [None, None]


def _files(tmp_path, shapes, seed=0):
    base, tuned = make_pair(shapes, k=4, seed=seed)
    save_file(base, str(tmp_path / "b.safetensors"))
    save_file(tuned, str(tmp_path / "t.safetensors"))
    return tmp_path / "b.safetensors", tmp_path / "t.safetensors"


def test_extract_batched_on_cpu_matches_one_at_a_time(tmp_path):
    shapes = {f"layers.{i}.q.weight": (300, 280) for i in range(3)} | {"layers.0.up.weight": (320, 280)}
    base, tuned = _files(tmp_path, shapes)
    one = extract(base, tuned, rule=RankRule(rank=6), method="randomized")
    three = extract(base, tuned, rule=RankRule(rank=6), method="randomized", svd_batch=3)
    assert list(one.adapter.modules) == list(three.adapter.modules)
    for name, m in one.adapter.modules.items():
        assert torch.allclose(m.delta_matrix(), three.adapter.modules[name].delta_matrix(), atol=1e-4)
    assert [r.rel_error for r in one.report.layers] == pytest.approx([r.rel_error for r in three.report.layers],
                                                                     abs=1e-5)


def test_tf32_switches_are_set_then_restored():
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    with tf32(True):
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        with pytest.raises(KeyError), tf32(False):
            assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
            raise KeyError("restored on errors too")
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before


def test_extract_runs_with_tf32_off_unless_asked(tmp_path):
    base, tuned = _files(tmp_path, {"a.weight": (40, 30)})
    seen = []
    real = pipeline.tf32

    def spy(allow):
        seen.append(allow)
        return real(allow)

    with mock.patch("lowrank_tools.extract.streaming.tf32", spy):
        extract(base, tuned, rule=RankRule(rank=2))
        extract(base, tuned, rule=RankRule(rank=2), allow_tf32=True)
    assert seen == [False, True]


def test_non_finite_deltas_are_caught_and_finite_overflowing_sums_are_not(tmp_path):
    big = torch.full((8, 8), 1e37)  # 64 of them sum past float32's 3.4e38
    base = {"a.weight": torch.zeros(8, 8), "b.weight": torch.zeros(8, 8)}
    tuned = {"a.weight": big, "b.weight": torch.zeros(8, 8)}  # sum(dW) overflows to inf; every entry is finite
    tuned["b.weight"][0, 0] = 1.0
    result = extract(base, tuned, rule=RankRule(rank=1))
    assert set(result.adapter.modules) == {"a", "b"}
    base["b.weight"][2, 3], tuned["b.weight"][2, 3] = -3e38, 3e38  # finite weights, a delta that overflows
    with pytest.raises(NonFiniteWeight, match="delta of b.weight holds 1 NaN/Inf"):
        extract(base, tuned, rule=RankRule(rank=1))
    tuned["b.weight"][2, 3] = float("nan")
    with pytest.raises(NonFiniteWeight, match="tuned tensor b.weight holds 1 NaN/Inf"):
        extract(base, tuned, rule=RankRule(rank=1))


# ------------------------------------------------------------------------------------------ CUDA (skipped without)


@CUDA
def test_cuda_staging_through_pinned_buffers_keeps_values():
    items = _deltas([(64, 48)] * 5)
    expected = [d.matrix.clone() for d in items]
    out = []
    for group, stack in staged(iter(items), sizes=[4, 1], stager=Stager(torch.device("cuda")), make=_make):
        assert all(d.matrix.is_cuda for d in group)
        out += [d.matrix for d in group]
    torch.cuda.synchronize()
    assert all(torch.equal(a.cpu(), b) for a, b in zip(out, expected))


@CUDA
def test_cuda_extract_matches_cpu(tmp_path):
    shapes = {f"layers.{i}.q.weight": (300, 280) for i in range(5)}
    base, tuned = _files(tmp_path, shapes)
    before = torch.backends.cuda.matmul.allow_tf32
    cpu = extract(base, tuned, rule=RankRule(rank=6), method="randomized")
    stacks = []
    real = pipeline.batched_svds
    with mock.patch("lowrank_tools.extract.streaming.batched_svds", lambda stack, *a, **k: stacks.append(stack.shape) or
                    real(stack, *a, **k)):
        gpu = extract(base, tuned, rule=RankRule(rank=6), method="randomized", device="cuda")
    assert stacks == [(CUDA_BATCH, 300, 280)]  # 4 layers stacked, the fifth alone
    for name, m in cpu.adapter.modules.items():
        assert m.B.device.type == "cpu"
        assert torch.allclose(m.delta_matrix(), gpu.adapter.modules[name].delta_matrix(), atol=1e-4)
    assert torch.backends.cuda.matmul.allow_tf32 == before
