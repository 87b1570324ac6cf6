"""A diffusers-named transformer checkpoint (Flux, SD3, Wan, HunyuanVideo) seen in the model's original names, its
fused layers stacked: what ``extract --format kohya`` factors, so that each module it writes is the one the file names.

    transformer_blocks.0.attn.to_q.weight (D, D)  }
    transformer_blocks.0.attn.to_k.weight (D, D)  }  ->  double_blocks.0.img_attn.qkv.weight (3D, D)   [q; k; v]
    transformer_blocks.0.attn.to_v.weight (D, D)  }
    single_transformer_blocks.0.{attn.to_q, .to_k, .to_v, proj_mlp}  ->  single_blocks.0.linear1 (3D + 4D, D)
    transformer_blocks.0.attn.to_out.0  ->  double_blocks.0.img_attn.proj          (1:1: renamed)
    norm_out.linear (scale; shift)  ->  final_layer.adaLN_modulation.1 (shift; scale)   (row halves swapped)

A fused layer's delta is then one matrix, [dW_q; dW_k; dW_v], and its rank-r truncation is the optimal rank-r module
of that name (a concatenation of rank-r parts would be rank 3r, and a truncation of that concatenation is not the
truncation of the stacked delta). Biases of a fused layer stack the same way; 1-D tensors of renamed modules are
renamed. Tensors are read on demand, part by part into one buffer (:meth:`FusedSource.read`): one layer in memory.
The names are the tables' (:mod:`.architectures`); everything else (text encoders, norms) keeps its name.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .architectures import Architecture, Naming, Rule, body_of, detect_architecture
from .checkpoint import Checkpoint

__all__ = ["FusedSource", "in_original_naming", "original_layout"]

_LEAVES = ("weight", "bias")


def _leaf(name: str) -> tuple[str, str]:
    module, _, leaf = name.rpartition(".")
    return module, leaf


def original_layout(ckpt: Checkpoint, arch: Architecture) -> dict[str, tuple[list[str], bool]] | None:
    """{original tensor name: (its parts' tensor names in row order, swap row halves)} for every module of ``arch``
    the diffusers-named ``ckpt`` holds; None when a fused layer misses a part or its parts do not stack (then the
    checkpoint is read as it is)."""
    groups: dict[tuple[Rule, str, str], dict[int, str]] = {}
    for name in ckpt.keys():
        module, leaf = _leaf(name)
        if leaf not in _LEAVES or module.startswith("text_encoder"):
            continue
        hit = arch.match(body_of(module), Naming.DIFFUSERS)
        if hit is not None:
            rule, index, part = hit
            groups.setdefault((rule, index, leaf), {})[part] = name
    layout = {}
    for (rule, index, leaf), parts in groups.items():
        names = [parts.get(j) for j in range(len(rule.parts))]
        if None in names or not _stacks(ckpt, names, rule, leaf):
            if rule.sizes and leaf == "weight":
                return None
            continue  # a bias a part lacks: the fused layer's bias is not carried
        swap = rule.swap and ckpt.shape(names[0])[0] == 2 * _in_features(ckpt, names[0])
        layout[f"{arch.module_name(rule, index, Naming.ORIGINAL)}.{leaf}"] = (names, swap)
    return layout


def _in_features(ckpt: Checkpoint, name: str) -> int:
    module, _ = _leaf(name)
    weight = f"{module}.weight"
    return ckpt.shape(weight)[1] if weight in ckpt and len(ckpt.shape(weight)) == 2 else -1


def _stacks(ckpt: Checkpoint, names: list[str], rule: Rule, leaf: str) -> bool:
    """Whether the parts are a fused layer's: rows = sizes x in_features, one width (a 1:1 rule: always)."""
    if not rule.sizes:
        return True
    n = _in_features(ckpt, names[0])
    shapes = [tuple(ckpt.shape(p)) for p in names]
    rows = [m * n for m in rule.sizes]
    if leaf == "weight":
        return all(len(s) == 2 and s == (r, n) for s, r in zip(shapes, rows))
    return all(s == (r,) for s, r in zip(shapes, rows))


class FusedSource:
    """A tensor source over a :class:`Checkpoint` that shows ``layout``'s tensors under their original names (parts
    stacked by rows, final modulations' halves swapped) and every other tensor as it is."""

    def __init__(self, ckpt: Checkpoint, layout: dict[str, tuple[list[str], bool]]):
        self.ckpt, self.layout = ckpt, layout
        self.path, self.metadata = ckpt.path, ckpt.metadata
        hidden = {p for parts, _ in layout.values() for p in parts}
        first = {parts[0]: new for new, (parts, _) in layout.items()}  # file order: a layer where its first part was
        self._names = [first.get(n, n) for n in ckpt.keys() if n in first or n not in hidden]

    def names(self) -> list[str]:
        return list(self._names)

    def info(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        if name not in self.layout:
            return self.ckpt.dtype(name), tuple(self.ckpt.shape(name))
        parts, _ = self.layout[name]
        shapes = [tuple(self.ckpt.shape(p)) for p in parts]
        return self._dtype(parts), (sum(s[0] for s in shapes), *shapes[0][1:])

    def write_dtype(self, name: str) -> torch.dtype:
        return self.ckpt.write_dtype(self.layout[name][0][0] if name in self.layout else name)

    def _dtype(self, parts: list[str]) -> torch.dtype:
        dtypes = {self.ckpt.dtype(p) for p in parts}
        return dtypes.pop() if len(dtypes) == 1 else torch.float32  # mixed parts: widened

    def read(self, name: str) -> torch.Tensor:
        """The tensor in a buffer of its own; a fused one read part by part into its rows (no second copy)."""
        if name not in self.layout:
            return self.ckpt.get(name)
        parts, swap = self.layout[name]
        dtype, shape = self.info(name)
        out = torch.empty(shape, dtype=dtype)
        flat, row_bytes, start = out.reshape(-1).view(torch.uint8), out[:1].numel() * dtype.itemsize, 0
        for part in parts:
            rows = self.ckpt.shape(part)[0]
            dst = out[start:start + rows]
            buffer = flat[start * row_bytes:(start + rows) * row_bytes] if self.ckpt.dtype(part) == dtype else None
            got = self.ckpt.get(part, out=buffer)  # a safetensors file reads straight into the rows
            if got.data_ptr() != dst.data_ptr() or got.dtype != dtype:
                dst.copy_(got.reshape(dst.shape))
            start += rows
        if swap:
            half = shape[0] // 2
            out = torch.cat([out[half:], out[:half]])
        return out

    def close(self) -> None:
        self.ckpt.close()


def in_original_naming(ckpt: Checkpoint) -> tuple[Checkpoint, Architecture | None]:
    """``ckpt`` seen in its architecture's original names, fused layers stacked (module docstring), and that
    architecture; ``(ckpt, None)`` when it is none of the tables' models in diffusers names, or one whose fused
    layers it cannot stack."""
    modules = _module_names(ckpt.keys())
    found = detect_architecture(modules, base_names=modules)
    if found is None or found.naming is not Naming.DIFFUSERS or found.architecture.one_naming:
        return ckpt, None
    layout = original_layout(ckpt, found.architecture)
    if not layout:
        return ckpt, None
    source = FusedSource(ckpt, layout)
    view = Checkpoint(ckpt.path, {n: (source, n) for n in source.names()}, sources=[source], config=ckpt.config,
                      metadata=ckpt.metadata, components=ckpt.components)
    view.fused_parts = {_leaf(name)[0]: tuple(_leaf(p)[0] for p in parts)
                        for name, (parts, _) in layout.items() if _leaf(name)[1] == "weight"}
    return view, found.architecture


def _module_names(keys: Iterable[str]) -> list[str]:
    return [_leaf(k)[0] for k in keys if k.endswith(".weight")]
