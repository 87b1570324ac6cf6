"""What ``--force`` may replace: a file, a symbolic link, an empty folder, or a folder lowrank-tools wrote.

A folder counts as ours when every entry in it is a name one of our writers produces: a PEFT or diffusers adapter
folder, an ``apply`` model folder (shards, index, and the config files its shards' metadata lists as copied), the
``demo`` folder. Anything else (a project folder, a home folder, notes beside an adapter) is refused with one line
naming what it holds, and the user decides.
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

from ..errors import OutputError

__all__ = ["check_replaceable", "foreign_entries", "COPIED_KEY"]

# names lowrank-tools writes into a folder output (PEFT / diffusers adapters, apply's model folders, demo)
_ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "pytorch_lora_weights.safetensors"}
_MODEL_FILE = re.compile(r"(model|diffusion_pytorch_model)((-\d{5}-of-\d{5})?\.safetensors|\.safetensors\.index\.json)")
_DEMO_FILE = re.compile(r"(base|tuned)\.safetensors|report-r\d+\.json")
_DEMO_ADAPTER = re.compile(r"adapter-r\d+")
COPIED_KEY = "lowrank_tools.copied"  # apply's safetensors metadata: the config files it copied beside the weights


def check_replaceable(target: Path) -> None:
    """Raise :class:`OutputError` unless ``--force`` may replace the existing ``target``."""
    try:
        mode = os.lstat(target).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISREG(mode) or stat.S_ISLNK(mode):
        return
    if not stat.S_ISDIR(mode):
        raise OutputError(f"{target} is not a file or folder ({_kind(mode)}): outputs are written under a temporary "
                          f"name and renamed into place, which cannot replace it: choose another output")
    foreign = foreign_entries(target)
    if foreign:
        count = f"{len(foreign)} entr{'y' if len(foreign) == 1 else 'ies'}"
        raise OutputError(f"--force will not replace folder {target}: it holds {count}, e.g. {foreign[0]}, that "
                          f"lowrank-tools did not write (--force replaces files, empty folders and the adapter or "
                          f"model folders lowrank-tools writes): remove it yourself or choose another output")


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a named pipe"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "a special file"


def foreign_entries(folder: Path, *, nested: bool = False) -> list[str]:
    """Entries of ``folder`` that lowrank-tools does not write, sorted: every name but regular files named
    ``adapter_config.json``, ``adapter_model.safetensors``, ``pytorch_lora_weights.safetensors``, apply's
    ``model*.safetensors`` / ``diffusion_pytorch_model*.safetensors`` shards and index and the config files its
    metadata lists as copied, and the demo's ``base``/``tuned.safetensors``, ``report-rN.json`` and ``adapter-rN``
    adapter folders."""
    entries = sorted(os.scandir(folder), key=lambda e: e.name)
    copied = set() if nested else _copied_names(folder, entries)
    foreign = []
    for entry in entries:
        name = entry.name
        if entry.is_dir(follow_symlinks=False):
            ours = not nested and _DEMO_ADAPTER.fullmatch(name) and not foreign_entries(Path(entry.path), nested=True)
        elif entry.is_file(follow_symlinks=False):
            ours = name in _ADAPTER_FILES or (not nested and (_MODEL_FILE.fullmatch(name) or _DEMO_FILE.fullmatch(name)
                                                              or name in copied))
        else:
            ours = False
        if not ours:
            foreign.append(name + ("/" if entry.is_dir(follow_symlinks=False) else ""))
    return foreign


def _copied_names(folder: Path, entries) -> set[str]:
    """The config files an apply run copied into ``folder``, as its safetensors metadata records them."""
    for entry in entries:
        if _MODEL_FILE.fullmatch(entry.name) and entry.name.endswith(".safetensors"):
            names = _safetensors_metadata(Path(entry.path)).get(COPIED_KEY)
            try:
                listed = json.loads(names) if isinstance(names, str) else []
            except ValueError:
                return set()
            return {n for n in listed if isinstance(n, str)} if isinstance(listed, list) else set()
    return set()


def _safetensors_metadata(path: Path) -> dict:
    try:
        with open(path, "rb") as file:
            size = int.from_bytes(file.read(8), "little")
            if not 0 < size <= 100 * 2**20:
                return {}
            header = json.loads(file.read(size))
    except (OSError, ValueError, RecursionError):
        return {}
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else {}
