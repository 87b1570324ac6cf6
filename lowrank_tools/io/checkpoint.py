"""Lazy, per-tensor reading of checkpoints; pairing base and tuned tensors; atomic writing.

:func:`open_checkpoint` reads a ``.safetensors`` file, an HF model folder (single file, ``*.index.json`` shards,
diffusers component names, ``pytorch_model.bin`` shards), a diffusers pipeline folder (components prefixed
``unet.``, ``text_encoder.``, ...) or a torch pickle (``.bin/.pt/.pth/.ckpt``, read by :mod:`.pickles`).

safetensors files are parsed by :mod:`lowrank_tools.io.safetensors`, not memory-mapped: opening reads and
validates the header only, and :meth:`Checkpoint.get` reads one tensor's bytes into a fresh buffer, so memory stays
flat and no file handle is held between calls. Torch pickles cannot be read per tensor:
each file is loaded once at open with ``mmap=True`` (a mapping, not a copy; old non-zip files are loaded into
memory) and kept until :meth:`Checkpoint.close`; ``get`` returns a contiguous copy that owns its memory.

Writing lives in :mod:`lowrank_tools.io.atomic` and is re-exported here.
"""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from .atomic import ShardedWriter, atomic_output, check_output, parse_size
from ..errors import (CheckpointNotFound, CorruptCheckpoint, MissingTensor, NoCommonTensors, NotACheckpoint,
                     ShapeMismatch)
from .fp8 import JoinedSource, block_size_from_config, dequantizing, strip_quantization_metadata
from .openclip import splitting
from .pickles import TensorDict, load_pickle
from .json_input import get_bool, get_str, get_str_list, get_str_map, load_json, type_name
from .safetensors import SAFETENSORS_DTYPES  # noqa: F401 - importable from here as before the split
from .safetensors import SafetensorsFile as _SafetensorsFile

__all__ = ["Checkpoint", "open_checkpoint", "as_checkpoint", "Pairing", "pair_tensors", "atomic_output",
           "check_output", "parse_size", "ShardedWriter"]

_PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt"}
_FOLDER_FILES = [  # in order of preference
    f"{stem}.{ext}{index}"
    for stem, ext in [("model", "safetensors"), ("diffusion_pytorch_model", "safetensors"),
                      ("pytorch_model", "bin"), ("diffusion_pytorch_model", "bin")]
    for index in ("", ".index.json")
]
_SKIPPED_COMPONENTS = ("vae", "scheduler", "feature_extractor", "safety_checker")
_ACCEPTED = "a .safetensors file, a .bin/.pt/.pth/.ckpt torch file, an HF model folder or a diffusers pipeline folder"
_FIX = "re-download or re-save it"

# ---------------------------------------------------------------------------- single files


def _sniff(path: Path) -> str | None:
    """'safetensors', 'zip', 'pickle', 'empty' or None, from the first bytes."""
    with open(path, "rb") as file:
        head = file.read(9)
    if not head:
        return "empty"
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if len(head) == 9 and head[8:] == b"{":
        if int.from_bytes(head[:8], "little") <= path.stat().st_size - 8:
            return "safetensors"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"
    return None


def _open_file(path: Path) -> _SafetensorsFile | TensorDict:
    if not path.is_file():  # a FIFO or a device would block or never end: read regular files only
        raise NotACheckpoint(f"{path} is not a regular file (a FIFO, socket or device): give a checkpoint file")
    suffix = path.suffix.lower()
    kind = "safetensors" if suffix == ".safetensors" else _sniff(path)
    if kind == "safetensors":
        return _SafetensorsFile(path)
    if kind in ("zip", "pickle"):
        return TensorDict(path, load_pickle(path, use_mmap=kind == "zip"))
    if kind == "empty" and suffix in _PICKLE_SUFFIXES:
        raise CorruptCheckpoint(f"torch file {path} is empty (0 bytes): {_FIX}")
    if suffix in _PICKLE_SUFFIXES:
        raise NotACheckpoint(f"{path} is not a torch file (no zip or pickle header): {_FIX}")
    what = "is empty" if kind == "empty" else "is not a checkpoint"
    raise NotACheckpoint(f"{path} {what}: expected {_ACCEPTED}")


# ---------------------------------------------------------------------------- Checkpoint


class Checkpoint:
    """Read-only, lazy view of a checkpoint: tensor names, shapes, dtypes without loading data.

    Build one with :func:`open_checkpoint` or :func:`as_checkpoint`. ``config`` is the parsed ``config.json`` of an
    HF folder (else None); ``metadata`` the safetensors ``__metadata__`` of the first file ({} for pickles and
    pipelines); ``components`` maps a pipeline's component names to their own checkpoints (empty otherwise);
    ``dequantized``: some tensor is stored as fp8 and read dequantized (:mod:`lowrank_tools.io.fp8`);
    ``fused_parts``: for a view in an architecture's original names (:mod:`lowrank_tools.io.arch_checkpoint`), each
    module's parts in the file's names, in row order (``{}`` otherwise).
    """

    def __init__(self, path: Path, index: dict, *, sources: list, config: dict | None = None,
                 metadata: dict[str, str] | None = None, components: dict[str, Checkpoint] | None = None):
        self.path = Path(path)
        self.config = config
        self.metadata = dict(metadata or {})
        self.components = dict(components or {})
        self.dequantized = False
        self.fused_parts: dict[str, tuple[str, ...]] = {}
        self._index = index  # name -> (source file, name inside that file)
        self._sources = sources

    def keys(self) -> list[str]:
        """Tensor names in file order (shard by shard for sharded folders)."""
        return list(self._index)

    def shape(self, name: str) -> tuple[int, ...]:
        source, inner = self._lookup(name)
        return source.info(inner)[1]

    def dtype(self, name: str) -> torch.dtype:
        source, inner = self._lookup(name)
        return source.info(inner)[0]

    def write_dtype(self, name: str) -> torch.dtype:
        """The dtype to write ``name`` back as when no dtype is asked: the stored one, or bfloat16 for a tensor
        stored as fp8 (read dequantized to float32; see :mod:`lowrank_tools.io.fp8`)."""
        source, inner = self._lookup(name)
        write_dtype = getattr(source, "write_dtype", None)
        return write_dtype(inner) if write_dtype else source.info(inner)[0]

    def nbytes(self, name: str) -> int:
        source, inner = self._lookup(name)
        dtype, shape = source.info(inner)
        return math.prod(shape) * dtype.itemsize

    def get(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """One tensor on the CPU, contiguous, owning its memory; or, from a safetensors file, read into the first
        bytes of ``out`` (a 1-D uint8 CPU tensor) when it is large enough: the caller's reused buffer."""
        source, inner = self._lookup(name)
        if out is not None and isinstance(source, _SafetensorsFile):
            return source.read(inner, out)
        return source.read(inner)

    __getitem__ = get

    def close(self) -> None:
        """Release pickle mappings; safetensors files hold nothing open."""
        for source in self._sources:
            source.close()

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def __len__(self) -> int:
        return len(self._index)

    def __iter__(self):
        return iter(list(self._index))

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {len(self)} tensors)"

    def _lookup(self, name: str) -> tuple:
        try:
            return self._index[name]
        except KeyError:
            close = difflib.get_close_matches(str(name), list(self._index), n=1)
            hint = f"did you mean {close[0]!r}?" if close else "check the name"
            raise MissingTensor(f"tensor {name!r} is not in {self.path}: {hint}") from None


def open_checkpoint(path: str | os.PathLike, *, dequantize: bool = True, split_qkv: bool = True) -> Checkpoint:
    """Open a checkpoint file or folder for lazy reading (see the module docstring).

    ``dequantize``: fp8 tensors (plain, ComfyUI-scaled or block-wise) read as float32, their scale keys (in any
    shard) hidden (:mod:`lowrank_tools.io.fp8`): a model's weights. Adapter readers pass False: they see stored dtypes.
    ``split_qkv``: a single file's OpenCLIP ``attn.in_proj_weight`` reads as q/k/v (:mod:`lowrank_tools.io.openclip`);
    apply, which writes the file's own layout back, passes False."""
    return _views(_open_checkpoint(Path(path)), dequantize, split_qkv)


def _views(ckpt: Checkpoint, dequantize: bool, split_qkv: bool) -> Checkpoint:
    if dequantize:
        ckpt = _dequantized(ckpt)
    return _wrapped(ckpt, splitting) if split_qkv else ckpt


def _dequantized(ckpt: Checkpoint) -> Checkpoint:
    """``ckpt`` with its fp8 tensors read dequantized: every shard seen as one source, so a weight's scale is found
    in whichever shard the index puts it; the block size of block-wise scales from config.json."""
    joined = JoinedSource(ckpt.path, ckpt._index, ckpt._sources, ckpt.metadata)
    view = dequantizing(joined, block_size_from_config(ckpt.config, str(ckpt.path / "config.json")))
    ckpt.metadata = strip_quantization_metadata(ckpt.metadata)
    if view is joined:
        return ckpt
    ckpt._index = {name: (view, name) for name in view.names()}
    ckpt._sources = [view]
    ckpt.dequantized = True
    return ckpt


def _wrapped(ckpt: Checkpoint, wrap) -> Checkpoint:
    """``ckpt`` with each source replaced by ``wrap(source)``, a view that may hide and add names (in place: it is
    fresh); a source ``wrap`` returns as it is stays."""
    wrapped = {id(s): wrap(s) for s in ckpt._sources}
    if all(wrapped[id(s)] is s for s in ckpt._sources):
        return ckpt
    index = {}
    for name, (source, inner) in ckpt._index.items():  # file order kept; a split tensor's parts in its place
        view = wrapped[id(source)]
        outer = name[:len(name) - len(inner)]  # a pipeline component's prefix, else ""
        index.update({outer + new: (view, new) for new in (view.expand(inner) if view is not source else [inner])})
    ckpt._index = index
    ckpt._sources = [wrapped[id(s)] for s in ckpt._sources]
    return ckpt


def _open_checkpoint(path: Path) -> Checkpoint:
    if not path.exists():
        raise CheckpointNotFound(f"checkpoint {path} does not exist: check the path")
    try:
        if path.is_dir():
            if (path / "model_index.json").is_file():
                return _open_pipeline(path)
            return _open_folder(path)
        source = _open_file(path)
    except OSError as exc:  # a permission, an I/O error: one line naming the file
        where = exc.filename or path
        raise NotACheckpoint(f"{where} cannot be read ({exc.strerror or exc}): check the path and its permissions") \
            from exc
    index = {name: (source, name) for name in source.names()}
    return Checkpoint(path, index, sources=[source], metadata=source.metadata)


def as_checkpoint(source: Checkpoint | str | os.PathLike | Mapping[str, torch.Tensor], *,
                  dequantize: bool = True, split_qkv: bool = True) -> Checkpoint:
    """A :class:`Checkpoint` from a checkpoint, a path (opened) or a name -> tensor mapping (``dequantize``,
    ``split_qkv``: as :func:`open_checkpoint`'s)."""
    if isinstance(source, Checkpoint):
        return source
    if isinstance(source, (str, os.PathLike)):
        return open_checkpoint(source, dequantize=dequantize, split_qkv=split_qkv)
    if isinstance(source, Mapping):
        tensors = {k: v for k, v in source.items() if isinstance(v, torch.Tensor)}
        part = TensorDict(Path("<in-memory>"), tensors)
        return _views(Checkpoint(part.path, {n: (part, n) for n in tensors}, sources=[part]), dequantize, split_qkv)
    raise TypeError(f"expected a checkpoint path, Checkpoint or dict of tensors, got {type(source).__name__}")


def _open_folder(folder: Path) -> Checkpoint:
    sources, index = _folder_sources(folder)
    config_path = folder / "config.json"
    config = _read_config(config_path) if config_path.is_file() else None
    return Checkpoint(folder, index, sources=sources, config=config, metadata=sources[0].metadata)


def _folder_sources(folder: Path) -> tuple[list, dict]:
    for name in _FOLDER_FILES:
        candidate = folder / name
        if candidate.is_file():
            if name.endswith(".index.json"):
                return _open_index(candidate)
            source = _open_file(candidate)
            return [source], {n: (source, n) for n in source.names()}
    found = sorted(p for p in folder.glob("*.safetensors") if p.is_file())
    if len(found) == 1:
        source = _SafetensorsFile(found[0])
        return [source], {n: (source, n) for n in source.names()}
    raise NotACheckpoint(f"folder {folder} holds no checkpoint: looked for {', '.join(_FOLDER_FILES)}, "
                         f"model_index.json or exactly one *.safetensors file (found {len(found)})")


def _open_index(index_path: Path) -> tuple[list, dict]:
    """Open the shards of an ``*.index.json``; names come shard by shard, in file order."""
    data = load_json(index_path, fix=_FIX)
    weight_map = get_str_map(data, "weight_map", str(index_path), default=None)
    if not weight_map:
        raise CorruptCheckpoint(f"{index_path} has no weight_map: {_FIX}")
    for file in set(weight_map.values()):
        if Path(file).is_absolute() or ".." in Path(file).parts or "\0" in file:
            raise CorruptCheckpoint(f"{index_path} names shard {file!r} outside its folder: {_FIX}")
    sources, index = [], {}
    for file in sorted(set(weight_map.values())):
        shard = index_path.parent / file
        if not shard.is_file():
            raise CorruptCheckpoint(f"shard {shard} listed in {index_path} is missing: {_FIX}")
        source = _open_file(shard)
        sources.append(source)
        index.update({n: (source, n) for n in source.names() if weight_map.get(n) == file})
    missing = [name for name in weight_map if name not in index]
    if missing:
        raise CorruptCheckpoint(f"{index_path} lists {len(missing)} tensor(s) absent from their shard "
                                f"(e.g. {missing[0]!r} in {weight_map[missing[0]]}): {_FIX}")
    return sources, index


def _open_pipeline(folder: Path) -> Checkpoint:
    """A diffusers pipeline: every weight-holding component, names prefixed ``component.``."""
    components = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        name = sub.name
        if name.startswith((".", "tokenizer")) or name in _SKIPPED_COMPONENTS:
            continue
        try:
            components[name] = _open_folder(sub)
        except NotACheckpoint:
            continue  # a component without weights (e.g. a processor config)
    if not components:
        raise NotACheckpoint(f"pipeline folder {folder} has no component with weights (looked in every subfolder "
                             "except vae, scheduler, tokenizer*, feature_extractor, safety_checker)")
    index = {f"{prefix}.{name}": entry for prefix, part in components.items() for name, entry in part._index.items()}
    sources = [source for part in components.values() for source in part._sources]
    return Checkpoint(folder, index, sources=sources, components=components)


def _read_config(path: Path) -> dict:
    """config.json, with the fields this tool reads checked by type (one line naming the field, not a TypeError)."""
    config = load_json(path, fix=_FIX)
    if not isinstance(config, dict):
        raise CorruptCheckpoint(f"{path} is {type_name(config)}, not a JSON object: {_FIX}")
    get_str_list(config, "architectures", str(path), default=None)
    get_bool(config, "tie_word_embeddings", str(path), default=None)
    get_str(config, "_name_or_path", str(path), default=None)
    return config


# ---------------------------------------------------------------------------- pairing


@dataclass(frozen=True)
class Pairing:
    """Which tensors of a base and a tuned checkpoint line up (same name, same shape)."""

    names: list[str]  # in tuned order
    only_base: list[str]
    only_tuned: list[str]
    shape_mismatch: list[tuple[str, tuple, tuple]]  # (name, base shape, tuned shape)

    def warning(self) -> str | None:
        """One line naming what was skipped (up to 3 names each), or None when all paired."""
        shapes = [f"{n}: {tuple(a)} vs {tuple(b)}" for n, a, b in self.shape_mismatch]
        parts = [(len(self.only_base), "only in base", self.only_base),
                 (len(self.only_tuned), "only in tuned", self.only_tuned),
                 (len(shapes), "with different shapes", shapes)]
        texts = []
        for count, label, names in parts:
            if count:
                noun = "" if texts else (" tensor" if count == 1 else " tensors")
                texts.append(f"{count}{noun} {label} ({_some(names)})")
        return "skipped " + ", ".join(texts) if texts else None


def _some(names: list[str], limit: int = 3) -> str:
    return ", ".join(names[:limit]) + (", …" if len(names) > limit else "")


def pair_tensors(base: Checkpoint, tuned: Checkpoint, *, strict: bool = False) -> Pairing:
    """Pair tensors by name; one-sided names and shape mismatches are skipped.

    Raises :class:`NoCommonTensors` when nothing pairs; with ``strict`` any skipped tensor raises
    :class:`MissingTensor` or :class:`ShapeMismatch`.
    """
    names, only_tuned, mismatch = [], [], []
    for name in tuned.keys():
        if name not in base:
            only_tuned.append(name)
        elif base.shape(name) != tuned.shape(name):
            mismatch.append((name, base.shape(name), tuned.shape(name)))
        else:
            names.append(name)
    only_base = [name for name in base.keys() if name not in tuned]
    if not names:
        raise _no_common(base, tuned, mismatch)
    pairing = Pairing(names, only_base, only_tuned, mismatch)
    if strict and (only_base or only_tuned or mismatch):
        error = MissingTensor if only_base or only_tuned else ShapeMismatch
        raise error(f"--strict: {pairing.warning()}: drop --strict to skip them, or compare matching models")
    return pairing


def _no_common(base: Checkpoint, tuned: Checkpoint, mismatch: list) -> NoCommonTensors:
    both = f"base {base.path} and tuned {tuned.path}"
    if mismatch:
        shown = _some([f"{n}: {tuple(a)} vs {tuple(b)}" for n, a, b in mismatch], 2)
        return NoCommonTensors(f"{both} share {len(mismatch)} tensor names but every shape differs (e.g. {shown}): "
                               "are they the same architecture?")
    return NoCommonTensors(f"{both} share no tensor name (base has e.g. {_some(base.keys(), 2) or 'nothing'}, tuned "
                           f"has e.g. {_some(tuned.keys(), 2) or 'nothing'}): are they the same architecture?")
