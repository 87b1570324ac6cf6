"""diffusers LoRA files: a pipeline's adapter in one ``pytorch_lora_weights.safetensors``, and any single file of
PEFT-style keys.

A diffusers pipeline's adapter (modules under ``unet.``, ``text_encoder.``, ``text_encoder_2.``, ``transformer.``)
is written the way diffusers' ``save_lora_weights`` does: one ``pytorch_lora_weights.safetensors`` with keys
``<component>.<module>.lora_A.weight`` and each component's LoraConfig in the ``lora_adapter_metadata`` entry of
the safetensors metadata, so that ``pipe.load_lora_weights(folder)`` restores every rank and alpha. One component's adapter (extracted from
``pipe/unet`` alone) is a PEFT folder, and the same file beside it with names and LoraConfig without a prefix, which
``unet.load_lora_adapter(folder, weight_name="pytorch_lora_weights.safetensors", prefix=None)`` loads.

Which adapters are a pipeline's (:func:`is_diffusers_adapter`) is decided from the evidence, strongest first: what
was recorded (``Adapter.pipeline``: the base's ``model_index.json`` / ``config.json`` at extract, the file an
adapter was read from), transformers ``Conv1D`` modules (GPT-2: a transformers model), and only then the names.
A transformers model whose weights start with ``transformer.`` (GPT-2, GPT-J, Falcon, Bloom, MPT, ...) is one
model, written as a PEFT folder (see :mod:`.model_config`).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from ..adapter import Adapter, ModuleKind
from .atomic import write_safetensors
from .base_class import base_class_from_metadata, base_class_metadata
from .checkpoint import open_checkpoint
from ..errors import AdapterFormatError, ConversionError
from .adapter_extras import attach_extras, split_extras
from .json_input import load_json, type_name
from .peft import WEIGHTS_NAME, build_module, collect_factors, modules_from_config, peft_config, peft_state_dict

__all__ = ["DIFFUSERS_NAME", "DIFFUSERS_COMPONENTS", "is_diffusers_adapter", "pipeline_components",
           "write_diffusers", "read_peft_file", "lone_component"]

DIFFUSERS_NAME = "pytorch_lora_weights.safetensors"
DIFFUSERS_METADATA = "lora_adapter_metadata"
DIFFUSERS_COMPONENTS = ("unet.", "text_encoder.", "text_encoder_2.", "transformer.")
_LORA_CONFIG_KEYS = ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "target_modules", "use_rslora", "use_dora",
                     "lora_dropout", "bias", "init_lora_weights")


def _may_be_pipeline(adapter: Adapter) -> bool:
    """False when the evidence says one model: recorded so, or a transformers Conv1D module (GPT-2 family)."""
    return adapter.pipeline is not False and not any(m.kind is ModuleKind.CONV1D for m in adapter.modules.values())


def is_diffusers_adapter(adapter: Adapter) -> bool:
    """True for a diffusers pipeline's adapter: every module under a pipeline component (``unet.``,
    ``text_encoder.``, ``transformer.``, ...) and nothing recorded that makes it one model's (``Adapter.pipeline``
    False: a base with a transformers / component ``config.json``, a PEFT folder; or Conv1D modules)."""
    names = [*adapter.modules, *adapter.full_tensors]
    return _may_be_pipeline(adapter) and bool(names) and all(n.startswith(DIFFUSERS_COMPONENTS) for n in names)


def pipeline_components(adapter: Adapter) -> dict[str, int]:
    """Modules per pipeline component (``"-"``: none) for ``info``; {} for one model's adapter (a GPT-2 adapter's
    ``transformer.`` is no component)."""
    if not _may_be_pipeline(adapter):
        return {}
    counts = Counter(next((c[:-1] for c in DIFFUSERS_COMPONENTS if n.startswith(c)), "-") for n in adapter.modules)
    return dict(sorted(counts.items())) if set(counts) != {"-"} else {}


# ----------------------------------------------------------------------------------------------- write


def _config_name(name: str, component: str) -> str:
    """A text encoder's names in its LoraConfig lose ``text_model.``: PEFT matches targets and patterns by their
    dotted tail, so they fit a CLIPTextModel with or without it (transformers >= 5 flattens it, and diffusers
    strips it from the weights' keys to match)."""
    return name[len("text_model."):] if component.startswith("text_encoder") and name.startswith("text_model.") else name


def lone_component(adapter: Adapter) -> bool:
    """True for one diffusers component's adapter (its base a component folder: ``config.json`` with
    ``_class_name``, e.g. ``pipe/unet``), written as a PEFT folder: diffusers' ``model.load_lora_adapter`` reads
    neither its ``base_model.model.`` keys nor its config, so :func:`write_diffusers` (``lone``) adds its file."""
    base = Path(adapter.base_model) if adapter.base_model else None
    if base is None or adapter.full_tensors or is_diffusers_adapter(adapter) or not (base / "config.json").is_file():
        return False
    try:
        config = load_json(base / "config.json", error=AdapterFormatError, fix="re-save the base")
    except AdapterFormatError:
        return False  # a base that changed since: no evidence
    return isinstance(config, dict) and isinstance(config.get("_class_name"), str)


def write_diffusers(adapter: Adapter, folder: Path, *, lone: bool = False) -> None:
    """Write a pipeline's adapter as diffusers' ``pytorch_lora_weights.safetensors`` in ``folder``; ``lone``: one
    component's, names and LoraConfig without a component prefix, as ``model.load_lora_adapter(folder,
    weight_name="pytorch_lora_weights.safetensors", prefix=None)`` reads them."""
    if adapter.full_tensors:
        name = next(iter(adapter.full_tensors))
        raise ConversionError(f"{name} is saved whole, which a diffusers LoRA file cannot hold: drop --full-modules "
                              f"or extract the component folder alone (PEFT modules_to_save)")
    metadata = {}
    for component in ("",) if lone else DIFFUSERS_COMPONENTS:
        modules = {_config_name(n[len(component):], component): m for n, m in adapter.modules.items()
                   if n.startswith(component)}
        if modules:
            config = peft_config(Adapter(modules=modules))
            metadata.update({f"{component}{k}": config[k] for k in _LORA_CONFIG_KEYS})
    folder.mkdir(parents=True, exist_ok=True)
    write_safetensors(peft_state_dict(adapter, prefix=""), folder / DIFFUSERS_NAME,  # same bytes for the same adapter
                      metadata={"format": "pt", **base_class_metadata(adapter),
                                DIFFUSERS_METADATA: json.dumps(metadata, sort_keys=True, allow_nan=False)})


# ------------------------------------------------------------------------------------------------ read


def _scalar(ckpt, key: str, where: Path) -> float:
    t = ckpt.get(key)
    if t.numel() != 1:
        raise AdapterFormatError(f"{where}: {key} has shape {tuple(t.shape)}, expected a scalar alpha")
    return float(t.reshape(()).item())


def _metadata(ckpt, path: Path) -> dict:
    raw = ckpt.metadata.get(DIFFUSERS_METADATA)
    metadata = load_json(raw, what=f"{path}: metadata {DIFFUSERS_METADATA}", error=AdapterFormatError,
                         fix="re-save the file") if raw else {}
    if not isinstance(metadata, dict):
        raise AdapterFormatError(f"{path}: metadata {DIFFUSERS_METADATA} is {type_name(metadata)}, not an object")
    return metadata


def read_peft_file(path: Path) -> Adapter:
    """A single file of PEFT-style keys: diffusers' ``pytorch_lora_weights.safetensors`` (LoraConfigs in its
    metadata, else per-module ``.alpha`` keys, else alpha = r as diffusers assumes) or a bare adapter file.
    ``Adapter.pipeline``: True for diffusers' file name or metadata, False for PEFT's ``adapter_model.safetensors``
    (its folder lost the config), else None (the names decide)."""
    ckpt, extras = split_extras(open_checkpoint(path, dequantize=False))  # DoRA magnitudes, lora_B.bias
    halves, full, alphas, notes = collect_factors(ckpt, path)
    metadata = _metadata(ckpt, path)
    orphan = sorted(set(alphas) - set(halves))
    if orphan:
        raise AdapterFormatError(f"{path}: key {alphas[orphan[0]]} has no lora_A / lora_B beside it: the file is "
                                 f"incomplete")
    modules = {}
    for component in DIFFUSERS_COMPONENTS:  # diffusers' save_lora_weights: one LoraConfig per component
        config = {k[len(component):]: v for k, v in metadata.items() if k.startswith(component)}
        if config:
            part = {n: p for n, p in halves.items() if n.startswith(component)}
            modules.update(modules_from_config(part, config, path, path, strip=component))
    for name, parts in halves.items():
        if name not in modules:
            A = parts["A"]
            alpha = _scalar(ckpt, alphas[name], path) if name in alphas else float(A.shape[0] if A.ndim else 0)
            modules[name] = build_module(name, A, parts["B"], alpha, embedding=parts["emb"], source=path,
                                         keys=(parts["A_key"], parts["B_key"]))
    pipeline = True if path.name == DIFFUSERS_NAME or metadata else False if path.name == WEIGHTS_NAME else None
    adapter = Adapter(modules=modules, full_tensors=full, notes=notes, pipeline=pipeline,
                      base_model=ckpt.metadata.get("base_model_name_or_path"),
                      base_class=base_class_from_metadata(ckpt.metadata),
                      tensor_deltas=attach_extras(modules, extras, ckpt, path))
    adapter.source_format = "diffusers" if pipeline or is_diffusers_adapter(adapter) else "peft-file"
    return adapter
