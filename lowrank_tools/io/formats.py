"""Load and save adapters in whatever format: one :class:`Adapter` type in memory.

- PEFT folder (``adapter_config.json`` + ``adapter_model.safetensors``), written by PEFT, mergekit or us;
- diffusers LoRA file (``pytorch_lora_weights.safetensors``: ``unet.<module>.lora_A.weight``, LoraConfigs in
  its metadata) or any single file of PEFT-style keys;
- kohya / A1111 / ComfyUI safetensors file (``lora_down`` / ``lora_up`` / ``alpha``).

Saving in ``peft`` format writes a PEFT folder, or for a diffusers pipeline's adapter (every module under
``unet.`` / ``text_encoder.`` / ``text_encoder_2.`` / ``transformer.``) a folder holding diffusers'
``pytorch_lora_weights.safetensors``, which ``pipe.load_lora_weights(folder)`` loads. Every write goes through
:func:`~lowrank_tools.checkpoint.atomic_output`: a temporary name beside the target, renamed into place at the end.
"""

from __future__ import annotations

import os
from collections import Counter
from enum import Enum
from pathlib import Path

import torch

from ..adapter import Adapter, module_name
from .checkpoint import Checkpoint, as_checkpoint, atomic_output, open_checkpoint
from ..errors import AdapterFormatError, CheckpointNotFound, ConversionError, UsageError
from .kohya import is_kohya_keys, kohya_state_dict, read_kohya, write_kohya
from .peft import (DIFFUSERS_COMPONENTS, DIFFUSERS_NAME, WEIGHTS_NAME, is_diffusers_adapter, is_peft_folder,
                          lora_keys_seen, read_peft, read_peft_file, write_diffusers, write_peft)

__all__ = ["AdapterFormat", "load_adapter", "save_adapter", "detect_format", "describe_adapter", "check_target"]


class AdapterFormat(str, Enum):
    PEFT = "peft"
    KOHYA = "kohya"


def _single_file(folder: Path) -> Path | None:
    for name in (DIFFUSERS_NAME, WEIGHTS_NAME):
        if (folder / name).is_file():
            return folder / name
    return None


def detect_format(path: Path) -> str:
    """'peft' (folder), 'kohya' or 'peft-file' (PEFT-style keys in one file, diffusers' included); else raises."""
    path = Path(path)
    if not path.exists():
        raise CheckpointNotFound(f"adapter {path} does not exist: check the path")
    if path.is_dir():
        if is_peft_folder(path):
            return "peft"
        if _single_file(path) is not None:
            return "peft-file"
        raise AdapterFormatError(f"{path}: a folder without adapter_config.json or {DIFFUSERS_NAME}: not an adapter "
                                 f"folder")
    keys = open_checkpoint(path).keys()
    if is_kohya_keys(keys):
        return "kohya"
    if any(".lora_A." in k or ".lora_B." in k or "lora_embedding_" in k for k in keys):
        return "peft-file"
    raise AdapterFormatError(f"{path}: unknown adapter layout (key patterns seen: {lora_keys_seen(keys)}): expected "
                             f"PEFT '*.lora_A.weight' / '*.lora_B.weight' or kohya '*.lora_down.weight' / "
                             f"'*.lora_up.weight' keys")


def _module_names(base) -> tuple[list[str], str]:
    ckpt = as_checkpoint(base)
    names = [module_name(k) for k in ckpt.keys() if len(ckpt.shape(k)) >= 2]
    return names, str(getattr(ckpt, "path", base))


def load_adapter(path: str | os.PathLike, *, base: Checkpoint | str | os.PathLike | None = None) -> Adapter:
    """Read an adapter in any supported format.

    ``base``: the checkpoint the adapter was made for; kohya keys without recorded module names are matched
    against its module names (else they are guessed from the known diffusers/transformers naming, with a note).
    """
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "peft":
        return read_peft(path)
    if fmt == "kohya":
        names, label = _module_names(base) if base is not None else (None, None)
        return read_kohya(path, module_names=names, base=label)
    return read_peft_file(_single_file(path) if path.is_dir() else path)


def check_target(adapter: Adapter, format: AdapterFormat | str, *, prefix: str = "lora_unet_") -> None:
    """Raise :class:`ConversionError` (naming the module) when ``format`` cannot hold the adapter."""
    if AdapterFormat(format) is AdapterFormat.KOHYA:
        kohya_state_dict(adapter, prefix=prefix)
    elif is_diffusers_adapter(adapter) and adapter.full_tensors:
        name = next(iter(adapter.full_tensors))
        raise ConversionError(f"tensor {name} is saved whole, which a diffusers LoRA file cannot hold: drop "
                              f"--full-modules, or extract the component folder alone (PEFT modules_to_save)")


def save_adapter(adapter: Adapter, target: str | os.PathLike, *, format: AdapterFormat | str = AdapterFormat.PEFT,
                 force: bool = False, inputs=(), dtype: torch.dtype | None = None, prefix: str = "lora_unet_") -> Path:
    """Write ``adapter`` atomically in ``format`` (PEFT: a folder; kohya: a .safetensors file).

    ``prefix``: the kohya prefix of modules without a pipeline component (``unet.`` and ``text_encoder.`` modules
    take ``lora_unet_`` / ``lora_te_``). Nothing is written when the format cannot hold a module.
    """
    fmt = AdapterFormat(format)
    target = Path(target)
    if fmt is AdapterFormat.KOHYA and target.suffix != ".safetensors":
        raise UsageError(f"-o {target}: a kohya adapter is one file: give a name ending in .safetensors")
    if dtype is not None:
        adapter = adapter.to(dtype=dtype)
    check_target(adapter, fmt, prefix=prefix)
    with atomic_output(target, force=force, inputs=inputs) as tmp:
        if fmt is AdapterFormat.KOHYA:
            write_kohya(adapter, tmp, prefix=prefix)
        elif is_diffusers_adapter(adapter):
            write_diffusers(adapter, tmp)
        else:
            write_peft(adapter, tmp)
    return target


def _counts(values) -> dict[str, int]:
    return {str(k): v for k, v in sorted(Counter(values).items())}


def _scale_rule(adapter: Adapter) -> str:
    rs = {m.rslora for m in adapter.modules.values()}
    if rs == {True}:
        return "alpha / sqrt(r) (rsLoRA)"
    return "alpha / r" if rs != {True, False} else "alpha / r, alpha / sqrt(r) for rsLoRA modules"


def describe_adapter(adapter: Adapter, path: str | os.PathLike) -> dict:
    """Facts for ``info``: format, module count, rank and alpha distribution, scale rule, params, dtype."""
    mods = adapter.modules.values()
    components = Counter(next((c[:-1] for c in DIFFUSERS_COMPONENTS if n.startswith(c)), "-") for n in adapter.modules)
    return {
        "path": str(path),
        "format": adapter.source_format,
        "modules": len(adapter.modules),
        "kinds": _counts(m.kind.value for m in mods),
        "components": dict(sorted(components.items())) if set(components) != {"-"} else {},
        "ranks": _counts(m.rank for m in mods),
        "alphas": _counts(round(m.alpha, 6) for m in mods),
        "scale_rule": _scale_rule(adapter),
        "scales": _counts(round(m.scale, 6) for m in mods),
        "params": adapter.params,
        "saved_whole": sorted(adapter.full_tensors),
        "dtype": str(adapter.dtype).replace("torch.", "") if adapter.dtype else None,
        "base_model": adapter.base_model,
        "notes": adapter.notes,
    }
