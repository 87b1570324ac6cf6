"""The read-ahead thread's float32 delta buffers are reused only when nothing views them any more (issue 16)."""

import numpy as np
import torch

from lowrank_tools.extract.reading import BufferPool, float32_delta


def test_a_buffer_in_use_is_never_handed_out_again():
    pool = BufferPool(size=3)
    held = [torch.from_numpy(pool.take(100)).view(10, 10)[2:] for _ in range(3)]  # views of views keep it alive
    ptrs = {t.untyped_storage().data_ptr() for t in held}
    assert len(ptrs) == 3
    fourth = pool.take(100)  # all three in use: a fresh one, not pooled beyond the size
    assert fourth.ctypes.data not in ptrs and len(pool._arrays) == 3


def test_a_released_buffer_is_reused_and_a_larger_one_serves_a_smaller_request():
    pool = BufferPool(size=2)
    first = torch.from_numpy(pool.take(1000))
    ptr = first.data_ptr()
    del first
    again = pool.take(400)  # free and large enough: the same memory
    assert again.ctypes.data == ptr and again.size == 400
    other = pool.take(400)  # the first is in use again (``again`` views it)
    assert other.ctypes.data != ptr


def test_pooled_deltas_are_the_exact_differences_while_older_ones_are_held():
    gen = torch.Generator().manual_seed(0)
    pool = BufferPool(size=2)
    kept = []
    for shape in [(64, 32), (32, 16), (64, 32), (8, 8), (64, 32)]:
        W1 = torch.randn(shape, generator=gen).bfloat16()
        W0 = torch.randn(shape, generator=gen).bfloat16()
        dW = float32_delta(W1, W0, pool)
        assert torch.equal(dW, W1.float() - W0.float())
        kept.append((dW, W1.float() - W0.float()))
    for dW, expected in kept:  # no later delta was written over a held one
        assert torch.equal(dW, expected)
    assert np.all([a.dtype == np.float32 for a in pool._arrays])


def _checkpoint(path, tensors):
    from safetensors.torch import save_file

    from lowrank_tools.io.checkpoint import open_checkpoint
    save_file(tensors, str(path))
    return open_checkpoint(path)


def test_read_buffers_reuse_memory_for_bf16_pairs_only(tmp_path):
    from lowrank_tools.extract.reading import ReadBuffers

    gen = torch.Generator().manual_seed(1)
    t = {"a": torch.randn(16, 8, generator=gen).bfloat16(), "b": torch.randn(4, 4, generator=gen).bfloat16(),
         "f": torch.randn(8, 8, generator=gen), "m": torch.randn(8, 8, generator=gen).half()}
    b = {k: (v.float() + 1).to(v.dtype) for k, v in t.items()} | {"m": torch.randn(8, 8, generator=gen).bfloat16()}
    tuned, base = _checkpoint(tmp_path / "t.safetensors", t), _checkpoint(tmp_path / "b.safetensors", b)
    reads = ReadBuffers()
    W1, W0 = reads.read_pair(base, tuned, "a")
    assert torch.equal(W1, t["a"]) and torch.equal(W0, b["a"])
    first = W1.untyped_storage().data_ptr()
    W1, W0 = reads.read_pair(base, tuned, "b")  # smaller: the same buffer again
    assert torch.equal(W1, t["b"]) and torch.equal(W0, b["b"]) and W1.untyped_storage().data_ptr() == first
    F1, _ = reads.read_pair(base, tuned, "f")  # float32 W' becomes dW in place: a buffer of its own
    F2, _ = reads.read_pair(base, tuned, "f")
    assert torch.equal(F1, t["f"]) and F1.data_ptr() != F2.data_ptr() and F1.data_ptr() != first
    M1, M0 = reads.read_pair(base, tuned, "m")  # mixed dtypes go to the consumer as read: buffers of their own
    assert torch.equal(M1, t["m"]) and torch.equal(M0, b["m"]) and first not in (M1.data_ptr(), M0.data_ptr())


def test_a_pair_not_subtracted_in_the_read_thread_is_never_left_in_a_reused_buffer(tmp_path, monkeypatch):
    """If the read thread ever hands a bf16 pair on unsubtracted, it must be a copy: the next read reuses the buffers."""
    from safetensors.torch import save_file

    from lowrank_tools.extract import reading
    from lowrank_tools.io.checkpoint import open_checkpoint
    from lowrank_tools.adapter import ModuleKind

    g = torch.Generator().manual_seed(0)
    tensors = {f"l{i}.weight": torch.randn(64, 32, generator=g).to(torch.bfloat16) for i in range(3)}
    save_file(tensors, str(tmp_path / "b.safetensors"))
    save_file({k: (v.float() + 1).to(torch.bfloat16) for k, v in tensors.items()}, str(tmp_path / "t.safetensors"))
    monkeypatch.setattr(reading, "DELTA_DTYPES", (torch.float32,))  # bf16 pairs now reach the consumer raw
    base, tuned = open_checkpoint(tmp_path / "b.safetensors"), open_checkpoint(tmp_path / "t.safetensors")
    pairs = list(reading.read_pairs(base, tuned, {k: ModuleKind.LINEAR for k in tensors}))
    for pair in pairs:  # every pair kept its own values although later reads reused the buffers
        name = pair.name
        assert torch.equal(pair.base, tensors[name]) and torch.equal(pair.tuned, tuned.get(name))


def test_an_oversized_buffer_is_let_go_for_the_small_layers_after_it(tmp_path, monkeypatch):
    """After an embedding-sized pair, the small layers that follow get buffers of their size: the large read and
    delta buffers are freed, not kept to the end of the stream (beside the other worker's lm_head)."""
    from lowrank_tools.adapter import ModuleKind
    from lowrank_tools.extract import reading

    monkeypatch.setattr(reading, "OVERSIZED_BYTES", 4096)
    g = torch.Generator().manual_seed(0)
    big = {"emb.weight": torch.randn(512, 64, generator=g).bfloat16()}  # 64 KiB of bf16, 128 KiB of float32
    small = {f"l{i}.weight": torch.randn(16, 32, generator=g).bfloat16() for i in range(3)}
    t = {**big, **small}
    tuned = _checkpoint(tmp_path / "t.safetensors", t)
    base = _checkpoint(tmp_path / "b.safetensors", {k: (v.float() + 1).bfloat16() for k, v in t.items()})
    reader = reading.LayerReader(pool_size=1)
    pair = reader.pair(base, tuned, "emb.weight", ModuleKind.EMBEDDING)
    assert torch.equal(pair.tuned, t["emb.weight"].float() - base.get("emb.weight").float())
    assert max(a.nbytes for a in reader.pool._arrays) == 512 * 64 * 4
    del pair
    for name in small:
        pair = reader.pair(base, tuned, name, ModuleKind.LINEAR)
        assert torch.equal(pair.tuned, t[name].float() - base.get(name).float())
        del pair
    assert [a.nbytes for a in reader.pool._arrays] == [16 * 32 * 4]  # the large one let go, the small one reused
    assert all(b.numel() == 16 * 32 * 2 for b in reader.reads._bufs)
    assert not reading.oversized(4096, 1) and reading.oversized(4097, 1024) and not reading.oversized(4097, 1025)
