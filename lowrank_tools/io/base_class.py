"""The diffusers class of the base an adapter was made for: read from the base, recorded in the adapter's files.

``extract`` has the base open: a pipeline folder's ``model_index.json`` names its pipeline (``SanaPipeline``), a lone
component folder's ``config.json`` its class (``SanaTransformer2DModel``). That ``_class_name`` (:func:`base_class`)
goes into the safetensors metadata of every adapter file written (kohya, PEFT, diffusers) under
:data:`BASE_CLASS_KEY` as JSON ``{"_class_name": ..., "file": "model_index.json" | "config.json"}``
(:func:`base_class_metadata`), is read back on load (:func:`base_class_from_metadata`), and lets
``check --for diffusers`` without ``--base`` judge by the pipeline the adapter was made for
(:func:`~lowrank_tools.io.diffusers_judge.judge_for`). Nothing is recorded for a base without such a file (a
single ``.safetensors``, a transformers model): never guessed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..adapter import Adapter, BaseClass
from ..errors import NotACheckpoint
from .json_input import load_json

__all__ = ["BASE_CLASS_KEY", "base_class", "base_class_metadata", "base_class_from_metadata"]

#: safetensors metadata key of the base's diffusers class, JSON {"_class_name": ..., "file": ...}
BASE_CLASS_KEY = "lowrank_tools.base_class"
_FILES = ("model_index.json", "config.json")
_CLASS = re.compile(r"^[A-Za-z_]\w{0,127}$")


def base_class(base) -> BaseClass | None:
    """The ``_class_name`` of a base pipeline's ``model_index.json`` (``base.path``) or of a lone component's config
    (``base.config``), with the file it was read from; None when neither names one."""
    index = Path(getattr(base, "path", None) or "") / "model_index.json"
    if getattr(base, "path", None) is not None and index.is_file():
        found = load_json(index, error=NotACheckpoint, fix="re-save the pipeline")
        if isinstance(found, dict) and isinstance(found.get("_class_name"), str):
            return BaseClass(found["_class_name"], "model_index.json")
    config = getattr(base, "config", None)
    if isinstance(config, dict) and isinstance(config.get("_class_name"), str):
        return BaseClass(config["_class_name"], "config.json")
    return None


def base_class_metadata(adapter: Adapter) -> dict[str, str]:
    """The safetensors metadata recording ``adapter.base_class`` (empty when there is none)."""
    found = adapter.base_class
    if found is None:
        return {}
    return {BASE_CLASS_KEY: json.dumps({"_class_name": found.name, "file": found.file}, sort_keys=True)}


def base_class_from_metadata(metadata: dict | None) -> BaseClass | None:
    """The base class recorded in a file's safetensors metadata; None when absent or not as written (a file edited
    by hand is judged by its names, as before)."""
    try:
        found = json.loads((metadata or {}).get(BASE_CLASS_KEY) or "null")
    except ValueError:
        return None
    if not isinstance(found, dict) or set(found) != {"_class_name", "file"}:
        return None
    name, file = found["_class_name"], found["file"]
    if not isinstance(name, str) or not _CLASS.match(name) or file not in _FILES:
        return None
    return BaseClass(name, file)
