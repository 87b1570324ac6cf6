"""What a base model's ``config.json`` says about the adapters made for it: PEFT's ``task_type`` and a
``base_model_name_or_path`` that loads from any working folder (both written into ``adapter_config.json``)."""

from __future__ import annotations

import os
import re

__all__ = ["task_type", "base_model_reference"]

_TASK_TYPES = (("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"), ("ForSequenceClassification", "SEQ_CLS"),
               ("ForTokenClassification", "TOKEN_CLS"), ("ForQuestionAnswering", "QUESTION_ANS"),
               ("ForSeq2SeqLM", "SEQ_2_SEQ_LM"), ("MTModel", "SEQ_2_SEQ_LM"))  # MarianMTModel: a translation LM
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]*[A-Za-z0-9_-]$")  # org/name


def task_type(config: dict | None) -> str | None:
    """PEFT's ``task_type`` for a base model from its ``config.json``: ``*ForCausalLM`` (and GPT-2 style
    ``*LMHeadModel``) -> CAUSAL_LM, ``*ForSequenceClassification`` -> SEQ_CLS, ``*ForTokenClassification`` ->
    TOKEN_CLS, ``*ForQuestionAnswering`` -> QUESTION_ANS, ``*ForSeq2SeqLM`` and an encoder-decoder's
    ``*ForConditionalGeneration`` (T5, BART) -> SEQ_2_SEQ_LM, a bare ``*Model`` -> FEATURE_EXTRACTION; None when
    unknown (no config, several architectures that disagree, a vision-language ``*ForConditionalGeneration``)."""
    archs = (config or {}).get("architectures") or []
    found = {_task_of(str(a), bool((config or {}).get("is_encoder_decoder"))) for a in archs}
    return found.pop() if len(found) == 1 else None


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
