"""The files of an HF model folder that ``apply`` writes beside its shards: the base folder's configs to copy,
and diffusers' shard naming (``diffusion_pytorch_model*.safetensors``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["config_files", "rename_stem"]

_WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf"}


def config_files(base_path: Path) -> list[str]:
    """The base folder's top-level non-weight files (config.json, tokenizer files, ...), to copy beside the weights."""
    if not base_path.is_dir():
        return []
    return [entry.name for entry in sorted(base_path.iterdir())
            if entry.is_file() and not entry.name.startswith(".")
            and entry.suffix.lower() not in _WEIGHT_SUFFIXES and not entry.name.endswith(".index.json")]


def rename_stem(folder: Path, files: list[Path], stem: str) -> list[Path]:
    """``model*.safetensors`` (+ index) -> ``<stem>*.safetensors``, as diffusers component folders name them."""
    if stem == "model":
        return files
    renamed = {p.name: stem + p.name[len("model"):] for p in files if p.name.endswith(".safetensors")}
    for old, new in renamed.items():
        os.replace(folder / old, folder / new)
    index = folder / "model.safetensors.index.json"
    if not index.exists():
        return [folder / renamed.get(p.name, p.name) for p in files]
    data = json.loads(index.read_text())
    data["weight_map"] = {k: renamed.get(v, v) for k, v in data["weight_map"].items()}
    new_index = folder / f"{stem}.safetensors.index.json"
    new_index.write_text(json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n")
    index.unlink()
    return [folder / renamed[p.name] for p in files if p.name in renamed] + [new_index]
