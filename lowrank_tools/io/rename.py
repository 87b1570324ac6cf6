"""Rename without replacing: the one step that makes an output install no-clobber (two runs racing for one ``-o``:
exactly one wins). ``renameat2(RENAME_NOREPLACE)`` through ctypes where Linux and the file system have it, else a
portable fallback."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import sys
from pathlib import Path

__all__ = ["rename_noreplace"]


def _renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_RENAMEAT2 = _renameat2()
_AT_FDCWD, _RENAME_NOREPLACE = -100, 1


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst`` unless ``dst`` exists (:class:`FileExistsError`), atomically.

    ``renameat2(RENAME_NOREPLACE)`` where the kernel and file system have it; else a file is hard-linked then
    unlinked (``link`` fails if ``dst`` exists) and a folder claims ``dst`` with ``mkdir`` then renames onto its own
    empty folder. Only where neither works (no hard links) is it a check then a rename."""
    if _RENAMEAT2 is not None:
        if _RENAMEAT2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise OSError(code, os.strerror(code), str(dst))
    if os.path.isdir(src) and not os.path.islink(src):
        os.mkdir(dst)  # the claim: FileExistsError if taken
        try:
            os.rename(src, dst)  # onto our own empty folder
        except BaseException:
            with contextlib.suppress(OSError):
                os.rmdir(dst)
            raise
        return
    try:
        os.link(src, dst, follow_symlinks=False)
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        if os.path.lexists(dst):  # a file system without hard links: the best it allows
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst)) from None
        os.rename(src, dst)
        return
    os.unlink(src)
