"""What adapters hold beside B and A: DoRA magnitudes and deltas of whole tensors (biases, norm weights).

PEFT LoRA files:

    <module>.lora_magnitude_vector    DoRA m: (out,) for linear layers, (1, out, 1, 1) for convs (PEFT 0.21)
    <module>.lora_B.bias              lora_bias=True: PEFT adds ``scale * bias`` to the layer's bias

:func:`split_extras` hides those keys from the LoRA reader (a filtered view of the checkpoint);
:func:`attach_extras` then puts each magnitude on its module (output axis) and each bias, scaled, into
``Adapter.tensor_deltas`` under ``<module>.bias``. :func:`peft_extras` / :func:`kohya_extras` write them back
(kohya: ``dora_scale`` (out, 1, ...), or (1, in, ...) for the legacy input axis, ``diff_b``, ``w_norm``, ``b_norm``),
after :func:`check_peft_extras` has refused what PEFT cannot hold.

Semantics followed: a DoRA module's weight is ``m * (W0 + s B A) / ||W0 + s B A||_row``; PEFT computes the norm with
no epsilon, LyCORIS/ComfyUI add float eps to it; the files are the same, the difference is below float32 rounding
for any non-degenerate row.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor

from ..adapter import LoraModule, ModuleKind
from ..errors import AdapterFormatError, ConversionError

__all__ = ["split_extras", "attach_extras", "ExtrasView", "check_peft_extras", "peft_extras", "peft_extras_config",
           "kohya_extras"]

_MAGNITUDE = re.compile(r"^(?:base_model\.model\.)?(.+)\.lora_magnitude_vector(?:\.[A-Za-z0-9_-]+)?(?:\.weight)?$")
_BIAS = re.compile(r"^(?:base_model\.model\.)?(.+)\.lora_B(?:\.[A-Za-z0-9_-]+)?\.bias$")


class ExtrasView:
    """The checkpoint without its DoRA / lora_bias keys (``keys``, ``get``, ``in``, ``metadata`` delegate)."""

    def __init__(self, ckpt, hidden: set[str]):
        self._ckpt, self._hidden = ckpt, hidden
        self.metadata = ckpt.metadata
        self.path = getattr(ckpt, "path", None)

    def keys(self) -> list[str]:
        return [k for k in self._ckpt.keys() if k not in self._hidden]

    def get(self, name: str) -> Tensor:
        return self._ckpt.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._ckpt and name not in self._hidden


def split_extras(ckpt) -> tuple[ExtrasView, dict[str, dict[str, str]]]:
    """(the checkpoint without extras, {module: {"magnitude" | "bias": key}})."""
    extras: dict[str, dict[str, str]] = {}
    for key in ckpt.keys():
        for which, pattern in (("magnitude", _MAGNITUDE), ("bias", _BIAS)):
            found = pattern.match(key)
            if found:
                extras.setdefault(found.group(1), {})[which] = key
    hidden = {k for parts in extras.values() for k in parts.values()}
    return ExtrasView(ckpt, hidden), extras


def attach_extras(modules: dict[str, LoraModule], extras: dict[str, dict[str, str]], ckpt,
                  where: Path | str) -> dict[str, Tensor]:
    """Set each module's DoRA magnitude; return ``{<module>.bias: scale * lora_B.bias}``. A magnitude or bias
    without its module, or of the wrong size, raises :class:`AdapterFormatError` naming the key."""
    deltas: dict[str, Tensor] = {}
    for name, parts in extras.items():
        module = modules.get(name)
        if module is None:
            key = next(iter(parts.values()))
            raise AdapterFormatError(f"{where}: key {key} has no lora_A / lora_B beside it: the file is incomplete")
        # outputs: a Conv1D's weight is (in, out); an embedding keeps its rows (vocab) as before
        out = module.matrix_shape[0] if module.kind is ModuleKind.CONV1D else module.weight_shape[0]
        for key in parts.values():
            _check_extra(ckpt.get(key), key, where)
        if "magnitude" in parts:
            m = ckpt.get(parts["magnitude"])
            if m.numel() != out:
                raise AdapterFormatError(f"{where}: key {parts['magnitude']} {tuple(m.shape)} does not hold one value "
                                         f"per output ({out}): the file is corrupt")
            module.magnitude, module.dora_axis = m.reshape(out).float() if m.dtype != torch.float64 else m.reshape(out), "out"
        if "bias" in parts:
            b = ckpt.get(parts["bias"])
            if b.numel() != out:
                raise AdapterFormatError(f"{where}: key {parts['bias']} {tuple(b.shape)} does not hold one value per "
                                         f"output ({out}): the file is corrupt")
            deltas[f"{name}.bias"] = b.reshape(out).double().mul(module.scale).to(
                torch.float64 if b.dtype == torch.float64 else torch.float32)
    return deltas


def _check_extra(t: Tensor, key: str, where) -> None:
    """A magnitude or bias must be a finite float tensor (float8 has no isfinite kernel: checked in float32)."""
    what = f"{where}: key {key} {tuple(t.shape)} {str(t.dtype).replace('torch.', '')}"
    if not t.is_floating_point():
        raise AdapterFormatError(f"{what} is not a float tensor: re-export the adapter in float32/float16/bfloat16")
    if not bool(torch.isfinite(t.float() if t.element_size() == 1 else t).all()):
        raise AdapterFormatError(f"{what} holds NaN/Inf: repair or re-export the adapter")


# ------------------------------------------------------------------------------------------------ write


def check_peft_extras(adapter) -> None:
    """Raise :class:`ConversionError` (naming the module) for what a PEFT LoRA folder cannot hold: DoRA on some
    modules only (``use_dora`` is one switch), the legacy input-axis magnitude, and whole-tensor deltas that are not
    the bias of a LoRA module (``lora_bias``)."""
    dora = [n for n, m in adapter.modules.items() if m.magnitude is not None]
    if dora and len(dora) != len(adapter.modules):
        plain = next(n for n in adapter.modules if n not in dora)
        raise ConversionError(f"module {dora[0]} is DoRA but {plain} is not: PEFT's use_dora holds all or none; use "
                              f"--format kohya, or leave one kind out with --exclude")
    for name in dora:
        if adapter.modules[name].dora_axis != "out":
            raise ConversionError(f"module {name} holds a legacy input-axis DoRA magnitude, which does not convert "
                                  f"exactly to PEFT's output-axis DoRA: use --format kohya")
    for tensor in adapter.tensor_deltas:
        owner = tensor[: -len(".bias")] if tensor.endswith(".bias") else None
        if owner not in adapter.modules:
            raise ConversionError(f"tensor {tensor} has a delta of its own (a kohya diff_b / w_norm / b_norm), which "
                                  f"a PEFT LoRA folder cannot hold: use --format kohya, or apply the adapter")


def peft_extras(adapter, prefix: str) -> dict[str, Tensor]:
    """``lora_magnitude_vector`` and ``lora_B.bias`` tensors of a PEFT file (after :func:`check_peft_extras`)."""
    out: dict[str, Tensor] = {}
    for name, m in adapter.modules.items():
        if m.magnitude is not None:
            shape = (1, m.weight_shape[0], *[1] * (len(m.weight_shape) - 2)) if len(m.weight_shape) > 2 else (-1,)
            out[f"{prefix}{name}.lora_magnitude_vector"] = m.magnitude.reshape(shape).contiguous()
        bias = adapter.tensor_deltas.get(f"{name}.bias")
        if bias is not None:
            out[f"{prefix}{name}.lora_B.bias"] = (bias.double() / m.scale).to(bias.dtype).contiguous()
    return out


def peft_extras_config(adapter) -> dict:
    """The LoraConfig switches the extras need: use_dora, lora_bias."""
    return {"use_dora": any(m.magnitude is not None for m in adapter.modules.values()),
            "lora_bias": bool(adapter.tensor_deltas)}


def kohya_extras(adapter, keys: dict[str, str]) -> dict[str, Tensor]:
    """``dora_scale``, ``diff_b``, ``w_norm``, ``b_norm`` tensors of a kohya file; ``keys``: {module name: kohya key}
    (modules with only tensor deltas included)."""
    out: dict[str, Tensor] = {}
    for name, m in adapter.modules.items():
        if m.magnitude is not None:
            ones = [1] * (len(m.weight_shape) - 2)
            shape = (-1, 1, *ones) if m.dora_axis == "out" else (1, -1, *ones)
            out[f"{keys[name]}.dora_scale"] = m.magnitude.reshape(shape).contiguous()
    for tensor, delta in adapter.tensor_deltas.items():
        owner, leaf = tensor.rsplit(".", 1)
        suffix = "diff_b" if owner in adapter.modules else ("b_norm" if leaf == "bias" else "w_norm")
        out[f"{keys[owner]}.{suffix}"] = delta.contiguous()
    return out
