"""Issue 11, outputs that cannot destroy data, through the real CLI in subprocesses: exit status, exactly one
``Error:`` line naming the thing, no stray temporary, inputs unchanged (sha256).

The child is ``python -m lowrank_tools`` or, where a scenario needs a hook (a slow disk, a report that fails, a rival
run), the CLI behind a few monkeypatches chosen by ``LRT_TEST_HOOK``. Every scenario runs once, in parallel, in a
module fixture; the tests read the results.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import LLAMA_SHAPES, make_pair

pytestmark = pytest.mark.slow  # about 15 subprocesses, 4 at a time

TMP_MARK = ".lrt-tmp-"
CHILD = r"""
import os, sys, time
from pathlib import Path
hook = os.environ.get("LRT_TEST_HOOK", "")
if hook == "slow":  # a slow disk: each tensor written takes a while, so a signal lands mid-write
    import lowrank_tools.io.atomic as atomic
    _add = atomic._SafetensorsStream.add
    def slow_add(self, name, tensor):
        _add(self, name, tensor)
        time.sleep(0.15)
    atomic._SafetensorsStream.add = slow_add
if hook == "slow-commit":  # the outputs are written, not yet installed: a signal lands here
    from lowrank_tools.io.outputs import OutputTransaction
    _install_all = OutputTransaction.commit
    def slow_commit(self):
        time.sleep(4)
        return _install_all(self)
    OutputTransaction.commit = slow_commit
if hook in ("report-fails", "report-appears"):
    import lowrank_tools.report as report
    _json = report.report_json
    def report_json(r):
        if hook == "report-fails":
            raise ValueError("Out of range float values are not JSON compliant: inf")
        Path(os.environ["LRT_TEST_TARGET"]).write_text("someone else's\n")  # appears while the run writes
        return _json(r)
    report.report_json = report_json
if hook == "wait-go":  # hold before installing until the rival run is there too
    from lowrank_tools.io.outputs import OutputTransaction
    _commit = OutputTransaction.commit
    def commit(self):
        Path(os.environ["LRT_TEST_READY"] + str(os.getpid())).touch()
        while not Path(os.environ["LRT_TEST_GO"]).exists():
            time.sleep(0.02)
        return _commit(self)
    OutputTransaction.commit = commit
from lowrank_tools.cli import main
main(prog_name="lowrank-tools")
"""
SLOW_SHAPES = {f"model.layers.{i}.mlp.up_proj.weight": (64, 64) for i in range(24)}


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str
    files: list[str] = field(default_factory=list)  # what the case folder holds afterwards (recursively)
    extra: dict = field(default_factory=dict)

    @property
    def lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _env(hook: str = "", **extra: str) -> dict:
    return {**os.environ, "LRT_TEST_HOOK": hook, "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1", **extra}


def _start(args, cwd: Path, hook: str = "", stdout=subprocess.PIPE, **extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-c", CHILD, *map(str, args)] if hook else [sys.executable, "-m", "lowrank_tools",
                                                                      *map(str, args)]
    return subprocess.Popen(cmd, cwd=cwd, env=_env(hook, **extra), stdout=stdout, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_signals)


def _default_signals() -> None:
    """The child starts with SIGINT/SIGTERM/SIGHUP at their defaults: a suite run under ``nohup`` (SIGHUP ignored,
    and an ignored signal is inherited) would otherwise see the CLI keep SIGHUP ignored, as it must for a user's nohup."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


def _finish(proc: subprocess.Popen, case: Path, **extra) -> Run:
    out, err = proc.communicate(timeout=300)
    return Run(proc.returncode, out or "", err, _listing(case), extra)


def _cli(case: Path, *args, hook: str = "", cwd: Path | None = None, **env) -> Run:
    return _finish(_start(args, cwd or case, hook, **env), case)


# ------------------------------------------------------------------------------------------------ scenarios


def _cwd_force(inp: Path, case: Path) -> Run:
    work = case / "work"
    work.mkdir()
    (work / "notes.txt").write_text("my notes\n")
    return _cli(case, "extract", inp / "base.safetensors", inp / "tuned.safetensors", "-o", ".", "--force", "-q",
                cwd=work)


def _foreign_force(inp: Path, case: Path) -> Run:
    notes = case / "notes"
    notes.mkdir()
    for name in ("b.txt", "a.txt", "adapter_config.json"):
        (notes / name).write_text(name)
    before = _digest(notes)
    run = _cli(case, "extract", inp / "base.safetensors", inp / "tuned.safetensors", "-o", "notes", "--force", "-q")
    run.extra["unchanged"] = _digest(notes) == before
    return run


def _own_force(inp: Path, case: Path) -> Run:
    shutil.copytree(inp / "adapter", case / "ad")  # one of ours, of rank 2
    run = _cli(case, "extract", inp / "base.safetensors", inp / "tuned.safetensors", "-o", "ad", "-r", "3", "-q",
               "--force")
    run.extra["r"] = json.loads((case / "ad" / "adapter_config.json").read_text())["r"]
    return run


def _report_fails(inp: Path, case: Path) -> Run:
    return _cli(case, "extract", inp / "base.safetensors", inp / "tuned.safetensors", "-o", "ad", "--report", "r.json",
                "-q", hook="report-fails")


def _report_appears(inp: Path, case: Path) -> Run:
    return _cli(case, "extract", inp / "base.safetensors", inp / "tuned.safetensors", "-o", "ad", "--report",
                "r.json", "-q", hook="report-appears", LRT_TEST_TARGET=str(case / "r.json"))


def _race(inp: Path, case: Path) -> Run:
    env = {"LRT_TEST_READY": str(case / "ready-"), "LRT_TEST_GO": str(case / "go")}
    procs = [_start(["extract", inp / "base.safetensors", inp / "tuned.safetensors", "-o", "ad", "-r", str(r), "-q"],
                    case, "wait-go", **env) for r in (2, 3)]
    deadline = time.monotonic() + 240
    while len(list(case.glob("ready-*"))) < 2 and time.monotonic() < deadline and all(p.poll() is None for p in procs):
        time.sleep(0.05)
    both_ready = len(list(case.glob("ready-*"))) == 2
    temporaries = sorted(p.name for p in case.iterdir() if TMP_MARK in p.name)
    (case / "go").touch()
    runs = [_finish(p, case) for p in procs]
    for f in [*case.glob("ready-*"), case / "go"]:
        f.unlink()
    return Run(0, "", "", _listing(case), {"runs": runs, "both_ready": both_ready, "temporaries": temporaries})


def _signal(inp: Path, case: Path, sig: signal.Signals, args: list, hook: str, previous: bool) -> Run:
    if previous:
        (case / "out.safetensors").write_bytes(b"a previous output")
        args = [*args, "--force"]
    before = _digest(case)
    proc = _start(args, case, hook)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None and not any(TMP_MARK in p.name for p in case.iterdir()):
        time.sleep(0.02)
    time.sleep(0.4)
    mid_write = proc.poll() is None
    proc.send_signal(sig)
    run = _finish(proc, case)
    run.extra.update(mid_write=mid_write, unchanged=_digest(case) == before)
    return run


def _sigterm(inp: Path, case: Path) -> Run:
    args = ["extract", inp / "base.safetensors", inp / "tuned.safetensors", "-o", "out.safetensors",
            "--format", "kohya", "-r", "2", "-q"]
    return _signal(inp, case, signal.SIGTERM, args, "slow-commit", previous=True)


def _sighup(inp: Path, case: Path) -> Run:
    args = ["apply", inp / "slow-base.safetensors", inp / "slow-adapter", "-o", "model", "--shard-size", "64KiB", "-q"]
    return _signal(inp, case, signal.SIGHUP, args, "slow", previous=False)


LONG = "é" * 100 + "x" * 38 + ".safetensors"  # 250 bytes: legal on every Linux file system


def _long_name(inp: Path, case: Path) -> Run:
    return _cli(case, "extract", inp / "base.safetensors", inp / "tuned.safetensors", "-o", LONG, "--format", "kohya",
                "-q")


def _proc(inp: Path, case: Path) -> Run:
    return _cli(case, "extract", inp / "base.safetensors", inp / "tuned.safetensors", "-o", "/proc/lrt-test-out", "-q")


def _closed_stdout(inp: Path, case: Path) -> Run:
    read, write = os.pipe()
    os.close(read)
    try:
        proc = _start(["info", inp / "adapter"], case, stdout=write)
    finally:
        os.close(write)
    return _finish(proc, case)


def _closed_stderr(inp: Path, case: Path) -> Run:
    """An error to report with stderr closed (``2>&-``: descriptor 2 gets /dev/null) or a closed pipe (141)."""
    read, write = os.pipe()
    os.close(read)
    args = [sys.executable, "-m", "lowrank_tools", "info", "missing"]
    try:
        pipe = subprocess.run(args, cwd=case, env=_env(), stdout=subprocess.PIPE, stderr=write, timeout=300)
    finally:
        os.close(write)
    closed = subprocess.run(args, cwd=case, env=_env(), stdout=subprocess.PIPE, timeout=300,
                            preexec_fn=lambda: os.close(2))
    return Run(0, "", "", _listing(case), {"pipe": pipe.returncode, "closed": closed.returncode,
                                           "stdout": pipe.stdout + closed.stdout})


def _apply_report(inp: Path, case: Path) -> Run:
    run = _cli(case, "apply", inp / "base.safetensors", f"{inp / 'adapter'}:0.5", "-o", "m.safetensors", "--report",
               "r.json", "-q")
    run.extra["report"] = json.loads((case / "r.json").read_text()) if (case / "r.json").exists() else None
    return run


def _plot_dir(inp: Path, case: Path) -> Run:
    plots = case / "plots"
    plots.mkdir()
    (plots / "notes.txt").write_text("mine\n")
    (plots / "singular_values.png").write_bytes(b"old png")
    run = _cli(case, "analyze", inp / "base.safetensors", inp / "tuned.safetensors", "--plot", "plots", "-q", "--force")
    run.extra.update(notes=(plots / "notes.txt").read_text(),
                     png=(plots / "singular_values.png").read_bytes()[:8])
    return run


SCENARIOS = {f.__name__[1:]: f for f in (_cwd_force, _foreign_force, _own_force, _report_fails, _report_appears, _race,
                                         _sigterm, _sighup, _long_name, _proc, _closed_stdout, _closed_stderr,
                                         _apply_report,
                                         _plot_dir)}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from lowrank_tools import Adapter, LoraModule, save_adapter

    inp = tmp_path_factory.mktemp("safety-in")
    base, tuned = make_pair(LLAMA_SHAPES, k=3)
    save_file(base, str(inp / "base.safetensors"))
    save_file(tuned, str(inp / "tuned.safetensors"))
    slow_base, slow_tuned = make_pair(SLOW_SHAPES, k=2)
    save_file(slow_base, str(inp / "slow-base.safetensors"))
    save_file(slow_tuned, str(inp / "slow-tuned.safetensors"))
    g = torch.Generator().manual_seed(0)
    modules = {k[: -len(".weight")]: LoraModule(B=torch.randn(s[0], 2, generator=g),
                                                A=torch.randn(2, s[1], generator=g), alpha=2.0)
               for k, s in LLAMA_SHAPES.items() if len(s) == 2}
    save_adapter(Adapter(modules=modules), inp / "adapter")
    slow = {k[: -len(".weight")]: LoraModule(B=torch.randn(64, 2, generator=g), A=torch.randn(2, 64, generator=g),
                                             alpha=2.0) for k in SLOW_SHAPES}
    save_adapter(Adapter(modules=slow), inp / "slow-adapter")
    before = _digest(inp)
    root = tmp_path_factory.mktemp("safety")
    cases = {}
    for name in SCENARIOS:
        cases[name] = root / name
        cases[name].mkdir()
    with ThreadPoolExecutor(4) as pool:
        futures = {name: pool.submit(f, inp, cases[name]) for name, f in SCENARIOS.items()}
        got = {name: f.result() for name, f in futures.items()}
    got["inputs unchanged"] = _digest(inp) == before
    return got


def _one_error(run: Run, code: int, pattern: str) -> None:
    import re

    assert run.code == code, run.stderr
    assert len(run.lines) == 1 and run.lines[0].startswith("Error: "), run.stderr
    assert re.search(pattern, run.lines[0]), run.lines[0]
    assert not any(TMP_MARK in f for f in run.files), run.files


# ------------------------------------------------------------------------------------------------ tests


def test_inputs_unchanged(results):
    assert results["inputs unchanged"]


def test_force_never_writes_over_the_current_folder_or_a_parent(results):
    run = results["cwd_force"]  # parents, home and / : test_outputs.py
    _one_error(run, 1, r"output \. is the current folder: lowrank-tools never writes over it, even with --force")
    assert run.files == ["work", "work/notes.txt"]


def test_force_refuses_a_folder_it_did_not_write(results):
    run = results["foreign_force"]
    _one_error(run, 1, r"--force will not replace folder notes: it holds 2 entries, e\.g\. a\.txt, that lowrank-tools "
                       r"did not write")
    assert run.extra["unchanged"]


def test_force_replaces_its_own_adapter_folder(results):
    run = results["own_force"]
    assert run.code == 0, run.stderr
    assert run.files == ["ad", "ad/adapter_config.json", "ad/adapter_model.safetensors"]
    assert run.extra["r"] == 3  # the rank-2 adapter was replaced


def test_a_failing_report_leaves_no_adapter(results):
    run = results["report_fails"]
    _one_error(run, 1, r"unexpected ValueError: Out of range float")
    assert run.files == []


def test_a_report_that_appears_meanwhile_rolls_the_adapter_back(results):
    run = results["report_appears"]
    _one_error(run, 1, r"^Error: r\.json exists: pass --force")
    assert run.files == ["r.json"]  # the other program's file, untouched; the adapter installed first is gone


def test_two_racing_runs_one_wins(results):
    race = results["race"]
    assert race.extra["both_ready"] and len(race.extra["temporaries"]) == 2
    runs = sorted(race.extra["runs"], key=lambda r: r.code)
    assert [r.code for r in runs] == [0, 1], [r.stderr for r in runs]
    assert runs[1].lines == ["Error: ad exists: pass --force to overwrite it or choose another -o"]
    assert race.files == ["ad", "ad/adapter_config.json", "ad/adapter_model.safetensors"]


@pytest.mark.parametrize(("name", "sig"), [("sigterm", signal.SIGTERM), ("sighup", signal.SIGHUP)])
def test_signals_unwind_like_ctrl_c(results, name, sig):
    run = results[name]
    assert run.extra["mid_write"], "the child finished before the signal"
    assert run.code == 128 + sig, run.stderr
    assert run.lines == [f"interrupted by {sig.name}: nothing was written"]
    assert run.extra["unchanged"] and not any(TMP_MARK in f for f in run.files), run.files


def test_a_250_byte_output_name(results):
    run = results["long_name"]
    assert run.code == 0, run.stderr
    assert run.files == [LONG]


def test_an_unwritable_place_is_one_line_naming_it(results):
    _one_error(results["proc"], 1, r"/proc/lrt-test-out")


def test_a_closed_stdout_ends_quietly(results):
    run = results["closed_stdout"]
    assert run.code == 141 and run.stderr == ""


def test_a_closed_stderr_keeps_the_exit_status_meaningful(results):
    run = results["closed_stderr"]
    assert run.extra["pipe"] == 141 and run.extra["closed"] == 1 and run.extra["stdout"] == b""
    assert run.files == []


def test_apply_report(results):
    run = results["apply_report"]
    assert run.code == 0, run.stderr
    assert sorted(run.files) == ["m.safetensors", "r.json"]
    changed = {r["tensor"]: r for r in run.extra["report"]["changed"]}
    assert sorted(changed) == sorted(k for k, s in LLAMA_SHAPES.items() if len(s) == 2)
    for record in changed.values():
        assert record["adapters"] and record["modules"] == [record["tensor"][: -len(".weight")]]
        assert record["max_abs_delta"] > 0 and 0 < record["relative_change"] < 10


def test_plot_folder_keeps_other_files(results):
    run = results["plot_dir"]
    assert run.code == 0, run.stderr
    assert run.extra["notes"] == "mine\n" and run.extra["png"].startswith(b"\x89PNG")
    assert run.files == ["plots", "plots/cumulative_energy.png", "plots/notes.txt", "plots/rank90_heatmap.png",
                         "plots/retained_energy_vs_params.png", "plots/singular_values.png"]
