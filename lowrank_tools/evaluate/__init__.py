"""evaluate: behaviour kept by base + adapter against the fine-tuned model, on texts or denoiser draws (issue 15).

Pieces: :mod:`.texts` (read TEXTS), :mod:`~lowrank_tools.io.models` (transformers loading, the ``[eval]`` extra), :mod:`.patch`
(adapters added to the base in memory and taken out exactly, DoRA included), :mod:`.metrics` (KL, top-1, loss;
pooled cosine; noise-prediction error), :mod:`.diffusion` (seeded inputs of diffusers denoisers),
:mod:`.run` (the protocol), :mod:`.curve` (one adapter truncated to several sizes), :mod:`.output` (table,
JSON, CSV, plot). An operation: it imports the adapter, io, refactor, report and linalg layers only.
"""

from .run import Evaluation, Score, evaluate
from ..io.texts import read_texts

__all__ = ["evaluate", "Evaluation", "Score", "read_texts"]
