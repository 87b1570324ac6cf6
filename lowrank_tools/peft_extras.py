"""What a PEFT LoRA file holds beside lora_A / lora_B: DoRA magnitudes and ``lora_bias`` biases.

    <module>.lora_magnitude_vector    DoRA m: (out,) for linear layers, (1, out, 1, 1) for convs (PEFT 0.21)
    <module>.lora_B.bias              lora_bias=True: PEFT adds ``scale * bias`` to the layer's bias

:func:`split_extras` hides those keys from the LoRA reader (a filtered view of the checkpoint);
:func:`attach_extras` then puts each magnitude on its module (output axis) and each bias, scaled, into
``Adapter.tensor_deltas`` under ``<module>.bias``.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor

from .adapter import LoraModule
from .errors import AdapterFormatError

__all__ = ["split_extras", "attach_extras", "ExtrasView"]

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
        out = module.weight_shape[0]
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
