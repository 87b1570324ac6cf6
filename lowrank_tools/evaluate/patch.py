"""Adapters applied to a loaded model in memory, then taken out again, bit for bit.

Each module's dense delta comes from :meth:`~lowrank_tools.adapter.LoraModule.delta` (``scale * B @ A`` laid
out as the weight) and is added in place to the model parameter it adapts; a copy of every touched parameter is
kept first (on the CPU) and copied back on exit: subtracting the delta again would not restore the weights
exactly. Memory: the copies of the touched weights and one dense delta at a time, never a second model.

Layout: a transformers ``Conv1D`` layer (GPT-2 family) stores its weight (in, out); the loaded layer's class decides,
as in PEFT (an adapter's ``fan_in_fan_out`` is only a hint), and its delta is laid out transposed.

Names: an adapter module ``model.layers.0.self_attn.q_proj`` adapts parameter ``<name>.weight``; the model's
``base_model_prefix`` may be present on one side only (a ``bert.`` checkpoint loaded as ``BertModel``). Tied
parameters (an ``lm_head`` sharing the embedding) get the delta once when the adapter carries the same product
on both sides (extract writes a tie so), else both (as ``apply`` and PEFT's ``merge_and_unload`` do). A DoRA module
(with a magnitude m) makes the weight ``m (W0 + delta) / ||W0 + delta||`` per output row (or input channel) after
the deltas are summed in float32, as ``apply`` does (:func:`~lowrank_tools.linalg.structured.dora_rescale_`).
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..adapter import Adapter, LoraModule, ModuleKind, as_conv1d
from ..errors import AdapterMismatch, NonFiniteWeight
from ..io.arch_convert import to_base_naming
from ..io.models import is_conv1d_layer
from ..linalg.structured import dora_rescale_

__all__ = ["Patch", "plan_patch", "applied"]

_SAME = 1e-5  # relative Frobenius difference under which two deltas on one tied weight are one


@dataclass
class Patch:
    """What an adapter changes in one model: parameter name -> modules adding to it / tensor replacing it."""

    source: str
    terms: dict[str, list[tuple[str, LoraModule]]] = field(default_factory=dict)
    whole: dict[str, Tensor] = field(default_factory=dict)
    outside: list[str] = field(default_factory=list)  # modules of a head the loaded model has not (skip_heads)


def _candidates(name: str, prefix: str) -> list[str]:
    names = [name]
    if prefix and name.startswith(prefix + "."):
        names.append(name[len(prefix) + 1:])
    elif prefix:
        names.append(f"{prefix}.{name}")
    return names


def _find(name: str, params: dict[str, Tensor], prefix: str, source: str, *, suffix: str = ".weight") -> str:
    for candidate in _candidates(name, prefix):
        if candidate + suffix in params:
            return candidate + suffix
    close = difflib.get_close_matches(name + suffix, list(params), n=1)
    hint = f" (closest: {close[0]})" if close else ""
    raise AdapterMismatch(f"{source}: module {name} is not in the model (no parameter {name}{suffix}{hint}): use the "
                          f"adapter made for this base model, or drop the module ('^{re.escape(name)}$')")


def _fits(m: LoraModule, shape: tuple[int, ...]) -> bool:
    if m.kind in (ModuleKind.EMBEDDING, ModuleKind.CONV1D):
        return shape == tuple(m.weight_shape)
    out, inp = m.matrix_shape  # a linear LoRA on a 1x1 conv (or the reverse) fits when the matrix views agree
    return len(shape) >= 2 and shape[0] == out and math.prod(shape[1:]) == inp


def _layer_kind(model: torch.nn.Module, parameter: str) -> bool | None:
    """True when ``parameter`` is the weight of a transformers ``Conv1D`` (stored (in, out)), False of an
    ``nn.Linear``, None for anything else (the adapter's layout stands)."""
    owner = model.get_submodule(parameter.rsplit(".", 1)[0]) if "." in parameter else model
    if is_conv1d_layer(owner):
        return True
    return False if isinstance(owner, torch.nn.Linear) else None


def _outside(name: str, params: dict[str, Tensor], prefix: str, skip_heads: bool) -> bool:
    """A module of a task head (``cls.predictions.*`` of a ``BertForMaskedLM`` checkpoint) that the loaded base
    model (``BertModel``, its weights under ``bert.``) does not have: it cannot change the hidden states."""
    return (skip_heads and bool(prefix) and not name.startswith(prefix + ".")
            and not any(c + ".weight" in params for c in _candidates(name, prefix)))


def plan_patch(model: torch.nn.Module, adapter: Adapter, source: str, *, skip_heads: bool = False,
               prefix: str | None = None) -> Patch:
    """Check every module against ``model`` (name, shape, finite factors) before anything is changed.

    ``skip_heads`` (encoders loaded with ``AutoModel``, a pipeline's denoiser): modules outside the prefix that the
    model lacks are listed in ``Patch.outside`` instead of raising. ``prefix``: the name the model's modules may
    carry in the adapter (default: the model's ``base_model_prefix``; ``unet`` / ``transformer`` for a denoiser,
    whose pipeline adapters name ``unet.<module>`` beside ``text_encoder.<module>``). A transformer diffusion model's
    adapter named otherwise than the model (BFL/kohya Flux on a diffusers Flux) is brought to its naming exactly."""
    params = dict(model.named_parameters(remove_duplicate=False))
    adapter = to_base_naming(adapter, [n[:-len(".weight")] for n in params if n.endswith(".weight")])
    prefix = (getattr(model, "base_model_prefix", "") if prefix is None else prefix) or ""
    patch = Patch(source=source)
    for name, m in adapter.modules.items():
        if _outside(name, params, prefix, skip_heads):
            patch.outside.append(name)
            continue
        target = _find(name, params, prefix, source)
        conv1d = _layer_kind(model, target)
        m = m if conv1d is None else as_conv1d(m, conv1d)
        shape = tuple(params[target].shape)
        if not _fits(m, shape):
            raise AdapterMismatch(f"{source}: module {name} is {m.kind.value} {tuple(m.weight_shape)} but parameter "
                                  f"{target} is {shape}: the adapter was made for another model")
        if not (torch.isfinite(m.B).all() and torch.isfinite(m.A).all()):
            raise NonFiniteWeight(f"{source}: module {name} holds NaN/Inf factors: repair or re-export the adapter")
        patch.terms.setdefault(target, []).append((name, m))
        _check_dora(patch.terms[target], target, source)
    for tensor, t in adapter.full_tensors.items():
        base_name, _, leaf = tensor.rpartition(".")
        if _outside(base_name, params, prefix, skip_heads):
            patch.outside.append(base_name)
            continue
        target = _find(base_name, params, prefix, source, suffix="." + leaf)
        if tuple(params[target].shape) != tuple(t.shape):
            raise AdapterMismatch(f"{source}: tensor {tensor} saved whole is {tuple(t.shape)} but parameter {target} "
                                  f"is {tuple(params[target].shape)}: the adapter was made for another model")
        patch.whole[target] = t
    return patch


def _check_dora(terms: list[tuple[str, LoraModule]], target: str, source: str) -> None:
    dora = [name for name, m in terms if m.magnitude is not None]
    if len(dora) > 1:
        raise AdapterMismatch(f"{source}: parameter {target} gets DoRA modules {dora[0]} and {dora[1]}: two magnitudes "
                              f"for one weight are not defined; keep one of them")
    if any(m.magnitude is not None and m.kind is ModuleKind.EMBEDDING for _, m in terms):
        raise AdapterMismatch(f"{source}: embedding {dora[0]} carries a DoRA magnitude, which is not defined on "
                              f"embeddings: convert it to LoRA (convert --dora lora --base BASE)")


def _shared(params: dict[str, Tensor], names) -> dict[str, list[str]]:
    """Parameter names grouped by the storage they share (tied weights): first name -> all names."""
    groups: dict[tuple, list[str]] = {}
    for name in names:
        p = params[name]
        groups.setdefault((p.data_ptr(), tuple(p.shape)), []).append(name)
    return {group[0]: group for group in groups.values()}


def _delta(terms: list[tuple[str, LoraModule]], param: Tensor) -> Tensor:
    """The float32 sum of the modules' deltas in ``param``'s layout; a repeat of a delta already summed (both
    sides of a tie) is counted once."""
    total, seen = None, []
    for _, m in terms:
        d = m.to(device=param.device).delta().reshape(param.shape)  # float32, the weight's layout
        norm = float(torch.linalg.vector_norm(d))
        if any(float(torch.linalg.vector_norm(d - s)) <= _SAME * max(norm, 1e-30) for s in seen):
            continue
        seen.append(d)
        total = d if total is None else total + d
    return total


def _add(param: Tensor, terms: list[tuple[str, LoraModule]]) -> None:
    """``param += delta``; with a DoRA module, ``param = m (param + delta) / ||param + delta||`` (float32 work)."""
    delta = _delta(terms, param)
    dora = next((m for _, m in terms if m.magnitude is not None), None)
    if dora is None:
        param.add_(delta.to(param.dtype))
        return
    work = (param.float() + delta).reshape(param.shape[0], -1)  # (out, in_flat); a Conv1D's (in, out)
    conv1d = dora.kind is ModuleKind.CONV1D
    work = dora_rescale_(work.mT if conv1d else work, dora.magnitude, dora.dora_axis)  # in place, on a view
    param.copy_((work.mT if conv1d else work).reshape(param.shape).to(param.dtype))


@contextmanager
@torch.no_grad()
def applied(model: torch.nn.Module, patch: Patch) -> Iterator[None]:
    """``model`` with ``patch`` added in place for the body of the ``with``; restored exactly afterwards."""
    params = dict(model.named_parameters(remove_duplicate=False))
    touched = set(patch.terms) | set(patch.whole)
    groups = _shared(params, touched)
    saved: dict[str, Tensor] = {}
    try:
        for first, names in groups.items():
            param = params[first]
            saved[first] = param.detach().to("cpu", copy=True)
            whole = next((patch.whole[n] for n in names if n in patch.whole), None)
            if whole is not None:
                param.copy_(whole.to(param.device, param.dtype))
            terms = [t for n in names for t in patch.terms.get(n, [])]
            if terms:
                _add(param, terms)
        yield
    finally:
        for first, copy in saved.items():
            params[first].copy_(copy.to(params[first].device))
