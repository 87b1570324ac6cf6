"""Which base weight an adapter module of any naming adapts (``check --base``): names compared with every ``.`` as
``_`` (so kohya's ``lora_unet_down_blocks_0_...`` meets ``down_blocks.0....``), without pipeline component and
adapter prefixes, a kohya text encoder sent to its component; an output head the base does not store is the input
embedding it is tied to (:func:`~lowrank_tools.io.base_model.tied_embedding`, as ``apply`` adds it); and what PEFT
cannot take on a base layer, as the base's model class says (:mod:`.model_config`: grouped convs, wrapped layers the
model reads)."""

from __future__ import annotations

import difflib

from .base_model import tied_embedding
from .model_config import grouped_convs, wrapper_hidden

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
        self._peft: tuple[dict, dict] | None = None  # (grouped convs, layers a wrapper breaks), when first asked
        self.index: dict[str, str] = {}
        for key in base.keys():
            if not key.endswith(".weight"):
                continue
            name = key[:-len(".weight")]
            self.index.setdefault(_norm(name), key)
            for p in _BASE_PREFIXES:
                if name.startswith(p):
                    self.index.setdefault(_norm(name[len(p):]), key)

    def add_names(self, names: dict[str, str]) -> None:
        """Index the model's module names the checkpoint stores under others ({model name: checkpoint name}:
        transformers v5 renames, tied aliases; :func:`~lowrank_tools.io.module_names.checkpoint_index`)."""
        for model, stored in names.items():
            if f"{stored}.weight" in self.base:
                self.index.setdefault(_norm(model), f"{stored}.weight")

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

    def refused(self, tensor: str, rank: int | None) -> str | None:
        """Why PEFT cannot take a LoRA of ``rank`` on base weight ``tensor``, or None: a grouped conv whose groups
        the rank is no multiple of (PEFT refuses the whole adapter), or a layer whose LoRA wrapper breaks the model."""
        if self._peft is None:
            self._peft = grouped_convs(self.base), wrapper_hidden(self.base)
        grouped, hidden = self._peft
        if tensor in grouped and rank and rank % grouped[tensor]:
            return (f"{tensor} is a grouped conv (groups={grouped[tensor]}): PEFT refuses the whole adapter, rank "
                    f"{rank} is no multiple of it; leave the module out (extract does), or merge it with apply")
        if tensor in hidden:
            return (f"{hidden[tensor]}, which PEFT's LoRA wrapper hides: the model fails to run; save the module whole "
                    f"(extract --full-modules, PEFT modules_to_save) instead")
        return None
