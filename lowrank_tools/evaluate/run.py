"""evaluate: how much of a fine-tune's behaviour base + adapter keeps, measured on texts.

Protocol. Every text is tokenized on its own (the tuned model's tokenizer, else the base's), truncated to
``max_length`` tokens and batched with right padding that never enters a measure. Per batch, the tuned model
runs once (the target), the base once, then each adapter is added to the base in memory
(:mod:`~lowrank_tools.evaluate.patch`), run, and taken out again: two models in memory, whatever the number of
adapters. The sums of :mod:`~lowrank_tools.evaluate.metrics` give per model (base and each adapter):

    causal:   kl = mean KL(tuned || model),  kl_recovered = 1 - kl / base_kl,  top1_agreement,  loss
    encoder:  cosine = mean cos(e_model, e_tuned),  recovered = (cosine - base_cosine) / (1 - base_cosine),
              rel_l2_error

A ratio whose denominator is 0 (base_kl == 0: base and tuned agree on these texts) is ``None`` (JSON null).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch

from ..adapter import Adapter
from ..errors import DataError, InvalidOption
from ..linalg.svd import resolve_device
from ..report import Progress, Warn
from .metrics import CausalSums, EncoderSums, causal_target, encoder_target
from ..io.models import ModelKind, load_model, load_tokenizer, model_kind, padded_batches, token_ids
from .patch import applied, plan_patch

__all__ = ["Score", "Evaluation", "evaluate"]


@dataclass
class Score:
    """One adapter's (or the base's) measures against the tuned model; keys of ``--json`` per adapter."""

    path: str
    params: int
    kl: float | None = None
    kl_recovered: float | None = None
    cosine: float | None = None
    recovered: float | None = None
    rel_l2_error: float | None = None
    top1_agreement: float | None = None
    loss: float | None = None
    size: dict = field(default_factory=dict)  # {"rank": r} or {"budget": n} for a --ranks / --budgets curve point

    @property
    def behaviour_recovered(self) -> float | None:
        """kl_recovered (causal) or recovered (encoder)."""
        return self.kl_recovered if self.kl_recovered is not None else self.recovered

    def to_dict(self) -> dict:
        data = asdict(self)
        if not self.size:
            del data["size"]
        return data


@dataclass
class Evaluation:
    kind: ModelKind
    samples: int
    tokens: int  # causal: next-token positions measured; encoder: real tokens
    base: Score
    tuned_loss: float | None
    adapters: list[Score]
    skipped: int = 0  # texts too short to measure (causal: fewer than 2 tokens)
    wall_time_s: float = 0.0

    def to_dict(self) -> dict:
        return {"kind": self.kind.value, "samples": self.samples, "tokens": self.tokens, "tuned_loss": self.tuned_loss,
                "base_loss": self.base.loss, "base_kl": self.base.kl, "base_cosine": self.base.cosine,
                "base_top1_agreement": self.base.top1_agreement, "base_rel_l2_error": self.base.rel_l2_error,
                "skipped_samples": self.skipped, "wall_time_s": self.wall_time_s,
                "adapters": [s.to_dict() for s in self.adapters]}


def _ratio(num: float, den: float) -> float | None:
    return num / den if den > 0 and math.isfinite(num / den) else None


def _forward(model, kind: ModelKind, input_ids, mask):
    out = model(input_ids=input_ids, attention_mask=mask)
    return out.logits if kind is ModelKind.CAUSAL else out.last_hidden_state


def _check_options(max_length: int, batch_size: int) -> None:
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise InvalidOption(f"--max-length {max_length!r} must be a whole number of 2 or more")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidOption(f"--batch-size {batch_size!r} must be a whole number of 1 or more")


def _score(label: str, params: int, kind: ModelKind, sums, base_sums=None) -> Score:
    if kind is ModelKind.CAUSAL:
        kl = sums.mean(sums.kl)
        rec = _ratio(base_sums.kl - sums.kl, base_sums.kl) if base_sums is not None else None
        return Score(path=label, params=params, kl=kl, kl_recovered=rec, top1_agreement=sums.mean(sums.agree),
                     loss=sums.mean(sums.nll))
    cos = sums.mean(sums.cosine)
    rec = None
    if base_sums is not None and cos is not None:
        base_cos = base_sums.mean(base_sums.cosine)
        rec = _ratio(cos - base_cos, 1.0 - base_cos)
    return Score(path=label, params=params, cosine=cos, recovered=rec, rel_l2_error=sums.mean(sums.rel_error))


def _prepare(base, tuned, texts, max_length: int, warn: Warn | None):
    """The model kind, the tokenizer and the token ids of every text long enough to measure."""
    kind = model_kind(tuned)
    if model_kind(base) is not kind:
        raise InvalidOption(f"base {base} is {model_kind(base).value} but tuned {tuned} is {kind.value}: give the "
                            f"base the fine-tune started from")
    tokenizer = load_tokenizer(tuned, base)
    minimum = 2 if kind is ModelKind.CAUSAL else 1
    ids, skipped = token_ids(tokenizer, texts, max_length, minimum)
    if not ids:
        raise DataError(f"every text is shorter than {minimum} token(s) once tokenized: nothing to measure; give "
                        f"longer texts")
    if skipped and warn:
        warn(f"{skipped} text(s) shorter than {minimum} tokens left out (no position to measure)")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return kind, ids, skipped, pad


def _measure(kind, tuned_model, base_model, patches, batches, total, progress):
    """Per batch: the tuned model once (the target), the base, then base + each adapter; sums of each."""
    new_sums = CausalSums if kind is ModelKind.CAUSAL else EncoderSums
    tuned_sums, base_sums, sums = new_sums(), new_sums(), [new_sums() for _ in patches]
    for done, (input_ids, mask) in enumerate(batches):
        if progress:
            progress(done, total, f"batch {done + 1}")
        out = _forward(tuned_model, kind, input_ids, mask)
        target = causal_target(out, input_ids, mask) if kind is ModelKind.CAUSAL else encoder_target(out, mask)
        tuned_sums.add(out, target)
        del out
        base_sums.add(_forward(base_model, kind, input_ids, mask), target)
        for patch, s in zip(patches, sums):
            with applied(base_model, patch):
                s.add(_forward(base_model, kind, input_ids, mask), target)
    if progress:
        progress(total, total, "")
    return tuned_sums, base_sums, sums


@torch.no_grad()
def evaluate(base: str | os.PathLike, tuned: str | os.PathLike, adapters: Sequence[tuple[str, Adapter]], *,
             texts: Sequence[str], max_length: int = 128, batch_size: int = 8, device: str | torch.device = "auto",
             sizes: Sequence[dict] | None = None, progress: Progress | None = None,
             warn: Warn | None = None) -> Evaluation:
    """Measure base and each ``(label, adapter)`` against the tuned model on ``texts`` (see the module doc).

    ``sizes``: per adapter ``{"rank": r}`` / ``{"budget": n}`` recorded with its score (a curve)."""
    _check_options(max_length, batch_size)
    start = time.perf_counter()
    dev = resolve_device(device)
    kind, ids, skipped, pad = _prepare(base, tuned, texts, max_length, warn)
    tuned_model = load_model(tuned, kind, dev)
    base_model = load_model(base, kind, dev)
    patches = [plan_patch(base_model, adapter, label, skip_heads=kind is ModelKind.ENCODER)
               for label, adapter in adapters]  # every check before any work
    for patch in patches:
        if patch.outside and warn:
            warn(f"{patch.source}: {len(patch.outside)} module(s) of a head the {kind.value} model has not are "
                 f"left out (e.g. {patch.outside[0]}): they cannot change its hidden states")
    tuned_sums, base_sums, sums = _measure(kind, tuned_model, base_model, patches,
                                           padded_batches(ids, batch_size, pad, dev), math.ceil(len(ids) / batch_size),
                                           progress)
    base_score = _score("base", 0, kind, base_sums)
    scores = [_score(label, adapter.params, kind, s, base_sums) for (label, adapter), s in zip(adapters, sums)]
    for score, size in zip(scores, sizes or []):
        score.size = dict(size)
    tuned_loss = tuned_sums.mean(tuned_sums.nll) if kind is ModelKind.CAUSAL else None
    tokens = tuned_sums.positions if kind is ModelKind.CAUSAL else sum(len(x) for x in ids)
    return Evaluation(kind=kind, samples=len(ids), tokens=tokens, base=base_score, tuned_loss=tuned_loss,
                      adapters=scores, skipped=skipped, wall_time_s=time.perf_counter() - start)
