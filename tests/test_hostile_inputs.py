"""Hostile inputs (issue 11, items 8-11), through the real CLI: every case in-process (``CliRunner`` on
``lowrank_tools.cli.main``), and the cases marked ``sub`` (at least two per item) also in a subprocess
(``python -m lowrank_tools``), where the memory high-water mark is measured too.

Every case asserts: the exit status (1 data, 2 usage), exactly one ``Error:`` line on stderr that names the file and
the field, tensor or pattern at fault, no traceback and no ``unexpected`` error, nothing new or changed in the
case's folder (inputs hashed with sha256 before and after), and an end within the time limit (a pattern that
backtracks exponentially, a 200,000-deep JSON, a 6.4 GB stride-0 view must all end in seconds).
Controls (``ok`` cases) show the same inputs, made valid, are read: the refusals are not blanket ones.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import resource
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from lowrank_tools.cli import main

WORKERS = 2
TIMEOUT = 60
Q = "model.layers.0.self_attn.q_proj"
EVIL = "([a-z0-9_.]|[a-z0-9_.])*Z"  # exponential in re: 24 characters take ~2 s, 40 take hours


# ---------------------------------------------------------------------------------------------- inputs


def raw_safetensors(path: Path, header: str | dict, data: bytes = b"") -> Path:
    text = (header if isinstance(header, str) else json.dumps(header)).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def _f32(shape, begin):
    n = 4 * (shape[0] * shape[1] if len(shape) == 2 else shape[0])
    return {"dtype": "F32", "shape": list(shape), "data_offsets": [begin, begin + n]}


def peft_tensors(r: int = 2) -> dict:
    g = torch.Generator().manual_seed(0)
    return {f"base_model.model.{Q}.lora_A.weight": torch.randn(r, 8, generator=g),
            f"base_model.model.{Q}.lora_B.weight": torch.randn(8, r, generator=g)}


def peft_folder(folder: Path, config: dict | str, *, r: int = 2) -> Path:
    folder.mkdir(parents=True)
    save_file(peft_tensors(r), str(folder / "adapter_model.safetensors"))
    base = {"peft_type": "LORA", "r": 2, "lora_alpha": 4}
    text = config if isinstance(config, str) else json.dumps({**base, **config})
    (folder / "adapter_config.json").write_text(text)
    return folder


def kohya_file(path: Path, metadata: dict) -> Path:
    g = torch.Generator().manual_seed(0)
    key = "lora_unet_q_proj"
    save_file({f"{key}.lora_down.weight": torch.randn(2, 8, generator=g),
               f"{key}.lora_up.weight": torch.randn(8, 2, generator=g)}, str(path), metadata=metadata)
    return path


def model_folder(folder: Path, *, seed: int, config: str | None = None, index: str | None = None) -> Path:
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    tensors = {f"{Q}.weight": torch.randn(8, 8, generator=g)}
    if index is None:
        save_file(tensors, str(folder / "model.safetensors"))
    else:
        save_file(tensors, str(folder / "model-00001-of-00001.safetensors"))
        (folder / "model.safetensors.index.json").write_text(index)
    if config is not None:
        (folder / "config.json").write_text(config)
    return folder


def deep(n: int = 200_000) -> str:
    return "[" * n + "]" * n


# ---------------------------------------------------------------------------------------------- cases


@dataclass
class Case:
    id: str
    build: Callable[[Path], list[str]]  # makes the inputs in the folder, returns the CLI arguments
    code: int = 1
    names: list[str] = field(default_factory=list)  # regexes the error line must hold
    seconds: float = 10.0  # in-process; a subprocess gets 40 more for importing torch on a busy machine
    sub: bool = False


def st_case(id, header, data=b"", names=(), **kw) -> Case:
    def build(d: Path) -> list[str]:
        raw_safetensors(d / "bad.safetensors", header, data)
        return ["info", "bad.safetensors"]
    return Case(id, build, names=["bad\\.safetensors", *names], **kw)


A8 = _f32((2,), 0)
CASES = [
    # 8. safetensors headers: what the reference library refuses, and more
    st_case("st-overlap", {"a": _f32((2,), 0), "b": _f32((2,), 4)}, b"\0" * 12, ["'b'", "overlaps"], sub=True),
    st_case("st-gap", {"a": _f32((2,), 8), "b": _f32((1,), 0)}, b"\0" * 16, ["'a'", "gap"]),
    st_case("st-trailing", {"a": A8}, b"\0" * 12, ["4 bytes follow"]),
    st_case("st-duplicate-key", '{"a":%s,"a":%s}' % (json.dumps(A8), json.dumps(A8)), b"\0" * 8, ["'a'", "twice"],
            sub=True),
    st_case("st-shape-overflow", {"a": {"dtype": "F32", "shape": [0, 2**63], "data_offsets": [0, 0]}}, b"",
            ["'a'", "shape"], sub=True),
    st_case("st-numel-overflow", {"a": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 0]}}, b"",
            ["'a'", "more elements"]),
    st_case("st-negative-dim", {"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}, b"", ["'a'", "shape"]),
    st_case("st-float-dim", {"a": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}}, b"\0" * 8,
            ["'a'", "shape"]),
    st_case("st-bool-dim", {"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, b"\0" * 4,
            ["'a'", "shape"]),
    st_case("st-wrong-length", {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8,
            ["'a'", "needs 12"]),
    st_case("st-header-list", "[1, 2]", b"", ["array, not an object"]),
    st_case("st-metadata-int", {"__metadata__": {"x": 1}, "a": A8}, b"\0" * 8, ["__metadata__", "'x'"]),
    st_case("st-metadata-list", {"__metadata__": ["x"], "a": A8}, b"\0" * 8, ["__metadata__"]),
    st_case("st-deep", '{"a":' + deep() + "}", b"", ["nested deeper"], sub=True),
    st_case("st-nan", '{"a":{"dtype":"F32","shape":[NaN],"data_offsets":[0,0]}}', b"", ["NaN"]),
    st_case("st-1e400", '{"a":{"dtype":"F32","shape":[1e400],"data_offsets":[0,0]}}', b"", ["1e400"]),
    st_case("st-entry-string", {"a": "F32"}, b"", ["'a'", "not an object"]),
    # 9. JSON everywhere: adapter_config.json, config.json, shard index, metadata strings
    Case("cfg-nan", lambda d: ["info", str(peft_folder(d / "a", '{"peft_type": "LORA", "r": 2, "lora_alpha": NaN}'))],
         names=["adapter_config\\.json", "NaN"], sub=True),
    Case("cfg-1e400", lambda d: ["info", str(peft_folder(d / "a", '{"r": 2, "lora_alpha": 1e400}'))],
         names=["adapter_config\\.json", "1e400"]),
    Case("cfg-huge-int", lambda d: ["info", str(peft_folder(d / "a", {"lora_alpha": 10**400}))],
         names=["adapter_config\\.json", "lora_alpha"]),
    Case("cfg-list", lambda d: ["info", str(peft_folder(d / "a", "[1, 2]"))], names=["adapter_config\\.json", "array"]),
    Case("cfg-deep", lambda d: ["info", str(peft_folder(d / "a", '{"r": ' + deep() + "}"))],
         names=["adapter_config\\.json", "nested deeper"], sub=True),
    Case("cfg-duplicate", lambda d: ["info", str(peft_folder(d / "a", '{"r": 2, "r": 4}'))],
         names=["adapter_config\\.json", "'r' appears twice"]),
    Case("cfg-rank-pattern-list", lambda d: ["info", str(peft_folder(d / "a", {"rank_pattern": [1]}))],
         names=["adapter_config\\.json", "rank_pattern"]),
    Case("cfg-modules-to-save-int", lambda d: ["info", str(peft_folder(d / "a", {"modules_to_save": 5}))],
         names=["adapter_config\\.json", "modules_to_save"]),
    Case("cfg-base-model-object", lambda d: ["info", str(peft_folder(d / "a", {"base_model_name_or_path": {}}))],
         names=["adapter_config\\.json", "base_model_name_or_path"]),
    Case("cfg-rslora-string", lambda d: ["info", str(peft_folder(d / "a", {"use_rslora": "yes"}))],
         names=["adapter_config\\.json", "use_rslora"]),
    Case("cfg-alpha-beyond-float32", lambda d: [
        "convert", str(peft_folder(d / "a", {"alpha_pattern": {"q_proj": 1e308}})), "-o", "k.safetensors",
        "--format", "kohya"], names=[re.escape(Q), "float32"]),  # found by the fuzz suite: an inf alpha was written
    Case("model-config-list", lambda d: ["analyze", str(model_folder(d / "b", seed=0, config="[]")),
                                         str(model_folder(d / "t", seed=1))], names=["config\\.json", "array"]),
    Case("model-config-architectures", lambda d: [
        "analyze", str(model_folder(d / "b", seed=0, config='{"architectures": 5}')),
        str(model_folder(d / "t", seed=1))],
        names=["config\\.json", "architectures"], sub=True),
    Case("index-weight-map-list", lambda d: [
        "analyze", str(model_folder(d / "b", seed=0, index='{"weight_map": []}')), str(model_folder(d / "t", seed=1))],
        names=["index\\.json", "weight_map"]),
    Case("index-weight-map-int", lambda d: [
        "analyze", str(model_folder(d / "b", seed=0, index='{"weight_map": {"%s.weight": 7}}' % Q)),
        str(model_folder(d / "t", seed=1))], names=["index\\.json", "weight_map"]),
    Case("kohya-names-not-strings", lambda d: [
        "info", str(kohya_file(d / "k.safetensors", {"lowrank_tools.modules": '{"lora_unet_q_proj": 1}'}))],
        names=["k\\.safetensors", "lowrank_tools\\.modules"]),
    Case("kohya-names-deep", lambda d: [
        "info", str(kohya_file(d / "k.safetensors", {"lowrank_tools.modules": deep()}))],
        names=["k\\.safetensors", "nested deeper"], sub=True),
    Case("diffusers-metadata-list", lambda d: [
        "info", str(_diffusers_file(d / "pytorch_lora_weights.safetensors", "[]"))],
        names=["pytorch_lora_weights\\.safetensors", "lora_adapter_metadata"]),
    # 10. patterns that could backtrack for ever
    Case("rank-pattern-exponential", lambda d: [
        "info", str(peft_folder(d / "a", {"rank_pattern": {EVIL: 2}}))],
        names=["adapter_config\\.json", "rank_pattern", re.escape(EVIL), "exponential"], seconds=15, sub=True),
    Case("alpha-pattern-exponential", lambda d: [
        "info", str(peft_folder(d / "a", {"alpha_pattern": {"(a+)+$": 2}}))],
        names=["alpha_pattern", re.escape("(a+)+$")], seconds=15),
    Case("include-exponential", lambda d: [
        "analyze", str(model_folder(d / "b", seed=0)), str(model_folder(d / "t", seed=1)), "--include", EVIL],
        code=2, names=["--include", "exponential"], seconds=15, sub=True),
    Case("exclude-star-chain", lambda d: [
        "resize", str(peft_folder(d / "a", {})), "-o", str(d / "out"), "--rank", "1", "--exclude", ".*.*.*.*x"],
        code=2, names=["--exclude", "unbounded repeats"], seconds=15),
    # 11. a 1.5 KB pickle holding a stride-0 view of 40000 x 40000 float32 (6.4 GB when expanded)
    Case("pickle-expand", lambda d: ["analyze", _expand_pickle(d / "base.pt"), _expand_pickle(d / "tuned.pt")],
         names=["base\\.pt", "'w\\.weight'", "40000, 40000"], sub=True),
    Case("pickle-overlapping-strides", lambda d: ["analyze", _strided_pickle(d / "base.pt"),
                                                  _strided_pickle(d / "t.pt")],
         names=["base\\.pt", "'w\\.weight'", "view"]),
    Case("pickle-sparse", lambda d: ["analyze", _sparse_pickle(d / "base.pt"), _sparse_pickle(d / "t.pt")],
         names=["base\\.pt", "'w\\.weight'", "sparse"]),
]


def _diffusers_file(path: Path, metadata: str) -> Path:
    tensors = {k.replace("base_model.model.", "unet."): v for k, v in peft_tensors().items()}
    save_file(tensors, str(path), metadata={"format": "pt", "lora_adapter_metadata": metadata})
    return path


def _strided_pickle(path: Path) -> str:
    """Overlapping strides (each row starts one element after the last): 80 KB stored, 400 MB logical."""
    torch.save({"w.weight": torch.zeros(20000).as_strided((10000, 10000), (1, 1))}, path)
    return str(path)


def _sparse_pickle(path: Path) -> str:
    indices = torch.tensor([[0, 99999], [0, 99999]])
    sparse = torch.sparse_coo_tensor(indices, torch.ones(2), (100000, 100000), check_invariants=True)
    torch.save({"w.weight": sparse}, path)
    return str(path)


def _expand_pickle(path: Path) -> str:
    torch.save({"w.weight": torch.zeros(1).expand(40000, 40000)}, path)
    assert path.stat().st_size < 4096
    return str(path)


# ---------------------------------------------------------------------------------------------- running


@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str
    seconds: float
    before: dict
    after: dict
    max_rss_kb: int


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


_CHILD = ("import resource, runpy, sys; sys.argv = ['lowrank-tools', *sys.argv[1:]]\n"
          "try:\n    runpy.run_module('lowrank_tools', run_name='__main__')\n"
          "finally:\n    print('MAXRSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n")


def run_in_process(case: Case, root: Path) -> Outcome:
    folder = root / case.id
    folder.mkdir()
    args = case.build(folder)
    before = snapshot(folder)
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        start = time.monotonic()
        result = CliRunner().invoke(main, args)
        seconds = time.monotonic() - start
    finally:
        os.chdir(cwd)
    return Outcome(result.exit_code, result.stdout, result.stderr, seconds, before, snapshot(folder), -1)


def run_case(case: Case, root: Path) -> Outcome:
    folder = root / case.id
    folder.mkdir()
    args = case.build(folder)
    before = snapshot(folder)
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", _CHILD, *args], cwd=folder, capture_output=True, text=True,
                          timeout=TIMEOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    seconds = time.monotonic() - start - 40
    lines = proc.stderr.splitlines()
    rss = int(lines[-1].split()[1]) if lines and lines[-1].startswith("MAXRSS") else -1
    stderr = "\n".join(ln for ln in lines if not ln.startswith("MAXRSS"))
    return Outcome(proc.returncode, proc.stdout, stderr, seconds, before, snapshot(folder), rss)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[str, Outcome]:
    """Subprocess outcomes of the ``sub`` cases, two at a time."""
    root = tmp_path_factory.mktemp("hostile")
    with ThreadPoolExecutor(WORKERS) as pool:
        futures = {case.id: pool.submit(run_case, case, root) for case in CASES if case.sub}
    return {k: f.result() for k, f in futures.items()}


def test_case_ids_are_unique_and_each_item_has_subprocess_cases():
    assert len({c.id for c in CASES}) == len(CASES) >= 35
    prefixes = {c.id.split("-")[0] for c in CASES if c.sub}
    assert {"st", "cfg", "model", "kohya", "rank", "include", "pickle"} <= prefixes


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input_in_process(case: Case, tmp_path):
    check(case, run_in_process(case, tmp_path))


@pytest.mark.parametrize("case", [c for c in CASES if c.sub], ids=[c.id for c in CASES if c.sub])
def test_hostile_input_subprocess(case: Case, outcomes):
    check(case, outcomes[case.id])


def check(case: Case, got: Outcome) -> None:
    errors = [ln for ln in got.stderr.splitlines() if ln.startswith("Error:")]
    assert got.code == case.code, got.stderr
    assert len(errors) == 1 and got.stderr.strip() == errors[0], got.stderr
    assert "Traceback" not in got.stderr and "unexpected" not in got.stderr, got.stderr
    for pattern in case.names:
        assert re.search(pattern, errors[0]), (pattern, errors[0])
    assert len(errors[0]) < 600, errors[0]
    assert got.after == got.before, "files were added, removed or changed"
    assert got.seconds < case.seconds, got.seconds


def test_expand_pickle_never_allocates_its_logical_size(outcomes):
    got = outcomes["pickle-expand"]
    assert 0 < got.max_rss_kb < 900_000, got.max_rss_kb  # 6.4 GB if the view were expanded


# ---------------------------------------------------------------------------------------------- controls


def _run(args, cwd):
    return subprocess.run([sys.executable, "-m", "lowrank_tools", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=TIMEOUT)


def test_controls_valid_versions_are_read(tmp_path):
    """The same shapes of input, valid: a rank_pattern regex key (PEFT semantics), a config with the fields typed,
    safetensors spans listed out of order but tiling the data (the reference accepts that), __metadata__ null."""
    folder = peft_folder(tmp_path / "a", {"r": 4, "rank_pattern": {r"layers\.\d+\.self_attn\.q_proj": 2},
                                          "alpha_pattern": {"q_proj": 8}, "base_model_name_or_path": "x"}, r=2)
    got = _run(["info", str(folder), "--json"], tmp_path)
    assert got.returncode == 0, got.stderr
    facts = json.loads(got.stdout)
    assert facts["ranks"] == {"2": 1} and facts["alphas"] == {"8.0": 1}, facts
    raw_safetensors(tmp_path / "ok.safetensors", {"__metadata__": None, "b": _f32((1,), 8), "a": _f32((2,), 0)},
                    struct.pack("<3f", 1, 2, 3))
    from lowrank_tools.io.checkpoint import open_checkpoint
    ckpt = open_checkpoint(tmp_path / "ok.safetensors")
    assert ckpt.keys() == ["a", "b"] and ckpt.get("b").tolist() == [3.0]
    base = torch.arange(16.0).reshape(4, 4)
    torch.save({"t.weight": base.t(), "s.bias": torch.arange(10.0)[2:5]}, tmp_path / "views.pt")
    views = open_checkpoint(tmp_path / "views.pt")  # transposed and sliced views are ordinary: read as they are
    assert torch.equal(views.get("t.weight"), base.t()) and views.get("s.bias").tolist() == [2.0, 3.0, 4.0]


def test_max_rss_probe_is_meaningful(tmp_path):
    """The control for the RSS bound: a child that does allocate 2 GB reports it."""
    code = "import torch; x = torch.ones(2**28); print(x.sum())"
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    assert resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss > 1_000_000
