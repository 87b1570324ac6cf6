"""A hostile review of extract's CPU side route (extract.side_thread, streaming._side_worker): with 2 torch threads
each of two workers reads its own layer's pair (no lock), subtracts and factors it. Every checkpoint kind is read by
both workers at once and must give the bytes of the 1-thread (read-ahead) route; errors name the first bad tensor in
layer order and leave no worker running; a worker's buffers do not stay oversized after a large layer."""

from __future__ import annotations

import importlib
import json
import sys
import threading
import time

import pytest
import torch
from safetensors.torch import save_file

from conftest import make_pair
from lowrank_tools.errors import CorruptCheckpoint, NonFiniteWeight
from lowrank_tools.extract import extract
from lowrank_tools.extract import reading
from lowrank_tools.extract.reading import fused_pair
from lowrank_tools.io.formats import save_adapter
from lowrank_tools.linalg import RankRule

streaming = importlib.import_module("lowrank_tools.extract.streaming")

LLAMA = {"model.embed_tokens.weight": (300, 48),
         **{f"model.layers.{i}.self_attn.{p}_proj.weight": (48, 48) for i in range(2) for p in "qkvo"},
         **{f"model.layers.{i}.mlp.up_proj.weight": (96, 48) for i in range(2)},
         **{f"model.layers.{i}.mlp.down_proj.weight": (48, 96) for i in range(2)},
         "model.layers.0.input_layernorm.weight": (48,)}


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _side_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("lowrank-tools-side")]


def _noisy(tuned: dict, seed: int = 1) -> dict:
    """A full-rank tail on every matrix, so that a rank-4 truncation is a real one (float32 math, stored dtype)."""
    g = torch.Generator().manual_seed(seed)
    return {n: (w.float() + 0.01 * torch.randn(w.shape, generator=g)).to(w.dtype) if w.ndim >= 2 else w
            for n, w in tuned.items()}


def _adapter_bytes(tmp_path, base, tuned, n: int, fmt: str = "peft", **kwargs) -> dict[str, bytes]:
    torch.set_num_threads(n)
    result = extract(base, tuned, rule=RankRule(rank=4), **kwargs)
    out = tmp_path / f"{fmt}{n}" if fmt == "peft" else tmp_path / f"t{n}.safetensors"
    save_adapter(result.adapter, out, format=fmt)
    files = sorted(out.rglob("*")) if out.is_dir() else [out]
    assert result.adapter.modules
    return {p.relative_to(out).as_posix() if out.is_dir() else "file": p.read_bytes() for p in files if p.is_file()}


# ------------------------------------------------------------------------------ every source kind, 1 vs 2 threads


def _sharded(folder):
    """An HF folder of two safetensors shards (index.json), float32 and bf16 layers, a tied lm_head."""
    base, tuned = make_pair(LLAMA, k=3)
    tuned = _noisy(tuned)
    for name in list(base)[5:9]:
        base[name], tuned[name] = base[name].bfloat16(), tuned[name].bfloat16()
    for d in (base, tuned):
        d["lm_head.weight"] = d["model.embed_tokens.weight"]
    out = []
    for side, tensors in (("base", base), ("tuned", tuned)):
        (folder / side).mkdir(parents=True)
        names = list(tensors)
        where = {n: f"model-0000{1 + i % 2}-of-00002.safetensors" for i, n in enumerate(names)}
        for file in set(where.values()):
            save_file({n: tensors[n].contiguous().clone() for n in names if where[n] == file}, str(folder / side / file))
        (folder / side / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": where}))
        (folder / side / "config.json").write_text(json.dumps({"model_type": "llama", "tie_word_embeddings": True,
                                                                "architectures": ["LlamaForCausalLM"]}))
        out.append(folder / side)
    return tuple(out)


def _pickles(folder):
    """torch .bin files (zip: memory-mapped), fp16 pairs and a 3x3 conv."""
    shapes = {**LLAMA, "vision.patch_embed.proj.weight": (16, 4, 3, 3)}
    base, tuned = make_pair(shapes, k=3, dtype=torch.float16)
    tuned = _noisy(tuned)
    folder.mkdir()
    torch.save(base, folder / "base.bin")
    torch.save(tuned, folder / "tuned.bin")
    return folder / "base.bin", folder / "tuned.bin"


def _mixed_dicts(_folder):
    """In-memory dicts: a bf16 fine-tune of a float32 base, non-contiguous tensors, a conv, float64 pairs."""
    shapes = {**LLAMA, "vision.patch_embed.proj.weight": (16, 4, 3, 3)}
    base, tuned = make_pair(shapes, k=3)
    tuned = {n: w.bfloat16() for n, w in _noisy(tuned).items()}
    base["model.layers.1.mlp.up_proj.weight"] = base["model.layers.1.mlp.up_proj.weight"].T.contiguous().T
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):  # float64 pairs
        base[name], tuned[name] = base[name].double(), tuned[name].double()
    return base, tuned


def _fp8_block(folder):
    """A block-wise fp8 base folder (weight_scale_inv, ragged blocks) against a bf16 tuned file."""
    from test_fp8_block import block_base

    folder.mkdir()
    bf16, _ = block_base(folder / "base")
    tuned = _noisy({n: w for n, w in bf16.items()})
    save_file(tuned, str(folder / "tuned.safetensors"))
    return folder / "base", folder / "tuned.safetensors"


def _flux(folder):
    """diffusers-named Flux parts seen as kohya's fused modules (FusedSource: parts read into one tensor's rows)."""
    from test_fused_extract import decaying, shapes

    folder.mkdir()
    base, tuned = {}, {}
    for i, (name, (m, n)) in enumerate(shapes().items()):
        g = torch.Generator().manual_seed(100 + i)
        base[f"{name}.weight"] = W = torch.randn(m, n, generator=g)
        tuned[f"{name}.weight"] = W + decaying(m, n, seed=i).float()
    save_file(base, str(folder / "base.safetensors"))
    save_file(tuned, str(folder / "tuned.safetensors"))
    return fused_pair(folder / "base.safetensors", folder / "tuned.safetensors")


def _gpt2(folder):
    """GPT-2 Conv1D weights (stored (in, out): the transposed kind) and a wte embedding, float32 safetensors."""
    shapes = {"transformer.wte.weight": (120, 32), "transformer.h.0.attn.c_attn.weight": (32, 96),
              "transformer.h.0.mlp.c_fc.weight": (32, 128), "transformer.h.0.mlp.c_proj.weight": (128, 32)}
    base, tuned = make_pair(shapes, k=3)
    tuned = _noisy(tuned)
    for side, tensors in (("base", base), ("tuned", tuned)):
        (folder / side).mkdir(parents=True)
        save_file(tensors, str(folder / side / "model.safetensors"))
        (folder / side / "config.json").write_text(json.dumps({"model_type": "gpt2",
                                                                "architectures": ["GPT2LMHeadModel"]}))
    return folder / "base", folder / "tuned"


@pytest.mark.parametrize("build", [_sharded, _pickles, _mixed_dicts, _fp8_block, _flux, _gpt2],
                         ids=["sharded-index-bf16-f32-tied", "bin-mmap-fp16-conv", "dict-bf16-vs-f32",
                              "fp8-block-scales", "flux-fused-view", "gpt2-conv1d"])
@pytest.mark.parametrize("method", ["auto", "randomized"])
def test_every_source_read_by_two_workers_writes_the_one_thread_bytes(tmp_path, threads, build, method):
    base, tuned = build(tmp_path / "in")
    fmt = "kohya" if build is _flux else "peft"
    kwargs = {"embeddings": False, "method": method} if fmt == "kohya" else {"method": method}
    one = _adapter_bytes(tmp_path, base, tuned, 1, fmt, **kwargs)
    two = _adapter_bytes(tmp_path, base, tuned, 2, fmt, **kwargs)
    assert one == two
    assert not _side_threads()


def test_the_gpt2_case_is_read_as_conv1d_and_an_embedding(tmp_path, threads):
    """The gpt2 case above covers the transposed kinds (so the no-copy transposed view of _subtract is hit)."""
    torch.set_num_threads(2)
    base, tuned = _gpt2(tmp_path)
    result = extract(base, tuned, rule=RankRule(rank=4))
    kinds = {name: m.kind.value for name, m in result.adapter.modules.items()}
    assert kinds["transformer.h.0.attn.c_attn"] == "conv1d" and kinds["transformer.wte"] == "embedding"


# ------------------------------------------------------------------------------ errors


def test_the_first_bad_layer_in_order_is_named_whichever_worker_meets_it(tmp_path, threads):
    """NaN in two layers: the error names the earlier one (as the 1-thread route does), though the later one is on
    the other worker and may fail first; no worker is left running."""
    torch.set_num_threads(2)
    base, tuned = make_pair(LLAMA, k=3)
    early, late = "model.layers.0.self_attn.v_proj.weight", "model.layers.0.mlp.up_proj.weight"
    assert list(LLAMA).index(early) < list(LLAMA).index(late)
    tuned[late][0, 0] = float("nan")
    tuned[early][3, 1] = float("inf")
    for _ in range(3):
        with pytest.raises(NonFiniteWeight, match=f"tuned tensor {early} holds 1 NaN/Inf"):
            extract(base, tuned, rule=RankRule(rank=4))
        assert not _side_threads()


def test_a_file_truncated_during_the_run_is_named_and_the_workers_end(tmp_path, threads, monkeypatch):
    """The tuned file is cut short after it was opened: the worker whose read comes up short raises
    CorruptCheckpoint naming the file; the caller sees it and both workers end."""
    torch.set_num_threads(2)
    base, tuned = make_pair(LLAMA, k=3)
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(tuned, str(tmp_path / "tuned.safetensors"))
    from lowrank_tools.io.checkpoint import open_checkpoint

    b, t = open_checkpoint(tmp_path / "base.safetensors"), open_checkpoint(tmp_path / "tuned.safetensors")
    path = tmp_path / "tuned.safetensors"
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    with pytest.raises(CorruptCheckpoint, match="tuned.safetensors.*the file ended after"):
        extract(b, t, rule=RankRule(rank=4))
    assert not _side_threads()


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_an_error_in_the_progress_callback_stops_the_workers(threads, monkeypatch, error):
    """A progress callback that raises (a closed terminal under the CLI's bar, a user's callback): extract raises,
    and no worker may still be reading and factoring layers afterwards (before the fix in _factor_layers, closing()
    around factored_in_order, both went on through all 30 layers while the exception was held)."""
    torch.set_num_threads(2)
    shapes = {f"model.layers.{i}.mlp.up_proj.weight": (96, 48) for i in range(30)}
    base, tuned = make_pair(shapes, k=3)
    factored = []
    real = streaming._factor_layer

    def factor(delta, *args, **kwargs):
        time.sleep(0.02)  # each layer takes a while: the caller keeps up with the workers
        factored.append(delta.name)
        return real(delta, *args, **kwargs)

    def progress(done, total, name):
        if done == 1:
            raise error("the bar's stream is closed")

    monkeypatch.setattr(streaming, "_factor_layer", factor)
    with pytest.raises(error, match="stream is closed") as caught:
        extract(base, tuned, rule=RankRule(rank=4), progress=progress)
    alive, count = _side_threads(), len(factored)  # the exception and its traceback still held, as a caller may
    assert caught.value is not None and not alive and count <= 6  # at most the layers running when it raised


# ------------------------------------------------------------------------------ memory


@pytest.mark.parametrize("mixed", [False, True])
def test_no_delta_after_the_embedding_lives_in_an_oversized_buffer(threads, monkeypatch, mixed):
    """The embedding (V x d) is read first; the small layers after it must not keep a buffer :func:`oversized` for
    them (threshold lowered to 64 KiB here so that a small model shows it). Mixed: a bf16 fine-tune of a float32
    base is subtracted in the worker's Stager.scratch, which only grew before (each worker kept an embedding-sized
    one to the end)."""
    torch.set_num_threads(2)
    monkeypatch.setattr(reading, "OVERSIZED_BYTES", 64 << 10)
    shapes = {"model.embed_tokens.weight": (2048, 48),
              **{f"model.layers.{i}.self_attn.q_proj.weight": (48, 48) for i in range(12)}}
    base, tuned = make_pair(shapes, k=3)
    if mixed:
        tuned = {n: w.bfloat16() for n, w in tuned.items()}
    held = {}
    real = streaming._factor_layer

    def factor(delta, *args, **kwargs):
        held[delta.name] = (delta.matrix.untyped_storage().nbytes(), delta.matrix.nbytes)
        return real(delta, *args, **kwargs)
    monkeypatch.setattr(streaming, "_factor_layer", factor)
    extract(base, tuned, rule=RankRule(rank=4))
    late = [held[f"model.layers.{i}.self_attn.q_proj.weight"] for i in range(4, 12)]
    assert not [h for h in late if reading.oversized(*h)], late


# ------------------------------------------------------------------------------ distributed


@pytest.mark.slow
@pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                    reason="torch.distributed with gloo is not available")
def test_torchrun_with_two_threads_per_process_writes_the_one_thread_bytes(tmp_path):
    """Two processes of 2 threads each (each on its side workers) write the adapter of one process on one thread."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from test_distributed import SHAPES

    base, tuned = make_pair(SHAPES, k=3, dtype=torch.bfloat16)
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(tuned, str(tmp_path / "tuned.safetensors"))
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR",
                                                               "MASTER_PORT")}
    args = ["-m", "lowrank_tools", "extract", "base.safetensors", "tuned.safetensors", "--rank", "4", "-q"]
    for out, threads, launch in (("alone", "1", []), ("job", "2", ["-m", "torch.distributed.run", "--standalone",
                                                                   "--nproc-per-node=2"])):
        done = subprocess.run([sys.executable, *launch, *args, "-o", out], cwd=tmp_path, capture_output=True,
                              text=True, timeout=120, env={**env, "OMP_NUM_THREADS": threads,
                                                           "PYTHONPATH": str(root), "CUDA_VISIBLE_DEVICES": ""})
        assert done.returncode == 0, done.stderr
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "job" / name).read_bytes() == (tmp_path / "alone" / name).read_bytes()


def test_two_workers_asking_for_madvise_at_once_both_get_it(monkeypatch):
    """The two workers' first large buffers are made at the same time: the one that finds libc's madvise second
    must not be told it is unavailable while the first is still looking it up (find_library runs ldconfig)."""
    import ctypes.util

    from lowrank_tools.linalg import memory

    if not sys.platform.startswith("linux"):
        pytest.skip("madvise is looked up on Linux only")
    real = ctypes.util.find_library

    def slow(name):
        time.sleep(0.2)
        return real(name)
    monkeypatch.setattr(memory, "_madvise", None)
    monkeypatch.setattr(ctypes.util, "find_library", slow)
    got = []
    workers = [threading.Thread(target=lambda: got.append(memory._libc_madvise())) for _ in range(2)]
    for w in workers:
        w.start()
        time.sleep(0.05)
    for w in workers:
        w.join()
    assert len(got) == 2 and all(got), got


def test_the_workers_buffers_are_let_go_when_extract_returns(threads, monkeypatch):
    """Each worker's LayerReader (its reused read and delta buffers) lives in a thread-local: it must go with the
    workers, by reference counting alone (no collection needed), not stay until the next extract."""
    import weakref

    torch.set_num_threads(2)
    readers = []
    real = reading.LayerReader.__init__

    def init(self, *args, **kwargs):
        real(self, *args, **kwargs)
        readers.append(weakref.ref(self))
    monkeypatch.setattr(reading.LayerReader, "__init__", init)
    base, tuned = make_pair(LLAMA, k=3, dtype=torch.bfloat16)
    result = extract(base, tuned, rule=RankRule(rank=4))
    assert result.adapter.modules and len(readers) == 2
    assert [r for r in readers if r() is not None] == []


_SLOW_CLI = r"""
import sys, time
from lowrank_tools.extract import streaming
from lowrank_tools.cli import main
real = streaming._factor_layer
def slow(delta, *args, **kwargs):
    print("factoring", delta.name, flush=True)
    time.sleep(0.15)
    return real(delta, *args, **kwargs)
streaming._factor_layer = slow
sys.argv = ["lowrank-tools", *sys.argv[1:]]
main()
"""


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_signal_mid_extract_on_side_threads_ends_the_run_at_once_and_writes_nothing(tmp_path, sig):
    """The CLI on 2 threads (side workers), 40 layers of 0.15 s each: a signal after a few layers ends it within the
    layers then running (not after every layer), exit 128 + signum, nothing written."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    shapes = {f"model.layers.{i}.mlp.up_proj.weight": (64, 32) for i in range(40)}
    base, tuned = make_pair(shapes, k=3)
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(tuned, str(tmp_path / "tuned.safetensors"))
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    # the child starts with SIGINT/SIGTERM at their defaults: a suite run from a non-interactive shell's background
    # job (SIGINT ignored) passes the ignored disposition on, and the child would then finish and exit 0
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_CLI, "extract", "base.safetensors", "tuned.safetensors",
                             "-r", "4", "-o", "out", "-q"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: [signal.signal(s, signal.SIG_DFL) for s in (signal.SIGINT, signal.SIGTERM)])
    for _ in range(4):
        proc.stdout.readline()
    sent = time.monotonic()
    proc.send_signal(getattr(signal, sig))
    out, err = proc.communicate(timeout=60)
    took = time.monotonic() - sent
    assert proc.returncode == 128 + getattr(signal, sig), err
    assert "nothing was written" in err and not (tmp_path / "out").exists()
    assert took < 5.0 and out.count("factoring") <= 4, (took, out.count("factoring"))  # 5 s: a loaded CI machine


def test_in_memory_inputs_are_never_written_by_the_workers(threads):
    """Float32 pairs become dW in place of W' as read, and an embedding keeps its transposed view: in a copy the
    worker owns, never in the caller's tensors (float32, bf16, mixed, a transposed tensor, a shared one)."""
    torch.set_num_threads(2)
    base, tuned = make_pair(LLAMA, k=3)
    for name in list(LLAMA)[5:8]:
        base[name], tuned[name] = base[name].bfloat16(), tuned[name].bfloat16()
    tuned["model.layers.1.mlp.up_proj.weight"] = tuned["model.layers.1.mlp.up_proj.weight"].bfloat16()
    tuned["model.layers.0.mlp.down_proj.weight"] = tuned["model.layers.0.mlp.down_proj.weight"].T.contiguous().T
    tuned["lm_head.weight"] = tuned["model.embed_tokens.weight"]  # one tensor under two names
    base["lm_head.weight"] = base["model.embed_tokens.weight"].clone()
    before = {side: {n: t.clone() for n, t in d.items()} for side, d in (("base", base), ("tuned", tuned))}
    extract(base, tuned, rule=RankRule(rank=4))
    for side, d in (("base", base), ("tuned", tuned)):
        assert all(torch.equal(d[n], before[side][n]) for n in d), side
