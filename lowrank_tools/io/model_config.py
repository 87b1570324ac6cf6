"""The config of a transformers model folder, for the operations that run the model (evaluate, calibrate)."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import CheckpointNotFound, NotACheckpoint, UsageError
from .json_input import load_json

__all__ = ["read_model_config"]


def read_model_config(path: str | os.PathLike) -> dict:
    """The ``config.json`` of a transformers model folder (saved by ``save_pretrained``), as a dict; diffusers
    pipelines and components are refused (calibrate runs transformers models only; evaluate finds diffusers
    denoisers with :func:`~lowrank_tools.io.models.find_denoiser` before it asks for this)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointNotFound(f"model {path} does not exist: check the path")
    if (path / "model_index.json").is_file() or (path.is_dir() and not (path / "config.json").is_file()
                                                 and (path / "unet").is_dir()):
        raise UsageError(f"{path} is a diffusers pipeline: calibrate runs transformers models (causal LMs and "
                         f"encoders) only; evaluate takes diffusers denoisers without --data")
    if not (path / "config.json").is_file():
        raise NotACheckpoint(f"{path}: not a transformers model folder (no config.json): evaluate needs folders "
                             f"saved by save_pretrained, with their config and tokenizer")
    config = load_json(path / "config.json", error=NotACheckpoint, fix="re-save the model")
    if not isinstance(config, dict):
        raise NotACheckpoint(f"{path / 'config.json'}: not a JSON object: re-save the model")
    if "_class_name" in config:  # a diffusers component (UNet, transformer, VAE)
        raise UsageError(f"{path} is a diffusers {config['_class_name']}: calibrate runs transformers models "
                         f"(causal LMs and encoders) only; evaluate takes diffusers denoisers without --data")
    return config
