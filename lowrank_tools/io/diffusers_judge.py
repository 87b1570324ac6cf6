"""What diffusers' own loader does with an adapter file: refuses it, or silently leaves modules out.

``<Pipeline>.load_lora_weights`` converts the file with ``<Pipeline>.lora_state_dict`` and hands each component the
keys under its name (``transformer.``, ``unet.``, ``text_encoder.``): a module the converter leaves out, or names
outside every component, is dropped with at most a log line. Measured with diffusers 0.42.1 (tests/test_diffusers_
drops.py loads the files for real):

- Flux (``_convert_kohya_flux_lora_to_diffusers``): ``time_in``, ``vector_in``, ``guidance_in``, ``txt_in``, ``img_in``
  and ``final_layer`` are converted to names without ``transformer.`` (``x_embedder.lora_A.weight``), which no
  component takes; ``lora_te3_`` (T5) and other text encoders than ``lora_te_`` / ``lora_te1_`` are left out
  ("Unsupported keys for ai-toolkit" in the log); ComfyUI's ``text_encoders.t5xxl`` and ``diff_b`` are filtered out.
- SD 1.x/2.x (``StableDiffusionPipeline``): LDM UNet names (``lora_unet_input_blocks_1_1_proj_in``) are mapped only
  when ``lora_state_dict`` gets ``unet_config=`` (SDXL's ``load_lora_weights`` passes it, SD 1.x's does not): without
  it ``input_blocks_1_1`` becomes ``down_blocks.1.1``, a module no UNet has (PEFT then refuses or drops it).

Which input module reaches which component is traced, not guessed: the converter runs a second time on a probe of
the file in which every module's down factor is filled with its own number and every scale is 1 (alpha = rank, up
all ones), so each converted down factor says which module it came from (:func:`trace_modules`).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

from .consumer_keys import Role, split_key

__all__ = ["PIPELINES", "COMPONENTS", "pipeline_for", "trace_modules", "ldm_unet_keys", "LDM_WORKAROUND"]

PIPELINES = (("FluxPipeline", re.compile(r"double_blocks|single_blocks|single_transformer_blocks")),
             ("StableDiffusion3Pipeline", re.compile(r"joint_blocks|context_block|transformer_blocks.*add_q_proj")),
             ("StableDiffusionXLPipeline", re.compile(r"^lora_te2_|^text_encoder_2\.|add_embedding|label_emb")),
             ("StableDiffusionPipeline", re.compile(r"")))
COMPONENTS = {"FluxPipeline": ("transformer.", "text_encoder."),
              "StableDiffusion3Pipeline": ("transformer.", "text_encoder.", "text_encoder_2."),
              "StableDiffusionXLPipeline": ("unet.", "text_encoder.", "text_encoder_2."),
              "StableDiffusionPipeline": ("unet.", "text_encoder.")}
_LDM_UNET = re.compile(r"^(lora_unet_|(model\.)?diffusion_model\.)(input_blocks|middle_block|output_blocks)[._]")
_DOWN_OUT = re.compile(r"(lora_A|lora\.down|lora_down)(\.weight)?$")
LDM_WORKAROUND = ("state, alphas = pipe.lora_state_dict(FILE, unet_config=pipe.unet.config); "
                  "pipe.load_lora_into_unet(state, alphas, pipe.unet)")


def pipeline_for(keys) -> str:
    """The diffusers pipeline class whose loader judges ``keys`` (Flux, SD3, SDXL, else SD 1.x)."""
    return next(n for n, pattern in PIPELINES if any(pattern.search(k) for k in keys))


def ldm_unet_keys(pipeline: str, modules) -> list[str]:
    """Module keys of an SD 1.x/2.x file in LDM UNet names, which that pipeline's ``load_lora_weights`` misplaces
    (module docstring); [] for other pipelines (SDXL's maps them) and files."""
    return [m for m in modules if _LDM_UNET.match(m)] if pipeline == "StableDiffusionPipeline" else []


def _probe(keys: list[str], get: Callable[[str], torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[int, str]]:
    """The file with each module's down factor filled with its number (1, 2, ...), its up factor with ones and its
    alpha = rank (scale 1); other tensors as they are. Returns (probe, {number: module key})."""
    modules: dict[str, dict] = {}
    for key in keys:
        module, suffix, role = split_key(key)
        modules.setdefault(module, {})[role] = key
    probe, numbers = {}, {}
    for key in keys:
        module, _, role = split_key(key)
        t = get(key)
        if role is Role.DOWN and t.numel():
            numbers[len(numbers) + 1] = module
            probe[key] = torch.full(t.shape, float(len(numbers)), dtype=torch.float32)
        elif role is Role.UP:
            probe[key] = torch.ones(t.shape, dtype=torch.float32)
        elif role is Role.ALPHA and Role.DOWN in modules[module]:
            probe[key] = torch.tensor(float(get(modules[module][Role.DOWN]).shape[0]))
        else:
            probe[key] = t
    return probe, numbers


def trace_modules(pipeline_cls, keys: list[str], get: Callable[[str], torch.Tensor], components: tuple[str, ...]
                  ) -> dict[str, str | None]:
    """{module key: None when a component loads it, else the name the converter gave it (``""``: none at all)} of
    every module with a down factor, by running ``pipeline_cls.lora_state_dict`` on a probe (module docstring)."""
    probe, numbers = _probe(keys, get)
    out = pipeline_cls.lora_state_dict(probe)
    converted = out[0] if isinstance(out, tuple) else out
    fate: dict[str, str | None] = {m: "" for m in numbers.values()}
    for key, t in converted.items():
        if not _DOWN_OUT.search(key) or not t.numel():
            continue
        module = numbers.get(int(round(float(t.reshape(-1)[0]))))
        if module is None:
            continue
        if key.startswith(components):
            fate[module] = None
        elif fate[module] == "":
            fate[module] = key
    return fate
