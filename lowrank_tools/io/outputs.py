"""Installing outputs: a temporary beside each target, installed no-clobber, all outputs of a run or none.

:class:`OutputTransaction` stages every output of one run (the adapter or model, ``--report``, analyze's JSON, CSV
and plots) under a temporary name beside its target and installs them together when the run succeeds; a failure,
Ctrl-C or SIGTERM removes the temporaries, and an install that fails part-way rolls back the outputs already
installed (a replaced previous output is put back). :func:`atomic_output` is a one-output transaction.

The rules (the README's "Output guarantees" says them to users):

- No clobber without ``--force``: the final install is ``renameat2(RENAME_NOREPLACE)`` where the kernel has it, else
  ``link()`` + ``unlink()`` for a file and ``mkdir()`` + ``rename()`` for a folder; an output that appeared after
  the start-time check is never replaced, and of two runs racing for one name exactly one wins.
- ``--force`` replaces only a file, a symbolic link (the link, never what it points to), an empty folder, or a
  folder every entry of which is a name lowrank-tools writes (:mod:`lowrank_tools.replaceable`). The current
  folder, one of its parents, the home folder and ``/`` are never outputs, with or without ``--force``.
- Temporaries are ``.<name><MARK><pid>-<hex>`` (a long name is shortened to a prefix and a hash, so the temporary
  fits the 255-byte name limit); a later run to the same target removes those of runs that were killed.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import OutputError, OutputExists, UsageError
from .rename import rename_noreplace
from .replaceable import check_replaceable, foreign_entries

__all__ = ["OutputTransaction", "atomic_output", "check_output", "check_replaceable", "foreign_entries", "temp_path",
           "rename_noreplace", "TMP_MARK", "write_files", "rendered"]

TMP_MARK = ".lrt-tmp-"
_OLD = "-old"  # suffix of a replaced output kept aside until the run commits
_KEY_BYTES = 120  # longer target names are cut to 100 bytes + "~" + 12 hex digits in temporaries
_DISK_FULL = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}
_CANNOT_WRITE = {errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOENT, errno.ENOTDIR, errno.EISDIR,
                 errno.ENAMETOOLONG, errno.EXDEV, errno.EIO, errno.EINVAL}


# ---------------------------------------------------------------------------------------------- checks


def check_output(target: str | os.PathLike, *, force: bool = False, inputs: Sequence[str | os.PathLike] = ()) -> None:
    """Fail early, before any work: ``target`` is a protected folder, an input, exists without ``force``, or
    exists and is not something ``force`` may replace."""
    target = Path(target)
    _refuse_protected(target)
    out = target.resolve()
    for item in inputs:
        src = Path(item).resolve()
        if out == src or out.is_relative_to(src) or src.is_relative_to(out):
            raise OutputError(f"output {target} is also an input ({item}): choose another -o")
    if _exists(target):
        if not force:
            raise OutputExists(f"{target} exists: pass --force to overwrite it or choose another -o")
        check_replaceable(target)


def _refuse_protected(target: Path) -> None:
    resolved = target.resolve()
    try:
        cwd = Path.cwd().resolve()
    except OSError:  # the current folder was deleted
        cwd = Path(resolved.anchor) / "\0"
    if resolved == Path(resolved.anchor):
        what = "the root folder"
    elif cwd.is_relative_to(resolved):
        what = "the current folder" if resolved == cwd else "a parent of the current folder"
    elif resolved == Path.home().resolve():
        what = "your home folder"
    else:
        return
    raise OutputError(f"output {target} is {what}: lowrank-tools never writes over it, even with --force: give a new "
                      f"name, e.g. {target / 'out'}")


def _exists(path: Path) -> bool:
    return os.path.lexists(path)


# ---------------------------------------------------------------------------------------------- temporaries


def _key(name: str) -> str:
    """``name``, or for a long one its first 100 bytes + ``~`` + a hash: temporaries stay under 255 bytes."""
    raw = os.fsencode(name)
    if len(raw) <= _KEY_BYTES:
        return name
    return os.fsdecode(raw[:100]) + "~" + hashlib.sha256(raw).hexdigest()[:12]


def temp_path(target: Path, suffix: str = "") -> Path:
    """A fresh temporary name beside ``target`` that :func:`_remove_stale` recognises as ``target``'s."""
    return target.parent / f".{_key(target.name)}{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}{suffix}"


def _remove_stale(target: Path) -> None:
    """Clean up after runs to ``target`` that were killed (their pid is gone): temporaries are deleted; a previous
    output set aside and not yet replaced (the run died between the two renames) is put back."""
    prefix = f".{_key(target.name)}{TMP_MARK}"
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return
    for entry in entries:
        if not entry.name.startswith(prefix):
            continue
        pid = entry.name[len(prefix):].split("-", 1)[0]
        if not pid.isdigit() or _pid_alive(int(pid)):
            continue
        if entry.name.endswith(_OLD) and not _exists(target):
            with contextlib.suppress(OSError):
                os.rename(entry, target)
                continue
        _remove(entry)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists but belongs to someone else, or we cannot tell: keep it
    return True


def _remove(path: Path) -> None:
    """Best effort: cleaning up must never hide the error that made us clean up."""
    with contextlib.suppress(OSError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink()


# ---------------------------------------------------------------------------------------------- install


def _install(tmp: Path, target: Path, *, force: bool) -> Path | None:
    """Install ``tmp`` as ``target``; return where a replaced previous output was set aside (None: nothing
    replaced). Never replaces without ``force``, nor with it anything :func:`check_replaceable` refuses."""
    if not _exists(tmp):
        raise OutputError(f"nothing was written for {target}: the writer produced no output")
    if not _exists(target):
        with contextlib.suppress(FileExistsError):
            rename_noreplace(tmp, target)
            return None
    if not force:
        raise OutputExists(f"{target} exists: pass --force to overwrite it or choose another -o")
    check_replaceable(target)  # again: it may have changed since the start
    aside = temp_path(target, _OLD)
    if not os.path.isdir(tmp) and not os.path.isdir(target):
        with contextlib.suppress(OSError):  # a file over a file: keep the old one aside by a link, swap atomically
            os.link(target, aside, follow_symlinks=False)
            os.replace(tmp, target)
            return aside
        _remove(aside)
    os.rename(target, aside)
    try:
        rename_noreplace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.rename(aside, target)
        raise
    return aside


def _uninstall(target: Path, aside: Path | None) -> None:
    """Undo :func:`_install`: remove the new output, put the previous one back."""
    _remove(target)
    if aside is not None:
        with contextlib.suppress(OSError):
            os.rename(aside, target)


# ---------------------------------------------------------------------------------------------- transaction


@dataclass
class _Staged:
    target: Path
    tmp: Path
    created: list[Path]  # parent folders made for it, outermost first
    aside: Path | None = None
    installed: bool = False


@dataclass
class OutputTransaction:
    """The outputs of one run: each :meth:`stage` returns a temporary path to write; leaving the ``with`` block
    normally installs them all (no-clobber unless ``force``), in the order staged; an exception removes every
    temporary, and an install that fails rolls back those already done. Errors name the output that failed.

    ``inputs``: paths no output may overwrite or lie in."""

    force: bool = False
    inputs: Sequence[str | os.PathLike] = ()
    _staged: list[_Staged] = field(default_factory=list, init=False, repr=False)
    _current: _Staged | None = field(default=None, init=False, repr=False)

    def __enter__(self) -> OutputTransaction:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self.commit()
            except BaseException:  # a signal anywhere in it, even before its own clean-up could start
                self.abort()
                raise
            return
        error = _as_output_error(exc, self._staged, self._current)
        self.abort()
        if error is not None:
            raise error from exc

    def stage(self, target: str | os.PathLike, *, inputs: Sequence[str | os.PathLike] = ()) -> Path:
        """Check ``target`` and return its temporary path (nothing is created there)."""
        target = Path(target)
        for other in self._staged:
            a, b = target.resolve(), other.target.resolve()
            if a == b or a.is_relative_to(b) or b.is_relative_to(a):
                raise UsageError(f"two outputs of one run overlap ({other.target} and {target}): give each its own")
        if target.parent.is_dir() and os.access(target.parent, os.W_OK | os.X_OK):
            _remove_stale(target)  # first: an output a killed run had set aside is put back, then checked
        check_output(target, force=self.force, inputs=[*self.inputs, *inputs])
        created = _make_parent(target.parent)
        staged = _Staged(target, temp_path(target), created)
        self._staged.append(staged)
        self._current = staged
        _check_writable(target.parent)
        return staged.tmp

    def commit(self) -> list[Path]:
        """Install every staged output; on any failure undo those installed and re-raise. Returns the targets."""
        try:
            for staged in self._staged:
                self._current = staged
                staged.aside = _install(staged.tmp, staged.target, force=self.force)
                staged.installed = True
        except BaseException as exc:
            error = _as_output_error(exc, self._staged, self._current)
            self.abort()
            if error is not None:
                raise error from exc
            raise
        done, asides = [s.target for s in self._staged], [s.aside for s in self._staged if s.aside is not None]
        self._staged.clear()  # committed: from here on nothing is undone (a previous output set aside is gone next)
        for aside in asides:
            _remove(aside)
        return done

    def abort(self) -> None:
        """Remove every temporary; undo the installs done (last first); remove the parent folders made."""
        for staged in reversed(self._staged):
            if staged.installed:
                _uninstall(staged.target, staged.aside)
            _remove(staged.tmp)
            for folder in reversed(staged.created):
                with contextlib.suppress(OSError):
                    folder.rmdir()
        self._staged.clear()


@contextlib.contextmanager
def atomic_output(target: str | os.PathLike, *, force: bool = False, inputs: Sequence[str | os.PathLike] = (),
                  transaction: OutputTransaction | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``target`` to write a file or a folder at; on success install it.

    With ``transaction`` the output joins it and is installed when the transaction commits (its ``force``
    applies; ``inputs`` add to its own). Otherwise it is a transaction of its own: on any exception (Ctrl-C too)
    the temporary, and parent folders made for it, are removed; a full disk or unwritable folder becomes
    :class:`OutputError` naming the path."""
    if transaction is not None:
        yield transaction.stage(target, inputs=inputs)
        return
    with OutputTransaction(force=force, inputs=inputs) as txn:
        yield txn.stage(target)


def rendered(wanted: Iterable[tuple[str | os.PathLike | None, Callable[[], str | bytes]]]) -> dict[Path, bytes]:
    """The files asked for (those whose path is given), each rendered only then: ``{path: bytes}`` for
    :func:`write_files` (``(json_path, lambda: to_json(x))`` pairs; text is UTF-8 encoded)."""
    files = {}
    for path, render in wanted:
        if path is not None:
            data = render()
            files[Path(path)] = data.encode() if isinstance(data, str) else data
    return files


def write_files(files: Mapping[Path, bytes], *, force: bool = False, inputs: Sequence[str | os.PathLike] = (),
                transaction: OutputTransaction | None = None) -> list[Path]:
    """Write files rendered in memory (reports, plots) all or nothing: each under a temporary name, installed when
    every one is written (with ``transaction``: when it commits, with the run's other outputs). Returns the targets."""
    with contextlib.ExitStack() as stack:
        txn = transaction or stack.enter_context(OutputTransaction(force=force, inputs=inputs))
        for target, data in files.items():
            txn.stage(target, inputs=inputs).write_bytes(data)
    return list(files)


def _make_parent(parent: Path) -> list[Path]:
    """Create ``parent`` if missing; return the folders created, outermost first."""
    missing = [p for p in [parent, *parent.parents] if not _exists(p)][::-1]
    blocking = next((p for p in [parent, *parent.parents] if _exists(p) and not p.is_dir()), None)
    if blocking is not None:  # mkdir would only say "File exists"
        raise OutputError(f"cannot create output folder {parent}: {blocking} is a file, not a folder: choose "
                          f"another -o")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create output folder {exc.filename or parent}: {exc.strerror}: choose another "
                          f"-o") from exc
    return missing


def _check_writable(parent: Path) -> None:
    if not parent.is_dir():
        raise OutputError(f"output folder {parent} is not a folder: choose another -o")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"output folder {parent} is not writable: choose another -o")


# ---------------------------------------------------------------------------------------------- errors


def _os_error(exc: BaseException) -> int | None:
    """The errno of a failed write: an OSError's, or the one safetensors' (Rust) writer quotes in its message
    ("I/O error: File too large (os error 27)"); None for anything else."""
    if isinstance(exc, OSError):
        return exc.errno
    found = re.search(r"\(os error (\d+)\)", str(exc)) if type(exc).__name__ == "SafetensorError" else None
    return int(found.group(1)) if found else None


def _failed_path(exc: BaseException, staged: Sequence[_Staged], current: _Staged | None) -> Path | None:
    """The output a write error is about: the error's own file name mapped from a temporary to its target, else
    the output being written; None when the error names a file that is none of ours (an input)."""
    name = getattr(exc, "filename", None)
    if name is None:
        return current.target if current is not None else None
    path = Path(os.fsdecode(name))
    for s in staged:
        for own, shown in ((s.tmp, s.target), (s.aside, s.target), (s.target, s.target)):
            if own is not None and (path == own or path.is_relative_to(own)):
                return shown / path.relative_to(own)
        if path == s.target.parent:
            return path
    return None


def _as_output_error(exc: BaseException, staged: Sequence[_Staged], current: _Staged | None) -> OutputError | None:
    code = _os_error(exc)
    if code is None or isinstance(exc, (OutputError, OutputExists)):
        return None
    path = _failed_path(exc, staged, current)
    if path is None:
        return None
    if code in _DISK_FULL:
        return OutputError(f"could not write {path}: disk full ({os.strerror(code)}): free space or choose another -o")
    if code in _CANNOT_WRITE:
        return OutputError(f"could not write {path}: {os.strerror(code)}: choose another -o")
    return None
