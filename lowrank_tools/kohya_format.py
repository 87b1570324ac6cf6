"""kohya / A1111 / ComfyUI LoRA files: one safetensors file with ``<prefix><module . -> _>`` keys.

    lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight   A: (r, in) or (r, in, kh, kw)
    lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight     B: (out, r) or (out, r, 1, 1)
    lora_unet_down_blocks_0_attentions_0_proj_in.alpha              0-d tensor; scale = alpha / r

A file without ``.alpha`` means scale 1 (alpha = r), the convention kohya's loaders follow.
Since ``_`` is ambiguous, files written here record ``{kohya key: module name}`` in the safetensors
metadata under ``lowrank_tools.modules`` so that reading them back restores the names exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from .adapter import Adapter, LoraModule, ModuleKind
from .checkpoint import open_checkpoint
from .errors import AdapterFormatError, ConversionError
from .peft_format import build_module

__all__ = ["NAMES_KEY", "COMPONENT_PREFIXES", "kohya_key", "is_kohya_keys", "read_kohya", "write_kohya"]

NAMES_KEY = "lowrank_tools.modules"
_DOWN, _UP, _ALPHA = ".lora_down.weight", ".lora_up.weight", ".alpha"
# module-name component -> kohya prefix (text_encoder becomes lora_te1_ when a second encoder is present)
COMPONENT_PREFIXES = {"unet.": "lora_unet_", "transformer.": "lora_unet_", "text_encoder.": "lora_te_",
                      "text_encoder_2.": "lora_te2_"}


def kohya_key(name: str, *, prefix: str = "lora_unet_", two_encoders: bool = False) -> str:
    """Module name -> kohya key: the component decides the prefix; other names take ``prefix``."""
    for component, comp_prefix in COMPONENT_PREFIXES.items():
        if name.startswith(component):
            if component == "text_encoder." and two_encoders:
                comp_prefix = "lora_te1_"
            return comp_prefix + name[len(component):].replace(".", "_")
    return prefix + name.replace(".", "_")


def is_kohya_keys(keys) -> bool:
    return any(k.endswith(_DOWN) or k.endswith(_UP) for k in keys)


def write_kohya(adapter: Adapter, path: Path, *, prefix: str = "lora_unet_") -> None:
    """Write ``adapter`` as a kohya safetensors file at ``path`` (the caller makes it atomic)."""
    two_encoders = any(n.startswith("text_encoder_2.") for n in adapter.modules)
    tensors: dict[str, torch.Tensor] = {}
    names: dict[str, str] = {}
    for name, m in adapter.modules.items():
        if m.kind is ModuleKind.EMBEDDING:
            raise ConversionError(f"module {name} is an embedding, which kohya files cannot hold: "
                                  f"use --format peft, or --exclude '{name}'")
        key = kohya_key(name, prefix=prefix, two_encoders=two_encoders)
        if key in names:
            raise ConversionError(f"modules {names[key]} and {name} both map to kohya key {key}: use --format peft")
        names[key] = name
        down, up = m.A, m.B
        if m.kind is ModuleKind.CONV:
            kernel_ones = [1] * (len(m.weight_shape) - 2)
            down, up = m.A.reshape(m.rank, *m.weight_shape[1:]), m.B.reshape(m.B.shape[0], m.rank, *kernel_ones)
        tensors[key + _DOWN] = down.contiguous()
        tensors[key + _UP] = up.contiguous()
        tensors[key + _ALPHA] = torch.tensor(m.scale * m.rank, dtype=torch.float32)
    ranks = sorted({m.rank for m in adapter.modules.values()})
    metadata = {"format": "pt", NAMES_KEY: json.dumps(names, sort_keys=True), "ss_network_module": "networks.lora",
                "ss_network_dim": str(ranks[-1] if ranks else 0), "ss_network_alpha": "dynamic" if len(ranks) > 1
                else str(next(iter(adapter.modules.values())).alpha if adapter.modules else 0)}
    if adapter.base_model:
        metadata["ss_sd_model_name"] = adapter.base_model
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)


def _alpha(ckpt, key: str, rank: int, where: Path) -> float:
    if key + _ALPHA not in ckpt:
        return float(rank)  # no alpha: scale 1
    t = ckpt.get(key + _ALPHA)
    if t.numel() != 1:
        raise AdapterFormatError(f"{where}: {key}{_ALPHA} has shape {tuple(t.shape)}, expected a scalar")
    return float(t.reshape(()).item())


def read_kohya(path: Path) -> Adapter:
    """Read a kohya/A1111 LoRA file. Names come from our metadata record when present, else the key
    (``lora_unet_...``) stands for the module and a note says the name is a guess."""
    ckpt = open_checkpoint(path)
    recorded = json.loads(ckpt.metadata.get(NAMES_KEY, "{}"))
    keys = {k[: -len(_DOWN)] for k in ckpt.keys() if k.endswith(_DOWN)}
    ups = {k[: -len(_UP)] for k in ckpt.keys() if k.endswith(_UP)}
    for key in sorted(keys ^ ups):
        have, lacks = ("lora_down", "lora_up") if key in keys else ("lora_up", "lora_down")
        raise AdapterFormatError(f"{path}: {key} has {have} but no {lacks}: the file is incomplete")
    modules: dict[str, LoraModule] = {}
    for key in sorted(keys):
        A, B = ckpt.get(key + _DOWN), ckpt.get(key + _UP)
        name = recorded.get(key, key)
        modules[name] = build_module(name, A, B, _alpha(ckpt, key, A.shape[0], path), embedding=False, source=path)
    notes = [] if recorded else [f"{path}: module names are kohya keys (no {NAMES_KEY} record in the file)"]
    return Adapter(modules=modules, base_model=ckpt.metadata.get("ss_sd_model_name"), source_format="kohya",
                   notes=notes)
