"""Tests for lowrank_tools.io.checkpoint (reading, pairing) and lowrank_tools.io.atomic (writing)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lowrank_tools.io.checkpoint import (
    Checkpoint,
    ShardedWriter,
    as_checkpoint,
    atomic_output,
    check_output,
    open_checkpoint,
    pair_tensors,
    parse_size,
)
from lowrank_tools.errors import (
    CheckpointNotFound,
    CorruptCheckpoint,
    InvalidOption,
    MissingTensor,
    NoCommonTensors,
    NotACheckpoint,
    OutputError,
    OutputExists,
    ShapeMismatch,
    UnsafeCheckpoint,
    UnsupportedTensor,
)


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    """Small tensors of every dtype the layouts must carry, including 0-d and 0-size."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "layer.0.weight": torch.randn(4, 6, generator=gen),
        "layer.0.bias": torch.randn(4, generator=gen).half(),
        "layer.1.weight": torch.randn(3, 4, generator=gen).bfloat16(),
        "layer.1.conv": torch.randn(2, 3, 3, 3, generator=gen, dtype=torch.float64),
        "step": torch.tensor(7, dtype=torch.int64),
        "ids": torch.arange(5, dtype=torch.int32),
        "mask": torch.tensor([True, False, True]),
        "bytes": torch.arange(4, dtype=torch.uint8),
        "small": torch.tensor([-3, 2], dtype=torch.int8),
        "empty": torch.zeros(0, 3),
    }


def _assert_same(ckpt: Checkpoint, expected: dict[str, torch.Tensor], prefix: str = "") -> None:
    assert sorted(ckpt.keys()) == sorted(prefix + k for k in expected)
    for name, tensor in expected.items():
        got = ckpt.get(prefix + name)
        assert got.dtype == tensor.dtype == ckpt.dtype(prefix + name)
        assert tuple(got.shape) == tuple(tensor.shape) == ckpt.shape(prefix + name)
        assert ckpt.nbytes(prefix + name) == tensor.numel() * tensor.element_size()
        assert got.is_contiguous()
        assert torch.equal(got, tensor)


def _write_shards(folder: Path, tensors: dict, stem: str, *, pickle: bool = False) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    halves = [names[: len(names) // 2], names[len(names) // 2:]]
    ext = "bin" if pickle else "safetensors"
    weight_map = {}
    for i, part in enumerate(halves):
        file = f"{stem}-0000{i + 1}-of-00002.{ext}"
        chunk = {n: tensors[n] for n in part}
        torch.save(chunk, folder / file) if pickle else save_file(chunk, folder / file)
        weight_map.update({n: file for n in part})
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / f"{stem}.{ext}.index.json").write_text(json.dumps(index))


# ---------------------------------------------------------------------------- layouts


def test_single_safetensors_matches_load_file(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file(_tensors(), path, metadata={"note": "hi"})
    with open_checkpoint(path) as ckpt:
        _assert_same(ckpt, load_file(path))
        assert ckpt.metadata == {"note": "hi"}
        assert ckpt.config is None and ckpt.components == {}
        assert len(ckpt) == 10 and "mask" in ckpt and "nope" not in ckpt
        assert list(ckpt) == ckpt.keys() == open_checkpoint(path).keys()


def test_keys_follow_file_order(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"b": torch.ones(3), "a": torch.ones(2), "c": torch.ones(1)}, path)
    ckpt = open_checkpoint(path)
    offsets = {n: ckpt._index[n][0].entries[n].start for n in ckpt.keys()}
    assert list(offsets.values()) == sorted(offsets.values())


def test_get_owns_its_memory(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.ones(3, 3)}, path)
    ckpt = open_checkpoint(path)
    first = ckpt.get("w")
    first.mul_(5)
    assert torch.equal(ckpt.get("w"), torch.ones(3, 3))


def test_float8_round_trip(tmp_path):
    if not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("torch without float8")
    tensors = {"a": torch.randn(3, 2).to(torch.float8_e4m3fn), "b": torch.randn(4).to(torch.float8_e5m2)}
    save_file(tensors, tmp_path / "f8.safetensors")
    ckpt = open_checkpoint(tmp_path / "f8.safetensors", dequantize=False)  # raw: as adapter readers see it
    for name, tensor in tensors.items():
        assert torch.equal(ckpt.get(name).view(torch.uint8), tensor.view(torch.uint8))


def test_hf_folder_single_file_with_config(tmp_path):
    save_file(_tensors(), tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    ckpt = open_checkpoint(tmp_path)
    _assert_same(ckpt, _tensors())
    assert ckpt.config == {"model_type": "llama"}


@pytest.mark.parametrize("stem", ["model", "diffusion_pytorch_model"])
def test_sharded_safetensors_folder(tmp_path, stem):
    _write_shards(tmp_path, _tensors(), stem)
    ckpt = open_checkpoint(tmp_path)
    _assert_same(ckpt, _tensors())
    assert len(ckpt._sources) == 2


def test_diffusers_component_single_file(tmp_path):
    save_file(_tensors(), tmp_path / "diffusion_pytorch_model.safetensors")
    _assert_same(open_checkpoint(tmp_path), _tensors())


def test_folder_with_one_odd_safetensors(tmp_path):
    save_file(_tensors(), tmp_path / "weights-v2.safetensors")
    _assert_same(open_checkpoint(tmp_path), _tensors())


def test_pipeline_folder_prefixes_components(tmp_path):
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    save_file(_tensors(1), _mkdir(tmp_path / "unet") / "diffusion_pytorch_model.safetensors")
    save_file(_tensors(2), _mkdir(tmp_path / "text_encoder") / "model.safetensors")
    (tmp_path / "text_encoder" / "config.json").write_text('{"hidden_size": 4}')
    save_file(_tensors(3), _mkdir(tmp_path / "vae") / "diffusion_pytorch_model.safetensors")
    save_file(_tensors(4), _mkdir(tmp_path / "tokenizer_2") / "model.safetensors")
    (_mkdir(tmp_path / "scheduler") / "scheduler_config.json").write_text("{}")
    ckpt = open_checkpoint(tmp_path)
    assert list(ckpt.components) == ["text_encoder", "unet"]
    assert ckpt.components["text_encoder"].config == {"hidden_size": 4}
    assert ckpt.config is None
    assert len(ckpt) == 20 and not any(k.startswith(("vae.", "tokenizer")) for k in ckpt)
    assert torch.equal(ckpt.get("unet.layer.0.weight"), _tensors(1)["layer.0.weight"])
    assert torch.equal(ckpt.get("text_encoder.layer.0.weight"), _tensors(2)["layer.0.weight"])


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


def test_pipeline_without_weights(tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    save_file({"w": torch.ones(1)}, _mkdir(tmp_path / "vae") / "diffusion_pytorch_model.safetensors")
    with pytest.raises(NotACheckpoint, match="no component with weights"):
        open_checkpoint(tmp_path)


def test_pytorch_model_bin(tmp_path):
    torch.save(_tensors(), tmp_path / "pytorch_model.bin")
    with open_checkpoint(tmp_path) as ckpt:
        _assert_same(ckpt, _tensors())
        assert ckpt.metadata == {}


def test_pytorch_bin_shards(tmp_path):
    _write_shards(tmp_path, _tensors(), "pytorch_model", pickle=True)
    _assert_same(open_checkpoint(tmp_path), _tensors())


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin", ".weights"])
def test_torch_file(tmp_path, suffix):
    path = tmp_path / f"m{suffix}"
    torch.save({**_tensors(), "epoch": 3, "name": "ignored"}, path)
    _assert_same(open_checkpoint(path), _tensors())


def test_ckpt_state_dict_wrapper_and_views(tmp_path):
    base = torch.randn(6, 4)
    state = {"a": base, "a_t": base.t(), "half": base[:3]}  # shared storage, a non-contiguous view
    torch.save({"state_dict": state, "global_step": 10}, tmp_path / "m.ckpt")
    ckpt = open_checkpoint(tmp_path / "m.ckpt")
    assert ckpt.keys() == ["a", "a_t", "half"]
    got = ckpt.get("a_t")
    assert got.is_contiguous() and torch.equal(got, base.t())
    assert got.untyped_storage().nbytes() == 4 * 6 * 4  # its own copy, not the shared storage


def test_legacy_non_zip_torch_file(tmp_path):
    torch.save(_tensors(), tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    _assert_same(open_checkpoint(tmp_path / "old.pt"), _tensors())


def test_safetensors_under_bin_name_is_sniffed(tmp_path):
    save_file(_tensors(), tmp_path / "model.data")
    _assert_same(open_checkpoint(tmp_path / "model.data"), _tensors())


# ---------------------------------------------------------------------------- bad inputs


def _good_bytes() -> bytes:
    from safetensors.torch import save

    return save({"w": torch.ones(4, 4), "b": torch.zeros(4)})


def _with_header(header: bytes, data: bytes = b"") -> bytes:
    return len(header).to_bytes(8, "little") + header + data


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", "is empty"),
        (b"\x01\x02", "only 2 bytes"),
        ((10**6).to_bytes(8, "little") + b"{}", "header length 1000000 is larger than the file"),
        (_with_header(b"{not json"), "not valid JSON"),
        (_with_header(b"[1, 2]"), "not an object"),
        (_with_header(b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', b"\0" * 4),
         "'w' .* past the end of the file"),
        (_with_header(b'{"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}', b"\0" * 8),
         "'w' .* spans 8 bytes but F32 \\(3,\\) needs 12"),
        (_with_header(b'{"w": {"dtype": 5, "shape": [2], "data_offsets": [0, 8]}}', b"\0" * 8),
         "not a dtype name"),
        (_with_header(b'{"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}', b"\0" * 8),
         "bad shape"),
        (_good_bytes()[:-10], "past the end of the file"),
        (os.urandom(64), "larger than the file|not valid JSON"),
    ],
    ids=["empty", "short", "header-length", "json", "not-object", "offsets", "size", "dtype",
         "shape", "truncated", "random"],
)
def test_corrupt_safetensors(tmp_path, content, match):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(CorruptCheckpoint, match=match) as info:
        open_checkpoint(path)
    assert str(path) in str(info.value) and "re-download or re-save" in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_dtype_is_unsupported(tmp_path):
    path = tmp_path / "q.safetensors"
    path.write_bytes(_with_header(b'{"w": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 1]}}', b"\0"))
    with pytest.raises(UnsupportedTensor, match="'w' in .* has dtype 'Q4', which this tool cannot read"):
        open_checkpoint(path)


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointNotFound, match="does not exist: check the path"):
        open_checkpoint(tmp_path / "nope.safetensors")


@pytest.mark.parametrize(
    ("name", "content", "error", "match"),
    [
        ("x.bin", os.urandom(64).replace(b"\x80", b"\x00"), NotACheckpoint, "not a torch file"),
        ("x.pt", b"", CorruptCheckpoint, "is empty"),
        ("x.txt", b"hello world, not weights", NotACheckpoint, "expected a .safetensors file"),
        ("x.dat", b"", NotACheckpoint, "is empty"),
    ],
)
def test_not_a_checkpoint_file(tmp_path, name, content, error, match):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(error, match=match):
        open_checkpoint(tmp_path / name)


def test_truncated_torch_zip(tmp_path):
    torch.save(_tensors(), tmp_path / "full.pt")
    data = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptCheckpoint, match="cut.pt cannot be read as a torch file"):
        open_checkpoint(tmp_path / "cut.pt")


def test_garbage_pickle_is_corrupt_not_unsafe(tmp_path):
    (tmp_path / "g.bin").write_bytes(b"\x80\x02garbagegarbage")
    with pytest.raises(CorruptCheckpoint, match="cannot be read as a torch file"):
        open_checkpoint(tmp_path / "g.bin")


def test_torch_file_without_tensors(tmp_path):
    torch.save({"epoch": 1}, tmp_path / "meta.pt")
    with pytest.raises(NotACheckpoint, match="holds no tensors"):
        open_checkpoint(tmp_path / "meta.pt")
    torch.save([torch.ones(1)], tmp_path / "list.pt")
    with pytest.raises(NotACheckpoint, match="holds a list, not a dict"):
        open_checkpoint(tmp_path / "list.pt")


_EVIL = """
import os, sys, torch
class Evil:
    def __reduce__(self):
        return (os.mkdir, (sys.argv[2],))
torch.save({"w": torch.ones(2), "payload": Evil()}, sys.argv[1])
"""


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    subprocess.run([sys.executable, "-c", _EVIL, str(tmp_path / "evil.ckpt"), str(marker)], check=True)
    with pytest.raises(UnsafeCheckpoint, match="holds Python objects other than tensors; refusing"):
        open_checkpoint(tmp_path / "evil.ckpt")
    assert not marker.exists()
    # the payload is real: an unsafe load would have run it
    torch.load(tmp_path / "evil.ckpt", weights_only=False)
    assert marker.exists()


def test_empty_folder(tmp_path):
    with pytest.raises(NotACheckpoint, match="looked for model.safetensors, model.safetensors.index.json"):
        open_checkpoint(tmp_path)


def test_index_with_missing_shard(tmp_path):
    _write_shards(tmp_path, _tensors(), "model")
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CorruptCheckpoint, match="model-00002-of-00002.safetensors listed in .* is missing"):
        open_checkpoint(tmp_path)


def test_index_naming_absent_tensor(tmp_path):
    _write_shards(tmp_path, _tensors(), "model")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    index["weight_map"]["ghost"] = "model-00001-of-00002.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CorruptCheckpoint, match="1 tensor\\(s\\) absent from their shard .*'ghost'"):
        open_checkpoint(tmp_path)


def test_get_unknown_name(tmp_path):
    save_file({"layer.weight": torch.ones(1)}, tmp_path / "m.safetensors")
    with pytest.raises(MissingTensor, match="'layer.weigth' is not in .*did you mean 'layer.weight'"):
        open_checkpoint(tmp_path / "m.safetensors").get("layer.weigth")


def test_as_checkpoint(tmp_path):
    tensors = _tensors()
    from_dict = as_checkpoint({**tensors, "note": "not a tensor"})
    _assert_same(from_dict, tensors)
    from_dict.get("layer.0.weight").zero_()
    assert torch.equal(from_dict.get("layer.0.weight"), tensors["layer.0.weight"])
    save_file(tensors, tmp_path / "m.safetensors")
    opened = as_checkpoint(tmp_path / "m.safetensors")
    assert as_checkpoint(opened) is opened and as_checkpoint(str(tmp_path / "m.safetensors")).keys() == opened.keys()
    with pytest.raises(TypeError, match="got int"):
        as_checkpoint(3)


# ---------------------------------------------------------------------------- pairing


def _ckpt(tmp_path: Path, name: str, shapes: dict[str, tuple]) -> Checkpoint:
    save_file({k: torch.zeros(s) for k, s in shapes.items()}, tmp_path / f"{name}.safetensors")
    return open_checkpoint(tmp_path / f"{name}.safetensors")


def test_pairing_all_match(tmp_path):
    shapes = {"a": (2, 3), "b": (4,)}
    pairing = pair_tensors(_ckpt(tmp_path, "base", shapes), _ckpt(tmp_path, "tuned", shapes))
    assert sorted(pairing.names) == ["a", "b"] and pairing.warning() is None


def test_pairing_skips_and_warns(tmp_path):
    base = _ckpt(tmp_path, "base", {"a": (2,), "b": (2,), "c": (2,), "x": (2,), "y": (2,),
                                    "e": (4, 8), "s": (1,)})
    tuned = _ckpt(tmp_path, "tuned", {"a": (2,), "d": (3,), "e": (5, 8), "s": (1,)})
    pairing = pair_tensors(base, tuned)
    assert sorted(pairing.names) == ["a", "s"]
    assert sorted(pairing.only_base) == ["b", "c", "x", "y"] and pairing.only_tuned == ["d"]
    assert pairing.shape_mismatch == [("e", (4, 8), (5, 8))]
    warning = pairing.warning()
    assert warning.startswith("skipped 4 tensors only in base (")
    assert warning.endswith(", …), 1 only in tuned (d), 1 with different shapes (e: (4, 8) vs (5, 8))")
    with pytest.raises(MissingTensor, match="--strict: skipped 4 tensors only in base"):
        pair_tensors(base, tuned, strict=True)


def test_pairing_strict_shape_mismatch(tmp_path):
    base = _ckpt(tmp_path, "base", {"a": (2,), "e": (4, 8)})
    tuned = _ckpt(tmp_path, "tuned", {"a": (2,), "e": (5, 8)})
    assert pair_tensors(base, tuned).warning() == "skipped 1 tensor with different shapes (e: (4, 8) vs (5, 8))"
    with pytest.raises(ShapeMismatch, match=r"e: \(4, 8\) vs \(5, 8\)"):
        pair_tensors(base, tuned, strict=True)


def test_pairing_no_common_names(tmp_path):
    base = _ckpt(tmp_path, "base", {"a": (2,), "b": (2,)})
    tuned = _ckpt(tmp_path, "tuned", {"c": (2,)})
    with pytest.raises(NoCommonTensors, match="share no tensor name .*tuned has e.g. c.*same architecture"):
        pair_tensors(base, tuned)


def test_pairing_every_shape_differs(tmp_path):
    base = _ckpt(tmp_path, "base", {"a": (2,), "b": (3,)})
    tuned = _ckpt(tmp_path, "tuned", {"a": (4,), "b": (5,)})
    with pytest.raises(NoCommonTensors, match="share 2 tensor names but every shape differs"):
        pair_tensors(base, tuned)


# ---------------------------------------------------------------------------- atomic_output


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".lrt-tmp-" in p.name)


def test_atomic_file_success(tmp_path):
    target = tmp_path / "out.safetensors"
    with atomic_output(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(f".out.safetensors.lrt-tmp-{os.getpid()}-")
        tmp.write_text("data")
        assert not target.exists()
    assert target.read_text() == "data" and _leftovers(tmp_path) == []


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_atomic_failure_leaves_nothing(tmp_path, error):
    target = tmp_path / "new" / "deeper" / "out"
    with pytest.raises(error):
        with atomic_output(target) as tmp:
            tmp.mkdir()
            (tmp / "part").write_text("half")
            raise error("boom")
    assert not (tmp_path / "new").exists()


def test_atomic_disk_full_becomes_output_error(tmp_path):
    import errno

    with pytest.raises(OutputError, match="could not write .*out: disk full"):
        with atomic_output(tmp_path / "out") as tmp:
            tmp.write_text("x")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_atomic_exists_and_force(tmp_path):
    target = tmp_path / "out.bin"
    target.write_text("old")
    with pytest.raises(OutputExists, match="out.bin exists: pass --force to overwrite it or choose another -o"):
        with atomic_output(target):
            pass
    with atomic_output(target, force=True) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new"


def test_atomic_force_replaces_folder_with_folder_and_file(tmp_path):
    target = tmp_path / "adapter"
    _mkdir(target)
    (target / "adapter_model.safetensors").write_text("old")  # a name lowrank-tools writes: --force may replace it
    with atomic_output(target, force=True) as tmp:
        tmp.mkdir()
        (tmp / "fresh.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["fresh.txt"]
    target.rename(tmp_path / "other")
    _mkdir(target)
    with atomic_output(target, force=True) as tmp:
        tmp.write_text("now a file")
    assert target.read_text() == "now a file" and _leftovers(tmp_path) == []


def test_atomic_force_failure_keeps_old_output(tmp_path):
    target = tmp_path / "out"
    target.write_text("old")
    with pytest.raises(ValueError):
        with atomic_output(target, force=True) as tmp:
            tmp.write_text("partial")
            raise ValueError
    assert target.read_text() == "old" and _leftovers(tmp_path) == []


def test_atomic_refuses_inputs(tmp_path):
    model = _mkdir(tmp_path / "model")
    (model / "model.safetensors").write_text("x")
    for target, inputs in [
        (model, [model]),
        (model / "model.safetensors", [model]),  # inside an input folder
        (tmp_path, [model / "model.safetensors"]),  # an input inside the output
        (tmp_path / "link", [model]),
    ]:
        if target.name == "link":
            target.symlink_to(model)
        with pytest.raises(OutputError, match="is also an input .*: choose another -o"):
            with atomic_output(target, force=True, inputs=inputs):
                pass
    assert (model / "model.safetensors").read_text() == "x"


def test_check_output_fails_early(tmp_path):
    (tmp_path / "out").write_text("x")
    with pytest.raises(OutputExists, match="exists: pass --force"):
        check_output(tmp_path / "out")
    check_output(tmp_path / "out", force=True)
    check_output(tmp_path / "new", inputs=[tmp_path / "out"])
    with pytest.raises(OutputError, match="is also an input"):
        check_output(tmp_path / "out", force=True, inputs=[tmp_path / "out"])


def test_atomic_unwritable_parent(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "access", lambda *a, **k: False)
    with pytest.raises(OutputError, match="is not writable: choose another -o"):
        with atomic_output(tmp_path / "out"):
            pass


def test_atomic_removes_stale_temporaries(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale_file = tmp_path / f".out.lrt-tmp-{dead.pid}-abcd"
    stale_file.write_text("left by a killed run")
    stale_dir = _mkdir(tmp_path / f".out.lrt-tmp-{dead.pid}-ef01")
    (stale_dir / "shard").write_text("x")
    alive = tmp_path / f".out.lrt-tmp-{os.getppid()}-beef"  # a live process: keep
    alive.write_text("busy")
    other = tmp_path / f".other.lrt-tmp-{dead.pid}-abcd"  # another target: keep
    other.write_text("not ours")
    with atomic_output(tmp_path / "out") as tmp:
        tmp.write_text("ok")
    assert _leftovers(tmp_path) == sorted([alive.name, other.name])


# ---------------------------------------------------------------------------- parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("5GB", 5 * 10**9), ("500MiB", 500 * 2**20), ("100KB", 100_000), ("2GiB", 2 * 2**30),
        ("1234", 1234), (1234, 1234), ("10 mb", 10**7), ("1.5GB", 1_500_000_000),
        ("3KiB", 3072), ("7B", 7), ("1TB", 10**12),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "5XB", "-5GB", "0", "five", "5 G B"])
def test_parse_size_rejects(text):
    with pytest.raises(InvalidOption, match="size .* (is not a size|is not positive)"):
        parse_size(text)


# ---------------------------------------------------------------------------- ShardedWriter


def test_writer_single_file_round_trip(tmp_path):
    tensors = _tensors()
    tensors["strided"] = torch.randn(5, 3).t()  # non-contiguous input
    with atomic_output(tmp_path / "out.safetensors") as tmp:
        with ShardedWriter(tmp, shard_size=None, metadata={"source": "test"}) as writer:
            for name, tensor in tensors.items():
                writer.add(name, tensor)
    loaded = load_file(tmp_path / "out.safetensors")
    assert loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[n], t) for n, t in tensors.items())
    assert open_checkpoint(tmp_path / "out.safetensors").metadata == {"format": "pt", "source": "test"}
    assert open_checkpoint(tmp_path / "out.safetensors").keys() == list(tensors)


def test_writer_shards_like_transformers(tmp_path):
    tensors = {f"t{i}": torch.full((10,), float(i)) for i in range(5)}  # 40 bytes each
    tensors["big"] = torch.ones(50)  # 200 bytes: larger than a shard, gets its own
    tensors["tail"] = torch.ones(5)
    with atomic_output(tmp_path / "model") as tmp:
        writer = ShardedWriter(tmp, shard_size=100, metadata=None)
        for name, tensor in tensors.items():
            writer.add(name, tensor)
        paths = writer.close()
    shard = [f"model-0000{i}-of-00005.safetensors" for i in range(1, 6)]
    assert [p.name for p in paths] == [*shard, "model.safetensors.index.json"]
    index = json.loads((tmp_path / "model" / "model.safetensors.index.json").read_text())
    assert index["metadata"] == {"total_size": 5 * 40 + 200 + 20}
    assert index["weight_map"] == {
        "t0": shard[0], "t1": shard[0], "t2": shard[1], "t3": shard[1], "t4": shard[2],
        "big": shard[3], "tail": shard[4],
    }
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == sorted(p.name for p in paths)
    _assert_same(open_checkpoint(tmp_path / "model"), tensors)
    for shard in paths[:-1]:
        assert load_file(tmp_path / "model" / shard.name).keys() <= tensors.keys()


def test_writer_shard_boundaries(tmp_path):
    writer = ShardedWriter(tmp_path / "m", shard_size=100)
    for i, size in enumerate([10, 15, 25, 1, 30]):  # floats: 40, 60 | 100 | 4 | 120
        writer.add(f"t{i}", torch.ones(size))
    names = [p.name for p in writer.close()]
    index = json.loads((tmp_path / "m" / names[-1]).read_text())["weight_map"]
    assert [index[f"t{i}"][:11] for i in range(5)] == ["model-00001", "model-00001", "model-00002",
                                                      "model-00003", "model-00004"]


def test_writer_one_shard_is_plain_model_safetensors(tmp_path):
    writer = ShardedWriter(tmp_path / "m", shard_size=10**9)
    writer.add("w", torch.ones(3))
    assert writer.close() == [tmp_path / "m" / "model.safetensors"]
    assert sorted(os.listdir(tmp_path / "m")) == ["model.safetensors"]
    assert torch.equal(load_file(tmp_path / "m" / "model.safetensors")["w"], torch.ones(3))


@pytest.mark.parametrize("count", [3, 400])  # header fits the reserved space / must be shifted
def test_writer_streams_to_disk(tmp_path, count):
    from lowrank_tools.io.atomic import _SafetensorsStream

    path = tmp_path / "s.safetensors"
    stream = _SafetensorsStream(path, {"format": "pt"}, spill_bytes=64)
    tensors = {f"layer.{i}.weight": torch.randn(4, 4) for i in range(count)}
    for name, tensor in tensors.items():
        stream.add(name, tensor)
        assert len(stream._pending) == 0 or stream.nbytes < 64
    stream.close()
    loaded = load_file(path)
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[n], tensors[n]) for n in tensors)


def test_writer_rejects_duplicates(tmp_path):
    writer = ShardedWriter(tmp_path / "x.safetensors", shard_size=None)
    writer.add("w", torch.ones(1))
    with pytest.raises(ValueError, match="already added"):
        writer.add("w", torch.ones(1))
    assert writer.close() == writer.close() == [tmp_path / "x.safetensors"]  # idempotent
    assert torch.equal(load_file(tmp_path / "x.safetensors")["w"], torch.ones(1))
    with pytest.raises(ValueError, match="is closed"):
        writer.add("v", torch.ones(1))


def test_writer_empty_and_aborted(tmp_path):
    assert ShardedWriter(tmp_path / "e.safetensors", shard_size=None).close() == [tmp_path / "e.safetensors"]
    assert load_file(tmp_path / "e.safetensors") == {}
    with pytest.raises(RuntimeError):
        with ShardedWriter(tmp_path / "m", shard_size=10) as writer:
            writer.add("w", torch.ones(8))
            raise RuntimeError
