"""The config of a model folder: what it says about the model (transformers or diffusers; which layers are
transformers ``Conv1D``), and :func:`read_model_config` for the operations that run the model (evaluate, calibrate).

Two rules decided from ``config.json``, never from tensor names or shapes:

- Pipeline or one model (:func:`pipeline_evidence`). A folder with ``model_index.json`` (a checkpoint with
  components) is a diffusers pipeline: its adapters name modules ``unet.`` / ``text_encoder.`` / ``transformer.``
  and are written as diffusers' ``pytorch_lora_weights.safetensors``. A ``config.json`` naming a ``model_type`` or
  ``architectures`` is a transformers model, one with ``_class_name`` a diffusers component: one model, whose
  adapter is a PEFT folder, whatever its names (GPT-2, GPT-J, Falcon, Bloom, MPT, ... store ``transformer.*``).
  No config: unknown, and the names decide (every module under a pipeline component: a pipeline).
- transformers ``Conv1D`` layers (:data:`CONV1D_LAYERS`). GPT-2 and a few of its descendants build their linear
  layers from ``transformers.pytorch_utils.Conv1D``, which stores the weight as (in, out), the transpose of
  ``nn.Linear``'s (out, in); the shapes cannot tell (``c_proj`` is square). A layer is a Conv1D when the config's
  ``model_type`` is in the table and the layer's leaf name is one of that model's Conv1D attributes. The table is
  read off each modeling file (transformers 5.x: every ``Conv1D(`` in ``src/transformers/models``) and pinned by
  tests/test_gpt2_family.py, which builds each model and compares with ``isinstance(module, Conv1D)``.
- Grouped convolutions (:func:`grouped_convs`): a conv with ``groups > 1`` (Sana's depthwise ``ff.conv_depth``,
  Mamba's ``conv1d``) stores (out, in / groups, *kernel), which no shape tells from a plain conv with fewer inputs.
  The config's model class, built on the meta device (no memory, no weights read), says; PEFT refuses a LoRA on
  one whose rank does not divide ``groups`` and cannot hold ours (a dense delta) at all.
- Layers a PEFT LoRA wrapper breaks (:func:`wrapper_hidden`): Whisper's encoder reads ``conv1.stride`` and
  ``embed_positions.num_embeddings``, which the wrapper does not have (the class source of each transformers
  module is searched for ``self.<layer>.<attribute>``), and a layer subclass whose forward takes more than its
  input (a positional embedding given (input_ids, cache_length)) would get its LoRA term on the wrong input. Its
  ``modules_to_save`` wrapper passes attributes and inputs through: such layers are saved whole.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import re
import warnings
from pathlib import Path

import torch

from ..errors import CheckpointNotFound, NotACheckpoint, UsageError
from .json_input import load_json

__all__ = ["read_model_config", "CONV1D_LAYERS", "CONV1D_LEAVES", "conv1d_leaves", "pipeline_evidence",
           "grouped_convs", "wrapper_hidden"]

#: ``model_type`` -> leaf names of its ``Conv1D`` layers (``gpt_bigcode``'s c_attn / c_fc / c_proj are nn.Linear:
#: same names, other layout, hence the model_type and never the names alone)
CONV1D_LAYERS: dict[str, frozenset[str]] = {
    "gpt2": frozenset({"c_attn", "q_attn", "c_proj", "c_fc"}),
    "openai-gpt": frozenset({"c_attn", "c_proj", "c_fc"}),
    "imagegpt": frozenset({"c_attn", "q_attn", "c_proj", "c_fc"}),
    "decision_transformer": frozenset({"c_attn", "q_attn", "c_proj", "c_fc"}),  # embed_* / predict_*: nn.Linear
    "clvp": frozenset({"c_fc", "c_proj"}),  # the decoder's MLP; its attention and the encoders are nn.Linear
    "clvp_decoder": frozenset({"c_fc", "c_proj"}),
}
#: every leaf name a Conv1D layer has in some model: a PEFT folder's ``fan_in_fan_out`` (one switch for the whole
#: adapter) is read as Conv1D for these only (a GPT-2 adapter's tied ``lm_head`` is an nn.Linear)
CONV1D_LEAVES = frozenset().union(*CONV1D_LAYERS.values())


def conv1d_leaves(config: dict | None) -> frozenset[str] | None:
    """Leaf names of the Conv1D layers of the model ``config`` describes; frozenset() for a transformers model
    without any (every 2-D weight an nn.Linear or embedding); None when ``config`` is no transformers config."""
    if not isinstance(config, dict):
        return None
    model_type = config.get("model_type")
    if isinstance(model_type, str) and model_type in CONV1D_LAYERS:
        return CONV1D_LAYERS[model_type]
    return frozenset() if model_type or config.get("architectures") else None


def pipeline_evidence(config: dict | None, *, components: bool = False) -> bool | None:
    """True for a diffusers pipeline (``components``: the folder has ``model_index.json`` and component folders),
    False for one model (a transformers ``config.json`` with ``model_type`` / ``architectures``, or a diffusers
    component's with ``_class_name``), None without evidence (no config: the names decide)."""
    if components:
        return True
    if isinstance(config, dict) and (config.get("model_type") or config.get("architectures")
                                     or config.get("_class_name")):
        return False
    return None


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


#: transformers model types whose class renames no checkpoint key, ties no embedding alias, holds no weighted module
#: PEFT cannot wrap, no grouped conv and no layer its parent reads past a LoRA wrapper: nothing is built for them
#: (building imports transformers: ~2.4 s, as long as the whole extract of a 135M model). tests/test_module_names.py
#: builds each one with the installed transformers and fails when a newer one makes any of this untrue.
PLAIN_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3",
                               "falcon", "bloom", "gpt_bigcode", "mpt", "gpt2", "bert", "roberta"})


def is_plain(config) -> bool:
    """Whether ``config`` is a transformers config of :data:`PLAIN_MODEL_TYPES` (its class need not be built)."""
    return isinstance(config, dict) and config.get("model_type") in PLAIN_MODEL_TYPES and "_class_name" not in config


def _models(ckpt):
    """(name prefix, model built on the meta device) of the checkpoint and each pipeline component that builds."""
    parts = [("", ckpt.config)] + [(f"{c}.", part.config) for c, part in ckpt.components.items()]
    return [(prefix, model) for prefix, config in parts
            if not is_plain(config) and (model := meta_model(config)) is not None]


def grouped_convs(ckpt) -> dict[str, int]:
    """{weight tensor name: groups} of every conv layer with ``groups > 1`` in the model(s) of checkpoint ``ckpt``
    (each pipeline component under its prefix), as the model class its config names builds them; {} where no config
    names a class that diffusers or transformers (when installed) builds."""
    return {f"{prefix}{name}.weight": int(module.groups) for prefix, model in _models(ckpt)
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.modules.conv._ConvNd) and module.groups > 1}


_WRAPPER_HAS = frozenset({"weight", "bias", "in_features", "out_features"})  # what PEFT's LoRA layers expose
_WRAPPED = (torch.nn.Linear, torch.nn.Embedding, torch.nn.modules.conv._ConvNd)  # the layers PEFT wraps


def wrapper_hidden(ckpt) -> dict[str, str]:
    """{weight tensor name: why} of the layers (linear, embedding, conv) of a transformers model whose parent module's
    class reads an attribute of theirs PEFT's LoRA wrapper hides (Whisper's encoder: ``self.conv1.stride``,
    ``self.embed_positions.num_embeddings``)."""
    found, sources = {}, {}
    for prefix, model in _models(ckpt):
        if not hasattr(model, "config") or isinstance(getattr(model, "config", None), dict):
            continue  # a diffusers model (its config is a dict): their LoRA convs load in diffusers
        for name, parent in model.named_modules():
            for leaf, child in parent.named_children():
                if not isinstance(child, _WRAPPED):
                    continue
                cls = type(parent)
                if cls not in sources:
                    sources[cls] = _source(cls)
                read = sorted(set(re.findall(rf"self\.{re.escape(leaf)}\.(\w+)", sources[cls])) - _WRAPPER_HAS)
                own = _own_forward(child)
                if read or own:
                    why = f"{cls.__name__} reads {leaf}.{read[0]}" if read else f"{own}'s forward takes more inputs"
                    found[f"{prefix}{name + '.' if name else ''}{leaf}.weight"] = why
    return found


def _own_forward(layer: torch.nn.Module) -> str | None:
    """The class name of a subclass of a torch layer whose forward takes more than its one input (Whisper's and
    OPT's positional embeddings: (input_ids, cache_length, position_ids), positions computed inside): PEFT's
    wrapper adds its LoRA term on that first input as if it were the layer's. None otherwise."""
    try:
        params = inspect.signature(type(layer).forward).parameters
    except (TypeError, ValueError):
        return None
    return type(layer).__name__ if len(params) > 2 else None


def _source(cls) -> str:
    try:
        return inspect.getsource(cls)
    except (OSError, TypeError):
        return ""


def meta_model(config) -> torch.nn.Module | None:
    """The model ``config`` (a diffusers ``_class_name`` or a transformers ``architectures`` config) describes, built
    on the meta device; None when it cannot be built here. Built once per config (extract asks a few times)."""
    if not isinstance(config, dict):
        return None
    try:
        return _built(json.dumps(config, sort_keys=True, default=str))
    except (TypeError, ValueError):  # a config that is no JSON object: no evidence
        return None


@functools.lru_cache(maxsize=4)
def _built(text: str) -> torch.nn.Module | None:
    config = json.loads(text)
    try:
        library = __import__("diffusers" if isinstance(config.get("_class_name"), str) else "transformers")
    except ImportError:
        return None
    quiet = library.utils.logging  # their config checks log: nothing below the CLI prints
    level = quiet.get_verbosity()
    quiet.set_verbosity_error()
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if library.__name__ == "diffusers":
                return getattr(library, config["_class_name"]).from_config(config)
            fields = {k: v for k, v in config.items() if k not in ("model_type", "architectures")}
            built = library.AutoConfig.for_model(config["model_type"], **fields)
            return getattr(library, config["architectures"][0])._from_config(built)
    except Exception:  # noqa: BLE001 - an unknown or unbuildable class: no evidence
        return None
    finally:
        quiet.set_verbosity(level)
