"""Unit tests of lowrank_tools.io.outputs: what --force may replace, no-clobber installs (raced), all-or-nothing
transactions, temporary names, error attribution. The same guarantees through the real CLI: test_output_safety.py."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import lowrank_tools.io.outputs as outputs
import lowrank_tools.io.rename as rename_module
from lowrank_tools import Adapter, LoraModule, save_adapter
from lowrank_tools.errors import OutputError, OutputExists, UsageError
from lowrank_tools.io.outputs import OutputTransaction, atomic_output, check_output, foreign_entries, temp_path


def _tmps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if outputs.TMP_MARK in p.name)


def _tree(path: Path) -> dict[str, bytes]:
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _adapter() -> Adapter:
    g = torch.Generator().manual_seed(0)
    return Adapter(modules={"layer": LoraModule(B=torch.randn(4, 2, generator=g), A=torch.randn(2, 4, generator=g),
                                                 alpha=2.0)})


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ------------------------------------------------------------------------------------ what --force may replace


def test_force_refuses_a_folder_with_foreign_entries(tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "adapter_config.json").write_text("{}")  # one of our names is not enough
    (notes / "b.txt").write_text("mine")
    (notes / "a.txt").write_text("mine too")
    before = _tree(notes)
    with pytest.raises(OutputError, match=r"--force will not replace folder .*notes: it holds 2 entries, e\.g\. "
                                          r"a\.txt, that lowrank-tools did not write .*remove it yourself"):
        with atomic_output(notes, force=True) as tmp:
            tmp.mkdir()
    assert _tree(notes) == before and _tmps(tmp_path) == []


def test_force_replaces_what_lowrank_tools_writes(tmp_path):
    save_adapter(_adapter(), tmp_path / "peft")  # PEFT folder
    save_adapter(_adapter(), tmp_path / "kohya.safetensors", format="kohya")  # a file
    (tmp_path / "empty").mkdir()
    demo = tmp_path / "demo"
    save_adapter(_adapter(), demo / "adapter-r4")
    (demo / "base.safetensors").write_bytes(b"x")
    (demo / "report-r4.json").write_text("{}")
    (tmp_path / "link").symlink_to(tmp_path / "peft")  # the link is replaced, never what it points to
    for name in ("link", "peft", "kohya.safetensors", "empty", "demo"):
        if name not in ("link", "kohya.safetensors"):
            assert foreign_entries(tmp_path / name) == []
        with atomic_output(tmp_path / name, force=True) as tmp:
            tmp.write_text("new")
        assert (tmp_path / name).read_text() == "new" and not (tmp_path / name).is_symlink()
        if name == "link":
            assert sorted(p.name for p in (tmp_path / "peft").iterdir()) == ["adapter_config.json",
                                                                             "adapter_model.safetensors"]
    assert _tmps(tmp_path) == []


def test_apply_folder_is_ours_only_with_the_configs_it_recorded(tmp_path):
    from lowrank_tools.apply import apply

    base = tmp_path / "base"
    base.mkdir()
    from safetensors.torch import save_file

    save_file({"layer.weight": torch.ones(4, 4)}, str(base / "model.safetensors"))
    (base / "config.json").write_text("{}")
    (base / "tokenizer.json").write_text("{}")
    apply(base, [_adapter()], tmp_path / "model")
    assert foreign_entries(tmp_path / "model") == []
    (tmp_path / "model" / "thesis.tex").write_text("mine")
    assert foreign_entries(tmp_path / "model") == ["thesis.tex"]
    with pytest.raises(OutputError, match="holds 1 entry, e.g. thesis.tex"):
        apply(base, [_adapter()], tmp_path / "model", force=True)


@pytest.mark.parametrize("where", [".", "cwd", "parent", "home", "/"])
def test_protected_folders_are_never_outputs(tmp_path, monkeypatch, where):
    work = tmp_path / "home" / "work"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(tmp_path / "home" / "other"))
    (tmp_path / "home" / "other").mkdir()
    target = {".": Path("."), "cwd": work, "parent": Path(".."), "home": Path("~").expanduser(), "/": Path("/")}[where]
    what = {".": "the current folder", "cwd": "the current folder", "parent": "a parent of the current folder",
            "home": "your home folder", "/": "the root folder"}[where]
    with pytest.raises(OutputError, match=f"is {what}: lowrank-tools never writes over it, even with --force"):
        check_output(target, force=True)


def test_special_files_are_refused(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(OutputError, match=r"fifo is not a file or folder \(a named pipe\)"):
        check_output(tmp_path / "fifo", force=True)


# ------------------------------------------------------------------------------------ no clobber


@pytest.fixture(params=["renameat2", "portable"])
def install_path(request, monkeypatch):
    if request.param == "portable":
        monkeypatch.setattr(rename_module, "_RENAMEAT2", None)
    elif rename_module._RENAMEAT2 is None:
        pytest.skip("no renameat2 here")
    return request.param


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_rename_noreplace_never_replaces(tmp_path, install_path, kind):
    src = tmp_path / "src"
    src.mkdir() if kind == "folder" else src.write_text("new")
    for existing in ("file", "empty folder"):
        dst = tmp_path / existing
        dst.mkdir() if existing == "empty folder" else dst.write_text("old")
        with pytest.raises(FileExistsError):
            outputs.rename_noreplace(src, dst)
        assert src.exists() and (dst.is_dir() if existing == "empty folder" else dst.read_text() == "old")
    outputs.rename_noreplace(src, tmp_path / "free")
    assert not src.exists() and (tmp_path / "free").exists()


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_two_racing_installs_one_wins(tmp_path, install_path, kind, monkeypatch):
    target = tmp_path / "out"
    barrier = threading.Barrier(2)
    results: dict[int, object] = {}
    rename, at_rename = outputs.rename_noreplace, threading.Barrier(2, timeout=5)

    def in_step(src, dst):  # both runs have found the target absent: now they rename at once
        at_rename.wait()
        rename(src, dst)

    monkeypatch.setattr(outputs, "rename_noreplace", in_step)

    def run(i: int) -> None:
        try:
            with OutputTransaction() as txn:
                tmp = txn.stage(target)  # both pass the start-time check: nothing is there yet
                if kind == "folder":
                    tmp.mkdir()
                    (tmp / "adapter_model.safetensors").write_text(str(i))
                else:
                    tmp.write_text(str(i))
                barrier.wait()
            results[i] = "ok"
        except OutputExists as exc:
            results[i] = exc

    for _ in range(20):
        shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert sorted(map(str, results.values()))[1] == "ok", results
        loser = next(v for v in results.values() if v != "ok")
        assert str(loser) == f"{target} exists: pass --force to overwrite it or choose another -o"
        winner = next(i for i, v in results.items() if v == "ok")
        got = (target / "adapter_model.safetensors") if kind == "folder" else target
        assert got.read_text() == str(winner)
        assert _tmps(tmp_path) == []


def test_an_output_that_appears_late_is_not_replaced(tmp_path, install_path):
    target = tmp_path / "out"
    with pytest.raises(OutputExists, match="out exists: pass --force"):
        with atomic_output(target) as tmp:
            tmp.write_text("ours")
            target.mkdir()  # another program made it meanwhile (an empty folder: rename() alone would replace it)
    assert target.is_dir() and list(target.iterdir()) == [] and _tmps(tmp_path) == []


# ------------------------------------------------------------------------------------ all or nothing


def test_a_failing_second_output_installs_neither(tmp_path):
    with pytest.raises(ValueError, match="report"):
        with OutputTransaction() as txn:
            save_adapter(_adapter(), tmp_path / "new" / "adapter", transaction=txn)
            txn.stage(tmp_path / "new" / "report.json")
            raise ValueError("report could not be rendered")
    assert list(tmp_path.iterdir()) == []  # the parent made for them is gone too


def test_a_failed_install_rolls_back_the_ones_before(tmp_path):
    first, second = tmp_path / "adapter", tmp_path / "report.json"
    save_adapter(_adapter(), first)
    before = _tree(first)
    with pytest.raises(OutputError, match="holds 1 entry, e.g. mine.txt"):
        with OutputTransaction(force=True) as txn:
            tmp = txn.stage(first)
            tmp.mkdir()
            (tmp / "adapter_config.json").write_text("new")
            txn.stage(second).write_text("{}")
            second.mkdir()  # appears before the install: a folder of someone else's
            (second / "mine.txt").write_text("mine")
    assert _tree(first) == before  # replaced, then put back
    assert (second / "mine.txt").read_text() == "mine" and _tmps(tmp_path) == []


def test_two_outputs_may_not_overlap(tmp_path):
    with pytest.raises(UsageError, match="two outputs of one run overlap"):
        with OutputTransaction() as txn:
            txn.stage(tmp_path / "out")
            txn.stage(tmp_path / "out" / "report.json")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------ names and errors


def test_a_250_byte_name_works_and_its_temporaries_are_recognised(tmp_path):
    name = "é" * 100 + "x" * 38 + ".safetensors"  # 250 bytes
    assert len(name.encode()) == 250
    target = tmp_path / name
    stale = tmp_path / temp_path(target).name.replace(f"-{os.getpid()}-", f"-{_dead_pid()}-")
    stale.write_text("left by a killed run")
    with atomic_output(target) as tmp:
        assert len(os.fsencode(tmp.name)) <= 255
        tmp.write_text("ok")
    assert target.read_text() == "ok" and _tmps(tmp_path) == []


def test_an_output_set_aside_by_a_killed_run_is_put_back(tmp_path):
    target = tmp_path / "out"
    aside = tmp_path / temp_path(target, "-old").name.replace(f"-{os.getpid()}-", f"-{_dead_pid()}-")
    aside.write_text("the previous output")  # killed between the two renames of a --force install
    with pytest.raises(OutputExists):
        with atomic_output(target) as tmp:
            tmp.write_text("new")
    assert target.read_text() == "the previous output" and _tmps(tmp_path) == []


def test_errors_name_the_output_that_failed_and_survive_a_failing_cleanup(tmp_path, monkeypatch):
    monkeypatch.setattr(outputs.shutil, "rmtree", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EBUSY, "busy")))
    with pytest.raises(OutputError, match=r"could not write .*second\.csv: Read-only file system: choose another"):
        with OutputTransaction() as txn:
            txn.stage(tmp_path / "first.json").write_text("{}")
            tmp = txn.stage(tmp_path / "second.csv")
            txn.stage(tmp_path / "third")
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(tmp))


def test_disk_full_names_the_file_inside_a_folder_output(tmp_path):
    with pytest.raises(OutputError, match=r"could not write .*model/shard\.bin: disk full"):
        with atomic_output(tmp_path / "model") as tmp:
            tmp.mkdir()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp / "shard.bin"))
    assert list(tmp_path.iterdir()) == []


def test_an_input_read_error_is_not_called_a_write_error(tmp_path):
    with pytest.raises(PermissionError):
        with atomic_output(tmp_path / "out") as tmp:
            tmp.write_text("x")
            raise PermissionError(errno.EACCES, "Permission denied", "/some/input.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_read_only_folder(tmp_path):
    with pytest.raises(OutputError, match=r"could not write /proc/lrt-out\.json: .*choose another"):
        with atomic_output(Path("/proc/lrt-out.json")) as tmp:
            tmp.write_text("{}")


def test_apply_records_exact_changes(tmp_path):
    from lowrank_tools.apply import apply
    from lowrank_tools.apply_report import apply_report_json
    from safetensors.torch import save_file

    save_file({"layer.weight": torch.full((4, 4), 2.0), "zero.weight": torch.zeros(4, 4),
               "norm.weight": torch.ones(4)}, str(tmp_path / "base.safetensors"))
    mods = {"layer": LoraModule(B=torch.ones(4, 1), A=torch.ones(1, 4), alpha=1.0),
            "zero": LoraModule(B=torch.ones(4, 1), A=torch.ones(1, 4), alpha=1.0)}
    result = apply(tmp_path / "base.safetensors", [(Adapter(modules=mods), 0.5)], tmp_path / "out.safetensors",
                   measure=True)
    records = {r["tensor"]: r for r in json.loads(apply_report_json(result))["changed"]}
    assert set(records) == {"layer.weight", "zero.weight"}
    layer = records["layer.weight"]
    assert layer["modules"] == ["layer"] and layer["max_abs_delta"] == 0.5
    assert layer["delta_norm"] == pytest.approx(2.0) and layer["relative_change"] == pytest.approx(0.25)
    assert records["zero.weight"]["relative_change"] is None and "all zeros" in records["zero.weight"]["note"]
    import csv
    import io

    from lowrank_tools.apply_report import apply_report_csv

    rows = list(csv.DictReader(io.StringIO(apply_report_csv(result))))
    assert [r["tensor"] for r in rows] == ["layer.weight", "zero.weight"]
    assert rows[0]["relative_change"] == "0.25" and rows[1]["relative_change"] == "" and rows[0]["modules"] == "layer"


def test_an_interrupt_during_the_installs_restores_everything(tmp_path, monkeypatch):
    first, second = tmp_path / "out.safetensors", tmp_path / "report.json"
    first.write_text("previous")
    install, calls = outputs._install, []

    def interrupted_second(tmp, target, *, force):
        calls.append(target)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C / SIGTERM between two installs
        return install(tmp, target, force=force)

    monkeypatch.setattr(outputs, "_install", interrupted_second)
    with pytest.raises(KeyboardInterrupt):
        with OutputTransaction(force=True) as txn:
            txn.stage(first).write_text("new")
            txn.stage(second).write_text("{}")
    assert first.read_text() == "previous" and not second.exists() and _tmps(tmp_path) == []


def test_sigterm_becomes_an_exception_and_an_ignored_sighup_stays_ignored():
    import signal

    from lowrank_tools.cli.group import Interrupted, _signals_unwind

    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as nohup leaves it
    try:
        with pytest.raises(Interrupted) as caught:
            with _signals_unwind():
                assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
                os.kill(os.getpid(), signal.SIGTERM)
                for _ in range(100):  # the handler runs at the next bytecode boundary
                    pass
        assert caught.value.signum == signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored
    finally:
        signal.signal(signal.SIGHUP, previous)
