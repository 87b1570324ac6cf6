"""What a base model's ``config.json`` says about the adapters made for it: PEFT's ``task_type`` and a
``base_model_name_or_path`` that loads from any working folder (both written into ``adapter_config.json``), and
its tied output head: the module that shares the input embedding's weight and is stored nowhere
(:func:`tied_head_name`, :func:`tied_embedding`; extract, apply and check all ask these two), and the heads a
fine-tune pair ties (:func:`find_tied_heads`, written as a linear LoRA by :func:`tied_head_module`)."""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..adapter import LoraModule, ModuleKind, module_name
from .model_config import is_plain

if TYPE_CHECKING:
    from .checkpoint import Checkpoint

__all__ = ["task_type", "base_model_reference", "WORD_EMBEDDINGS", "tied_head_name", "tied_embedding", "TiedHead",
           "find_tied_heads", "tied_head_module", "component_configs"]

# input embeddings an output head can be tied to, in order of preference
WORD_EMBEDDINGS = ("embed_tokens", "wte", "word_embeddings", "tok_embeddings", "embed_in", "shared")
_HEAD_ARCHITECTURES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")
_HEAD = "lm_head"  # the output head's name in most models (Whisper's is proj_out: its class says so)
_NAME = re.compile(r"^[A-Za-z_][\w.]*$")  # a plain module path (not one of the regexes some classes list)

_TASK_TYPES = (("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"), ("ForSequenceClassification", "SEQ_CLS"),
               ("ForTokenClassification", "TOKEN_CLS"), ("ForQuestionAnswering", "QUESTION_ANS"),
               ("ForSeq2SeqLM", "SEQ_2_SEQ_LM"), ("MTModel", "SEQ_2_SEQ_LM"))  # MarianMTModel: a translation LM
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]*[A-Za-z0-9_-]$")  # org/name


def task_type(config: dict | None) -> str | None:
    """PEFT's ``task_type`` for a base model from its ``config.json``: ``*ForCausalLM`` (and GPT-2 style
    ``*LMHeadModel``) -> CAUSAL_LM, ``*ForSequenceClassification`` -> SEQ_CLS, ``*ForTokenClassification`` ->
    TOKEN_CLS, ``*ForQuestionAnswering`` -> QUESTION_ANS, ``*ForSeq2SeqLM`` and an encoder-decoder's
    ``*ForConditionalGeneration`` (T5, BART) -> SEQ_2_SEQ_LM, a bare ``*Model`` -> FEATURE_EXTRACTION; None when
    unknown (no config, several architectures that disagree, a vision-language ``*ForConditionalGeneration``) and
    for an LM whose class reads another input than ``input_ids`` (Whisper's ``input_features``: PEFT's
    ``PeftModelForSeq2SeqLM`` would break it; a plain ``PeftModel`` passes every input through)."""
    archs = (config or {}).get("architectures") or []
    found = {_task_of(str(a), bool((config or {}).get("is_encoder_decoder"))) for a in archs}
    task = found.pop() if len(found) == 1 else None
    if task in ("CAUSAL_LM", "SEQ_2_SEQ_LM") and not is_plain(config) and any(
            _main_input(str(a)) not in (None, "input_ids") for a in archs):
        return None  # Whisper reads input_features: PEFT's LM wrappers would pass it input_ids
    return task


@functools.lru_cache(maxsize=None)
def _main_input(architecture: str) -> str | None:
    """The input a transformers class's forward takes first (``main_input_name``), None when unknown."""
    try:
        import transformers

        return getattr(getattr(transformers, architecture, None), "main_input_name", None)
    except Exception:  # noqa: BLE001 - not installed, or a class that fails to import: no evidence
        return None


def _task_of(arch: str, encoder_decoder: bool) -> str | None:
    for ending, task in _TASK_TYPES:
        if arch.endswith(ending):
            return task
    if arch.endswith("ForConditionalGeneration"):
        return "SEQ_2_SEQ_LM" if encoder_decoder else None
    return "FEATURE_EXTRACTION" if arch.endswith("Model") and "For" not in arch else None


def base_model_reference(config: dict | None, path: str | os.PathLike | None) -> str | None:
    """``base_model_name_or_path`` that loads from any working folder: the hub id of the base's config
    ``_name_or_path`` when it looks like ``org/name`` and is not a local path, else the absolute path of the base
    (None for a base that is no file, e.g. tensors in memory)."""
    name = str((config or {}).get("_name_or_path") or "")
    if _HUB_ID.match(name) and not os.path.isabs(name) and not os.path.exists(name):
        return name
    return os.path.abspath(path) if path is not None and os.path.exists(path) else None


@functools.lru_cache(maxsize=None)
def _class_ties(architecture: str) -> tuple[tuple[str, str], ...]:
    """(tied weight, the weight it shares) as transformers' class ``architecture`` declares them
    (``_tied_weights_keys``: a dict in transformers 5, a list of the tied side in 4); () when unknown."""
    try:
        import transformers

        keys = getattr(getattr(transformers, architecture, None), "_tied_weights_keys", None)
    except Exception:  # noqa: BLE001 - not installed, or a class that fails to import: no evidence
        return ()
    pairs = keys.items() if isinstance(keys, dict) else ((k, "") for k in keys or ()) if isinstance(
        keys, (list, tuple)) else ()
    return tuple((str(k), str(v)) for k, v in pairs if _NAME.match(str(k)))


def _class_head(config: dict) -> tuple[str, str] | None:
    """(head module, the weight it shares or "") the model class of ``config`` ties, if it declares one; None for a
    plain model type (:data:`~.model_config.PLAIN_MODEL_TYPES`: ``lm_head``, tied to the word embedding; importing
    transformers to read it would cost seconds)."""
    if is_plain(config):
        return None
    for arch in config.get("architectures") or []:
        for tied, source in _class_ties(str(arch)):
            name = tied.removesuffix(".weight")
            if name.rsplit(".", 1)[-1] not in WORD_EMBEDDINGS:  # T5 also ties encoder.embed_tokens: an alias
                return name, source
    return None


def tied_head_name(config: dict | None) -> str:
    """The module name of the output head a model ties to its input embedding: the one its transformers class
    declares (Whisper: ``proj_out``), else ``lm_head``."""
    found = _class_head(config) if isinstance(config, dict) else None
    return found[0] if found else _HEAD


def tied_embedding(head: str, base, shape: tuple[int, ...] | None = None) -> str | None:
    """The input embedding tensor of ``base`` (a checkpoint) that output head module ``head`` shares when the base
    stores no weight for it and its config does not untie it (``tie_word_embeddings`` false): the weight the model
    class names, else the shortest ``<prefix><embedding>.weight`` (of ``shape`` when given); None when ``head``
    is no tied head."""
    config = base.config if isinstance(base.config, dict) else {}
    if f"{head}.weight" in base or config.get("tie_word_embeddings", True) is False:
        return None
    own = _class_head(config)
    name = own[0] if own else _HEAD  # a class that ties another head (Whisper's proj_out) has no lm_head at all
    if not (head == name or head.endswith("." + name)):
        return None
    prefix = head[:-len(name)]

    def fits(key: str) -> bool:
        return key in base and (shape is None or tuple(base.shape(key)) == tuple(shape))

    if own and own[1] and fits(prefix + own[1]):
        return prefix + own[1]
    leaves = tuple(f"{leaf}.weight" for leaf in WORD_EMBEDDINGS)
    found = sorted((k for k in base.keys() if k.startswith(prefix) and k.endswith(leaves) and fits(k)), key=len)
    return found[0] if found else None


# ------------------------------------------------------------------------------------------- tied weights


@dataclass(frozen=True)
class TiedHead:
    """An output head that shares the input embedding's weight."""

    embedding: str  # tensor name, e.g. model.embed_tokens.weight
    head: str  # module name of the output projection, e.g. lm_head
    stored: bool  # the head's weight is in the checkpoint (equal to the embedding), else implied by the config


def component_configs(ckpt: Checkpoint) -> list[tuple[str, dict]]:
    """(name prefix, config.json) of the checkpoint and of each pipeline component."""
    parts = [("", ckpt.config if isinstance(ckpt.config, dict) else {})]
    return parts + [(f"{c}.", part.config if isinstance(part.config, dict) else {}) for c, part in
                    ckpt.components.items()]


def _word_embedding(tuned: Checkpoint, prefix: str) -> str | None:
    for leaf in WORD_EMBEDDINGS:
        found = sorted((n for n in tuned.keys() if n.startswith(prefix) and n.endswith(f"{leaf}.weight")
                        and len(tuned.shape(n)) == 2), key=len)
        if found:
            return found[0]
    return None


def _same(ckpt: Checkpoint, a: str, b: str) -> bool:
    return a in ckpt and b in ckpt and ckpt.shape(a) == ckpt.shape(b) and torch.equal(ckpt.get(a), ckpt.get(b))


def _implied_tie(config: dict, base: Checkpoint, tuned: Checkpoint, head: str) -> bool:
    """A head architecture whose head weight is stored in neither file, and the config does not untie it."""
    archs = config.get("architectures") or []
    has_head = any(str(a).endswith(_HEAD_ARCHITECTURES) for a in archs)
    return has_head and config.get("tie_word_embeddings", True) is not False and head not in base and head not in tuned


def find_tied_heads(base: Checkpoint, tuned: Checkpoint) -> list[TiedHead]:
    """Output heads tied to the input embedding: stored equal to it (in base and tuned), or absent while
    config.json ties them (``tie_word_embeddings``, default true for head architectures)."""
    base_configs = dict(component_configs(base))
    found = []
    for prefix, config in component_configs(tuned):
        config = config or base_configs.get(prefix) or {}
        emb = _word_embedding(tuned, prefix)
        head = f"{prefix}{tied_head_name(config)}.weight"  # lm_head, or what the model class ties (proj_out)
        if emb is None or emb not in base:
            continue
        grew = base.shape(emb) != tuned.shape(emb)
        if head in tuned and _same(tuned, emb, head) and (grew or _same(base, emb, head)):
            found.append(TiedHead(emb, module_name(head), stored=True))
        elif _implied_tie(config, base, tuned, head):
            found.append(TiedHead(emb, module_name(head), stored=False))
    return found


def tied_head_module(embedding: LoraModule) -> LoraModule:
    """The head's LoRA from the embedding's: weight (vocab, dim) += scale * B_e^T... laid out as a linear module.

    Embedding: delta (vocab, dim) = scale * (B_e @ A_e)^T with B_e (dim, r), A_e (r, vocab); so the head's
    B = A_e^T (vocab, r) and A = B_e^T (r, dim) give the same delta (PEFT's own tying uses this layout).
    """
    return LoraModule(B=embedding.A.t().contiguous(), A=embedding.B.t().contiguous(), alpha=embedding.alpha,
                      kind=ModuleKind.LINEAR, weight_shape=tuple(embedding.weight_shape), rslora=embedding.rslora)
