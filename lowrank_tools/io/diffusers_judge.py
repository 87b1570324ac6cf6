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

Which loader judges the file is the base's when one is given: the pipeline its ``model_index.json`` names
(``WanPipeline``: :class:`WanLoraLoaderMixin`'s converter and components), or for a lone component folder (its
``config.json`` ``_class_name``) its own ``load_lora_adapter(prefix=None)`` for a file without component prefixes
(what extract writes beside a component's PEFT folder), its family's loader for a pipeline's file
(``SanaTransformer2DModel`` -> ``SanaLoraLoaderMixin``); without a base, the class extract read from the base and
recorded in the adapter (:mod:`.base_class`), taken as the base's; with neither, the names decide
(:func:`pipeline_for`, then the architecture of the tables they are: Wan's -> WanPipeline). A pipeline diffusers has
no LoRA loader for (PixArt in 0.42) is said so, once (:func:`judge_for`).

Which input module reaches which component is traced, not guessed: the converter runs a second time on a probe of
the file in which every module's down factor is filled with its own number and every scale is 1 (alpha = rank, up
all ones; every other tensor, diff_b or dora_scale, numbered too), so each converted tensor says where it came
from (:func:`trace_modules`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..adapter import BaseClass
from .architectures import detect_architecture
from .base_class import base_class
from .consumer_keys import KOHYA_LIKE_PREFIXES, Role, split_key

__all__ = ["PIPELINES", "COMPONENTS", "pipeline_for", "trace_modules", "ldm_unet_keys", "LDM_WORKAROUND", "Judge",
           "judge_for"]

PIPELINES = (("FluxPipeline", re.compile(r"double_blocks|single_blocks|single_transformer_blocks")),
             ("StableDiffusion3Pipeline", re.compile(r"joint_blocks|context_block|transformer_blocks.*add_q_proj")),
             ("StableDiffusionXLPipeline", re.compile(r"^lora_te2_|^text_encoder_2\.|add_embedding|label_emb")),
             ("StableDiffusionPipeline", re.compile(r"")))
COMPONENTS = {"FluxPipeline": ("transformer.", "text_encoder."),
              "StableDiffusion3Pipeline": ("transformer.", "text_encoder.", "text_encoder_2."),
              "StableDiffusionXLPipeline": ("unet.", "text_encoder.", "text_encoder_2."),
              "StableDiffusionPipeline": ("unet.", "text_encoder.")}
_LDM_UNET = re.compile(r"^(lora_unet_|(model\.)?diffusion_model\.)(input_blocks|middle_block|output_blocks)[._]")
_UP_OUT = re.compile(r"(lora_B|lora\.up|lora_up)\.weight$")
LDM_WORKAROUND = ("state, alphas = pipe.lora_state_dict(FILE, unet_config=pipe.unet.config); "
                  "pipe.load_lora_into_unet(state, alphas, pipe.unet)")


def pipeline_for(keys) -> str:
    """The diffusers pipeline class whose loader judges ``keys`` (Flux, SD3, SDXL, else SD 1.x)."""
    return next(n for n, pattern in PIPELINES if any(pattern.search(k) for k in keys))


_ARCHITECTURE_PIPELINES = {"flux": "FluxPipeline", "sd3": "StableDiffusion3Pipeline", "wan": "WanPipeline",
                           "qwen_image": "QwenImagePipeline", "hunyuan_video": "HunyuanVideoPipeline"}
_PREFIXED = tuple(sorted({c for parts in COMPONENTS.values() for c in parts}))  # keys a pipeline routes
_COMPONENT_CLASS = re.compile(r"^(?P<stem>\w+?)Transformer\dDModel$")  # WanTransformer3DModel -> Wan


@dataclass(frozen=True)
class Judge:
    """The diffusers class whose ``lora_state_dict`` judges a file, and why that one."""

    name: str                          # FluxPipeline, WanPipeline, SanaLoraLoaderMixin, PixArtSigmaPipeline
    loader: type | None                # the class, None when diffusers has no LoRA loader for it
    components: tuple[str, ...]        # its components' key prefixes ("transformer.", ...)
    evidence: str                      # "model_index.json of BASE", "the adapter's names", ...


def _class_of(base, recorded: BaseClass | None) -> tuple[str, str, bool] | None:
    """(``_class_name``, where it was read, whether a lone component's): the base's own (:func:`base_class`), else
    the one recorded in the adapter at extract; None when neither is known."""
    found = base_class(base) if base is not None else None
    if found is not None:
        where = str(Path(base.path) / found.file) if not found.component else f"config.json of {base.path}"
        return found.name, where, found.component
    if recorded is not None:
        return recorded.name, f"the base's {recorded.file} as recorded in the adapter at extract", recorded.component
    return None


class _AsIs:
    """What a component's ``load_lora_adapter(prefix=None)`` does with a file before PEFT loads it: keys not in
    PEFT's naming through diffusers' ``convert_unet_state_dict_to_peft``, else nothing."""

    @staticmethod
    def lora_state_dict(state_dict):
        from diffusers.utils import convert_unet_state_dict_to_peft

        return state_dict if "lora_A" in next(iter(state_dict), "lora_A") else convert_unet_state_dict_to_peft(
            state_dict)


def _lone(diffusers, keys, name: str, where: str) -> Judge | None:
    """The judge of a file in the component's own names for a lone component base (``pipe/unet``, an adapter
    extract wrote for it): the component's own ``load_lora_adapter(prefix=None)``; None for a prefixed file (loaded
    through a pipeline), a kohya/A1111-named one (only a pipeline loader's converter reads ``lora_unet_...``: taken
    as it is, no module of it would exist) or a class diffusers does not have."""
    cls = getattr(diffusers, name, None)
    if cls is None or any(k.startswith(_PREFIXED) or k.startswith(KOHYA_LIKE_PREFIXES) for k in keys):
        return None
    loader = _AsIs if callable(getattr(cls, "load_lora_adapter", None)) else None
    return Judge(name, loader, ("",), f"{where}: its load_lora_adapter(prefix=None) takes the file as it is")


def _by_names(diffusers, keys) -> Judge:
    """The pipeline the names point to (:func:`pipeline_for`); where that is only the SD 1.x fallback, the pipeline
    of the tables' architecture the names are (a Wan file's ``transformer.blocks.0.attn1``: WanPipeline)."""
    name = pipeline_for(keys)
    if name == "StableDiffusionPipeline":
        found = detect_architecture([split_key(k)[0] for k in keys])
        name = _ARCHITECTURE_PIPELINES.get(found.architecture.name, name) if found else name
    loader = getattr(diffusers, name)
    modules = getattr(loader, "_lora_loadable_modules", None) or ()
    components = tuple(f"{m}." for m in modules) or COMPONENTS[name]
    unsure = any(not k.startswith(components) for k in keys)  # a transformer the fallback has no component for
    return Judge(name, loader, components, "the adapter's names" + ("; --base PIPELINE judges by the base's own "
                                                                     "pipeline" if unsure else ""))


def judge_for(diffusers, keys, base=None, *, recorded: BaseClass | None = None) -> Judge:
    """Who judges ``keys`` in ``diffusers`` (the module): the base's pipeline (its ``model_index.json``); for a lone
    component base, the component's own ``load_lora_adapter`` (a file without component prefixes) or its family's
    pipeline loader (a pipeline's file). Without a base that names its class, the class ``recorded`` in the adapter
    at extract (:mod:`.base_class`), taken exactly as the base's; else the pipeline the names point to
    (:func:`_by_names`)."""
    found = _class_of(base, recorded)
    if found is None:
        return _by_names(diffusers, keys)
    name, where, lone = found
    judge = _lone(diffusers, keys, name, where) if lone else None
    if judge is not None:
        return judge
    stem = _COMPONENT_CLASS.match(name)
    if stem and name not in COMPONENTS:  # a lone transformer component: its family's LoRA loader
        name = f"{stem['stem']}LoraLoaderMixin"
    loader = getattr(diffusers, name, None) or getattr(getattr(diffusers, "loaders", None), name, None)
    loader = loader if callable(getattr(loader, "lora_state_dict", None)) else None
    if loader is None and stem is None and not name.endswith("Pipeline"):  # a UNet, an unknown class: the names
        return _by_names(diffusers, keys)
    modules = getattr(loader, "_lora_loadable_modules", None) or ()
    components = tuple(f"{m}." for m in modules) or COMPONENTS.get(name, ("transformer.",))
    return Judge(name, loader, components, where)


def ldm_unet_keys(pipeline: str, modules) -> list[str]:
    """Module keys of an SD 1.x/2.x file in LDM UNet names, which that pipeline's ``load_lora_weights`` misplaces
    (module docstring); [] for other pipelines (SDXL's maps them) and files."""
    return [m for m in modules if _LDM_UNET.match(m)] if pipeline == "StableDiffusionPipeline" else []


def _probe(keys: list[str], get: Callable[[str], torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[int, str]]:
    """The file with each module's down factor, and each other tensor (``diff_b``, ``dora_scale``...), filled with
    its own number (2, 3, ...), every up factor with ones and every alpha = rank (scale 1). Returns (probe, {number:
    module key for a down factor, tensor key for another tensor})."""
    downs = {split_key(k)[0]: k for k in keys if split_key(k)[2] is Role.DOWN}
    probe, numbers = {}, {}
    for key in keys:
        module, _, role = split_key(key)
        t = get(key)
        if role is Role.UP:
            probe[key] = torch.ones(t.shape, dtype=torch.float32)
        elif role is Role.ALPHA and module in downs:
            probe[key] = torch.tensor(float(get(downs[module]).shape[0]))
        elif role in (Role.DOWN, Role.OTHER) and t.numel() and t.is_floating_point():
            numbers[len(numbers) + 2] = module if role is Role.DOWN else key  # 1 is an up factor's value
            probe[key] = torch.full(t.shape, float(len(numbers) + 1), dtype=torch.float32)
        else:
            probe[key] = t
    return probe, numbers


def trace_modules(pipeline_cls, keys: list[str], get: Callable[[str], torch.Tensor], components: tuple[str, ...]
                  ) -> dict[str, str | None]:
    """{module key (a down factor's) or tensor key (any other tensor): None when a component loads it, else the name
    the converter gave it (``""``: none at all)}, by running ``pipeline_cls.lora_state_dict`` on a probe (module
    docstring)."""
    probe, numbers = _probe(keys, get)
    out = pipeline_cls.lora_state_dict(probe)
    converted = out[0] if isinstance(out, tuple) else out
    fate: dict[str, str | None] = {m: "" for m in numbers.values()}
    for key, t in converted.items():
        if _UP_OUT.search(key) or not isinstance(t, torch.Tensor) or not t.numel():
            continue
        owner = numbers.get(int(round(float(t.reshape(-1)[0]))))
        if owner is None or (owner in fate and fate[owner] is None):
            continue
        fate[owner] = None if key.startswith(components) else (fate[owner] or key)
    return fate
