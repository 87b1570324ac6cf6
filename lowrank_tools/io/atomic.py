"""Atomic writing: temporary name beside the target, renamed into place at the end.

:func:`atomic_output` guards every write (a failure or Ctrl-C leaves no half-written output and never touches the
inputs); :class:`ShardedWriter` streams a full checkpoint into safetensors files, holding one tensor in memory at a
time; :func:`parse_size` reads ``--shard-size`` values. The safetensors format (shared with the reader in
``safetensors_io``): 8 bytes little-endian header length N, N bytes of JSON header, then the tensor bytes.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import secrets
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from ..errors import InvalidOption, OutputError, OutputExists, UnsupportedTensor
from .safetensors import DTYPE_NAMES as _DTYPE_NAMES
from .safetensors import SAFETENSORS_DTYPES  # re-exported: the table lives with the reader

__all__ = ["atomic_output", "check_output", "parse_size", "ShardedWriter", "SAFETENSORS_DTYPES", "header_bound",
           "write_safetensors"]

_TMP_MARK = ".lrt-tmp-"
_DISK_FULL = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}
_SIZE_UNITS = {
    "": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}


def parse_size(text: str | int) -> int:
    """Bytes in a size written like transformers' ``max_shard_size``.

    ``"5GB"`` = 5 * 10**9, ``"500MiB"`` = 500 * 2**20, ``"100KB"``, ``"2GiB"``, ``"1.5GB"`` or a
    plain byte count. Units are case-insensitive (unlike transformers, ``"5Gb"`` is not bits).
    """
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([kmgt]i?b|b)?\s*", str(text), re.IGNORECASE)
        if match is None:
            raise InvalidOption(f"size {text!r} is not a size: write e.g. 5GB, 500MiB or a byte count")
        value = int(float(match.group(1)) * _SIZE_UNITS[(match.group(2) or "").lower()])
    if value <= 0:
        raise InvalidOption(f"size {text!r} is not positive: give at least one byte, e.g. 5GB")
    return value


# ---------------------------------------------------------------------------- atomic_output


@contextlib.contextmanager
def atomic_output(target: str | os.PathLike, *, force: bool = False,
                  inputs: Sequence[str | os.PathLike] = ()) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success rename it into place.

    The body writes a file or a folder at the yielded path. On any exception (Ctrl-C too) the temporary, and any
    parent folders created for it, are removed and the exception re-raised; a full disk becomes
    :class:`OutputError`. With ``force`` an existing target (file or folder) is replaced.
    """
    target = Path(target)
    check_output(target, force=force, inputs=inputs)
    created = _make_parent(target.parent)
    tmp = target.parent / f".{target.name}{_TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}"
    try:
        _check_writable(target.parent)
        _remove_stale(target)
        yield tmp
        _install(tmp, target)
    except BaseException as exc:
        _remove(tmp)
        for folder in reversed(created):
            with contextlib.suppress(OSError):
                folder.rmdir()
        code = _os_error(exc)
        if code in _DISK_FULL:
            message = f"could not write {target}: disk full ({os.strerror(code)}): free space or choose another -o"
            raise OutputError(message) from exc
        if code in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise OutputError(f"could not write {target}: {os.strerror(code)}: choose another -o") from exc
        raise


def _os_error(exc: BaseException) -> int | None:
    """The errno of a failed write: an OSError's, or the one safetensors' (Rust) writer quotes in its message
    ("I/O error: File too large (os error 27)"); None for anything else."""
    if isinstance(exc, OSError):
        return exc.errno
    found = re.search(r"\(os error (\d+)\)", str(exc)) if type(exc).__name__ == "SafetensorError" else None
    return int(found.group(1)) if found else None


def check_output(target: str | os.PathLike, *, force: bool = False, inputs: Sequence[str | os.PathLike] = ()) -> None:
    """Fail early, before any work, if ``target`` is an input or exists without ``force``."""
    target = Path(target)
    out = target.resolve()
    for item in inputs:
        src = Path(item).resolve()
        if out == src or out.is_relative_to(src) or src.is_relative_to(out):
            raise OutputError(f"output {target} is also an input ({item}): choose another -o")
    if (target.exists() or target.is_symlink()) and not force:
        raise OutputExists(f"{target} exists: pass --force to overwrite it or choose another -o")


def _make_parent(parent: Path) -> list[Path]:
    """Create ``parent`` if missing; return the folders created, outermost first."""
    missing = [p for p in [parent, *parent.parents] if not p.exists()][::-1]
    blocking = next((p for p in [parent, *parent.parents] if p.exists() and not p.is_dir()), None)
    if blocking is not None:  # mkdir would only say "File exists"
        raise OutputError(f"cannot create output folder {parent}: {blocking} is a file, not a folder: choose "
                          f"another -o")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create output folder {parent}: {exc.strerror}: choose another -o") from exc
    return missing


def _check_writable(parent: Path) -> None:
    if not parent.is_dir():
        raise OutputError(f"output folder {parent} is not a folder: choose another -o")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"output folder {parent} is not writable: choose another -o")


def _remove_stale(target: Path) -> None:
    """Delete temporaries of this target left by runs that were killed (their pid is gone)."""
    prefix = f".{target.name}{_TMP_MARK}"
    for entry in target.parent.iterdir():
        if not entry.name.startswith(prefix):
            continue
        pid = entry.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
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


def _install(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` to ``target``; an existing target (file or folder) is replaced."""
    if not (tmp.exists() or tmp.is_symlink()):
        raise OutputError(f"nothing was written for {target}: the writer produced no output")
    both_files = not tmp.is_dir() and not (target.is_dir() and not target.is_symlink())
    if both_files or not target.exists():
        os.replace(tmp, target)  # atomic for files, and for a folder onto nothing
        return
    aside = tmp.with_name(f"{tmp.name}-old")
    os.replace(target, aside)
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(aside, target)
        raise
    _remove(aside)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


# ---------------------------------------------------------------------------- writers


def _tensor_bytes(name: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor]:
    """The safetensors dtype string and the raw little-endian bytes of ``tensor`` (1-d uint8)."""
    if tensor.dtype not in _DTYPE_NAMES or tensor.is_sparse or tensor.is_quantized:
        raise UnsupportedTensor(f"tensor {name!r} has dtype {tensor.dtype} (layout {tensor.layout}) that safetensors "
                                "cannot hold: convert it to a dense float or int tensor")
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return _DTYPE_NAMES[tensor.dtype], flat.view(torch.uint8)


class _SafetensorsStream:
    """One safetensors file written tensor by tensor.

    Tensors are kept in memory until ``spill_bytes`` accumulate; then the data goes straight to disk after a header
    area reserved (spaces, which the format allows) from the header size so far. If the final header outgrows that
    area, the data is shifted once. A ``header_reserve`` (an upper bound of the final header, from a caller that
    knows every name and shape) is reserved at once and nothing is kept in memory.
    """

    def __init__(self, path: Path, metadata: dict[str, str], *, spill_bytes: int = 64 * 2**20,
                 header_reserve: int = 0):
        self.path = path
        self.nbytes = 0
        self._header: dict[str, dict] = {"__metadata__": metadata}
        self._pending: list[torch.Tensor] = []
        self._spill = 0 if header_reserve else spill_bytes
        self._header_reserve = header_reserve
        self._file = None
        self._reserved = 0

    def __len__(self) -> int:
        return len(self._header) - 1

    def add(self, name: str, tensor: torch.Tensor) -> None:
        dtype, data = _tensor_bytes(name, tensor)
        end = self.nbytes + data.numel()
        self._header[name] = {"dtype": dtype, "shape": list(tensor.shape), "data_offsets": [self.nbytes, end]}
        self.nbytes = end
        if self._file is not None:
            self._file.write(data.numpy().data)
            return
        self._pending.append(data)
        if self.nbytes >= self._spill:
            self._reserved = _round8(max(4 * len(self._header_bytes()) + 4096, self._header_reserve))
            self._file = open(self.path, "w+b")  # noqa: SIM115 (closed in close/abort)
            self._file.seek(8 + self._reserved)
            self._flush_pending()

    def close(self) -> None:
        header = self._header_bytes()
        if self._file is None:
            with open(self.path, "wb") as file:
                self._file = file
                file.write(_header_block(header, len(header)))
                self._flush_pending()
            self._file = None
            return
        with self._file as file:
            if len(header) > self._reserved:
                _shift(file, 8 + self._reserved, self.nbytes, _round8(len(header)) - self._reserved)
                self._reserved = _round8(len(header))
            file.seek(0)
            file.write(_header_block(header, self._reserved))
        self._file = None

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._pending.clear()

    def _flush_pending(self) -> None:
        for data in self._pending:
            self._file.write(data.numpy().data)
        self._pending.clear()

    def _header_bytes(self) -> bytes:
        return json.dumps(self._header, separators=(",", ":")).encode()


def _round8(n: int) -> int:
    return (n + 7) // 8 * 8


def _header_block(header: bytes, size: int) -> bytes:
    """Length prefix + header padded with spaces to ``size`` (at least 8-aligned)."""
    size = _round8(max(size, len(header)))
    return size.to_bytes(8, "little") + header + b" " * (size - len(header))


def _shift(file, start: int, length: int, delta: int, chunk: int = 64 * 2**20) -> None:
    """Move ``length`` bytes at ``start`` forward by ``delta``, last chunk first."""
    pos = start + length
    while pos > start:
        size = min(chunk, pos - start)
        file.seek(pos - size)
        data = file.read(size)
        file.seek(pos - size + delta)
        file.write(data)
        pos -= size


class ShardedWriter:
    """Stream tensors into one safetensors file, or into transformers-style shards.

    With ``shard_size=None`` ``path`` becomes a single ``.safetensors`` file. Otherwise ``path`` becomes a folder of
    ``model-00001-of-0000N.safetensors`` shards plus ``model.safetensors.index.json`` (a single shard is just
    ``model.safetensors``). A shard closes when the next tensor would take it past ``shard_size``; a tensor larger
    than ``shard_size`` gets a shard of its own. Every file carries ``{"format": "pt"}`` plus ``metadata``. Use it
    at the path yielded by :func:`atomic_output`. ``header_reserve``: an upper bound (bytes) of any file's JSON
    header, for callers that know every name and shape in advance: each tensor then goes straight to disk and no
    file is shifted when closed (see :func:`header_bound`).
    """

    def __init__(self, path: Path, *, shard_size: int | None, metadata: dict | None = None, header_reserve: int = 0):
        self.path = Path(path)
        self.header_reserve = int(header_reserve)
        self.shard_size = shard_size
        self.metadata = {"format": "pt", **_check_metadata(metadata or {})}
        self._names: set[str] = set()
        self._shards: list[_SafetensorsStream] = []
        self._weight_map: dict[str, int] = {}
        self._written: list[Path] | None = None  # set by close()
        if shard_size is not None:
            if shard_size <= 0:
                raise InvalidOption(f"shard size {shard_size} is not positive: give e.g. 5GB")
            self.path.mkdir(parents=True, exist_ok=False)

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            for shard in self._shards:
                shard.abort()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Append one tensor (copied to CPU, contiguous) to the current shard."""
        if self._written is not None:
            raise ValueError(f"cannot add {name!r}: the writer for {self.path} is closed")
        if name in self._names:
            raise ValueError(f"tensor {name!r} was already added to {self.path}")
        size = tensor.numel() * tensor.element_size()
        current = self._shards[-1] if self._shards else None
        full = (self.shard_size is not None and current is not None and len(current) > 0
                and current.nbytes + size > self.shard_size)
        if current is None or full:
            if current is not None:
                current.close()
            current = _SafetensorsStream(self._shard_path(len(self._shards)), self.metadata,
                                         header_reserve=self.header_reserve)
            self._shards.append(current)
        current.add(name, tensor)
        self._names.add(name)
        self._weight_map[name] = len(self._shards) - 1

    def close(self) -> list[Path]:
        """Finish every file; return the paths written (shards, then the index if any). Idempotent."""
        if self._written is None:
            self._written = self._finish()
        return list(self._written)

    def _finish(self) -> list[Path]:
        if not self._shards:
            self._shards.append(_SafetensorsStream(self._shard_path(0), self.metadata,
                                                   header_reserve=self.header_reserve))
        self._shards[-1].close()
        if self.shard_size is None:
            return [self.path]
        count = len(self._shards)
        if count == 1:
            final = [self.path / "model.safetensors"]
        else:
            final = [self.path / f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        for shard, path in zip(self._shards, final):
            os.replace(shard.path, path)
        if count == 1:
            return final
        index = {"metadata": {"total_size": sum(s.nbytes for s in self._shards)},
                 "weight_map": {name: final[i].name for name, i in self._weight_map.items()}}
        index_path = self.path / "model.safetensors.index.json"
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return [*final, index_path]

    def _shard_path(self, i: int) -> Path:
        if self.shard_size is None:
            return self.path
        return self.path / f".shard-{i + 1:05d}.safetensors.part"


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, *,
                      metadata: dict[str, str] | None = None) -> None:
    """One safetensors file whose bytes depend on its content only: tensors and metadata in sorted key order.

    ``safetensors.torch.save_file`` writes metadata in a per-process random hash order, so two runs (or the
    distributed and single-process extracts) would differ in the header whenever there are two keys or more."""
    with ShardedWriter(Path(path), shard_size=None, metadata=dict(sorted((metadata or {}).items()))) as writer:
        for name in sorted(tensors):
            writer.add(name, tensors[name])


def header_bound(entries: Sequence[tuple[str, torch.dtype, Sequence[int]]], metadata: dict | None = None) -> int:
    """An upper bound (bytes) of the safetensors JSON header of a file holding some or all of ``entries``
    ``(name, dtype, shape)``: for :class:`ShardedWriter`'s ``header_reserve``."""
    offsets = len(str(sum(math.prod(shape) * dtype.itemsize for _, dtype, shape in entries)))  # largest offset's digits
    body = sum(len(json.dumps(name)) + len(json.dumps(list(shape))) + 2 * offsets + 64 for name, _, shape in entries)
    return _round8(body + len(json.dumps({"format": "pt", **(metadata or {})})) + 64)


def _check_metadata(metadata: dict) -> dict[str, str]:
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ValueError(f"safetensors metadata must map str to str, got {key!r}: {value!r}")
    return dict(metadata)
