"""kohya / A1111 / ComfyUI LoRA files: one safetensors file with ``<prefix><module . -> _>`` keys.

    lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight   A: (r, in) or (r, in, kh, kw)
    lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight     B: (out, r) or (out, r, 1, 1)
    lora_unet_down_blocks_0_attentions_0_proj_in.alpha              0-d tensor; scale = alpha / r

Convention: a module without ``.alpha`` has alpha = r, i.e. scale 1 (what kohya's, A1111's and diffusers' loaders
assume). Written alphas are float32 scalars equal to scale * r, so every module's product is kept exactly.

Names (see :mod:`kohya_names`): since ``_`` is ambiguous, files written here record ``{kohya key: module name}``
in the safetensors metadata under ``lowrank_tools.modules``, so reading them back restores the names exactly.
A file without that record is read by matching its keys against a base checkpoint's module names when one is
given, else by rebuilding names from known diffusers/transformers identifiers, and the adapter says which names
are guesses. Embeddings and tensors saved whole have no kohya form: writing them is a :class:`ConversionError`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..adapter import Adapter, LoraModule, ModuleKind
from .adapter_extras import kohya_extras
from .atomic import write_safetensors
from .base_class import base_class_from_metadata, base_class_metadata
from .checkpoint import open_checkpoint
from ..errors import AdapterFormatError, ConversionError
from .json_input import get_str_map, load_json
from .kohya_names import (KOHYA_PREFIXES, T5_PREFIX, architecture_names, check_prefix, dotted_module_name, guess_module_name,
                          kohya_key, match_keys, t5_component)
from .peft import build_module, file_factors, lora_keys_seen

__all__ = ["NAMES_KEY", "kohya_key", "is_kohya_keys", "read_kohya", "write_kohya", "kohya_state_dict",
           "resolve_module_names"]

NAMES_KEY = "lowrank_tools.modules"
_DOWN, _UP, _ALPHA = ".lora_down.weight", ".lora_up.weight", ".alpha"


def is_kohya_keys(keys) -> bool:
    return any(k.endswith(_DOWN) or k.endswith(_UP) for k in keys)


def _check_holdable(adapter: Adapter) -> None:
    for name, m in adapter.modules.items():
        if m.kind is ModuleKind.EMBEDDING:
            raise ConversionError(f"module {name} is an embedding, which kohya files cannot hold: use --format peft, "
                                  f"or leave it out (--exclude '{name}')")
    if adapter.full_tensors:
        name = next(iter(adapter.full_tensors))
        raise ConversionError(f"tensor {name} is saved whole (modules_to_save), which kohya files cannot hold: use "
                              f"--format peft")


def kohya_state_dict(adapter: Adapter, *, prefix: str = "lora_unet_") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """({kohya tensor key: tensor}, {kohya module key: module name}); raises for what kohya cannot hold."""
    check_prefix(prefix)
    _check_holdable(adapter)
    two_encoders = any(n.startswith("text_encoder_2.") for n in adapter.modules)
    tensors: dict[str, torch.Tensor] = {}
    names: dict[str, str] = {}
    for name, m in adapter.modules.items():
        key = kohya_key(name, prefix=prefix, two_encoders=two_encoders)
        if key in names:
            raise ConversionError(f"modules {names[key]} and {name} both map to kohya key {key}: use --format peft")
        names[key] = name
        down, up = file_factors(m)
        tensors[key + _DOWN] = down.contiguous()
        tensors[key + _UP] = up.contiguous()
        tensors[key + _ALPHA] = _alpha_tensor(name, m.scale * m.rank)
    tensors.update(_extras(adapter, names, prefix, two_encoders))
    return tensors, names


def _alpha_tensor(name: str, alpha: float) -> torch.Tensor:
    """kohya's ``.alpha`` is a float32 scalar: an alpha past its range (Inf) or below it (0) would change the
    module's product, so it is refused with the module's name."""
    t = torch.tensor(alpha, dtype=torch.float32)
    if not (math.isfinite(float(t)) and float(t) >= torch.finfo(torch.float32).tiny):  # subnormal: digits lost
        raise ConversionError(f"module {name}: alpha {alpha:g} does not fit the float32 .alpha of a kohya file: "
                              f"give an --alpha within float32's range (1e-38 to 3e38), or use --format peft")
    return t


def _extras(adapter: Adapter, names: dict[str, str], prefix: str, two_encoders: bool) -> dict[str, torch.Tensor]:
    """DoRA ``dora_scale`` and whole-tensor deltas (``diff_b``, ``w_norm``, ``b_norm``); ``names`` gains the keys
    of modules that only have tensor deltas."""
    keys = {name: key for key, name in names.items()}
    for tensor in adapter.tensor_deltas:
        owner = tensor.rsplit(".", 1)[0]
        if owner not in keys:
            keys[owner] = kohya_key(owner, prefix=prefix, two_encoders=two_encoders)
            names[keys[owner]] = owner
    return kohya_extras(adapter, keys)


def write_kohya(adapter: Adapter, path: Path, *, prefix: str = "lora_unet_") -> None:
    """Write ``adapter`` as a kohya safetensors file at ``path`` (the caller makes it atomic)."""
    tensors, names = kohya_state_dict(adapter, prefix=prefix)
    ranks = sorted({m.rank for m in adapter.modules.values()})
    alphas = sorted({m.scale * m.rank for m in adapter.modules.values()})
    metadata = {"format": "pt", NAMES_KEY: json.dumps(names, allow_nan=False), "ss_network_module": "networks.lora",
                "ss_network_dim": str(ranks[-1] if ranks else 0),
                "ss_network_alpha": "dynamic" if len(alphas) > 1 else f"{alphas[0] if alphas else 0:g}"}
    if adapter.base_model:
        metadata["ss_sd_model_name"] = adapter.base_model
    metadata.update(base_class_metadata(adapter))  # the base's diffusers class, when extract read one
    path.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors(tensors, path, metadata=metadata)  # same bytes for the same adapter


# ------------------------------------------------------------------------------------------------ read


def _group_keys(ckpt, path: Path) -> set[str]:
    """Module keys of the file; any tensor that is not a down/up/alpha of one raises, naming the key."""
    downs = {k[: -len(_DOWN)] for k in ckpt.keys() if k.endswith(_DOWN)}
    ups = {k[: -len(_UP)] for k in ckpt.keys() if k.endswith(_UP)}
    for key in sorted(downs ^ ups):
        have, lacks = (_DOWN, "lora_up") if key in downs else (_UP, "lora_down")
        raise AdapterFormatError(f"{path}: key {key}{have} has no matching {lacks}: the file is incomplete")
    for key in ckpt.keys():
        if key.endswith(_ALPHA) and key[: -len(_ALPHA)] not in downs:
            raise AdapterFormatError(f"{path}: key {key} has no lora_down / lora_up beside it: the file is incomplete")
        if not (key.endswith(_DOWN) or key.endswith(_UP) or key.endswith(_ALPHA)):
            raise AdapterFormatError(f"{path}: key {key} is not a LoRA factor (keys seen: {lora_keys_seen(ckpt.keys())})"
                                     f": supported are lora_down / lora_up / alpha and the LyCORIS kinds (LoHa, LoKr, Tucker, DoRA, diffs)")
    return downs


def _alpha(ckpt, key: str, rank: int, where: Path) -> float:
    if key + _ALPHA not in ckpt:
        return float(rank)  # no alpha: scale 1
    t = ckpt.get(key + _ALPHA)
    if t.numel() != 1:
        raise AdapterFormatError(f"{where}: key {key}{_ALPHA} has shape {tuple(t.shape)}, expected a scalar alpha")
    value = float(t.reshape(()).item())
    if not math.isfinite(value):
        raise AdapterFormatError(f"{where}: key {key}{_ALPHA} is {value}, not a finite number")
    return value


def _recorded_names(ckpt, path: Path) -> dict[str, str]:
    raw = ckpt.metadata.get(NAMES_KEY)
    names = load_json(raw, what=f"{path}: metadata {NAMES_KEY}", error=AdapterFormatError,
                      fix="re-write the file") if raw else {}
    return get_str_map({NAMES_KEY: names}, NAMES_KEY, f"{path}: metadata", error=AdapterFormatError)


def _module_names(keys: list[str], recorded: dict, path: Path, module_names, base: str | None,
                  metadata: dict | None = None) -> tuple[dict, list]:
    """{kohya key: module name} and notes: recorded names, else matched against a base, else guessed."""
    names = {k: recorded[k] for k in keys if k in recorded}
    names.update({k: dotted_module_name(k) for k in keys if k not in names and "." in k})  # exact: ComfyUI's
    exact, found = architecture_names(k for k in keys if k not in names)
    names.update(exact)
    rest = [k for k in keys if k not in names]
    notes = [f"{path}: read as {found.describe()}: {len(exact)} module names from its table"] if found else []
    if rest and module_names is not None:
        names.update(match_keys(rest, module_names, where=str(path), base=base or "the base checkpoint"))
        notes.append(f"{path}: {len(rest)} module names matched against {base or 'the base checkpoint'} "
                     f"(no {NAMES_KEY} record)")
    elif rest:
        names.update({k: guess_module_name(k) for k in rest})
        notes += _t5_names(names, [k for k in rest if k.startswith(T5_PREFIX)], found, metadata or {}, path)
        notes.append(f"{path}: {len(rest)} module names are guesses from the known diffusers/transformers naming "
                     f"(e.g. {rest[0]} -> {names[rest[0]]}): pass a base checkpoint to match them exactly")
    seen: dict[str, str] = {}
    for key, name in names.items():
        if name in seen:
            raise AdapterFormatError(f"{path}: keys {seen[name]} and {key} both stand for module {name}")
        seen[name] = key
    return names, notes


def _t5_names(names: dict[str, str], t5_keys: list[str], found, metadata: dict, path: Path) -> list[str]:
    """Guessed ``lora_te3_`` (T5) names moved to the component the file's model has it in (Flux: text_encoder_2,
    SD3: text_encoder_3, see :func:`~.kohya_names.t5_component`); notes saying how it was decided."""
    if not t5_keys:
        return []
    component, why = t5_component(found, metadata)
    guessed = KOHYA_PREFIXES[T5_PREFIX][0]
    if component is None:
        return [f"{path}: {len(t5_keys)} lora_te3_ (T5) modules read as SD3's {guessed[:-1]} ({why}); a Flux "
                f"LoRA's T5 is text_encoder_2: pass --base to read them against the model"]
    for key in t5_keys:
        names[key] = component + names[key][len(guessed):]
    return [f"{path}: {len(t5_keys)} lora_te3_ (T5) modules read as {component[:-1]} ({why})"]


def resolve_module_names(ckpt, keys: list[str], path: Path, module_names=None, base: str | None = None
                         ) -> tuple[dict[str, str], list[str]]:
    """{kohya module key: module name} and notes for ``keys`` of ``ckpt``: recorded names, else matched against
    ``module_names`` (a base's), else guessed (what :func:`read_kohya` does; LyCORIS files use it too)."""
    return _module_names(keys, _recorded_names(ckpt, path), path, module_names, base, ckpt.metadata)


def read_kohya(path: Path, *, module_names=None, base: str | None = None) -> Adapter:
    """Read a kohya/A1111/ComfyUI LoRA file; ``module_names`` (a base checkpoint's) resolve unrecorded keys."""
    ckpt = open_checkpoint(path, dequantize=False)
    downs, recorded = _group_keys(ckpt, path), _recorded_names(ckpt, path)
    keys = [k for k in recorded if k in downs] + sorted(k for k in downs if k not in recorded)  # as written
    names, notes = _module_names(keys, recorded, path, module_names, base, ckpt.metadata)
    modules: dict[str, LoraModule] = {}
    for key in keys:
        A, B = ckpt.get(key + _DOWN), ckpt.get(key + _UP)
        alpha = _alpha(ckpt, key, A.shape[0] if A.ndim else 0, path)
        modules[names[key]] = build_module(names[key], A, B, alpha, embedding=False, source=path,
                                           keys=(key + _DOWN, key + _UP))
    no_alpha = [k for k in keys if k + _ALPHA not in ckpt]
    if no_alpha:
        notes.append(f"{path}: {len(no_alpha)} modules have no .alpha (e.g. {no_alpha[0]}): alpha = r, scale 1")
    return Adapter(modules=modules, base_model=ckpt.metadata.get("ss_sd_model_name"), source_format="kohya",
                   notes=notes, base_class=base_class_from_metadata(ckpt.metadata))
