"""The extract operation: a base and a tuned checkpoint in, an adapter and its report out. The streaming
loop (:mod:`.streaming`), batched SVDs on the device (:mod:`.pipeline`), a layer share per torchrun
rank (:mod:`.distributed`) the ``--budget`` path (:mod:`.budget`) and the
typed options (:mod:`.options`).
"""

from __future__ import annotations

import importlib

from .options import ExtractOptions
from .pipeline import CUDA_BATCH, MAX_BATCH_ELEMENTS, Stager, batch_size, plan_batches, staged, batched_svds, tf32
from .distributed import Share, assign, layer_cost, current_share, torchrun_group, torchrun_world_size
from .budget import BUDGET_TOP_K, budget_top_k, check_budget, extract_with_budget
from .streaming import ExtractResult, extract, Progress
from .extras import with_magnitudes, carry_tensors, carried_budget, count_carried

_MODULES = (
    "options", "pipeline", "distributed", "budget", "streaming", "extras",
)
__all__ = list(dict.fromkeys(  # every module's public names, once
    name for m in _MODULES for name in importlib.import_module(f".{m}", __name__).__all__))
