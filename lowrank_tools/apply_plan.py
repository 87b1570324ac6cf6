"""apply's plan: which base tensor each adapter module adds to, as a checked ``coef * L @ R`` term, before anything
is read or written.

Every module is resolved to a base tensor (``<name>.weight``, or without a pipeline component prefix), laid out as the
base stores it (a transformers ``Conv1D`` weight (in, out) of the GPT-2 family takes (B A)^T: the base's
``config.json`` decides, as PEFT decides from the layer's class; see :func:`~lowrank_tools.io.layers.conv1d_rule`),
and checked (shape, finite factors, DoRA where it is defined). An output head the base does not store adds to the
input embedding it is tied to (:func:`~lowrank_tools.io.base_model.tied_embedding`, shared with ``check``);
tensors saved whole replace base tensors; tensor deltas (biases, norms) are rank-1 terms. Adapters named otherwise
than the base (BFL/kohya Flux onto diffusers) are first brought to its naming.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .adapter import LoraModule, ModuleKind, as_conv1d, matrix_shape
from .errors import AdapterMismatch, ConversionError, NonFiniteWeight
from .io.arch_convert import to_base_naming
from .io.module_names import in_checkpoint_names
from .io.checkpoint import Checkpoint
from .io.base_model import tied_embedding
from .io.layers import conv1d_rule, matches
from .io.openclip import fused_rows
from .linalg.norms import lowrank_frobenius_diff, lowrank_frobenius_norm
from .report import Warn
from .weighted import WeightedAdapter

__all__ = ["Term", "plan_apply"]

_COMPONENTS = ("unet.", "text_encoder.", "text_encoder_2.", "transformer.")  # diffusers pipeline components


@dataclass(frozen=True)
class Term:
    """One adapter module's contribution to a base tensor viewed as a (rows, cols) matrix: ``coef * L @ R``."""

    module: str
    source: str
    L: Tensor  # (rows, r): B, or A^T for embeddings
    R: Tensor  # (r, cols): A, or B^T for embeddings
    coef: float  # weight * scale
    magnitude: Tensor | None = None  # DoRA m (see _add_terms_dora)
    axis: str = "out"  # DoRA norm: per output row, or per input channel (LyCORIS legacy wd_on_out=False)
    weight: float = 1.0  # the adapter's weight (DoRA: w (m / ||W'|| - 1) + 1, LyCORIS' multiplier rule)
    conv1d: bool = False  # the tensor is a transformers Conv1D weight (in, out): DoRA norms run over its columns


def _resolve(name: str, base: Checkpoint) -> str | None:
    """The base tensor a module adapts: ``<name>.weight``, or the same without a pipeline component prefix
    (a ``unet.`` adapter applied to the ``unet`` folder)."""
    if f"{name}.weight" in base:
        return f"{name}.weight"
    for component in _COMPONENTS:
        if name.startswith(component) and f"{name[len(component):]}.weight" in base:
            return f"{name[len(component):]}.weight"
    return None


def _missing(name: str, source: str, base: Checkpoint, *, renamed: bool = False) -> AdapterMismatch:
    """``renamed``: a name of the base's naming the adapter's module was given (the filters see the adapter's own)."""
    close = difflib.get_close_matches(f"{name}.weight", base.keys(), n=1)
    hint = f" (closest: {close[0]})" if close else ""
    leave = "with --exclude on its name in the adapter" if renamed else f"with --exclude '^{re.escape(name)}$'"
    return AdapterMismatch(f"{source}: module {name} is not in base {base.path} (no tensor {name}.weight{hint}): "
                           f"use the adapter's base model, or leave it out {leave}")


def _term(name: str, m: LoraModule, item: WeightedAdapter, tensor: str, base: Checkpoint,
          part: int | None = None) -> Term:
    """The module's term on ``tensor``; ``part`` (0/1/2): its q/k/v rows of an OpenCLIP fused in_proj_weight."""
    shape = tuple(base.shape(tensor))
    if part is not None:
        shape = (shape[0] // 3, *shape[1:])
    # the matrix views agree (a linear LoRA fits a 1x1 conv, and the reverse)
    fits = len(shape) >= 2 and matrix_shape(shape, m.kind) == m.matrix_shape
    if not fits or not base.dtype(tensor).is_floating_point:
        what = f"{base.dtype(tensor)} {shape}".replace("torch.", "")
        raise AdapterMismatch(f"{item.source}: module {name} is {m.kind.value} {tuple(m.weight_shape)} but base "
                              f"tensor {tensor} is {what}: the adapter was made for another model")
    if not (torch.isfinite(m.B).all() and torch.isfinite(m.A).all()):
        raise NonFiniteWeight(f"{item.source}: module {name} holds NaN/Inf factors: repair or re-export the adapter")
    transposed = m.kind in (ModuleKind.EMBEDDING, ModuleKind.CONV1D)  # weight (in, out) = (B A)^T = A^T B^T
    L, R = (m.A.mT, m.B.mT) if transposed else (m.B, m.A)  # weight (rows, cols) = L @ R
    if part is not None:  # zero rows elsewhere: the q/k/v part's product lands on its rows of the fused weight
        L = torch.cat([L.new_zeros(part * shape[0], L.shape[1]), L.reshape(shape[0], -1),
                       L.new_zeros((2 - part) * shape[0], L.shape[1])])
    if m.magnitude is not None and (m.kind is ModuleKind.EMBEDDING or part is not None):
        what = "an embedding" if part is None else "a q/k/v part of a fused in_proj_weight"
        raise AdapterMismatch(f"{item.source}: module {name} is DoRA on {what}: not supported; leave it out with "
                              f"--exclude '^{re.escape(name)}$'")
    return Term(module=name, source=item.source, L=L, R=R, coef=float(item.weight) * m.scale, magnitude=m.magnitude,
                axis=m.dora_axis, weight=float(item.weight), conv1d=m.kind is ModuleKind.CONV1D)


def _oriented(name: str, m: LoraModule, conv1d: bool | None, item: WeightedAdapter, warn: Warn | None) -> LoraModule:
    """``m`` laid out as the base stores its weight: the base's config decides Conv1D (in, out) or nn.Linear, as PEFT
    decides from the layer's class whatever ``fan_in_fan_out`` says (``conv1d`` None: no config, the adapter's
    layout stands). A module the adapter did not mark Conv1D on a Conv1D weight is warned about: an adapter
    written for GPT-2 without ``fan_in_fan_out`` may hold transposed factors (a square c_proj cannot tell)."""
    if conv1d is None or m.kind not in (ModuleKind.LINEAR, ModuleKind.CONV1D) or (m.kind is ModuleKind.CONV1D) == conv1d:
        return m
    if conv1d and warn:
        warn(f"{item.source}: module {name} is not marked fan_in_fan_out but the base stores it as a transformers "
             f"Conv1D (weight (in, out)): applied as (B A)^T, as PEFT does")
    return as_conv1d(m, conv1d)


def _same_product(a: Term, b: Term) -> bool:
    norm = lowrank_frobenius_norm(a.L, a.R, a.coef)
    return lowrank_frobenius_diff(a.L, a.R, a.coef, b.L, b.R, b.coef) <= 1e-5 * norm


def _add_tied_head(plan: dict[str, list[Term]], name: str, m: LoraModule, item: WeightedAdapter,
                   base: Checkpoint) -> None:
    """A head tied to the embedding: its delta goes to the shared weight, once when it repeats the embedding's
    own (extract writes both sides of a tie), else beside it (as PEFT's merge_and_unload does)."""
    emb = tied_embedding(name, base, tuple(m.weight_shape))
    if emb is None:
        raise _missing(name, item.source, base)
    head = _term(name, m, item, emb, base)  # (vocab, r) @ (r, dim) on the embedding weight (vocab, dim)
    if not any(t.source == item.source and _same_product(t, head) for t in plan.get(emb, [])):
        plan.setdefault(emb, []).append(head)


def _add_whole(whole: dict[str, Tensor], item: WeightedAdapter, base: Checkpoint, warn: Warn | None) -> None:
    for name, t in item.adapter.full_tensors.items():
        if name not in base or tuple(base.shape(name)) != tuple(t.shape):
            got = tuple(base.shape(name)) if name in base else "missing"
            raise AdapterMismatch(f"{item.source}: tensor {name} saved whole has shape {tuple(t.shape)} but the "
                                  f"base has {got}: the adapter was made for another model")
        if item.weight == 0:  # weight 0: nothing of this adapter, its whole tensors included (bit for bit)
            if warn:
                warn(f"{item.source}: tensor {name} is saved whole: weight 0 leaves the base tensor as it is")
            continue
        if warn and (name in whole or item.weight != 1.0):
            warn(f"{item.source}: tensor {name} is saved whole: it replaces the base tensor (weights do not apply)")
        whole[name] = t


def plan_apply(base: Checkpoint, adapters: Sequence[WeightedAdapter], *, include: Sequence[str] = (),
               exclude: Sequence[str] = (), warn: Warn | None = None) -> tuple[dict[str, list[Term]], dict[str, Tensor]]:
    """Check every selected module against the base; return {tensor: terms} and {tensor: whole replacement}.

    An output head (``lm_head``) the base does not store, tied to its input embedding, adds to the embedding's weight.
    An adapter of a transformer diffusion model named otherwise than the base (BFL/kohya Flux onto a diffusers
    transformer, diffusers names onto a ComfyUI single file) is first brought to the base's naming, exactly
    (:func:`~lowrank_tools.io.arch_convert.to_base_naming`); ``include`` / ``exclude`` see the adapter's own names.
    Raises :class:`AdapterMismatch` naming the first module the base lacks or has with another shape."""
    plan: dict[str, list[Term]] = {}
    whole: dict[str, Tensor] = {}
    module_names = [k[:-len(".weight")] for k in base.keys() if k.endswith(".weight")]
    conv1d = conv1d_rule(base)
    for item in adapters:
        own = item.adapter.modules
        item = _in_base_naming(item, module_names, include, exclude, base)  # filtered on its own names
        heads = []
        for name, m in item.adapter.modules.items():
            tensor, part = _resolve(name, base), None
            m = _oriented(name, m, conv1d(tensor or name), item, warn)
            if tensor is None and (fused := fused_rows(f"{name}.weight", base)) is not None:
                tensor, part = fused  # an OpenCLIP q/k/v module of a single file: rows of attn.in_proj_weight
            if tensor is None:
                heads.append((name, m))
                continue
            plan.setdefault(tensor, []).append(_term(name, m, item, tensor, base, part))
        for name, m in heads:  # after the embedding's own terms
            if name not in own:
                raise _missing(name, item.source, base, renamed=True)
            _add_tied_head(plan, name, m, item, base)
        _add_whole(whole, item, base, warn)
        _add_tensor_deltas(plan, item, base)
    return _drop_zero_terms(plan), whole


def _in_base_naming(item: WeightedAdapter, module_names: list[str], include, exclude,
                    base: Checkpoint) -> WeightedAdapter:
    """``item``'s modules that pass ``include`` / ``exclude`` (on its own names), in the base's naming
    (:func:`~lowrank_tools.io.arch_convert.to_base_naming`); a module that cannot be fused or split (DoRA) is an
    :class:`AdapterMismatch` naming it."""
    keep = (lambda name: matches(name, include, exclude)) if include or exclude else None
    adapter = item.adapter if keep is None else replace(
        item.adapter, modules={n: m for n, m in item.adapter.modules.items() if keep(n)},
        full_tensors={n: t for n, t in item.adapter.full_tensors.items() if keep(n.rsplit(".", 1)[0])},
        tensor_deltas={n: t for n, t in item.adapter.tensor_deltas.items() if keep(n.rsplit(".", 1)[0])})
    try:
        adapter = in_checkpoint_names(adapter, base)  # a transformers model's names -> its checkpoint's
        return WeightedAdapter(to_base_naming(adapter, module_names), item.weight, item.source)
    except ConversionError as e:
        what = re.sub(r"[:;] use --format .*$", "", str(e))
        raise AdapterMismatch(f"{item.source}: its names are not the base's, and {what}: apply it to a base of its "
                              f"own naming, or leave the module out with --exclude") from None


def _drop_zero_terms(plan: dict[str, list[Term]]) -> dict[str, list[Term]]:
    """Terms that add exactly nothing (weight 0, or a factor that is all zero, e.g. a fresh PEFT ``lora_B``) are
    dropped after their checks: float addition would still turn the base's -0.0 into +0.0, and a tensor with no
    term left is copied bit for bit. A DoRA term with a non-zero weight stays: its magnitude rescales the rows
    even when its factors are zero."""
    kept = {name: [t for t in terms if t.coef != 0 and (t.magnitude is not None or (bool(t.L.any())
                                                                                    and bool(t.R.any())))]
            for name, terms in plan.items()}
    return {name: terms for name, terms in kept.items() if terms}


def _add_tensor_deltas(plan: dict[str, list[Term]], item: WeightedAdapter, base: Checkpoint) -> None:
    """Whole-tensor deltas (biases, norm weights: kohya diff_b / w_norm / b_norm, PEFT lora_B.bias) as rank-1 terms
    ``w * delta @ [1]`` on the tensor's (n, 1) view."""
    for name, delta in item.adapter.tensor_deltas.items():
        tensor = name if name in base else next((name[len(c):] for c in _COMPONENTS
                                                 if name.startswith(c) and name[len(c):] in base), None)
        if tensor is None or math.prod(base.shape(tensor)) != delta.numel():
            got = tuple(base.shape(tensor)) if tensor else "missing"
            raise AdapterMismatch(f"{item.source}: tensor {name} has a delta of shape {tuple(delta.shape)} but the base "
                                  f"has {got}: the adapter was made for another model")
        plan.setdefault(tensor, []).append(Term(module=name, source=item.source, L=delta.reshape(-1, 1),
                                                R=torch.ones(1, 1, dtype=delta.dtype), coef=float(item.weight)))
