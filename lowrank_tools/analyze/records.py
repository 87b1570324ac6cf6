"""The records of an analysis: one :class:`LayerAnalysis` per layer and the :class:`Analysis` that holds them,
with the name keys they are grouped by. Below the operation (:mod:`.spectra`) so that the recommendation, the
report and the plots read them without importing the operation that makes them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from ..adapter import module_name
from ..linalg.spectrum import SpectrumMetrics
from ..report import finite_or_none

__all__ = ["Analysis", "LayerAnalysis", "module_type", "depth_key"]

_WRAPPERS = re.compile(r"^(base_model\.model\.|model\.)+")  # dropped from depth keys: "model.layers.3" -> "layers.3"


@dataclass
class LayerAnalysis:
    """One layer's spectrum and metrics. ``singular_values`` are all of them, or the top K (``metrics.complete``)."""

    name: str  # module name
    shape: tuple[int, ...]  # the weight's shape
    matrix_shape: tuple[int, int]  # (out, in_flat): the matrix whose spectrum this is
    kind: str  # linear | conv | embedding
    singular_values: list[float]  # descending
    delta_norm: float  # ||dW||_F
    base_norm: float | None  # ||W0||_F; None for an adapter
    metrics: SpectrumMetrics
    method: str  # exact | randomized or randomized-bf16 (top K: the sketch's precision) | qr-core (adapter)
    bytes_per_param: int  # element size of the adapter factors it would become
    full_length: int  # how many singular values the matrix has: min(out, in_flat); an adapter's: min(out, in, r)

    @property
    def module_type(self) -> str:
        return module_type(self.name)

    @property
    def depth(self) -> str | None:
        return depth_key(self.name)

    @property
    def relative_change(self) -> float | None:
        if self.base_norm is None:
            return None
        return self.delta_norm / self.base_norm if self.base_norm else math.inf

    @property
    def unit_cost(self) -> int:
        """Adapter parameters per rank unit: out + in_flat."""
        return self.matrix_shape[0] + self.matrix_shape[1]

    def to_dict(self) -> dict:
        m = self.metrics
        return {"name": self.name, "shape": list(self.shape), "matrix_shape": list(self.matrix_shape),
                "kind": self.kind, "module_type": self.module_type, "depth": self.depth, "method": self.method,
                "singular_values": self.singular_values, "delta_norm": self.delta_norm,
                "relative_change": finite_or_none(self.relative_change), "effective_rank": m.effective_rank,
                "stable_rank": m.stable_rank, "energy_rank": dict(m.energy_rank), "complete": m.complete,
                "estimated": list(m.estimated)}


@dataclass
class Analysis:
    """What ``analyze`` found: layers, summary, groups, recommendation, and what was left out."""

    source: str  # "delta" (BASE TUNED) or "adapter"
    layers: list[LayerAnalysis]
    summary: dict
    groups: dict[str, dict[str, dict]]  # "module_type" | "depth" -> group key -> stats
    recommendation: dict
    top: int | None = None
    skipped: dict[str, list[str]] = field(default_factory=dict)
    changed_1d: dict[str, float] = field(default_factory=dict)  # 1-D tensors: ||d|| / ||W0||
    notes: list[str] = field(default_factory=list)
    energy_curve: dict = field(default_factory=dict)  # recommend.energy_curve: retained energy vs params

    def to_dict(self) -> dict:
        return {"command": "analyze", "source": self.source, "top": self.top, "summary": self.summary,
                "groups": self.groups, "recommendation": self.recommendation, "energy_curve": self.energy_curve,
                "layers": [layer.to_dict() for layer in self.layers], "skipped": self.skipped,
                "not_low_rank": {k: finite_or_none(v) for k, v in self.changed_1d.items()}, "notes": self.notes}


# ------------------------------------------------------------------------------------------ names


def module_type(name: str) -> str:
    """The last name component: ``model.layers.3.self_attn.q_proj`` -> ``q_proj``."""
    return module_name(name).rsplit(".", 1)[-1]


def depth_key(name: str) -> str | None:
    """The name up to its first integer component, wrappers dropped: ``model.layers.12.mlp.up_proj`` ->
    ``layers.12``, ``down_blocks.1.attentions.0.proj_in`` -> ``down_blocks.1``; None without one."""
    parts = _WRAPPERS.sub("", module_name(name)).split(".")
    for i, part in enumerate(parts[:-1]):  # the last component is the module type, never a block
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return None
