"""Which base weight an adapter module of any naming adapts (``check --base``): names compared with every ``.`` as
``_`` (so kohya's ``lora_unet_down_blocks_0_...`` meets ``down_blocks.0....``), without pipeline component and
adapter prefixes, a kohya text encoder sent to its component; an output head the base does not store is the input
embedding it is tied to (:func:`~lowrank_tools.io.base_model.tied_embedding`, as ``apply`` adds it)."""

from __future__ import annotations

import difflib

from .base_model import tied_embedding

__all__ = ["BaseIndex"]

_BASE_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "unet.", "transformer.", "text_encoder.",
                  "text_encoder_2.", "base_model.model.", "cond_stage_model.transformer.", "lora_unet_", "lora_te_",
                  "lora_te1_", "lora_te2_", "lora_te3_", "lora_transformer_", "lycoris_")
_COMPONENT_HINT = {"lora_te2_": "text_encoder_2_", "text_encoder_2.": "text_encoder_2_", "lora_te1_": "text_encoder_",
                   "lora_te_": "text_encoder_", "text_encoder.": "text_encoder_"}
_LONGEST_FIRST = sorted(_BASE_PREFIXES, key=len, reverse=True)


def _norm(name: str) -> str:
    return name.replace(".", "_")


class BaseIndex:
    """The ``.weight`` tensors of a base checkpoint, found by module name in any naming."""

    def __init__(self, base):
        self.base = base
        self.index: dict[str, str] = {}
        for key in base.keys():
            if not key.endswith(".weight"):
                continue
            name = key[:-len(".weight")]
            self.index.setdefault(_norm(name), key)
            for p in _BASE_PREFIXES:
                if name.startswith(p):
                    self.index.setdefault(_norm(name[len(p):]), key)

    def find(self, module: str) -> str | None:
        """The base tensor ``module`` adapts, or the embedding a tied head shares; None when the base has neither."""
        prefix = next((p for p in _LONGEST_FIRST if module.startswith(p)), "")
        body = _norm(module[len(prefix):])
        hint = _COMPONENT_HINT.get(prefix)
        for candidate in ((hint + body) if hint else None, body, _norm(module)):
            if candidate and candidate in self.index:
                return self.index[candidate]
        return tied_embedding(module.removeprefix("base_model.model."), self.base)

    def closest(self, module: str) -> str | None:
        """The base tensor whose name is nearest ``module``'s (for a hint)."""
        near = difflib.get_close_matches(_norm(module.split(".", 2)[-1]), list(self.index), n=1, cutoff=0.5)
        return self.index[near[0]] if near else None
