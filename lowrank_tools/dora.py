"""DoRA <-> plain LoRA, given the base the adapter was made for.

A DoRA module ``(B, A, s, m)`` makes the weight ``W = m * W' / ||W'||_row`` with ``W' = W0 + s B A`` (PEFT's
semantics; LyCORIS' legacy modules norm per input channel instead). Its delta ``W - W0 = diag(f - 1) W0 + diag(f) s B A``
(``f = m / ||W'||_row``) holds a row-scaled copy of W0, full rank in general, so:

- :func:`lora_to_dora` is exact: ``m = ||W0 + s B A||_row`` (computed without forming W', see
  :func:`~lowrank_tools.structured.dora_row_norms`) makes ``W = W'``. This is how PEFT initialises a DoRA adapter.
- :func:`dora_to_lora` is lossy: the rank-k truncation of the dense delta (one module at a time), with the relative
  error of each module reported. Default k: the module's own rank. The top-k SVD is :func:`truncated_svd`'s, by
  extract's rule: randomized (range finder, power iterations) when k is small against the sides, exact otherwise or
  with ``method="exact"``; a dynamic rank rule (energy, ratio, threshold) needs the whole spectrum: exact. The error
  reported is measured on the factors written, ``||D - B A||_F / ||D||_F``, whichever SVD made them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from .adapter import Adapter, LoraModule, ModuleKind, as_conv1d, matrix_shape, matrix_view
from .io.checkpoint import as_checkpoint
from .io.layers import conv1d_rule
from .errors import AdapterMismatch, ConversionError, UnsupportedTensor
from .linalg.norms import frobenius_error
from .linalg.svd import Method, RankRule, truncated_svd
from .linalg.structured import dora_rescale_, dora_row_norms

__all__ = ["DoraConversion", "lora_to_dora", "dora_to_lora"]

_COMPONENTS = ("unet.", "text_encoder.", "text_encoder_2.", "transformer.")


@dataclass
class DoraConversion:
    """The converted adapter and, per module converted, ``||delta - delta_k||_F / ||delta||_F`` (0 when exact)."""

    adapter: Adapter
    rel_errors: dict[str, float] = field(default_factory=dict)


def _base_matrix(ckpt, name: str, m: LoraModule) -> torch.Tensor:
    """The base weight a module adapts, as its (out, in_flat) matrix (float64)."""
    if m.kind is ModuleKind.EMBEDDING:
        raise ConversionError(f"module {name} is an embedding: DoRA conversion supports linear and conv modules only")
    for candidate in (name, *(name[len(c):] for c in _COMPONENTS if name.startswith(c))):
        key = f"{candidate}.weight"
        if key in ckpt:
            W0 = ckpt.get(key)
            if not W0.is_floating_point() or W0.ndim < 2:
                raise UnsupportedTensor(f"base tensor {key} of {getattr(ckpt, 'path', '')} is "
                                        f"{str(W0.dtype).replace('torch.', '')} {tuple(W0.shape)}, not a float weight "
                                        f"matrix: give the float base the adapter was made for")
            if matrix_shape(tuple(W0.shape), m.kind) != m.matrix_shape:
                raise AdapterMismatch(f"module {name} is {tuple(m.weight_shape)} but base tensor {key} is "
                                      f"{tuple(W0.shape)}: give the base the adapter was made for")
            return matrix_view(W0, m.kind).double()  # (out, in_flat): a Conv1D weight (in, out) transposed
    raise AdapterMismatch(f"module {name} has no weight in base {getattr(ckpt, 'path', '')}: give the base the "
                          f"adapter was made for")


def _oriented(adapter: Adapter, ckpt) -> dict[str, LoraModule]:
    """The modules laid out as the base stores them: its config.json decides transformers Conv1D (weight (in, out))
    or nn.Linear, as in apply (no config: the adapter's own layout)."""
    conv1d = conv1d_rule(ckpt)
    return {n: m if conv1d(n) is None else as_conv1d(m, bool(conv1d(n))) for n, m in adapter.modules.items()}


@torch.no_grad()
def lora_to_dora(adapter: Adapter, base) -> DoraConversion:
    """Every plain module gets ``m = ||W0 + s B A||_row``: the same weights, now a PEFT DoRA adapter (exact)."""
    ckpt = as_checkpoint(base)
    modules = {}
    for name, m in _oriented(adapter, ckpt).items():
        if m.magnitude is not None:
            modules[name] = m
            continue
        W0 = _base_matrix(ckpt, name, m)
        norms = dora_row_norms(W0, m.B, m.A, m.scale)  # (out,) float64
        modules[name] = replace(m, magnitude=norms.to(torch.float64 if m.B.dtype == torch.float64 else torch.float32),
                                dora_axis="out")
    return DoraConversion(adapter=replace(adapter, modules=modules), rel_errors={n: 0.0 for n in modules})


def _top(D: torch.Tensor, k: int | None, rule: RankRule | None, method: Method | str, seed: int):
    """``(U_k, S_k, Vh_k)`` of D: k given (the module's rank, or a fixed --rank) through truncated_svd's method;
    a dynamic ``rule`` picks k from the whole (exact) spectrum."""
    if k is not None:
        svd = truncated_svd(D, k, method=method, seed=seed)
        return svd.U, svd.S, svd.Vh
    U, S, Vh = torch.linalg.svd(D, full_matrices=False)  # dense: the delta is full rank in general
    k = max(1, rule.choose(S))
    return U[:, :k], S[:k], Vh[:k]


@torch.no_grad()
def dora_to_lora(adapter: Adapter, base, *, rule: RankRule | None = None, method: Method | str = Method.AUTO,
                 seed: int = 0) -> DoraConversion:
    """Every DoRA module becomes the rank-k LoRA of its whole delta ``m W'/||W'|| - W0`` (lossy; k by ``rule``, else
    the module's rank; the top-k SVD by ``method``, see the module doc); plain modules pass unchanged."""
    ckpt = as_checkpoint(base)
    modules, errors = {}, {}
    for name, m in _oriented(adapter, ckpt).items():
        if m.magnitude is None:
            modules[name] = m
            continue
        W0 = _base_matrix(ckpt, name, m)
        D = dora_rescale_(W0 + m.scale * (m.B.double() @ m.A.double()), m.magnitude.double(), m.dora_axis) - W0
        fixed = m.rank if rule is None else (rule.rank if not rule.dynamic else None)
        U, S, Vh = _top(D, fixed, rule, method, seed)
        root = S.sqrt()
        dtype = torch.float64 if m.B.dtype == torch.float64 else torch.float32
        B, A = (U * root).to(dtype), (root.unsqueeze(1) * Vh).to(dtype)
        modules[name] = LoraModule(B=B, A=A, alpha=float(len(S)), kind=m.kind, weight_shape=m.weight_shape)
        total = float(D.norm())
        errors[name] = frobenius_error(D, B, A) / total if total else 0.0  # measured on what is written
    return DoraConversion(adapter=replace(adapter, modules=modules), rel_errors=errors)
