"""The module names a transformers model has once loaded, which are the names a PEFT adapter must use.

transformers v5 renames checkpoint keys on load (its ``conversion_mapping``: GPT-NeoX ``embed_out`` is the model's
``lm_head``; LLaVA's ``language_model.model.layers.N`` is ``model.language_model.layers.N``), and PEFT matches
``target_modules`` against the model's modules: an adapter in the checkpoint's names loads nothing, in silence.
Tied weights are one parameter under several names (T5's ``shared`` is also ``encoder.embed_tokens`` and
``decoder.embed_tokens``); PEFT wraps each module it is told to, so a LoRA on ``shared`` alone never reaches the
encoder's and decoder's lookups.

Both facts come from the model class itself, built on the meta device (no weights: 0.07 s for a GPT-NeoX-20B
config once transformers is imported; 2.7 s for the first one in a process, a Llama-2-7B config, the import
included): the renames are transformers' own ``WeightRenaming`` rules applied to the checkpoint's keys, kept where
the new name is a parameter of the model and the old one is not; the aliases are the embedding modules sharing one
parameter; weighted modules that are no LoRA layer (MoE routers) are listed for :mod:`.layers` to save whole.
Models whose conversion fuses tensors (MoE experts) keep their names: PEFT's own conversion expects the
checkpoint's. Nothing is built for a checkpoint without a transformers
``config.json`` (diffusers components, bare files) or when transformers is not installed.

An adapter written in the model's names records {its name: the checkpoint's name} (``Adapter.model_names``, the
PEFT file's metadata), so apply and check can map back; an alias maps to its owner's checkpoint name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from functools import lru_cache

import torch

from ..adapter import Adapter, ModuleKind, module_name
from .checkpoint import Checkpoint
from .model_config import is_plain, meta_model

__all__ = ["ModelNames", "model_names", "in_model_names", "in_checkpoint_names", "with_aliases", "fold_aliases",
           "checkpoint_index",
           "CHECKPOINT_NAMES_KEY", "names_metadata", "names_from_metadata"]

#: safetensors metadata key of a PEFT file written in the model's names: JSON {adapter name: checkpoint name}
CHECKPOINT_NAMES_KEY = "lowrank_tools.checkpoint_names"


@dataclass(frozen=True)
class ModelNames:
    """What loading the checkpoint as its transformers class does to module names."""

    model_class: str
    renamed: dict[str, str] = field(default_factory=dict)  # checkpoint module name -> model module name
    aliases: dict[str, tuple[str, ...]] = field(default_factory=dict)  # embedding (model name) -> its tied aliases
    # modules named alike in checkpoint and model whose weight PEFT's LoRA cannot wrap (MoE routers: a raw weight
    # parameter, not an nn.Linear): saved whole instead
    unadaptable: frozenset[str] = frozenset()

    def checkpoint_name(self, name: str) -> str:
        """The checkpoint's module name of model module ``name`` (an alias: its owner's)."""
        owner = next((o for o, al in self.aliases.items() if name in al), name)
        back = {m: c for c, m in self.renamed.items()}
        return back.get(owner, owner)


def model_names(ckpt: Checkpoint) -> ModelNames | None:
    """The renames, tied aliases and LoRA-less weighted modules (routers) of ``ckpt``'s transformers class (None: not
    a transformers checkpoint, or its class cannot be built here). Built once per checkpoint and process; a model
    type of :data:`~.model_config.PLAIN_MODEL_TYPES` gets the empty answer without a build."""
    config = ckpt.config if isinstance(ckpt.config, dict) else {}
    archs = config.get("architectures") or []
    if not archs or not isinstance(config.get("model_type"), str):
        return None
    if is_plain(config):
        return ModelNames(str(archs[0]))
    return _model_names(json.dumps(config, sort_keys=True), str(archs[0]), tuple(sorted(ckpt.keys())))


@lru_cache(maxsize=4)
def _model_names(config_json: str, arch: str, keys: tuple[str, ...]) -> ModelNames | None:
    model = meta_model(json.loads(config_json))
    if model is None:
        return None
    names = dict(model.named_parameters(remove_duplicate=False))
    renamed = _renames(model, keys, set(names))
    return ModelNames(arch, renamed, _aliases(model, keys, renamed), _unadaptable(model, keys))


def _unadaptable(model, keys: tuple[str, ...]) -> frozenset[str]:
    from transformers.pytorch_utils import Conv1D

    lora_layers = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, Conv1D)
    stored = set(keys)
    return frozenset(name for name, module in model.named_modules()
                     if f"{name}.weight" in stored and not isinstance(module, lora_layers)
                     and getattr(getattr(module, "weight", None), "ndim", 0) >= 2)


def _renames(model, keys: tuple[str, ...], params: set[str]) -> dict[str, str]:
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, apply_renamings

    rules = get_model_conversion_mapping(model)
    if any(isinstance(r, WeightConverter) for r in rules):  # fused on load (MoE experts): PEFT converts these itself
        return {}
    renamings = [r for r in rules if isinstance(r, WeightRenaming)]
    out = {}
    for key in keys:
        new = apply_renamings(key, renamings)
        if new != key and new in params and key not in params:
            out[module_name(key)] = module_name(new)
    return out


def _aliases(model, keys: tuple[str, ...], renamed: dict[str, str]) -> dict[str, tuple[str, ...]]:
    """Embedding modules sharing one weight: {the one the checkpoint stores: the others} in the model's names
    (output heads, which are Linear, are left to the tied-head rule of :mod:`.layers`)."""
    modules = dict(model.named_modules())
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if name.endswith(".weight") and isinstance(modules.get(module_name(name)), torch.nn.Embedding):
            groups.setdefault(id(p), []).append(module_name(name))
    stored = {renamed.get(module_name(k), module_name(k)) for k in keys}
    out = {}
    for group in groups.values():  # names the checkpoint stores too are layers of their own there (older saves)
        owners = [n for n in group if n in stored]
        if owners and (aliases := tuple(n for n in group if n not in stored)):
            out[owners[0]] = aliases
    return out


def in_model_names(adapter: Adapter, ckpt: Checkpoint) -> tuple[Adapter, str | None]:
    """``adapter`` (in ``ckpt``'s names) in the names of the model PEFT loads it onto: modules and tensors saved
    whole renamed, each tied embedding's aliases recorded (:func:`with_aliases` writes its factors on them); with
    a one-line note (None: unchanged)."""
    names = model_names(ckpt) if adapter.modules or adapter.full_tensors else None
    if names is None:
        return adapter, None
    modules = {names.renamed.get(n, n): m for n, m in adapter.modules.items()}
    record = {names.renamed[n]: n for n in adapter.modules if n in names.renamed}
    record.update({names.renamed[_owner_of(t)]: _owner_of(t) for t in adapter.full_tensors
                   if _owner_of(t) in names.renamed})
    renamed = [f"{c} -> {m}" for m, c in record.items()]
    tied = [a for owner, aliases in names.aliases.items() for a in aliases
            if modules.get(owner) is not None and modules[owner].kind is ModuleKind.EMBEDDING]
    record.update({a: names.checkpoint_name(a) for a in tied})
    if not record:
        return adapter, None
    shown = ", ".join(renamed[:3]) + (", ..." if len(renamed) > 3 else "")
    parts = ([f"{len(renamed)} renamed ({shown})"] if renamed else []) + (
        [f"the tied embedding's factors are also written on {', '.join(tied)} (one weight, so one delta)"]
        if tied else [])
    note = f"module names are {names.model_class}'s once loaded (PEFT matches those): " + "; ".join(parts)
    full = {_renamed_tensor(t, names.renamed): v for t, v in adapter.full_tensors.items()}
    return replace(adapter, modules=modules, full_tensors=full,
                   model_names={**adapter.model_names, **record}), note


def _owner_of(tensor: str) -> str:
    """The module holding ``tensor`` (``x.bias`` -> ``x``)."""
    return tensor.rpartition(".")[0]


def _renamed_tensor(tensor: str, renamed: dict[str, str]) -> str:
    mod, _, leaf = tensor.rpartition(".")
    return f"{renamed[mod]}.{leaf}" if mod in renamed else tensor


def _owner(adapter: Adapter, alias: str) -> str | None:
    """The embedding module whose factors a recorded tied alias repeats."""
    target = adapter.model_names[alias]
    return next((n for n, m in adapter.modules.items() if n != alias and m.kind is ModuleKind.EMBEDDING
                 and adapter.model_names.get(n, n) == target), None)


def with_aliases(adapter: Adapter) -> dict:
    """``adapter``'s modules with each recorded tied alias holding its owner's factors (what a PEFT file holds)."""
    modules = dict(adapter.modules)
    for alias in adapter.model_names:
        if alias not in modules and (owner := _owner(adapter, alias)) is not None:
            m = modules[owner]  # copies: safetensors refuses tensors that share memory
            modules[alias] = replace(m, A=m.A.clone(), B=m.B.clone())
    return modules


def fold_aliases(adapter: Adapter) -> Adapter:
    """``adapter`` as read from a file: a recorded alias whose factors equal its owner's is one module, not two;
    a note says which names are the model's and what they were in the checkpoint (``info`` shows it)."""
    drop = [a for a in adapter.model_names if a in adapter.modules and (o := _owner(adapter, a)) is not None
            and _same(adapter.modules[o], adapter.modules[a])]
    renamed = [f"{n} (checkpoint: {c})" for n, c in adapter.model_names.items()
               if n in adapter.modules and n not in drop and _owner(adapter, n) is None]
    notes = [f"{len(renamed)} module name(s) are the transformers model's, recorded with the checkpoint's: "
             f"{', '.join(renamed[:3])}{' ...' if len(renamed) > 3 else ''}"] if renamed else []
    if drop:
        notes.append(f"{', '.join(drop)}: tied to {adapter.model_names[drop[0]]} (one weight): its factors are "
                     f"written on every name, counted once")
    return replace(adapter, modules={n: m for n, m in adapter.modules.items() if n not in drop},
                   notes=[*adapter.notes, *notes]) if notes else adapter


def in_checkpoint_names(adapter: Adapter, ckpt: Checkpoint) -> Adapter:
    """``adapter`` in ``ckpt``'s names, for apply: modules the checkpoint lacks are mapped back by the adapter's
    record, else by the model class; a tied alias whose factors repeat its owner's is dropped (one delta, once)."""
    missing = [n for n in adapter.modules if f"{n}.weight" not in ckpt]
    whole = [_owner_of(t) for t in adapter.full_tensors if t not in ckpt]
    if not missing and not whole:
        return adapter
    back = {n: adapter.model_names[n] for n in missing + whole if n in adapter.model_names}
    names = model_names(ckpt) if len(back) < len(missing) + len(whole) else None
    if names is not None:
        back.update({n: names.checkpoint_name(n) for n in missing + whole if n not in back})
    modules: dict = {}
    for n, m in adapter.modules.items():
        target = back.get(n, n)
        if target in modules and _same(modules[target], m):
            continue  # a tied alias's copy of its owner's factors
        modules[target if target not in modules else n] = m
    full = {_renamed_tensor(t, back): v for t, v in adapter.full_tensors.items()}
    return replace(adapter, modules=modules, full_tensors=full, model_names={})


def _same(a, b) -> bool:
    return a is b or (a.A.shape == b.A.shape and a.B.shape == b.B.shape and a.alpha == b.alpha
                      and torch.equal(a.A, b.A) and torch.equal(a.B, b.B))


def checkpoint_index(ckpt: Checkpoint, metadata: dict | None = None) -> dict[str, str]:
    """{model module name: checkpoint module name} of every renamed module and tied alias of ``ckpt``'s model
    (``metadata``: a PEFT file's, whose record comes first), for check --base."""
    index = names_from_metadata(metadata or {})
    names = model_names(ckpt)
    if names is not None:
        for name in [*names.renamed.values(), *(a for al in names.aliases.values() for a in al)]:
            index.setdefault(name, names.checkpoint_name(name))
    return index


def names_metadata(adapter: Adapter) -> dict[str, str]:
    """The safetensors metadata recording ``adapter.model_names`` (empty when there is none)."""
    return {CHECKPOINT_NAMES_KEY: json.dumps(adapter.model_names, sort_keys=True)} if adapter.model_names else {}


def names_from_metadata(metadata: dict) -> dict[str, str]:
    """{adapter name: checkpoint name} recorded in a PEFT file's metadata ({} when absent or unreadable)."""
    try:
        found = json.loads(metadata.get(CHECKPOINT_NAMES_KEY) or "{}")
    except ValueError:
        return {}
    return {str(k): str(v) for k, v in found.items()} if isinstance(found, dict) else {}
