"""Which tensors of a checkpoint become which LoRA modules: kinds, filters, and what is left out."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch
from torch import Tensor

from .adapter import ModuleKind, module_name
from .checkpoint import Checkpoint
from .errors import InvalidOption

__all__ = ["layer_kind", "compile_filters", "matches", "select_layers", "relative_change"]

_EMBEDDING_LEAF = re.compile(r"(embed|embedding|embeddings|wte|wpe|shared)", re.IGNORECASE)


def layer_kind(name: str, shape: Sequence[int]) -> ModuleKind | None:
    """How a weight is adapted: linear (2-D), conv (3-D/4-D kernels), embedding (2-D, named so); None if not."""
    if not name.endswith(".weight") or len(shape) < 2 or 0 in shape:
        return None
    if len(shape) == 2:
        leaf = module_name(name).rsplit(".", 1)[-1]
        return ModuleKind.EMBEDDING if _EMBEDDING_LEAF.search(leaf) else ModuleKind.LINEAR
    return ModuleKind.CONV if len(shape) in (3, 4, 5) else None


def matches(name: str, include: Sequence[str], exclude: Sequence[str]) -> bool:
    if include and not any(re.search(p, name) for p in include):
        return False
    return not any(re.search(p, name) for p in exclude)


def compile_filters(patterns: Sequence[str], option: str) -> tuple[str, ...]:
    for p in patterns:
        try:
            re.compile(p)
        except re.error as exc:
            raise InvalidOption(f"{option} {p!r} is not a valid regular expression ({exc})") from None
    return tuple(patterns)


def select_layers(names: Sequence[str], tuned: Checkpoint, include, exclude) -> tuple[dict, dict, list]:
    """Split paired tensor names into layers to factor ({name: kind}), skipped ones, and 1-D float tensors."""
    selected: dict[str, ModuleKind] = {}
    skipped: dict[str, list[str]] = {"filtered out": [], "not a float tensor": [], "not a weight matrix": []}
    one_d = []
    for name in names:
        shape, dt = tuned.shape(name), tuned.dtype(name)
        if not dt.is_floating_point:
            skipped["not a float tensor"].append(name)
            continue
        kind = layer_kind(name, shape)
        if kind is None:
            (one_d if len(shape) == 1 and shape[0] > 0 else skipped["not a weight matrix"]).append(name)
            continue
        if not matches(module_name(name), include, exclude):
            skipped["filtered out"].append(name)
            continue
        selected[name] = kind
    return selected, skipped, one_d


def relative_change(W0: Tensor, W1: Tensor) -> float:
    d = float(torch.linalg.vector_norm(W1.float() - W0.float(), dtype=torch.float64))
    n = float(torch.linalg.vector_norm(W0.float(), dtype=torch.float64))
    return d / n if n else (math.inf if d else 0.0)
