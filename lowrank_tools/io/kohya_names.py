"""kohya / A1111 / ComfyUI key names: module name <-> ``<prefix><module with . -> _>``.

Writing is exact. Components of a diffusers pipeline choose the prefix (``unet.`` -> ``lora_unet_``,
``text_encoder.`` -> ``lora_te_``, or ``lora_te1_`` when a ``text_encoder_2.`` is present, ``text_encoder_2.``
-> ``lora_te2_``); names without a component take the caller's prefix. Text-encoder modules are written in the
A1111/ComfyUI naming, ``lora_te_text_model_encoder_layers_0_self_attn_q_proj``, adding ``text_model.`` where the
checkpoint's own names lack it (transformers >= 5 flattens ``CLIPTextModel``).

Reading is a guess, because ``_`` is also a character of names: a key is matched against the module names of a
base checkpoint when one is given (:func:`match_keys`), else rebuilt from the identifiers diffusers and
transformers are known to use (:func:`guess_module_name`) -- and said to be a guess.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from ..errors import AdapterMismatch, InvalidOption
from .architectures import TRANSFORMER, Detected, Naming, architecture_named, detect_architecture
from .ldm_names import ldm_split

__all__ = ["COMPONENT_PREFIXES", "KOHYA_PREFIXES", "kohya_key", "split_prefix", "check_prefix", "guess_module_name",
           "match_keys", "is_text_encoder_prefix", "architecture_names", "dotted_module_name", "t5_component",
           "T5_PREFIX"]

# module-name component -> kohya prefix
COMPONENT_PREFIXES = {"unet.": "lora_unet_", "transformer.": "lora_unet_", "text_encoder.": "lora_te_",
                      "text_encoder_2.": "lora_te2_", "text_encoder_3.": "lora_te3_"}
# kohya prefix -> the pipeline components it can stand for (the first is the guess)
# (lora_te3_: SD3's / Flux's T5 in sd-scripts' lora_sd3.py / lora_flux.py; lora_transformer_: OneTrainer's diffusers
# transformer. LyCORIS' own lycoris_ prefix is read for the transformer models of :mod:`.architectures` only)
KOHYA_PREFIXES = {"lora_unet_": ("unet.", "transformer."), "lora_transformer_": ("transformer.",),
                  "lora_te1_": ("text_encoder.",), "lora_te2_": ("text_encoder_2.",),
                  "lora_te3_": ("text_encoder_3.", "text_encoder_2."),  # SD3's T5, Flux's T5 (see t5_component)
                  "lora_te_": ("text_encoder.",)}
_TRANSFORMER_PREFIXES = ("lora_unet_", "lora_transformer_", "lycoris_")  # may hold a transformer model's names
_TEXT_MODEL_CHILDREN = ("encoder.", "embeddings.", "final_layer_norm.")  # CLIPTextTransformer's children
# a T5 encoder (Flux's text_encoder_2, SD3's text_encoder_3): sd-scripts (lora_flux.py, lora_sd3.py) and ComfyUI
# (comfy/lora.py, t5xxl) name it lora_te3_<T5 module path>
_T5_BODY = ("encoder.block.", "shared", "encoder.final_layer_norm")
# UNet names diffusers' kohya converter cannot read back in diffusers spelling (its SDXL rule strips the ".1" of
# "add.embedding.linear.1"): written in the SGM spelling it maps to them (label_emb.0.0 -> add_embedding.linear_1)
_UNET_SPELLING = {"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
_UNET_NAMES = {v: k for k, v in _UNET_SPELLING.items()}
_PREFIX_SHAPE = re.compile(r"^lora_[a-z0-9]+(_[a-z0-9]+)*_$")

# identifiers that hold "_" in diffusers UNets/transformers, LDM/SGM UNets, CLIP and common LLMs
_KNOWN = """
down_blocks up_blocks mid_block transformer_blocks single_transformer_blocks temp_attentions
to_q to_k to_v to_out add_q_proj add_k_proj add_v_proj to_add_out norm_added_q norm_added_k ff_context
proj_in proj_out proj_attn time_emb_proj conv_shortcut conv_in conv_out conv_norm_out conv_act
time_embedding linear_1 linear_2 add_embedding time_proj encoder_hid_proj class_embedding
input_blocks output_blocks middle_block in_layers out_layers emb_layers skip_connection time_embed label_emb
text_model self_attn q_proj k_proj v_proj out_proj o_proj gate_proj up_proj down_proj qkv_proj gate_up_proj
final_layer_norm layer_norm1 layer_norm2 token_embedding position_embedding text_projection
embed_tokens lm_head input_layernorm post_attention_layernorm word_embeddings position_embeddings
token_type_embeddings c_attn c_proj c_fc query_key_value dense_h_to_4h dense_4h_to_h embed_in embed_out
x_embedder context_embedder time_text_embed timestep_embedder text_embedder guidance_embedder norm_out
single_transformer_blocks proj_mlp norm1_context ff_context to_add_out
double_blocks single_blocks img_attn txt_attn img_mlp txt_mlp img_mod txt_mod final_layer adaLN_modulation
img_in txt_in time_in vector_in guidance_in in_layer out_layer joint_blocks x_block context_block t_embedder
y_embedder self_attn cross_attn k_img v_img patch_embedding text_embedding time_embedding time_projection img_emb
wi_0 wi_1
"""
_KNOWN_TOKENS = sorted((tuple(w.split("_")) for w in _KNOWN.split()), key=len, reverse=True)


def check_prefix(prefix: str) -> str:
    """A kohya prefix is ``lora_<word>_`` (``lora_unet_``, ``lora_te_``, ``lora_te1_``, ...)."""
    if not _PREFIX_SHAPE.match(prefix):
        raise InvalidOption(f"--prefix {prefix!r} is not a kohya prefix: use lora_unet_, lora_te_, lora_te1_, "
                            f"lora_te2_ (or another 'lora_<word>_')")
    return prefix


def is_text_encoder_prefix(prefix: str) -> bool:
    return prefix.startswith("lora_te")


def _is_t5(body: str) -> bool:
    return body.startswith(_T5_BODY)


def _a1111_body(body: str) -> str:
    """Text-encoder names gain ``text_model.`` where a flattened CLIPTextModel lacks it (never a T5's)."""
    return f"text_model.{body}" if body.startswith(_TEXT_MODEL_CHILDREN) and not _is_t5(body) else body


def _component_prefix(name: str, prefix: str, two_encoders: bool) -> tuple[str, str]:
    """(kohya prefix, name without its pipeline component); the caller's prefix when there is no component."""
    for component, comp_prefix in COMPONENT_PREFIXES.items():
        if name.startswith(component):
            if component == "text_encoder." and two_encoders:
                comp_prefix = "lora_te1_"
            elif component.startswith("text_encoder") and _is_t5(name[len(component):]):
                comp_prefix = "lora_te3_"
            return comp_prefix, name[len(component):]
    return prefix, name


def kohya_key(name: str, *, prefix: str = "lora_unet_", two_encoders: bool = False) -> str:
    """Module name -> kohya key (without ``.lora_down.weight``): the component decides the prefix (a single-file
    checkpoint's ``model.diffusion_model.`` / ``cond_stage_model.`` / ``conditioner.embedders.N.`` too)."""
    ldm = ldm_split(name)
    if ldm is not None:
        _, prefix, name = ldm
    else:
        prefix, name = _component_prefix(name, prefix, two_encoders)
    if is_text_encoder_prefix(prefix):
        name = _a1111_body(name)
    elif prefix == "lora_unet_":
        name = _UNET_SPELLING.get(name, name)
    return prefix + name.replace(".", "_")


def split_prefix(key: str) -> tuple[str, str]:
    """``lora_te1_text_model_x`` -> (``lora_te1_``, ``text_model_x``); ('', key) for an unknown prefix."""
    for prefix in KOHYA_PREFIXES:
        if key.startswith(prefix):
            return prefix, key[len(prefix):]
    match = re.match(r"^(lora_[a-z0-9]+_)", key)
    return (match.group(1), key[match.end():]) if match else ("", key)


def guess_module_name(key: str) -> str:
    """The module a key most likely stands for, from known identifiers; ``.`` between the others.

    ``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q`` ->
    ``unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``.
    """
    prefix, body = split_prefix(key)
    tokens, parts, i = body.split("_"), [], 0
    while i < len(tokens):
        for known in _KNOWN_TOKENS:
            if tuple(tokens[i:i + len(known)]) == known:
                parts.append("_".join(known))
                i += len(known)
                break
        else:
            parts.append(tokens[i])
            i += 1
    name = ".".join(parts)
    if prefix == "lora_unet_":
        name = _UNET_NAMES.get(name, name)
    return KOHYA_PREFIXES.get(prefix, ("",))[0] + name


def _normal(body: str) -> str:
    body = body.replace(".", "_")
    return body[len("text_model_"):] if body.startswith("text_model_") else body


def match_keys(keys: Iterable[str], module_names: Iterable[str], *, where: str, base: str) -> dict[str, str]:
    """Map each kohya key to the one module of ``module_names`` (a base checkpoint's) it can stand for.

    Names of a pipeline keep their component (``unet.``, ``text_encoder.``) and must agree with the key's
    prefix; a single component's names match any prefix. Raises :class:`AdapterMismatch` naming the key
    that matches no module, or more than one.
    """
    names = list(module_names)
    with_component = any(n.startswith(tuple(COMPONENT_PREFIXES)) or ldm_split(n) for n in names)
    index: dict[tuple[str, str], list[str]] = {}
    for n in names:
        component = next((c for c in COMPONENT_PREFIXES if n.startswith(c)), "") if with_component else ""
        body = n[len(component):]
        ldm = ldm_split(n)
        if ldm is not None:  # a single-file checkpoint: its prefixes stand for components
            component, _, body = ldm
        for spelling in {body, _UNET_SPELLING.get(body, body)}:
            index.setdefault((component, _normal(spelling)), []).append(n)
    out = {}
    for key in keys:
        prefix, body = split_prefix(key)
        components = KOHYA_PREFIXES.get(prefix, ("",)) if with_component else ("",)
        found = [n for c in components for n in index.get((c, _normal(body)), [])]
        if len(found) != 1:
            what = "no module" if not found else f"{len(found)} modules ({', '.join(found[:3])})"
            raise AdapterMismatch(f"{where}: key {key} matches {what} of {base}: give the base model the adapter "
                                  f"was made for")
        out[key] = found[0]
    return out


def dotted_module_name(key: str) -> str | None:
    """A key that spells its module with dots (ComfyUI's ``diffusion_model.double_blocks.0.img_attn.qkv``,
    ``text_encoders.clip_l...``) names it exactly: the module, without ComfyUI's / SGM's model prefix; None for
    a kohya key (no dot)."""
    if "." not in key:
        return None
    return next((key[len(p):] for p in ("model.diffusion_model.", "diffusion_model.") if key.startswith(p)), key)


def architecture_names(keys: Iterable[str]) -> tuple[dict[str, str], Detected | None]:
    """{kohya key: exact module name} for the keys of a transformer model's file, read with the one architecture
    and naming the whole file is detected as (:mod:`.architectures`): ``lora_unet_double_blocks_0_img_attn_qkv``
    -> ``double_blocks.0.img_attn.qkv`` (Flux, BFL names), ``lora_transformer_single_transformer_blocks_0_attn_to_q``
    -> ``transformer.single_transformer_blocks.0.attn.to_q``; ({}, None) when no architecture fits."""
    bodies = {}
    for key in keys:
        prefix, body = ("lycoris_", key[len("lycoris_"):]) if key.startswith("lycoris_") else split_prefix(key)
        if prefix in _TRANSFORMER_PREFIXES:
            bodies[key] = body
    found = detect_architecture(bodies.values(), sep="_")
    if found is None:
        return {}, None
    names = {}
    for key, body in bodies.items():
        hit = found.architecture.match(body, found.naming, sep="_")
        if hit is not None:
            rule, index, part = hit
            name = found.architecture.module_name(rule, index, found.naming, part)
            names[key] = name if found.naming is Naming.ORIGINAL else TRANSFORMER + name
    return names, found


T5_PREFIX = "lora_te3_"
# what sd-scripts records of the model a LoRA was trained on (library/sai_model_spec.py, flux_utils.MODEL_VERSION_*):
# modelspec.architecture "flux-1-dev/lora", "chroma/lora", "stable-diffusion-3-...", ss_base_model_version "flux1",
# "chroma", "sd3"...; and ss_sd_model_name, the base checkpoint's file name ("flux1-dev.safetensors")
_RECORDED_MODEL = (("flux", re.compile(r"flux|chroma", re.IGNORECASE)),
                   ("sd3", re.compile(r"stable-diffusion-3|sd3|sd_3|sd-3", re.IGNORECASE)))
_RECORDED_KEYS = ("modelspec.architecture", "ss_base_model_version", "ss_sd_model_name")


def t5_component(found: Detected | None, metadata: dict[str, str]) -> tuple[str | None, str]:
    """The diffusers component a ``lora_te3_`` (T5) key stands for and why: Flux's T5 is ``text_encoder_2.``, SD3's
    ``text_encoder_3.`` (sd-scripts and ComfyUI write lora_te3_ for both). Decided by the architecture of the file's
    transformer keys (``found``), else by what the file records of its base model; (None, why not) when neither
    tells (the caller then reads SD3's and says so)."""
    if found is not None and found.architecture.t5:
        return found.architecture.t5, f"its transformer keys are {found.architecture.label}'s"
    for key in _RECORDED_KEYS:
        value = metadata.get(key) or ""
        for arch, pattern in _RECORDED_MODEL:
            if pattern.search(value):
                return architecture_named(arch).t5, f"its metadata {key} is {value!r}"
    return None, "no transformer keys and no recorded base model"
