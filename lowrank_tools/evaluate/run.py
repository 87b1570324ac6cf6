"""evaluate: how much of a fine-tune's behaviour base + adapter keeps, measured on texts (or, for diffusers
denoisers, on seeded random inputs).

Protocol. Every text is tokenized on its own (the tuned model's tokenizer, else the base's), truncated to
``max_length`` tokens and batched with right padding that never enters a measure. Per batch, the tuned model
runs once (the target), the base once, then each adapter is added to the base in memory
(:mod:`~lowrank_tools.evaluate.patch`), run, and taken out again: two models in memory, whatever the number of
adapters. The sums of :mod:`~lowrank_tools.evaluate.metrics` give per model (base and each adapter):

    causal:   kl = mean KL(tuned || model),  kl_recovered = 1 - kl / base_kl,  top1_agreement,  loss
    encoder:  cosine = mean cos(e_model, e_tuned),  recovered = (cosine - base_cosine) / (1 - base_cosine),
              rel_l2_error
    diffusion: noise_error = sum ||eps_model - eps_tuned||^2 / sum ||eps_tuned||^2 over the seeded draws of
              :mod:`~lowrank_tools.evaluate.diffusion`,  recovered = 1 - noise_error / base_noise_error

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
from ..errors import DataError, InvalidOption, UsageError
from ..linalg.svd import resolve_device
from ..report import Progress, Warn
from ..io.models import (Denoiser, ModelKind, find_denoiser, load_denoiser, load_model, load_tokenizer, model_kind,
                         padded_batches, token_ids)
from .diffusion import check_denoiser, denoiser_batches, predict
from .metrics import CausalSums, DiffusionSums, EncoderSums, causal_target, encoder_target
from .patch import applied, plan_patch

__all__ = ["DEFAULT_DRAWS", "Score", "Evaluation", "evaluate"]

DEFAULT_DRAWS = 16  # diffusion: seeded input draws when --max-samples is not given


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
    noise_error: float | None = None
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
                "base_noise_error": self.base.noise_error,
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
    if kind is ModelKind.DIFFUSION:
        err, base_err = sums.error(), base_sums.error() if base_sums is not None else None
        rec = _ratio(base_err - err, base_err) if err is not None and base_err is not None else None
        return Score(path=label, params=params, noise_error=err, recovered=rec)
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


def _measure(forward, target_of, new_sums, tuned_model, base_model, patches, batches, total, progress):
    """Per batch: the tuned model once (the target), the base, then base + each adapter; sums of each.
    ``forward(model, batch)`` runs a model, ``target_of(output, batch)`` makes the tuned output a target."""
    tuned_sums, base_sums, sums = new_sums(), new_sums(), [new_sums() for _ in patches]
    for done, batch in enumerate(batches):
        if progress:
            progress(done, total, f"batch {done + 1}")
        out = forward(tuned_model, batch)
        target = target_of(out, batch)
        tuned_sums.add(out, target)
        del out
        base_sums.add(forward(base_model, batch), target)
        for patch, s in zip(patches, sums):
            with applied(base_model, patch):
                s.add(forward(base_model, batch), target)
    if progress:
        progress(total, total, "")
    return tuned_sums, base_sums, sums


def _plans(model, adapters, *, skip_heads: bool, prefix: str | None, what: str, warn: Warn | None) -> list:
    """Every adapter checked against the model before any work; modules it has not are warned about once each."""
    patches = [plan_patch(model, adapter, label, skip_heads=skip_heads, prefix=prefix) for label, adapter in adapters]
    for patch in patches:
        if patch.outside and warn:
            warn(f"{patch.source}: {len(patch.outside)} module(s) outside the {what} are left out (e.g. "
                 f"{patch.outside[0]}): they cannot change its outputs")
    return patches


def _scores(label_params, kind, base_sums, sums, sizes) -> tuple[Score, list[Score]]:
    base_score = _score("base", 0, kind, base_sums, None)
    scores = [_score(label, params, kind, s, base_sums) for (label, params), s in zip(label_params, sums)]
    for score, size in zip(scores, sizes or []):
        score.size = dict(size)
    return base_score, scores


def _denoisers(base, tuned) -> Denoiser | None:
    """The tuned model's denoiser when both models are diffusers denoisers of one class; None when neither is."""
    b, t = find_denoiser(base), find_denoiser(tuned)
    if b is None and t is None:
        return None
    if b is None or t is None or b.class_name != t.class_name:
        what = lambda d: f"a diffusers {d.class_name}" if d else "a transformers model"  # noqa: E731
        raise InvalidOption(f"base {base} is {what(b)} but tuned {tuned} is {what(t)}: give the base the fine-tune "
                            f"started from")
    check_denoiser(t)
    return t


def _evaluate_denoisers(denoiser, base, tuned, adapters, *, samples, batch_size, seed, dev, dtype, sizes, progress,
                        warn, start) -> Evaluation:
    """The diffusion protocol of :mod:`~lowrank_tools.evaluate.diffusion`, noise predictions against the tuned's."""
    tuned_model = load_denoiser(denoiser, dev, dtype)
    base_model = load_denoiser(find_denoiser(base), dev, dtype)
    patches = _plans(base_model, adapters, skip_heads=True, prefix=denoiser.component, what=denoiser.class_name,
                     warn=warn)
    batches = denoiser_batches(denoiser, samples, batch_size, seed, dev, dtype)
    _, base_sums, sums = _measure(predict, lambda out, batch: out.double(), DiffusionSums, tuned_model, base_model,
                                  patches, batches, math.ceil(samples / batch_size), progress)
    base_score, scores = _scores([(label, a.params) for label, a in adapters], ModelKind.DIFFUSION, base_sums, sums,
                                 sizes)
    return Evaluation(kind=ModelKind.DIFFUSION, samples=base_sums.draws, tokens=base_sums.values, base=base_score,
                      tuned_loss=None, adapters=scores, wall_time_s=time.perf_counter() - start)


@torch.no_grad()
def evaluate(base: str | os.PathLike, tuned: str | os.PathLike, adapters: Sequence[tuple[str, Adapter]], *,
             texts: Sequence[str] | None = None, max_length: int = 128, batch_size: int = 8,
             device: str | torch.device = "auto", dtype: torch.dtype = torch.float32, samples: int | None = None,
             seed: int = 0, sizes: Sequence[dict] | None = None, progress: Progress | None = None,
             warn: Warn | None = None) -> Evaluation:
    """Measure base and each ``(label, adapter)`` against the tuned model (see the module doc): on ``texts`` for
    transformers models, on ``samples`` seeded draws (default 16) for diffusers denoisers (``texts`` unused).

    ``dtype``: of the loaded weights (the measures are float64 whatever it is). ``sizes``: per adapter
    ``{"rank": r}`` / ``{"budget": n}`` recorded with its score (a curve)."""
    _check_options(max_length, batch_size)
    start = time.perf_counter()
    dev = resolve_device(device)
    denoiser = _denoisers(base, tuned)
    if denoiser is not None:
        if samples is not None and (isinstance(samples, bool) or not isinstance(samples, int) or samples < 1):
            raise InvalidOption(f"--max-samples {samples!r} must be a whole number of 1 or more")
        return _evaluate_denoisers(denoiser, base, tuned, adapters, samples=samples or DEFAULT_DRAWS,
                                   batch_size=batch_size, seed=seed, dev=dev, dtype=dtype, sizes=sizes,
                                   progress=progress, warn=warn, start=start)
    if texts is None:
        raise UsageError(f"evaluate on transformers models ({tuned}) needs texts: give --data TEXTS")
    kind, ids, skipped, pad = _prepare(base, tuned, texts, max_length, warn)
    tuned_model = load_model(tuned, kind, dev, dtype)
    base_model = load_model(base, kind, dev, dtype)
    patches = _plans(base_model, adapters, skip_heads=kind is ModelKind.ENCODER, prefix=None,
                     what=f"{kind.value} model", warn=warn)
    causal = kind is ModelKind.CAUSAL
    target_of = ((lambda out, b: causal_target(out, b[0], b[1])) if causal
                 else (lambda out, b: encoder_target(out, b[1])))
    tuned_sums, base_sums, sums = _measure(lambda m, b: _forward(m, kind, *b), target_of,
                                           CausalSums if causal else EncoderSums, tuned_model, base_model, patches,
                                           padded_batches(ids, batch_size, pad, dev), math.ceil(len(ids) / batch_size),
                                           progress)
    base_score, scores = _scores([(label, a.params) for label, a in adapters], kind, base_sums, sums, sizes)
    tuned_loss = tuned_sums.mean(tuned_sums.nll) if causal else None
    tokens = tuned_sums.positions if causal else sum(len(x) for x in ids)
    return Evaluation(kind=kind, samples=len(ids), tokens=tokens, base=base_score, tuned_loss=tuned_loss,
                      adapters=scores, skipped=skipped, wall_time_s=time.perf_counter() - start)
