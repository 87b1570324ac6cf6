"""Killed in the middle of writing, the CLI leaves no target or the previous complete one, never a half-written file.

The child is the real CLI (``lowrank_tools.cli.main``) with one hook: every tensor written to a safetensors file is
followed by a short sleep, a slow disk, so that the signal lands while the output is half written (the test waits
until the temporary beside the target exists, and checks that it was still being written). SIGINT (Ctrl-C) must
exit non-zero with one line and remove the temporary; SIGKILL cannot clean up, so the temporary stays, and the next
successful run to the same target removes it.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import make_pair

TMP_MARK = ".lrt-tmp-"
CHILD = """
import os, sys, time
import lowrank_tools.io.atomic as atomic

_add = atomic._SafetensorsStream.add

def slow_add(self, name, tensor):
    _add(self, name, tensor)
    time.sleep(float(os.environ["LRT_TEST_WRITE_DELAY"]))  # a slow disk: the signal lands mid-write

atomic._SafetensorsStream.add = slow_add
from lowrank_tools.cli import main
main(prog_name="lowrank-tools")
"""
SHAPES = {f"model.layers.{i}.mlp.up_proj.weight": (64, 64) for i in range(24)}


@dataclass(frozen=True)
class Scenario:
    id: str
    args: tuple[str, ...]  # {in}: inputs folder; the target is "out" or "out.safetensors" in the case folder
    target: str
    sig: signal.Signals
    previous: bool  # a complete target exists before (and --force is given)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "lowrank_tools", *args]


def _digest(path: Path) -> dict[str, str]:
    """{relative name: sha256} of a file or every file of a folder ({} when absent)."""
    if not path.exists():
        return {}
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(f.relative_to(path.parent)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def _temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if TMP_MARK in p.name)


SCENARIOS = [
    Scenario("apply-file-sigint-previous", ("apply", "{in}/base.safetensors", "{in}/adapter", "-o", "out.safetensors"),
             "out.safetensors", signal.SIGINT, previous=True),
    Scenario("apply-file-sigkill", ("apply", "{in}/base.safetensors", "{in}/adapter", "-o", "out.safetensors"),
             "out.safetensors", signal.SIGKILL, previous=False),
    Scenario("apply-shards-sigkill-previous", ("apply", "{in}/base.safetensors", "{in}/adapter", "-o", "out",
                                               "--shard-size", "64KiB"), "out", signal.SIGKILL, previous=True),
]


@dataclass
class Result:
    code: int
    stderr: str
    tmp_at_signal: list[str]
    before: dict[str, str]
    after: dict[str, str]
    temporaries: list[str]  # left right after the kill
    rerun_code: int | None = None  # SIGKILL only: the next run to the same target
    rerun_tensors: list[str] | None = None
    rerun_temporaries: list[str] | None = None


def _signal_mid_write(args: list[str], cwd: Path, sig: signal.Signals) -> tuple[int, str, list[str]]:
    """Start the slow child, wait until its temporary exists and has grown, send ``sig``; (exit code, stderr,
    temporaries seen when the signal was sent)."""
    env = {**os.environ, "LRT_TEST_WRITE_DELAY": "0.25", "PYTHONDONTWRITEBYTECODE": "1"}  # 24 tensors: 6 s of writing
    # the child starts with SIGINT at its default: an earlier test in this pytest process may have left it ignored,
    # and an ignored SIGINT is inherited (the child would then finish and exit 0)
    proc = subprocess.Popen([sys.executable, "-c", CHILD, *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    seen: list[str] = []
    while time.monotonic() < deadline and proc.poll() is None and not seen:
        seen = _temporaries(cwd)
        time.sleep(0.02)
    time.sleep(0.5)  # a few tensors into the file
    still_running = proc.poll() is None
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    return (proc.returncode if still_running else 999), stderr, seen


def run_scenario(s: Scenario, inp: Path, root: Path) -> Result:
    cwd = root / s.id
    cwd.mkdir()
    args = [a.replace("{in}", str(inp)) for a in s.args] + ["-q"]
    target = cwd / s.target
    if s.previous:
        subprocess.run(_cli(*args), cwd=cwd, check=True, capture_output=True)
        args.append("--force")
    before = _digest(target)
    code, stderr, seen = _signal_mid_write(args, cwd, s.sig)
    got = Result(code, stderr, seen, before, _digest(target), _temporaries(cwd))
    if s.sig is signal.SIGKILL:
        from lowrank_tools.io.checkpoint import open_checkpoint

        got.rerun_code = subprocess.run(_cli(*args, "--force"), cwd=cwd, capture_output=True).returncode
        got.rerun_tensors = sorted(open_checkpoint(target).keys()) if got.rerun_code == 0 else []
        got.rerun_temporaries = _temporaries(cwd)
    return got


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, Result]:
    from lowrank_tools import Adapter, LoraModule, save_adapter

    inp = tmp_path_factory.mktemp("kill-in")
    base, _ = make_pair(SHAPES, k=2)
    save_file(base, str(inp / "base.safetensors"))
    g = torch.Generator().manual_seed(0)
    modules = {k[: -len(".weight")]: LoraModule(B=torch.randn(64, 2, generator=g), A=torch.randn(2, 64, generator=g),
                                                alpha=2.0) for k in SHAPES}
    save_adapter(Adapter(modules=modules), inp / "adapter")
    root = tmp_path_factory.mktemp("kill")
    with ThreadPoolExecutor(2) as pool:
        futures = {s.id: pool.submit(run_scenario, s, inp, root) for s in SCENARIOS}
        return {k: f.result() for k, f in futures.items()}


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.id for s in SCENARIOS])
def test_killed_mid_write(scenario: Scenario, results):
    got = results[scenario.id]
    assert got.tmp_at_signal, "the signal was sent before the output was being written"
    assert got.code != 999, "the child finished before the signal: make the write slower"
    if scenario.previous:
        assert got.before and got.after == got.before, "the previous complete target was changed"
    else:
        assert not got.before and not got.after, "a target appeared"
    if scenario.sig is signal.SIGINT:
        assert got.code == 130, got.stderr
        lines = [line for line in got.stderr.splitlines() if line.strip()]
        assert lines == ["interrupted: nothing was written"], got.stderr
        assert got.temporaries == [], "Ctrl-C left a temporary"
    else:
        assert got.code == -signal.SIGKILL
        assert got.temporaries, "SIGKILL left no temporary: was it killed mid-write?"
        # the next successful run to the same target removes what the killed one left, and writes it whole
        assert got.rerun_code == 0
        assert got.rerun_temporaries == []
        assert got.rerun_tensors == sorted(SHAPES)
