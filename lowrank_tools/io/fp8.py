"""fp8 weights, plain and scaled, read as the float32 values they stand for, one tensor at a time.

    plain fp8 (F8_E4M3 / F8_E5M2):          W = w8.float()
    ComfyUI scaled fp8 (``scaled_fp8``):      W = w8.float() * <module>.scale_weight
    ComfyUI mixed precision / TensorRT:       W = w8.float() * <module>.weight_scale
    block-wise (DeepSeek-V3, Qwen3-FP8,       W[..., i, j] = w8[..., i, j] * weight_scale_inv[..., i // bn, j // bk]
      transformers' FineGrainedFP8)

A scale is a float32 scalar, one value per output row ((out,), (out, 1), ...), or one per bn x bk block of the
last two dimensions (leading dimensions, a fused MoE's experts, one scale grid each), multiplied in float32: the
product is the definition of the dequantized weight (ComfyUI multiplies after casting to its compute dtype,
bf16 for Flux, which rounds what this reads exactly). Every fp8 value is exact in bf16 and float32.

Block-wise: the scale grid is (ceil(out / bn), ceil(in / bk)), the last row and column of blocks ragged when the
size is not a multiple (DeepSeek-V3's ``inference/kernel.py`` ``weight_dequant`` masks them; transformers'
``integrations/finegrained_fp8.py`` ``_dequantize_fp8_weight`` slices them). (bn, bk) is config.json's
``quantization_config.weight_block_size`` (transformers' fp8 format), or compressed-tensors'
``config_groups.*.weights.block_structure``; (128, 128), what every published block-fp8 model uses, without a
config (a single file). A scale grid of any other shape is refused by name. UE8M0 scales (``F8_E8M0``, DeepSeek
V3.1's ``scale_fmt``) are refused when the file is opened (an unknown safetensors dtype).

The scale is found wherever the checkpoint's index puts it: :func:`dequantizing` is given the whole checkpoint
(every shard) as one source (:class:`JoinedSource`), so a ``.weight`` in shard 1 finds its ``weight_scale_inv``
in shard 2.

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

from ..errors import CorruptCheckpoint, UnsupportedTensor

__all__ = ["FP8_DTYPES", "WEIGHT_SCALES", "DEQUANTIZED_DTYPE", "WRITE_DTYPE", "DEFAULT_BLOCK", "DequantizedSource",
           "JoinedSource", "dequantizing", "strip_quantization_metadata", "dequantize", "block_size_from_config"]

FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))
#: leaves beside an fp8 weight that hold its scale: ComfyUI's legacy scaled fp8, its mixed-precision format (and
#: compressed-tensors'), block-wise fp8 (DeepSeek-V3, transformers' FineGrainedFP8)
WEIGHT_SCALES = ("scale_weight", "weight_scale", "weight_scale_inv")
DEFAULT_BLOCK = (128, 128)  # (rows, columns) of a block when no config says
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


def dequantize(w8: torch.Tensor, scale: torch.Tensor | None, *, block: tuple[int, int] | None = None,
               name: str = "", where: str = "") -> torch.Tensor:
    """``w8.float() * scale`` in float32; ``scale`` is a scalar, one value per output row, or one per ``block``
    (default :data:`DEFAULT_BLOCK`) of the last two dimensions (module docstring); None: 1."""
    W = w8.to(torch.float32)  # (out, ...): exact, every fp8 value is a float32
    if scale is None:
        return W
    s = scale.to(torch.float32)
    if s.numel() == 1:
        return W.mul_(s.reshape(()))
    if W.ndim >= 1 and tuple(s.shape) in ((W.shape[0],), (W.shape[0],) + (1,) * (W.ndim - 1)):
        return W.mul_(s.reshape((-1,) + (1,) * (W.ndim - 1)))  # per output row
    bn, bk = block or DEFAULT_BLOCK
    grid = tuple(W.shape[:-2]) + (-(-W.shape[-2] // bn), -(-W.shape[-1] // bk)) if W.ndim >= 2 else None
    if grid is not None and tuple(s.shape) == grid:
        return _mul_blocks(W, s, bn, bk)
    blocks = f", nor one per {bn}x{bk} block {grid}" if grid else ""
    raise UnsupportedTensor(f"tensor {name} of shape {tuple(w8.shape)} in {where} is fp8 with a scale of shape "
                            f"{tuple(scale.shape)}: not one value, one per output row{blocks} (block-wise fp8): "
                            f"give the folder whose config.json quantization_config.weight_block_size says the "
                            f"block size, dequantize the checkpoint first, or --exclude it")


def _mul_blocks(W: torch.Tensor, s: torch.Tensor, bn: int, bk: int) -> torch.Tensor:
    """W[..., i, j] *= s[..., i // bn, j // bk] in place; ragged last blocks included. The scales are expanded over
    rows only (out x ceil(in/bk), small) and broadcast over a block's columns through a view."""
    rows, cols = W.shape[-2:]
    s = s.repeat_interleave(bn, dim=-2)[..., :rows, :]
    full, rem = divmod(cols, bk)
    if full:
        W[..., :full * bk].unflatten(-1, (full, bk)).mul_(s[..., :full, None])
    if rem:
        W[..., full * bk:].mul_(s[..., full:])
    return W


def block_size_from_config(config: dict | None, where: str = "config.json") -> tuple[int, int] | None:
    """The fp8 block (rows, columns) a model's config.json states: transformers' ``quantization_config
    .weight_block_size`` or compressed-tensors' ``quantization_config.config_groups.*.weights.block_structure``;
    None when it states none. A value that is not two positive integers raises :class:`CorruptCheckpoint`."""
    quant = (config or {}).get("quantization_config")
    if not isinstance(quant, dict):
        return None
    value, field = quant.get("weight_block_size"), "quantization_config.weight_block_size"
    groups = quant.get("config_groups")
    if value is None and isinstance(groups, dict):
        for group, spec in groups.items():
            weights = spec.get("weights") if isinstance(spec, dict) else None
            if isinstance(weights, dict) and weights.get("block_structure") is not None:
                value, field = weights["block_structure"], f"quantization_config.config_groups.{group}.weights" \
                                                           f".block_structure"
                break
    if value is None:
        return None
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        raise CorruptCheckpoint(f"{where}: {field} is {value!r}, not two positive integers [rows, columns]: fix the "
                                f"config (block-fp8 models use [128, 128])")
    return int(value[0]), int(value[1])


class JoinedSource:
    """The tensors of several sources (a sharded checkpoint's files) as one source: ``index`` maps each name to
    (source, name inside it), as the checkpoint's index.json decides."""

    def __init__(self, path, index: dict, sources: list, metadata: dict[str, str]):
        self.path, self.metadata = path, metadata
        self._index, self._sources = index, sources

    def names(self) -> list[str]:
        return list(self._index)

    def info(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        source, inner = self._index[name]
        return source.info(inner)

    def read(self, name: str) -> torch.Tensor:
        source, inner = self._index[name]
        return source.read(inner)

    def close(self) -> None:
        for source in self._sources:
            source.close()


class DequantizedSource:
    """A tensor source (safetensors file or torch pickle) whose fp8 tensors read dequantized (module docstring)."""

    def __init__(self, source, block: tuple[int, int] | None = None):
        self.source = source
        self.block = block
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
        if scale_name is None and self.block is not None and _split(name)[1] == "weight":
            raise UnsupportedTensor(f"tensor {name} in {self.path} is fp8 without a scale beside it (no "
                                    f"weight_scale_inv in any shard), though config.json declares block-wise fp8: "
                                    f"the checkpoint is incomplete: re-download it, or --exclude it")
        scale = self.source.read(scale_name) if scale_name else None
        return dequantize(t, scale, block=self.block, name=name, where=str(self.path))

    def close(self) -> None:
        self.source.close()


def strip_quantization_metadata(metadata: dict[str, str]) -> dict[str, str]:
    """The header metadata without the records that describe fp8 layers (absent once dequantized)."""
    return {k: v for k, v in metadata.items() if k not in _METADATA_KEYS}


def dequantizing(source, block: tuple[int, int] | None = None):
    """``source`` wrapped in :class:`DequantizedSource` (block-wise scales in ``block``, default
    :data:`DEFAULT_BLOCK`) when it holds an fp8 tensor or a ``scaled_fp8`` marker, else ``source`` itself (nothing
    changes for every other checkpoint)."""
    names = source.names()
    if any(source.info(n)[0] in FP8_DTYPES for n in names) or any(_split(n)[1] == _MARKER for n in names):
        return DequantizedSource(source, block)
    return source

