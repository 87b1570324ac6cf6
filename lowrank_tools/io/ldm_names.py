"""Single-file LDM/SGM checkpoints (A1111, ComfyUI, the original SD 1.x/2.x/XL releases) and ComfyUI's saved
Flux/SD3-style checkpoints: which part of the model a tensor belongs to, and its kohya name.

    model.diffusion_model.<LDM UNet / BFL name>          -> lora_unet_<name>    (input_blocks_1_1_..., as A1111 and
                                                                                ComfyUI read it; diffusers' kohya
                                                                                converter maps these SGM names)
    cond_stage_model.transformer.<HF CLIP name>         -> lora_te_<name>      SD 1.x: CLIPTextModel
    cond_stage_model.model.<OpenCLIP name>              -> lora_te_<HF name>   SD 2.x: OpenCLIP ViT-H
    conditioner.embedders.0.transformer.<HF CLIP name>  -> lora_te1_<name>     SDXL: CLIP ViT-L
    conditioner.embedders.1.model.<OpenCLIP name>       -> lora_te2_<HF name>  SDXL: OpenCLIP ViT-bigG
    conditioner.embedders.0.model.<OpenCLIP name>       -> lora_te_<HF name>   SDXL refiner: ViT-bigG alone (and SD 2.x
                                                                                saved in SGM layout: ViT-H)
    conditioner.embedders.1.transformer.<HF CLIP name>  -> lora_te2_<name>     bigG stored in transformers layout
    text_encoders.clip_l.transformer.<HF CLIP name>     -> lora_te1_<name>     ComfyUI Flux / SD3 checkpoints
    text_encoders.clip_g.transformer.<HF CLIP name>     -> lora_te2_<name>     ComfyUI SD3
    text_encoders.t5xxl.transformer.<T5 name>           -> lora_te3_<name>     ComfyUI Flux / SD3
    first_stage_model. , vae.                           the VAE (LDM/SGM; ComfyUI Flux/SD3): never adapted

The tower is read from the names, not from the slot: ``embedders.N.model.`` is OpenCLIP, ``.transformer.`` is
transformers' CLIP. The SDXL refiner (``conditioner.embedders.0.model.``, no CLIP-L) gets ``lora_te_``: ComfyUI's
``model_lora_keys_clip`` maps a ``clip_g`` without a ``clip_l`` to ``lora_te_text_model_encoder_layers_N_*`` (and
``text_encoder.text_model...``), its only kohya name; sd-scripts has no refiner support; diffusers' refiner pipeline
(StableDiffusionXLImg2ImgPipeline) calls the tower ``text_encoder_2`` while its kohya converter maps ``lora_te_`` to
``text_encoder``, so a kohya file cannot address the refiner's tower in diffusers (README). Inside this table the
tower stands in the ``text_encoder.`` slot, the component ``lora_te_`` keys are matched against. T5 keeps its own
module names (``lora_te3_encoder_block_0_layer_0_SelfAttention_q``: ComfyUI's ``t5xxl`` map, sd-scripts'
lora_flux.py); ComfyUI maps ``clip_l`` alone to ``lora_te_`` and ``lora_te1_`` both, sd-scripts' Flux uses the latter.

OpenCLIP names become the transformers CLIP names kohya's ``lora_te2_`` keys use (``transformer.resblocks.N`` ->
``text_model.encoder.layers.N``, ``attn.out_proj`` -> ``self_attn.out_proj``, ``mlp.c_fc``/``c_proj`` -> ``mlp.fc1``
/ ``fc2``); OpenCLIP's fused ``attn.in_proj_weight`` reads as ``attn.q_proj/k_proj/v_proj`` (:mod:`.openclip`),
which become ``self_attn.q_proj`` etc. Sources: diffusers' ``loaders/single_file_utils.py`` (LDM key
prefixes, ``convert_open_clip_checkpoint``, ``is_open_clip_sdxl_refiner_model``), ComfyUI's
``comfy/supported_models.py`` (each model's ``process_clip_state_dict(_for_saving)``, ``vae_key_prefix``,
``text_encoder_key_prefix``) and ``comfy/lora.py`` (``model_lora_keys_unet``: ``lora_unet_`` + the name under
``diffusion_model.``; ``model_lora_keys_clip``).
"""

from __future__ import annotations

import re

__all__ = ["LDM_PREFIXES", "VAE_PREFIX", "VAE_PREFIXES", "ldm_split", "is_vae", "openclip_to_clip"]

#: single-file prefix -> (pipeline component it stands for, kohya prefix, OpenCLIP names to translate)
LDM_PREFIXES: dict[str, tuple[str, str, bool]] = {
    "model.diffusion_model.": ("unet.", "lora_unet_", False),
    "cond_stage_model.transformer.": ("text_encoder.", "lora_te_", False),
    "cond_stage_model.model.": ("text_encoder.", "lora_te_", True),
    "conditioner.embedders.0.transformer.": ("text_encoder.", "lora_te1_", False),
    "conditioner.embedders.1.model.": ("text_encoder_2.", "lora_te2_", True),
    "conditioner.embedders.0.model.": ("text_encoder.", "lora_te_", True),
    "conditioner.embedders.1.transformer.": ("text_encoder_2.", "lora_te2_", False),
    "text_encoders.clip_l.transformer.": ("text_encoder.", "lora_te1_", False),
    "text_encoders.clip_g.transformer.": ("text_encoder_2.", "lora_te2_", False),
    "text_encoders.t5xxl.transformer.": ("text_encoder_3.", "lora_te3_", False),
}
VAE_PREFIX = "first_stage_model."
VAE_PREFIXES = (VAE_PREFIX, "vae.")  # LDM/SGM; ComfyUI's Flux / SD3 / HunyuanDiT checkpoints (vae_key_prefix)

_OPENCLIP = [  # (pattern, replacement), applied in order
    (re.compile(r"^transformer\.resblocks\.(\d+)\."), r"text_model.encoder.layers.\1."),
    (re.compile(r"\.attn\.(out|q|k|v)_proj$"), r".self_attn.\1_proj"),  # q/k/v: io/openclip.py's split view
    (re.compile(r"\.mlp\.c_fc$"), ".mlp.fc1"),
    (re.compile(r"\.mlp\.c_proj$"), ".mlp.fc2"),
    (re.compile(r"\.ln_1$"), ".layer_norm1"),
    (re.compile(r"\.ln_2$"), ".layer_norm2"),
    (re.compile(r"^ln_final$"), "text_model.final_layer_norm"),
    (re.compile(r"^token_embedding$"), "text_model.embeddings.token_embedding"),
]


def openclip_to_clip(name: str) -> str:
    """An OpenCLIP text-tower module name -> the transformers CLIP one (unchanged when no rule applies)."""
    for pattern, replacement in _OPENCLIP:
        name = pattern.sub(replacement, name)
    return name


def ldm_split(name: str) -> tuple[str, str, str] | None:
    """(component, kohya prefix, body) of a module name of a single-file checkpoint, else None.

    ``model.diffusion_model.input_blocks.1.1.proj_in`` -> (``unet.``, ``lora_unet_``, ``input_blocks.1.1.proj_in``);
    ``conditioner.embedders.1.model.transformer.resblocks.0.mlp.c_fc`` -> (``text_encoder_2.``, ``lora_te2_``,
    ``text_model.encoder.layers.0.mlp.fc1``)."""
    for prefix, (component, kohya, openclip) in LDM_PREFIXES.items():
        if name.startswith(prefix):
            body = name[len(prefix):]
            return component, kohya, openclip_to_clip(body) if openclip else body
    return None


def is_vae(name: str) -> bool:
    """A tensor of a single file's VAE (``first_stage_model.``, ComfyUI's ``vae.``): never adapted."""
    return name.startswith(VAE_PREFIXES)
