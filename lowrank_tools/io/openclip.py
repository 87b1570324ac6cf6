"""OpenCLIP's fused attention input projection in single-file checkpoints (SD 2.x ``cond_stage_model.model.``, SDXL
``conditioner.embedders.1.model.``), seen as the q/k/v projections kohya, ComfyUI and diffusers name.

    <tower>transformer.resblocks.N.attn.in_proj_weight  (3d, d)  rows [0:d] q, [d:2d] k, [2d:3d] v
    -> <tower>transformer.resblocks.N.attn.q_proj.weight (d, d), .k_proj.weight, .v_proj.weight (and biases)

:class:`SplitQKVSource` shows a file's fused tensors as the three slices (read on demand), so extract factors q, k
and v each at its own rank, as kohya trains them (``lora_te2_..._self_attn_q_proj``), and a kohya key matches a
module of the base. ``apply`` writes the file's own layout back: it opens the base unsplit and adds a q/k/v module's
delta to its rows of the fused tensor (:func:`fused_rows`).
"""

from __future__ import annotations

import re

import torch

__all__ = ["OPENCLIP_TOWERS", "SplitQKVSource", "splitting", "fused_rows"]

#: single-file prefixes of OpenCLIP text towers
OPENCLIP_TOWERS = ("cond_stage_model.model.", "conditioner.embedders.0.model.", "conditioner.embedders.1.model.")
_FUSED = re.compile(r"^(?P<attn>.*\.attn\.)in_proj_(?P<leaf>weight|bias)$")
_PART = re.compile(r"^(?P<attn>.*\.attn\.)(?P<part>[qkv])_proj\.(?P<leaf>weight|bias)$")
_PARTS = "qkv"


def _fused(name: str):
    match = _FUSED.match(name)
    return match if match and name.startswith(OPENCLIP_TOWERS) else None


def fused_rows(name: str, names) -> tuple[str, int] | None:
    """(fused tensor, part: 0 q, 1 k, 2 v) of a split tensor name (``...attn.k_proj.weight`` ->
    (``...attn.in_proj_weight``, 1)) when ``names`` (the file's tensor names) holds the fused one, else None."""
    match = _PART.match(name)
    if not match or not name.startswith(OPENCLIP_TOWERS):
        return None
    fused = f"{match['attn']}in_proj_{match['leaf']}"
    return (fused, _PARTS.index(match["part"])) if fused in names else None


class SplitQKVSource:
    """A tensor source whose OpenCLIP ``attn.in_proj_weight/bias`` read as q/k/v slices (module docstring)."""

    def __init__(self, source):
        self.source = source
        self.path = source.path
        self.metadata = getattr(source, "metadata", {})
        self._parts: dict[str, tuple[str, int]] = {}  # split name -> (fused name, part)
        self._split: dict[str, list[str]] = {}  # fused name -> its split names
        for name in source.names():
            match = _fused(name)
            if match is not None and source.info(name)[1] and source.info(name)[1][0] % 3 == 0:
                self._split[name] = [f"{match['attn']}{part}_proj.{match['leaf']}" for part in _PARTS]
                self._parts.update({split: (name, i) for i, split in enumerate(self._split[name])})

    def expand(self, name: str) -> list[str]:
        """The names ``name`` of the wrapped source reads as here: q/k/v for a fused projection, else [name]."""
        return self._split.get(name, [name])

    def names(self) -> list[str]:
        return [n for name in self.source.names() for n in self.expand(name)]

    def info(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        if name not in self._parts:
            return self.source.info(name)
        dtype, shape = self.source.info(self._parts[name][0])
        return dtype, (shape[0] // 3, *shape[1:])

    def write_dtype(self, name: str) -> torch.dtype:
        inner = self._parts[name][0] if name in self._parts else name
        write_dtype = getattr(self.source, "write_dtype", None)
        return write_dtype(inner) if write_dtype else self.source.info(inner)[0]

    def read(self, name: str) -> torch.Tensor:
        if name not in self._parts:
            return self.source.read(name)
        fused, i = self._parts[name]
        t = self.source.read(fused)
        d = t.shape[0] // 3
        return t[i * d:(i + 1) * d].clone()  # a buffer of its own, as every read

    def close(self) -> None:
        self.source.close()


def splitting(source):
    """``source`` wrapped in :class:`SplitQKVSource` when it holds an OpenCLIP fused projection, else itself."""
    return SplitQKVSource(source) if any(_fused(n) for n in source.names()) else source
