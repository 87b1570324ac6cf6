"""The options of extract: one typed, documented, checked value (the CLI builds it from its flags).

Checked when made, before any file is opened: a rank rule or a budget, ``alpha``, ``conv_rank``, ``svd_batch``,
the method; and the device is resolved here, once (``"auto"`` -> cuda when available).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from typing import Sequence

import torch

from ..adapter import ModuleKind, check_alpha
from ..errors import InvalidOption
from ..linalg.svd import Method, RankRule, resolve_device
from ..linalg.whiten import DEFAULT_DAMPING
from .pipeline import batch_size
from ..linalg.rank_rules import require_rank_option

__all__ = ["ExtractOptions"]


@dataclass(frozen=True)
class ExtractOptions:
    """How :func:`~lowrank_tools.extract.extract` factors ``tuned - base``.

    Ranks: ``rule`` (:class:`~lowrank_tools.linalg.RankRule`) and/or ``budget`` (total adapter parameters, spread
    over layers by :mod:`~lowrank_tools.extract_budget`; ``rule`` then caps each layer: its rank, or where its
    dynamic rule stops within the top K computed); at least one. ``conv_rank``: the rank (or cap) for conv
    kernels, default that of ``rule`` (not with ``budget``). ``alpha``: default r per layer (scale 1).

    Output: ``dtype`` of the written factors, default each tuned tensor's dtype. ``include`` / ``exclude``:
    regexes of module names. ``full_modules``: regexes of modules saved whole (PEFT ``modules_to_save``).
    ``embeddings=False`` leaves embeddings out (kohya targets). ``strict``: tensors on one side only, or of
    different shapes, are errors.

    SVD: ``method`` (auto, exact, randomized), ``seed``, ``oversample`` and ``n_iter`` (the MAXIMUM of power
    iterations: fewer once one improves the rank-k error by at most
    :data:`~lowrank_tools.linalg.sketch.POWER_TOL`, see :class:`~lowrank_tools.linalg.sketch.PowerStop`) of the
    randomized range finder. Devices: ``device`` (cpu, cuda, cuda:N, auto; resolved to a ``torch.device`` when
    the options are made), ``allow_tf32`` (let CUDA matmuls use TF32; off, restored after), ``svd_batch``
    (same-shape layers per stacked SVD; default 1 on the CPU, :data:`~lowrank_tools.pipeline.CUDA_BATCH` on
    CUDA), ``distributed`` (split the layers over a torch.distributed group; None: when one of more than one
    process is initialised, see :mod:`~lowrank_tools.distributed`).

    Calibration: ``calibration`` (a statistics file of ``calibrate``) makes every layer with statistics factor
    ``dW L`` (activation-whitened, :mod:`~lowrank_tools.linalg.whiten`), with ``damping`` F (lambda = F *
    mean(diag X^T X)); its rank rule, and ``budget``, read the whitened spectrum (the output error).
    """

    rule: RankRule | None = None
    budget: int | None = None
    alpha: float | None = None
    conv_rank: int | None = None
    dtype: torch.dtype | None = None
    include: Sequence[str] = ()
    exclude: Sequence[str] = ()
    full_modules: Sequence[str] = ()
    embeddings: bool = True
    strict: bool = False
    method: Method | str = Method.AUTO
    seed: int = 0
    oversample: int = 10
    n_iter: int = 4
    device: str | torch.device = "cpu"
    allow_tf32: bool = False
    svd_batch: int | None = None
    distributed: bool | None = None
    calibration: str | os.PathLike | None = None
    damping: float = DEFAULT_DAMPING
    conv_rule: RankRule | None = field(init=False, repr=False, compare=False, default=None)  # rule with conv_rank

    def __post_init__(self) -> None:
        require_rank_option(self.rule, self.budget, "extract")
        check_alpha(self.alpha)
        if self.conv_rank is not None:
            _check_conv_rank(self.conv_rank, self.rule, self.budget)
            object.__setattr__(self, "conv_rule", replace(self.rule, rank=self.conv_rank))
        for name in ("include", "exclude", "full_modules"):
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))
        _check_calibration(self.damping)
        object.__setattr__(self, "method", Method(self.method))
        object.__setattr__(self, "device", resolve_device(self.device))  # once: everything below takes this
        batch_size(self.device, self.svd_batch)  # checked now, before any reading

    def rule_for(self, kind: ModuleKind) -> RankRule | None:
        """The rule for a layer of ``kind``: ``conv_rank``'s for conv kernels when given, else ``rule``."""
        return self.conv_rule if kind is ModuleKind.CONV and self.conv_rule is not None else self.rule

    @property
    def batch(self) -> int:
        """Layers per stacked SVD (:func:`~lowrank_tools.pipeline.batch_size`); 1 under ``budget`` or ``calibration``."""
        if self.budget is not None or self.calibration is not None:  # whitened layers are factored one by one
            return 1
        return batch_size(self.device, self.svd_batch)


def _check_conv_rank(conv_rank: int, rule: RankRule | None, budget: int | None) -> None:
    if isinstance(conv_rank, bool) or not isinstance(conv_rank, int) or conv_rank < 1:
        raise InvalidOption(f"--conv-rank {conv_rank!r} is outside [1, inf): use a whole number of 1 or more")
    if budget is not None or rule is None:
        raise InvalidOption("--conv-rank cannot be combined with --budget: the budget decides every rank")


def _check_calibration(damping: float) -> None:
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not math.isfinite(damping) or damping < 0:
        raise InvalidOption(f"--damping {damping!r} must be a finite number >= 0 (default {DEFAULT_DAMPING})")

