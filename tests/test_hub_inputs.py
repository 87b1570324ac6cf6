"""Hub ids (org/name) as checkpoint inputs, from a local cache folder built here with HF_HUB_OFFLINE=1: no network."""

from __future__ import annotations

import sys

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from conftest import LLAMA_SHAPES, make_pair
from lowrank_tools.cli import main
from lowrank_tools.errors import CheckpointNotFound, MissingExtra
from lowrank_tools.io.hub import is_hub_id, resolve_input

SHA_MAIN, SHA_V2 = "a" * 40, "b" * 40


def _snapshot(cache, repo: str, sha: str, tensors: dict, ref: str | None = "main"):
    """The hub cache layout: models--org--name/snapshots/<sha>/model.safetensors and refs/<ref> = sha."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    snap = folder / "snapshots" / sha
    snap.mkdir(parents=True)
    save_file(tensors, str(snap / "model.safetensors"))
    (snap / "config.json").write_text('{"model_type": "llama"}')
    if ref:
        (folder / "refs").mkdir(exist_ok=True)
        (folder / "refs" / ref).write_text(sha)
    return snap


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A cache with org/base (main, and tag v2 = base * 2) and org/tuned; offline; cwd without an org/ folder."""
    base, tuned = make_pair(LLAMA_SHAPES, k=3)
    cache = tmp_path / "hf" / "hub"
    _snapshot(cache, "org/base", SHA_MAIN, base)
    _snapshot(cache, "org/base", SHA_V2, {k: v * 2 for k, v in base.items()}, ref="v2")
    _snapshot(cache, "org/tuned", SHA_MAIN, tuned)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return cache, base, tuned


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_is_hub_id_shape_and_existing_paths_win(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert is_hub_id("org/name") and is_hub_id("Org-1/model.v2_x")
    for text in ("name", "org/name/file", "./org/name", "/org/name", "org/../x", "org--x/y", "org/name."):
        assert not is_hub_id(text), text
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert not is_hub_id("org/name")  # an existing path is a path


def test_extract_hub_ids_from_the_cache_equals_local_paths(hub):
    cache, base, tuned = hub
    r = run("extract", "org/base", "org/tuned", "-o", "hub.safetensors", "-r", "3", "-q")
    assert r.exit_code == 0, r.output
    local = cache / "models--org--base" / "snapshots" / SHA_MAIN / "model.safetensors"
    r = run("extract", local, cache / "models--org--tuned" / "snapshots" / SHA_MAIN / "model.safetensors",
            "-o", "local.safetensors", "-r", "3", "-q")
    assert r.exit_code == 0, r.output
    a, b = load_file("hub.safetensors"), load_file("local.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_revision_picks_the_tag_or_commit(hub):
    cache, base, _ = hub
    name = "model.layers.0.self_attn.q_proj.weight"
    for revision in ("v2", SHA_V2):
        path = resolve_input("org/base", revision=revision)
        assert path.name == SHA_V2
        assert torch.equal(load_file(str(path / "model.safetensors"))[name], base[name] * 2)
    assert resolve_input("org/base").name == SHA_MAIN


def test_apply_onto_a_hub_base(hub):
    cache, base, tuned = hub
    assert run("extract", "org/base", "org/tuned", "-o", "lora.safetensors", "-r", "3", "-q").exit_code == 0
    r = run("apply", "org/base", "lora.safetensors", "-o", "applied.safetensors", "-q")
    assert r.exit_code == 0, r.output
    out = load_file("applied.safetensors")
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.allclose(out[name], tuned[name], atol=1e-5)


def test_missing_id_offline_is_one_line(hub):
    r = run("extract", "org/absent", "org/tuned", "-o", "x.safetensors", "-q")
    assert r.exit_code == 1
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and "org/absent" in lines[0] and "HF_HUB_OFFLINE" in lines[0], r.output
    with pytest.raises(CheckpointNotFound, match=r"org/base.*revision nope.*HF_HUB_OFFLINE"):
        resolve_input("org/base", revision="nope")


def test_without_huggingface_hub_the_error_names_the_extra(hub, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails
    with pytest.raises(MissingExtra, match=r"lowrank-tools\[hub\]"):
        resolve_input("org/base")
    r = run("extract", "org/base", "org/tuned", "-o", "x.safetensors", "-q")
    assert r.exit_code == 2 and "lowrank-tools[hub]" in r.output
    assert resolve_input("plain-missing-file.safetensors").name == "plain-missing-file.safetensors"  # not an id
