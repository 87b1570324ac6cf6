"""Load transformers models (the optional ``lowrank-tools[eval]`` extra) and their tokenizer, and batch token ids:
shared by the operations that run a model (evaluate, calibrate).

The kind is decided from the config's ``architectures``: a ``*ForCausalLM`` / ``*LMHeadModel`` is a causal LM
(``AutoModelForCausalLM``, next-token distributions compared); anything else transformers loads is an encoder
(``AutoModel``, mean-pooled last hidden states compared). A diffusers denoiser (a component folder whose config names
a ``_class_name``, or a pipeline folder's ``unet/`` or ``transformer/``) is found by :func:`find_denoiser` and loaded
by :func:`load_denoiser` (diffusers: the ``lowrank-tools[diffusion]`` extra).
Weights are loaded in float32 unless a ``dtype`` is given: an adapter's delta added to bf16 weights loses the low
digits the measure is about (bf16/fp16 halve the memory, at that price).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import torch

from ..errors import MissingExtra, NotACheckpoint
from .json_input import load_json
from .model_config import read_model_config

__all__ = ["ModelKind", "require_transformers", "model_kind", "load_model", "load_tokenizer", "token_ids",
           "padded_batches", "Denoiser", "find_denoiser", "require_diffusers", "load_denoiser", "is_conv1d_layer"]

_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


class ModelKind(str, Enum):
    """How outputs are compared: next-token distributions, or pooled hidden states."""

    CAUSAL = "causal"
    ENCODER = "encoder"
    DIFFUSION = "diffusion"  # noise predictions of a diffusers UNet / transformer


def require_transformers():
    """The transformers module; :class:`MissingExtra` naming the extra when it is not installed."""
    try:
        import transformers
    except ImportError:
        raise MissingExtra("evaluate and calibrate need transformers, which is not installed: pip install "
                           "'lowrank-tools[eval]' (or pip install transformers)") from None
    return transformers


def model_kind(path: str | os.PathLike) -> ModelKind:
    """CAUSAL when the config's ``architectures`` name a ``*ForCausalLM`` / ``*LMHeadModel``, else ENCODER."""
    architectures = read_model_config(Path(path)).get("architectures") or []
    return ModelKind.CAUSAL if any(str(a).endswith(_CAUSAL_SUFFIXES) for a in architectures) else ModelKind.ENCODER


def is_conv1d_layer(module: torch.nn.Module) -> bool:
    """A transformers ``Conv1D`` (``transformers.pytorch_utils``: GPT-2 family): a linear layer computing
    ``x @ W + b`` with its weight stored (in, out). Told by its class, without importing transformers."""
    return type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers")


def _dtype_kwargs(transformers, dtype: torch.dtype = torch.float32) -> dict:
    """The weights' dtype: ``dtype`` since transformers 4.56, ``torch_dtype`` before."""
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


@contextmanager
def _quiet(transformers) -> Iterator[None]:
    """transformers' own progress bars and info lines off while loading (nothing below the CLI prints)."""
    logging = transformers.utils.logging
    bars, verbosity = logging.is_progress_bar_enabled(), logging.get_verbosity()
    logging.disable_progress_bar()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def load_model(path: str | os.PathLike, kind: ModelKind, device: torch.device,
               dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The model in ``dtype`` on ``device``, in eval mode. Raises :class:`NotACheckpoint` (one line) on failure."""
    transformers = require_transformers()
    path = Path(path)
    read_model_config(path)
    cls = transformers.AutoModelForCausalLM if kind is ModelKind.CAUSAL else transformers.AutoModel
    try:
        with _quiet(transformers):
            model = cls.from_pretrained(str(path), **_dtype_kwargs(transformers, dtype))
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise NotACheckpoint(f"{path}: transformers cannot load it as {cls.__name__} ({first})") from None
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(device).train(False)  # inference mode: dropout off (same as .eval())


def load_tokenizer(*paths: str | os.PathLike):
    """The tokenizer saved with the first of ``paths`` that has one (tuned first, then base)."""
    transformers = require_transformers()
    for path in paths:
        try:
            with _quiet(transformers):
                return transformers.AutoTokenizer.from_pretrained(str(path))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    raise NotACheckpoint(f"no tokenizer in {' or '.join(map(str, paths))}: save one with the model "
                         f"(tokenizer.save_pretrained(folder))")


def token_ids(tokenizer, texts: Sequence[str], max_length: int, minimum: int) -> tuple[list[list[int]], int]:
    """Each text tokenized on its own, truncated to ``max_length``: (ids of those with >= ``minimum`` tokens,
    how many were shorter)."""
    ids = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    kept = [list(x) for x in ids if len(x) >= minimum]
    return kept, len(ids) - len(kept)


def padded_batches(ids: list[list[int]], size: int, pad: int, device: torch.device,
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids, attention_mask), both (batch, width) long on ``device``, ``size`` texts at a time, right padded:
    real positions keep positions 0..n-1 and the mask marks them."""
    for i in range(0, len(ids), size):
        chunk = ids[i:i + size]
        width = max(len(x) for x in chunk)
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, x in enumerate(chunk):
            input_ids[row, :len(x)] = torch.tensor(x, dtype=torch.long)
            mask[row, :len(x)] = 1
        yield input_ids.to(device), mask.to(device)


@dataclass(frozen=True)
class Denoiser:
    """A diffusers denoiser on disk: the folder holding its config, its class, and the component name its modules
    carry in a pipeline's adapters (``unet.`` / ``transformer.``)."""

    folder: Path
    class_name: str
    component: str
    config: dict = field(compare=False)


def _component_config(folder: Path) -> dict | None:
    config = load_json(folder / "config.json", error=NotACheckpoint, fix="re-save the model")
    return config if isinstance(config, dict) and config.get("_class_name") else None


def find_denoiser(path: str | os.PathLike) -> Denoiser | None:
    """The denoiser of a diffusers component folder (config ``_class_name``) or pipeline folder (``unet/`` or
    ``transformer/``); None for anything else (a transformers folder, a file)."""
    path = Path(path)
    if not path.is_dir():
        return None
    if (path / "config.json").is_file():
        config = _component_config(path)
        if config is None:
            return None
        name = str(config["_class_name"])
        return Denoiser(path, name, "unet" if "UNet" in name else "transformer", config)
    if not ((path / "model_index.json").is_file() or (path / "unet").is_dir() or (path / "transformer").is_dir()):
        return None
    for component in ("unet", "transformer"):
        if (path / component / "config.json").is_file():
            config = _component_config(path / component)
            if config is not None:
                return Denoiser(path / component, str(config["_class_name"]), component, config)
    raise NotACheckpoint(f"{path} is a diffusers pipeline without unet/config.json or transformer/config.json: "
                         f"give the folder of its denoiser")


def require_diffusers():
    """The diffusers module; :class:`MissingExtra` naming the extra when it is not installed."""
    try:
        import diffusers
    except ImportError:
        raise MissingExtra("evaluate on diffusion models needs diffusers, which is not installed: pip install "
                           "'lowrank-tools[diffusion]' (or pip install diffusers)") from None
    return diffusers


def load_denoiser(denoiser: Denoiser, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The diffusers model in ``dtype`` on ``device``, in eval mode; :class:`NotACheckpoint` (one line) on failure."""
    diffusers = require_diffusers()
    cls = getattr(diffusers, denoiser.class_name, None)
    if cls is None:
        raise NotACheckpoint(f"{denoiser.folder}: diffusers {diffusers.__version__} has no class "
                             f"{denoiser.class_name}: upgrade diffusers")
    try:
        model = cls.from_pretrained(str(denoiser.folder), torch_dtype=dtype)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise NotACheckpoint(f"{denoiser.folder}: diffusers cannot load it as {denoiser.class_name} "
                             f"({first})") from None
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(device).train(False)
