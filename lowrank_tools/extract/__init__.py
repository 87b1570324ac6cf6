"""The extract operation: a base and a tuned checkpoint in, an adapter and its report out. The streaming
loop (:mod:`.streaming`), batched SVDs on the device (:mod:`.pipeline`), a layer share per torchrun
rank (:mod:`.distributed`) and the ``--budget`` path (:mod:`.budget`).
"""

from __future__ import annotations

from .pipeline import CUDA_BATCH, MAX_BATCH_ELEMENTS, Stager, batch_size, plan_batches, staged, batched_svds, tf32
from .distributed import Share, assign, layer_cost, current_share, torchrun_group, torchrun_world_size
from .budget import BUDGET_TOP_K, budget_top_k, check_budget, extract_with_budget
from .streaming import ExtractResult, extract, Progress

__all__ = [
    "CUDA_BATCH", "MAX_BATCH_ELEMENTS", "Stager", "batch_size", "plan_batches", "staged", "batched_svds", "tf32",
    "Share", "assign", "layer_cost", "current_share", "torchrun_group", "torchrun_world_size", "BUDGET_TOP_K",
    "budget_top_k", "check_budget", "extract_with_budget", "ExtractResult", "extract", "Progress",
]
