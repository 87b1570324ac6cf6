"""The safetensors format, read without memory mapping: dtype table, header parsing, per-tensor reading.

A file is 8 bytes little-endian header length N, N bytes of JSON header (``{name: {"dtype", "shape",
"data_offsets": [begin, end]}, "__metadata__": {str: str}}``, offsets relative to the end of the header), then
the tensor bytes. :class:`SafetensorsFile` reads and validates the header at open (every entry's dtype, shape
and span, and that the spans tile the data section exactly, as the reference library requires) and reads one
tensor's bytes into a fresh buffer on demand, so memory stays flat and no file handle is held between calls. The
host is assumed little-endian, as the format is. Writing lives in :mod:`lowrank_tools.io.atomic`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CorruptCheckpoint, UnsupportedTensor
from .json_input import get_str_map, load_json, type_name

__all__ = ["SAFETENSORS_DTYPES", "DTYPE_NAMES", "SafetensorsFile", "parse_header"]

#: safetensors dtype strings and the torch dtypes they map to (both directions are unique).
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, attr)
    for name, attr in [
        ("F64", "float64"), ("F32", "float32"), ("F16", "float16"), ("BF16", "bfloat16"),
        ("I64", "int64"), ("I32", "int32"), ("I16", "int16"), ("I8", "int8"),
        ("U64", "uint64"), ("U32", "uint32"), ("U16", "uint16"), ("U8", "uint8"),
        ("BOOL", "bool"), ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"),
    ]
    if hasattr(torch, attr)  # uint16/32/64 and float8 need newer torch
}
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}

_MAX_HEADER = 100_000_000  # the limit safetensors itself enforces
_INT64_MAX = 2**63 - 1  # torch sizes are int64
_FIX = "re-download or re-save it"


@dataclass(frozen=True)
class Entry:
    """Where one tensor lies in its file."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute offset of the first byte in the file
    nbytes: int


class SafetensorsFile:
    """A safetensors file: header parsed and checked at open, each tensor read on demand."""

    def __init__(self, path: Path):
        self.path = path
        self.entries, self.metadata = parse_header(path)

    def names(self) -> list[str]:
        return list(self.entries)

    def info(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        entry = self.entries[name]
        return entry.dtype, entry.shape

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor, CPU, contiguous, in a buffer of its own; or in the first bytes of ``out`` (a 1-D uint8 CPU
        tensor) when it is large enough: a reused buffer spares a page fault per 4 KiB page of a fresh one."""
        entry = self.entries[name]
        if out is not None and out.dtype == torch.uint8 and out.ndim == 1 and out.numel() >= entry.nbytes:
            buffer = out[:entry.nbytes]
        else:
            buffer = torch.empty(entry.nbytes, dtype=torch.uint8)
        got = 0
        if entry.nbytes:
            with open(self.path, "rb") as file:
                file.seek(entry.start)
                got = file.readinto(memoryview(buffer.numpy()))
        if got != entry.nbytes:
            raise CorruptCheckpoint(f"tensor {name!r} in {self.path}: the file ended after {got} of {entry.nbytes} "
                                    f"bytes (was it changed after opening?): {_FIX}")
        return buffer.view(entry.dtype).reshape(entry.shape)

    def close(self) -> None:
        """Nothing to release: no handle is held between reads."""


def parse_header(path: Path) -> tuple[dict[str, Entry], dict[str, str]]:
    """Read and validate the header of ``path``: ({name: Entry} in file (data offset) order, metadata).

    The rules are the reference library's (``Metadata::validate`` in safetensors' ``tensor.rs``): sorted by their
    ``data_offsets``, the tensors' spans tile the data section exactly (no gap, no overlap, nothing after the last),
    each span holds ``numel * itemsize`` bytes, ``__metadata__`` maps strings to strings. Stricter than it: a key
    that appears twice is refused (the reference keeps the last), and a dimension or element count that does not fit
    torch's int64 is refused. Raises :class:`CorruptCheckpoint` naming the file and tensor, and
    :class:`UnsupportedTensor` for a dtype name this table does not know (e.g. a GGUF-style ``Q4_K``)."""
    size = path.stat().st_size
    with open(path, "rb") as file:
        prefix = file.read(8)
        if len(prefix) < 8:
            what = "is empty (0 bytes)" if not prefix else f"is only {size} bytes long"
            raise CorruptCheckpoint(f"safetensors file {path} {what}: {_FIX}")
        length = int.from_bytes(prefix, "little")
        if length > size - 8 or length > _MAX_HEADER:
            raise CorruptCheckpoint(f"{path}: header length {length} is larger than the file ({size} bytes) or than "
                                    f"{_MAX_HEADER} bytes, so it is truncated or not safetensors: {_FIX}")
        raw = file.read(length)
    header = load_json(raw, what=f"{path}: header", fix=_FIX)
    if not isinstance(header, dict):
        raise CorruptCheckpoint(f"{path}: header is {type_name(header)}, not an object: {_FIX}")
    metadata = get_str_map(header, "__metadata__", f"{path}: header", default={}, error=CorruptCheckpoint)
    entries = {name: _parse_entry(path, name, info, 8 + length) for name, info in header.items()
               if name != "__metadata__"}
    order = sorted(entries, key=lambda n: (entries[n].start, entries[n].start + entries[n].nbytes))
    _check_spans(path, entries, order, 8 + length, size)
    return {name: entries[name] for name in order}, dict(metadata)


def _check_spans(path: Path, entries: dict[str, Entry], order: list[str], data_start: int, size: int) -> None:
    """The spans, in offset order, must tile [data_start, size) exactly (the reference's InvalidOffset and
    MetadataIncompleteBuffer)."""
    at = data_start
    for name in order:
        entry = entries[name]
        if entry.start != at:
            what = "overlaps the tensor before it" if entry.start < at else f"leaves a gap of {entry.start - at} bytes"
            raise CorruptCheckpoint(f"tensor {name!r} in {path}: data_offsets start at {entry.start - data_start}, "
                                    f"which {what} (tensors must be stored back to back): {_FIX}")
        at = entry.start + entry.nbytes
        if at > size:
            raise CorruptCheckpoint(f"tensor {name!r} in {path} ends at byte {at}, past the end of the file "
                                    f"({size} bytes), so the file is truncated: {_FIX}")
    if at != size:
        raise CorruptCheckpoint(f"{path}: {size - at} bytes follow the last tensor's data, which no tensor "
                                f"covers (data_offsets wrong, or bytes appended): {_FIX}")


def _parse_entry(path: Path, name: str, info: object, data_start: int) -> Entry:
    where = f"tensor {name!r} in {path}"
    if not isinstance(info, dict):
        raise CorruptCheckpoint(f"{where}: header entry is {type_name(info)}, not an object: {_FIX}")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        if isinstance(dtype, str):
            raise UnsupportedTensor(f"{where} has dtype {dtype[:40]!r}, which this tool cannot read: convert it to F32")
        raise CorruptCheckpoint(f"{where}: dtype is {type_name(dtype)}, not a dtype name: {_FIX}")
    if not _int_list(shape) or any(d > _INT64_MAX for d in shape) or len(shape) > 64:
        raise CorruptCheckpoint(f"{where}: bad shape {_show(shape)}, expected a list of at most 64 integers "
                                f"in [0, 2^63): {_FIX}")
    if not _int_list(offsets) or len(offsets) != 2 or offsets[0] > offsets[1]:
        raise CorruptCheckpoint(f"{where}: bad data_offsets {_show(offsets)}, expected [begin, end] with 0 <= begin <= "
                                f"end: {_FIX}")
    numel = math.prod(shape)
    if numel > _INT64_MAX or (0 in shape and math.prod(d for d in shape if d) > _INT64_MAX):
        raise CorruptCheckpoint(f"{where}: shape {_show(shape)} has more elements than a tensor can hold: {_FIX}")
    torch_dtype = SAFETENSORS_DTYPES[dtype]
    begin, end = offsets
    needed = numel * torch_dtype.itemsize
    if end - begin != needed:
        raise CorruptCheckpoint(f"{where} spans {end - begin} bytes but {dtype} {tuple(shape)} needs {needed}: {_FIX}")
    return Entry(torch_dtype, tuple(shape), data_start + begin, needed)


def _int_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)


def _show(value: object) -> str:
    """A header value for a message, cut short (a hostile list may be long)."""
    long = isinstance(value, (dict, list)) and len(value) > 8
    text = f"{type_name(value)} of {len(value)}" if long else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
