"""Which adapter keys each consumer loads: our own tables, written from the loaders' documented key maps.

- A1111 (``extensions-builtin/Lora``): kohya names only, ``lora_unet_`` / ``lora_te_`` / ``lora_te1_`` / ``lora_te2_``
  + the module path with ``.`` -> ``_``, suffixes ``.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` and the
  LyCORIS ones (``hada_*``, ``lokr_*``, ``lora_mid``, ``dora_scale``, ``diff``, ``diff_b``, ``w_norm``, ``b_norm``).
- ComfyUI (``comfy/lora.py``: ``model_lora_keys_unet`` / ``model_lora_keys_clip`` / ``load_lora``): those, plus
  ``lora_te3_``, ``lora_transformer_``, ``lycoris_``, ``lora_prior_unet_`` / ``lora_prior_te_`` (Stable Cascade)
  and the dotted forms it maps from the model's own state dict: ``diffusion_model.<key>``, diffusers ``unet.`` /
  ``transformer.`` / ``text_encoder*.`` (UNet names bare too),
  ``text_encoders.``, PEFT ``base_model.model.`` for transformer models only (its HunyuanVideo /
  Qwen-Image maps); dotted keys may also use ``.lora_A/B.weight``, ``.lora.up/down.weight``,
  ``.lora_linear_layer.up/down.weight`` and diffusers' old ``_lora.up/down.weight`` (its ``load_lora`` reads
  ``{x}.lora_up.weight`` / ``{x}_lora.up.weight`` / ``{x}.lora_linear_layer.up.weight``; diffusers UNet names also bare
  or under ``unet.``, with ``.processor.to_q``).
- PEFT (``PeftModel.from_pretrained``): ``base_model.model.<module>.lora_A.weight`` etc. and nothing else.
- diffusers: judged by its own loader (see :mod:`lowrank_tools.check`); without diffusers, kohya names or
  component-prefixed PEFT-style keys (``unet.`` / ``text_encoder.`` / ``text_encoder_2.`` / ``transformer.``).
"""

from __future__ import annotations

import difflib
import re
from enum import Enum

from .architectures import Naming
from .kohya_names import architecture_names, split_prefix

__all__ = ["Consumer", "Role", "split_key", "key_accepted", "ROLES", "KOHYA_LIKE_PREFIXES", "unknown_to_architecture"]


class Consumer(str, Enum):
    PEFT = "peft"
    DIFFUSERS = "diffusers"
    COMFYUI = "comfyui"
    A1111 = "a1111"


class Role(str, Enum):
    DOWN = "down"      # A: (r, in[, kh, kw])
    UP = "up"          # B: (out, r[, 1, 1])
    ALPHA = "alpha"
    OTHER = "other"    # LyCORIS / DoRA / bias tensors: shape-checked by kind, never a LoRA factor


_LYCORIS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "lokr_w1", "lokr_w1_a",
            "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "lora_mid.weight", "dora_scale", "diff",
            "diff_b", "w_norm", "b_norm")
_KOHYA = {"lora_down.weight": Role.DOWN, "lora_up.weight": Role.UP, "alpha": Role.ALPHA,
          **{s: Role.OTHER for s in _LYCORIS}}
_PEFT = {"lora_A.weight": Role.DOWN, "lora_B.weight": Role.UP, "lora_embedding_A": Role.DOWN,
         "lora_embedding_B": Role.UP, "lora_B.bias": Role.OTHER, "lora_magnitude_vector": Role.OTHER,
         "lora_magnitude_vector.weight": Role.OTHER,
         **{s: Role.OTHER for s in _LYCORIS if s.startswith(("hada_", "lokr_"))}}
_COMFY_EXTRA = {"lora.down.weight": Role.DOWN, "lora.up.weight": Role.UP, "lora_linear_layer.down.weight": Role.DOWN,
                "lora_linear_layer.up.weight": Role.UP}
ROLES = {**_KOHYA, **_PEFT, **_COMFY_EXTRA}
_BY_LENGTH = sorted(ROLES, key=len, reverse=True)
_OLD_DIFFUSERS = re.compile(r"^(.*)_lora\.(up|down)\.weight$")  # unet...to_q_lora.up.weight (diffusers < 0.20)

A1111_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
KOHYA_LIKE_PREFIXES = (*A1111_PREFIXES, "lora_te3_", "lora_transformer_", "lycoris_", "lora_prior_unet_",
                       "lora_prior_te_")
_COMFY_DOTTED = ("diffusion_model.", "model.diffusion_model.", "unet.", "transformer.", "text_encoder.",
                 "text_encoder_2.", "text_encoders.", "down_blocks.", "up_blocks.", "mid_block.")  # bare UNet names too
_COMFY_PEFT = re.compile(r"^base_model\.model\..*transformer_blocks\.")  # its HunyuanVideo / Qwen-Image maps only
_DIFFUSERS_DOTTED = ("unet.", "transformer.", "text_encoder.", "text_encoder_2.")
_UNDERSCORE_BODY = re.compile(r"^[A-Za-z0-9_]+$")
_DOTTED_BODY = re.compile(r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$")


def split_key(key: str) -> tuple[str, str | None, Role | None]:
    """``key`` -> (module key, suffix, role); (key, None, None) when no known suffix ends it."""
    old = _OLD_DIFFUSERS.match(key)
    if old:
        return old.group(1), f"_lora.{old.group(2)}.weight", Role.UP if old.group(2) == "up" else Role.DOWN
    for suffix in _BY_LENGTH:
        if key.endswith("." + suffix):
            return key[:-len(suffix) - 1], suffix, ROLES[suffix]
    return key, None, None


def _prefixed(module: str, prefixes) -> str | None:
    return next((p for p in prefixes if module.startswith(p) and len(module) > len(p)), None)


def key_accepted(consumer: Consumer, module: str, suffix: str | None) -> str | None:
    """None when ``consumer`` maps the key to a module by its name alone; else why not (one phrase)."""
    if suffix is None:
        return "no suffix any LoRA/LyCORIS loader knows (.lora_down.weight, .lora_A.weight, .alpha, .hada_w1_a, ...)"
    if consumer is Consumer.PEFT:
        if suffix not in _PEFT:
            return f"suffix .{suffix} is not PEFT's (.lora_A.weight / .lora_B.weight / .lora_embedding_A/B)"
        if not module.startswith("base_model.model."):
            return "PEFT keys start with base_model.model."
        return None if _DOTTED_BODY.match(module) else "not a dotted module path"
    underscore = A1111_PREFIXES if consumer is Consumer.A1111 else KOHYA_LIKE_PREFIXES
    dotted = {Consumer.A1111: (), Consumer.COMFYUI: _COMFY_DOTTED, Consumer.DIFFUSERS: _DIFFUSERS_DOTTED}[consumer]
    if _prefixed(module, underscore):
        if suffix not in _KOHYA:
            return f"suffix .{suffix} is not a kohya/LyCORIS one (.lora_down.weight / .lora_up.weight / .alpha)"
        return None if _UNDERSCORE_BODY.match(module) else "a kohya name holds no '.' inside the module path"
    if _prefixed(module, dotted) or (consumer is Consumer.COMFYUI and _COMFY_PEFT.match(module)):
        return None if _DOTTED_BODY.match(module) else "not a dotted module path"
    return f"prefix not loaded by {consumer.value} (expected {', '.join((*underscore, *dotted))})"


def unknown_to_architecture(module_keys) -> tuple[str | None, dict[str, str]]:
    """For a kohya-named file of a transformer model (Flux, SD3, Wan: :mod:`.architectures`), the model it is read
    as and {module key: why} for each ``lora_unet_`` key that is none of that model's modules: ComfyUI maps
    ``lora_unet_<original name with . -> _>`` of the model's own modules only, and drops the rest ("lora key not
    loaded"). (None, {}) for any other file."""
    keys = [k for k in module_keys if split_prefix(k)[0] == "lora_unet_" and "." not in k]
    names, found = architecture_names(keys)
    if found is None or found.naming is not Naming.ORIGINAL:
        return None, {}
    rules = found.architecture.rules
    out = {}
    for key in (k for k in keys if k not in names):
        indices = set(re.findall(r"_(\d+)_", key)) or {"0"}
        known = [f"lora_unet_{r.original.replace('{i}', i).replace('.', '_')}" for r in rules for i in indices]
        close = difflib.get_close_matches(key, known, n=1)
        out[key] = (f"no module of {found.describe()} has this name" +
                    (f" (did you mean {close[0]}?)" if close else ""))
    return found.describe(), out
