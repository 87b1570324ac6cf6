"""Seeded random inputs for a diffusers denoiser, and its noise prediction on them (evaluate on diffusion models).

Protocol: draw ``n`` inputs from one ``torch.Generator`` seeded with ``seed`` (on the CPU, in float32, so the same
seed gives the same draws on every device), shaped from the model's config:

    UNet2DConditionModel    sample (n, in_channels, s, s) ~ N(0, 1) with s = sample_size; integer timestep uniform
                            in [0, 1000); encoder_hidden_states (n, 77, cross_attention_dim or encoder_hid_dim)
                            ~ N(0, 1); SDXL's added_cond_kwargs: text_embeds ~ N(0, 1) of the width the config
                            leaves for them, time_ids = (8s, 8s, 0, 0, 8s, 8s) (a square image, no crop)
    FluxTransformer2DModel  hidden_states (n, 32 * 32, in_channels) ~ N(0, 1) (a 512 px image's packed latents)
                            with img_ids (row, column) of the 32 x 32 grid; encoder_hidden_states (n, 77,
                            joint_attention_dim) and pooled_projections (n, pooled_projection_dim) ~ N(0, 1);
                            timestep uniform in (0, 1); guidance 3.5 when the model embeds it
    SD3Transformer2DModel   hidden_states (n, in_channels, s, s) ~ N(0, 1); encoder_hidden_states (n, 77,
                            joint_attention_dim), pooled_projections (n, pooled_projection_dim) ~ N(0, 1);
                            timestep uniform in [0, 1000)

Random conditioning is not a text encoder's output: the measure says how closely base + adapter reproduces the
tuned model's function over these inputs, not image quality. The measures themselves are in
:class:`~lowrank_tools.evaluate.metrics.DiffusionSums`.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from ..errors import UsageError
from ..io.models import Denoiser

__all__ = ["DENOISERS", "TEXT_TOKENS", "check_denoiser", "denoiser_batches", "predict"]

DENOISERS = ("UNet2DConditionModel", "FluxTransformer2DModel", "SD3Transformer2DModel")
TEXT_TOKENS = 77  # conditioning sequence length (CLIP's)
_FLUX_GRID = 32  # packed latent tokens per side: a 512 px image
_FLUX_GUIDANCE = 3.5


def check_denoiser(denoiser: Denoiser) -> None:
    """Refuse, in one line, a class or a config this protocol does not cover."""
    if denoiser.class_name not in DENOISERS:
        raise UsageError(f"{denoiser.folder} is a diffusers {denoiser.class_name}: evaluate measures the denoisers "
                         f"{', '.join(DENOISERS)} (give the folder of one, or a pipeline folder holding one)")
    config = denoiser.config
    if denoiser.class_name == "UNet2DConditionModel":
        if config.get("class_embed_type") is not None or config.get("num_class_embeds") is not None:
            raise UsageError(f"{denoiser.folder}: a class-conditioned UNet (class_embed_type "
                             f"{config.get('class_embed_type')!r}) is not covered by evaluate's protocol yet")
        if config.get("addition_embed_type") not in (None, "text_time"):
            raise UsageError(f"{denoiser.folder}: addition_embed_type {config.get('addition_embed_type')!r} is not "
                             f"covered by evaluate's protocol yet (SD and SDXL UNets are)")
        if not isinstance(config.get("cross_attention_dim", 1280), int):
            raise UsageError(f"{denoiser.folder}: a cross_attention_dim per block "
                             f"({config.get('cross_attention_dim')!r}) is not covered by evaluate's protocol yet")


def _normal(g: torch.Generator, *shape: int) -> Tensor:
    return torch.randn(shape, generator=g, dtype=torch.float32)


def _unet_inputs(config: dict, n: int, g: torch.Generator) -> dict:
    side = int(config.get("sample_size") or 64)
    width = int(config.get("encoder_hid_dim") or config.get("cross_attention_dim") or 1280)
    inputs = {"sample": _normal(g, n, int(config.get("in_channels", 4)), side, side),
              "timestep": torch.randint(0, 1000, (n,), generator=g),
              "encoder_hidden_states": _normal(g, n, TEXT_TOKENS, width)}
    if config.get("addition_embed_type") == "text_time":
        time_width = int(config.get("addition_time_embed_dim") or 256)
        text_width = int(config["projection_class_embeddings_input_dim"]) - 6 * time_width
        pixels = float(8 * side)
        inputs["added_cond_kwargs"] = {
            "text_embeds": _normal(g, n, text_width),
            "time_ids": torch.tensor([[pixels, pixels, 0.0, 0.0, pixels, pixels]]).repeat(n, 1)}
    return inputs


def _flux_inputs(config: dict, n: int, g: torch.Generator) -> dict:
    rows, cols = torch.meshgrid(torch.arange(_FLUX_GRID), torch.arange(_FLUX_GRID), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).float()  # (grid^2, 3)
    inputs = {"hidden_states": _normal(g, n, _FLUX_GRID * _FLUX_GRID, int(config.get("in_channels", 64))),
              "encoder_hidden_states": _normal(g, n, TEXT_TOKENS, int(config.get("joint_attention_dim", 4096))),
              "pooled_projections": _normal(g, n, int(config.get("pooled_projection_dim", 768))),
              "timestep": torch.rand((n,), generator=g),
              "img_ids": img_ids, "txt_ids": torch.zeros(TEXT_TOKENS, 3)}
    if config.get("guidance_embeds"):
        inputs["guidance"] = torch.full((n,), _FLUX_GUIDANCE)
    return inputs


def _sd3_inputs(config: dict, n: int, g: torch.Generator) -> dict:
    side = int(config.get("sample_size") or 128)
    return {"hidden_states": _normal(g, n, int(config.get("in_channels", 16)), side, side),
            "encoder_hidden_states": _normal(g, n, TEXT_TOKENS, int(config.get("joint_attention_dim", 4096))),
            "pooled_projections": _normal(g, n, int(config.get("pooled_projection_dim", 2048))),
            "timestep": torch.rand((n,), generator=g) * 1000}


_BUILDERS = {"UNet2DConditionModel": _unet_inputs, "FluxTransformer2DModel": _flux_inputs,
             "SD3Transformer2DModel": _sd3_inputs}


def _to(value, device: torch.device, dtype: torch.dtype):
    if isinstance(value, dict):
        return {k: _to(v, device, dtype) for k, v in value.items()}
    return value.to(device, dtype) if value.is_floating_point() else value.to(device)


def denoiser_batches(denoiser: Denoiser, samples: int, batch_size: int, seed: int, device: torch.device,
                     dtype: torch.dtype) -> Iterator[dict]:
    """Keyword arguments of the model's forward, ``batch_size`` draws at a time, ``samples`` in all; the same
    ``seed`` gives the same draws whatever ``batch_size``, device or dtype."""
    g = torch.Generator().manual_seed(seed)
    build = _BUILDERS[denoiser.class_name]
    for start in range(0, samples, batch_size):
        draws = [build(denoiser.config, 1, g) for _ in range(min(batch_size, samples - start))]
        yield _to(_stacked(draws), device, dtype)


def _stacked(draws: list[dict]) -> dict:
    """One batch from single draws: per-draw tensors concatenated, shared ones (ids) kept once."""
    out = {}
    for key, first in draws[0].items():
        if isinstance(first, dict):
            out[key] = _stacked([d[key] for d in draws])
        elif key in ("img_ids", "txt_ids"):
            out[key] = first
        else:
            out[key] = torch.cat([d[key] for d in draws])
    return out


def predict(model: torch.nn.Module, inputs: dict) -> Tensor:
    """The model's noise (or velocity) prediction on ``inputs``."""
    return model(**inputs, return_dict=False)[0]
