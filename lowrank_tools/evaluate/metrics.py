"""The measures, accumulated batch by batch over real (unpadded) positions, in float64.

Causal LMs, per next-token position t of each text (the logits at t predict token t + 1; padding never counts):

    KL(tuned || model)  = sum_v p_tuned(v) (log p_tuned(v) - log p_model(v))   full vocabulary, float64 log-softmax
    top-1 agreement     = argmax p_model == argmax p_tuned
    loss                = -log p_model(token t + 1)

each averaged over every position of every text. Encoders: the last hidden state mean-pooled over the real tokens
of each text, e = sum_t mask_t h_t / sum_t mask_t, then per text cos(e_model, e_tuned) and the relative L2 error
||e_model - e_tuned|| / ||e_tuned||, averaged over texts. Diffusion denoisers, over every draw d of the seeded
inputs (:mod:`~lowrank_tools.evaluate.diffusion`), the relative squared error of the noise prediction

    noise_error = sum_d ||eps_model(d) - eps_tuned(d)||^2 / sum_d ||eps_tuned(d)||^2       float64

The ratios built on these (recovered) live in
:mod:`~lowrank_tools.evaluate.run`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["CausalTarget", "CausalSums", "EncoderTarget", "EncoderSums", "DiffusionSums", "causal_target",
           "encoder_target"]


_CHUNK_ELEMENTS = 1 << 22  # positions x vocabulary per float64 block: 32 MiB per temporary, whatever the vocabulary


@dataclass
class CausalTarget:
    """The tuned model's next-token logits at one batch's real positions, and the tokens that follow."""

    logits: Tensor  # (N, V) as the model gave them; log-softmax in float64 a block of positions at a time
    top1: Tensor  # (N,)
    next_tokens: Tensor  # (N,)
    select: Tensor  # (B, T - 1) bool: which positions are real next-token positions

    def blocks(self):
        """(rows, tuned log-probs (n, V) float64) per block of positions."""
        step = max(1, _CHUNK_ELEMENTS // max(1, self.logits.shape[1]))
        for i in range(0, self.logits.shape[0], step):
            yield slice(i, i + step), torch.log_softmax(self.logits[i:i + step].double(), dim=-1)


def _positions(logits: Tensor, select: Tensor) -> Tensor:
    return logits[:, :-1][select]  # (N, V): the logits at real next-token positions


def causal_target(logits: Tensor, input_ids: Tensor, mask: Tensor) -> CausalTarget:
    """``logits`` (B, T, V) of the tuned model; ``mask`` (B, T) 1 on real tokens (right padding)."""
    select = mask[:, 1:].bool() & mask[:, :-1].bool()  # (B, T - 1): position t is real and so is token t + 1
    real = _positions(logits, select)
    return CausalTarget(logits=real, top1=real.argmax(-1), next_tokens=input_ids[:, 1:][select], select=select)


@dataclass
class CausalSums:
    """Running sums over positions for one model against the tuned one."""

    positions: int = 0
    kl: float = 0.0
    agree: int = 0
    nll: float = 0.0

    def add(self, logits: Tensor, target: CausalTarget) -> None:
        real = _positions(logits, target.select)  # (N, V)
        for rows, logp_t in target.blocks():
            logp = torch.log_softmax(real[rows].double(), dim=-1)  # (n, V)
            p = logp_t.exp()
            term = torch.where(p > 0, p * (logp_t - logp), torch.zeros_like(p))  # 0 log 0 = 0
            self.kl += float(term.sum())
            self.agree += int((logp.argmax(-1) == target.top1[rows]).sum())
            self.nll -= float(logp.gather(1, target.next_tokens[rows].unsqueeze(1)).sum())
        self.positions += int(target.select.sum())

    def mean(self, value: float) -> float | None:
        return value / self.positions if self.positions else None


@dataclass
class EncoderTarget:
    """The tuned model's mean-pooled embeddings of one batch."""

    pooled: Tensor  # (B, H) float64
    mask: Tensor  # (B, T)


def _pooled(hidden: Tensor, mask: Tensor) -> Tensor:
    m = mask.to(torch.float64).unsqueeze(-1)  # (B, T, 1)
    return (hidden.double() * m).sum(1) / m.sum(1).clamp_min(1.0)  # (B, H)


def encoder_target(hidden: Tensor, mask: Tensor) -> EncoderTarget:
    """``hidden`` (B, T, H): the tuned model's last hidden state; ``mask`` (B, T)."""
    return EncoderTarget(pooled=_pooled(hidden, mask), mask=mask)


@dataclass
class EncoderSums:
    """Running sums over texts for one model against the tuned one."""

    texts: int = 0
    cosine: float = 0.0
    rel_error: float = 0.0

    def add(self, hidden: Tensor, target: EncoderTarget) -> None:
        e = _pooled(hidden, target.mask)  # (B, H)
        t = target.pooled
        self.cosine += float(torch.nn.functional.cosine_similarity(e, t, dim=-1, eps=1e-300).sum())
        norm = torch.linalg.vector_norm(t, dim=-1)
        err = torch.linalg.vector_norm(e - t, dim=-1)
        self.rel_error += float(torch.where(norm > 0, err / norm.clamp_min(1e-300), torch.zeros_like(err)).sum())
        self.texts += int(t.shape[0])

    def mean(self, value: float) -> float | None:
        return value / self.texts if self.texts else None


@dataclass
class DiffusionSums:
    """Running sums over draws for one denoiser against the tuned one's prediction (the target, float64)."""

    draws: int = 0
    values: int = 0
    squared_error: float = 0.0
    target_energy: float = 0.0

    def add(self, prediction: Tensor, target: Tensor) -> None:
        diff = prediction.double() - target
        self.squared_error += float((diff * diff).sum())
        self.target_energy += float((target * target).sum())
        self.draws += int(target.shape[0])
        self.values += int(target.numel())

    def error(self) -> float | None:
        return self.squared_error / self.target_energy if self.target_energy > 0 else None
