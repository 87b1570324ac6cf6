"""Load and save adapters in whatever format: one :class:`Adapter` type in memory.

- PEFT folder (``adapter_config.json`` + ``adapter_model.safetensors``), written by PEFT, mergekit or us;
- kohya / A1111 / ComfyUI safetensors file (``lora_down`` / ``lora_up`` / ``alpha``);
- diffusers / PEFT-style single file (``unet.…lora_A.weight``, ``pytorch_lora_weights.safetensors``).

Saving goes through :func:`~lowrank_tools.checkpoint.atomic_output`: a temporary name beside the
target, renamed into place at the end.
"""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path

import torch

from .adapter import Adapter
from .checkpoint import atomic_output, open_checkpoint
from .errors import AdapterFormatError, CheckpointNotFound, UsageError
from .kohya_format import is_kohya_keys, read_kohya, write_kohya
from .peft_format import collect_factors, build_module, is_peft_folder, read_peft, write_peft

__all__ = ["AdapterFormat", "load_adapter", "save_adapter", "detect_format"]


class AdapterFormat(str, Enum):
    PEFT = "peft"
    KOHYA = "kohya"


def detect_format(path: Path) -> str:
    """'peft', 'kohya' or 'peft-file' (PEFT/diffusers keys in a single file); raises for anything else."""
    if not path.exists():
        raise CheckpointNotFound(f"adapter {path} does not exist: check the path")
    if path.is_dir():
        if is_peft_folder(path):
            return "peft"
        for name in ("pytorch_lora_weights.safetensors", "adapter_model.safetensors"):
            if (path / name).is_file():
                return "peft-file"
        raise AdapterFormatError(f"{path}: a folder without adapter_config.json or pytorch_lora_weights.safetensors: "
                                 f"not an adapter folder")
    keys = open_checkpoint(path).keys()
    if is_kohya_keys(keys):
        return "kohya"
    if any(".lora_A." in k or ".lora_B." in k or "lora_embedding_" in k for k in keys):
        return "peft-file"
    seen = sorted({k.rsplit(".", 2)[-2] if k.count(".") >= 2 else k for k in keys})[:5]
    raise AdapterFormatError(f"{path}: unknown adapter layout (key endings seen: {', '.join(seen) or 'none'}): "
                             f"expected PEFT lora_A/lora_B or kohya lora_down/lora_up keys")


def _read_peft_file(path: Path) -> Adapter:
    """A single safetensors file with PEFT-style keys (diffusers' pytorch_lora_weights.safetensors): alpha = r."""
    if path.is_dir():
        path = next(p for p in (path / "pytorch_lora_weights.safetensors", path / "adapter_model.safetensors")
                    if p.is_file())
    ckpt = open_checkpoint(path)
    factors, full = collect_factors(ckpt, path)
    alphas = {k[: -len(".alpha")]: float(ckpt.get(k).reshape(()).item()) for k in ckpt.keys() if k.endswith(".alpha")}
    modules = {n: build_module(n, A, B, alphas.get(n, float(A.shape[0])), embedding=emb, source=path)
               for n, (A, B, emb) in factors.items()}
    return Adapter(modules=modules, full_tensors=full, source_format="peft-file")


def load_adapter(path: str | os.PathLike) -> Adapter:
    """Read an adapter in any supported format."""
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "peft":
        return read_peft(path)
    if fmt == "kohya":
        return read_kohya(path)
    return _read_peft_file(path)


def save_adapter(adapter: Adapter, target: str | os.PathLike, *, format: AdapterFormat | str = AdapterFormat.PEFT,
                 force: bool = False, inputs=(), dtype: torch.dtype | None = None, prefix: str = "lora_unet_") -> Path:
    """Write ``adapter`` atomically in ``format`` (PEFT: a folder; kohya: a .safetensors file)."""
    fmt = AdapterFormat(format)
    target = Path(target)
    if fmt is AdapterFormat.KOHYA and target.suffix != ".safetensors":
        raise UsageError(f"-o {target}: a kohya adapter is one file: give a name ending in .safetensors")
    if dtype is not None:
        adapter = adapter.to(dtype=dtype)
    with atomic_output(target, force=force, inputs=inputs) as tmp:
        if fmt is AdapterFormat.PEFT:
            write_peft(adapter, tmp)
        else:
            write_kohya(adapter, tmp, prefix=prefix)
    return target


def describe_adapter(adapter: Adapter, path: str | os.PathLike) -> dict:
    """Facts for ``info``: format, module count, rank and alpha distribution, scale rule, params, dtype."""
    from collections import Counter

    ranks = Counter(m.rank for m in adapter.modules.values())
    alphas = Counter(round(m.alpha, 6) for m in adapter.modules.values())
    kinds = Counter(m.kind.value for m in adapter.modules.values())
    rslora = any(m.rslora for m in adapter.modules.values())
    return {
        "path": str(path),
        "format": adapter.source_format,
        "modules": len(adapter.modules),
        "kinds": dict(sorted(kinds.items())),
        "ranks": {str(k): v for k, v in sorted(ranks.items())},
        "alphas": {str(k): v for k, v in sorted(alphas.items())},
        "scale_rule": "alpha / sqrt(r) (rsLoRA)" if rslora else "alpha / r",
        "params": adapter.params,
        "saved_whole": sorted(adapter.full_tensors),
        "dtype": str(adapter.dtype).replace("torch.", "") if adapter.dtype else None,
        "base_model": adapter.base_model,
        "notes": adapter.notes,
    }
