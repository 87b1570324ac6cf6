"""fp8 weights, plain and scaled, read as the float32 values they stand for, one tensor at a time.

    plain fp8 (F8_E4M3 / F8_E5M2):          W = w8.float()
    ComfyUI scaled fp8 (``scaled_fp8``):      W = w8.float() * <module>.scale_weight
    ComfyUI mixed precision / TensorRT:       W = w8.float() * <module>.weight_scale

A scale is a float32 scalar, or one value per output row ((out,), (out, 1), ...), multiplied in float32: the
product is the definition of the dequantized weight (ComfyUI multiplies after casting to its compute dtype,
bf16 for Flux, which rounds what this reads exactly). Every fp8 value is exact in bf16 and float32.

:class:`DequantizedSource` wraps one file's tensor source: fp8 tensors read as float32, the scales consumed
by a weight, the activation scales beside them (``scale_input`` / ``input_scale``), the per-layer
``comfy_quant`` records and the ``scaled_fp8`` marker are hidden (they are not modules, and a dequantized
output must not carry them, or ComfyUI would read its weights as fp8 again). So is the header's
``_quantization_metadata``. :meth:`DequantizedSource.write_dtype` says what apply writes back: bfloat16 for a
tensor stored as fp8 (adding a delta to fp8 cannot stay fp8 without requantizing; bf16 holds every fp8 value
exactly and is what these models are tuned in), the stored dtype for every other.
"""

from __future__ import annotations

import torch

from ..errors import UnsupportedTensor

__all__ = ["FP8_DTYPES", "WEIGHT_SCALES", "DEQUANTIZED_DTYPE", "WRITE_DTYPE", "DequantizedSource", "dequantizing",
           "strip_quantization_metadata", "dequantize"]

FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))
#: leaves beside an fp8 weight that hold its scale: ComfyUI's legacy scaled fp8, and its mixed-precision format
WEIGHT_SCALES = ("scale_weight", "weight_scale")
_ACTIVATION_SCALES = ("scale_input", "input_scale")  # for fp8 matmuls only: meaningless once dequantized
_RECORDS = ("comfy_quant",)  # ComfyUI's per-layer JSON record of the quantization format (a uint8 tensor)
_MARKER = "scaled_fp8"  # ComfyUI's model-wide marker tensor (empty, fp8)
_METADATA_KEYS = ("_quantization_metadata",)
DEQUANTIZED_DTYPE = torch.float32  # what an fp8 tensor reads as
WRITE_DTYPE = torch.bfloat16  # what apply writes an fp8 tensor back as, without --dtype


def _split(name: str) -> tuple[str, str]:
    """``a.b.weight`` -> (``a.b.``, ``weight``); a name without a dot has an empty module prefix."""
    head, _, leaf = name.rpartition(".")
    return (head + "." if head else ""), leaf


def dequantize(w8: torch.Tensor, scale: torch.Tensor | None, *, name: str = "", where: str = "") -> torch.Tensor:
    """``w8.float() * scale`` in float32; ``scale`` is a scalar or one value per output row (None: 1)."""
    W = w8.to(torch.float32)  # (out, ...): exact, every fp8 value is a float32
    if scale is None:
        return W
    s = scale.to(torch.float32)
    if s.numel() == 1:
        return W.mul_(s.reshape(()))
    if W.ndim >= 1 and s.numel() == W.shape[0]:
        return W.mul_(s.reshape((-1,) + (1,) * (W.ndim - 1)))  # per output row
    raise UnsupportedTensor(f"tensor {name} in {where} is fp8 with a scale of shape {tuple(scale.shape)}, neither "
                            f"one value nor one per output row (block-wise fp8 is not supported yet): dequantize "
                            f"the checkpoint first, or --exclude it")


class DequantizedSource:
    """A tensor source (safetensors file or torch pickle) whose fp8 tensors read dequantized (module docstring)."""

    def __init__(self, source):
        self.source = source
        self.path = source.path
        self.metadata = strip_quantization_metadata(getattr(source, "metadata", {}))
        names = source.names()
        present = set(names)
        self._scales: dict[str, str] = {}  # fp8 tensor -> its scale tensor
        hidden = set()
        for name in names:
            if source.info(name)[0] in FP8_DTYPES:
                prefix, leaf = _split(name)
                scale = next((prefix + s for s in WEIGHT_SCALES if leaf == "weight" and prefix + s in present), None)
                if scale is not None:
                    self._scales[name] = scale
                    hidden.add(scale)
                hidden.update(prefix + a for a in _ACTIVATION_SCALES + _RECORDS if prefix + a in present)
            prefix, leaf = _split(name)
            if leaf == _MARKER:
                hidden.add(name)
        self._hidden = hidden
        self._names = [n for n in names if n not in hidden]

    def names(self) -> list[str]:
        return list(self._names)

    def expand(self, name: str) -> list[str]:
        """The names ``name`` of the wrapped source reads as here: [] for a hidden scale or marker, else [name]."""
        return [name] if name not in self._hidden else []

    def info(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        dtype, shape = self.source.info(name)
        return (DEQUANTIZED_DTYPE if dtype in FP8_DTYPES else dtype), shape

    def quantized(self, name: str) -> bool:
        """Whether ``name`` is stored as fp8 (and read dequantized)."""
        return self.source.info(name)[0] in FP8_DTYPES

    def write_dtype(self, name: str) -> torch.dtype:
        """The dtype apply writes ``name`` back as without ``--dtype``: bfloat16 for fp8, else the stored one."""
        return WRITE_DTYPE if self.quantized(name) else self.source.info(name)[0]

    def read(self, name: str) -> torch.Tensor:
        """The tensor, CPU, contiguous, in a buffer of its own; fp8 dequantized to float32."""
        t = self.source.read(name)
        if t.dtype not in FP8_DTYPES:
            return t
        scale_name = self._scales.get(name)
        scale = self.source.read(scale_name) if scale_name else None
        return dequantize(t, scale, name=name, where=str(self.path))

    def close(self) -> None:
        self.source.close()


def strip_quantization_metadata(metadata: dict[str, str]) -> dict[str, str]:
    """The header metadata without the records that describe fp8 layers (absent once dequantized)."""
    return {k: v for k, v in metadata.items() if k not in _METADATA_KEYS}


def dequantizing(source):
    """``source`` wrapped in :class:`DequantizedSource` when it holds an fp8 tensor or a ``scaled_fp8`` marker,
    else ``source`` itself (nothing changes for every other checkpoint)."""
    names = source.names()
    if any(source.info(n)[0] in FP8_DTYPES for n in names) or any(_split(n)[1] == _MARKER for n in names):
        return DequantizedSource(source)
    return source

