"""The files of an HF model folder that ``apply`` writes beside its shards: the base folder's configs to copy,
and diffusers' shard naming (``diffusion_pytorch_model*.safetensors``).

A base read dequantized (fp8, :mod:`lowrank_tools.io.fp8`) is written unquantized (bf16 or ``--dtype``): its
config.json is copied without ``quantization_config`` (and compressed-tensors' older ``compression_config``), which
would make transformers read the bf16 weights as fp8 and look for the ``weight_scale_inv`` tensors no longer
there; every other field is kept, and every other file is copied byte for byte."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

__all__ = ["config_files", "copy_config_files", "shard_stem", "rename_stem", "QUANTIZATION_FIELDS"]

#: config.json fields that describe stored quantized weights: dropped when the weights are written dequantized
QUANTIZATION_FIELDS = ("quantization_config", "compression_config")

_WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf"}


def config_files(base_path: Path) -> list[str]:
    """The base folder's top-level non-weight files (config.json, tokenizer files, ...), to copy beside the weights."""
    if not base_path.is_dir():
        return []
    return [entry.name for entry in sorted(base_path.iterdir())
            if entry.is_file() and not entry.name.startswith(".")
            and entry.suffix.lower() not in _WEIGHT_SUFFIXES and not entry.name.endswith(".index.json")]


def copy_config_files(base_path: Path, folder: Path, names: list[str], *, dequantized: bool = False) -> None:
    """Copy ``names`` (from :func:`config_files`) from the base folder into ``folder``; with ``dequantized``,
    config.json without :data:`QUANTIZATION_FIELDS` (module docstring)."""
    for name in names:
        if dequantized and name == "config.json":
            config = json.loads((base_path / name).read_text())
            if isinstance(config, dict) and any(field in config for field in QUANTIZATION_FIELDS):
                kept = {k: v for k, v in config.items() if k not in QUANTIZATION_FIELDS}
                (folder / name).write_text(json.dumps(kept, indent=2, allow_nan=False) + "\n")
                continue
        shutil.copy2(base_path / name, folder / name)


def shard_stem(base_path: Path) -> str:
    """The stem a folder written from ``base_path`` names its shards with: diffusers' or transformers'."""
    return "diffusion_pytorch_model" if any(base_path.glob("diffusion_pytorch_model*")) else "model"


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
