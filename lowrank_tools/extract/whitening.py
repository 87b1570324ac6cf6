"""extract --calibration: which layers get activation-whitened factors (:mod:`lowrank_tools.linalg.whiten`), and
their Cholesky factors, one per distinct input (q/k/v share one), computed when the first of them is factored.

Checked before any factoring: the statistics must name some selected Linear layer (else they were computed on
another model), and every matched layer's input width must equal the statistics' (else a one-line error).
Layers without statistics (embeddings, grouped convs, Conv3d, modules the model never ran) are factored plainly and listed
in one note.

--budget compares layers by their whitened singular values divided by sqrt(tokens): the per-token output error
(:meth:`Whitening.unit`). A layer without statistics in such a run is compared as if its inputs were isotropic with
the typical per-token energy of the run's inputs (:meth:`Whitening.plain_unit`, the median over every input of
mean(diag X^T X) / tokens), and the note says so.
"""

from __future__ import annotations

import math
import os
import statistics

import torch

from ..adapter import ModuleKind, module_name
from ..errors import DataError, ShapeMismatch, Warn
from ..io.calibration import CalibrationStats, read_calibration
from ..linalg.whiten import Whitener, whitener
from ..report import LayerRecord, factor_record

__all__ = ["Whitening", "whitened_record"]


class Whitening:
    """The statistics of one run and the last Cholesky factor (the layers of one input come one after another)."""

    def __init__(self, stats: CalibrationStats | str | os.PathLike, *, damping: float, device: torch.device,
                 warn: Warn | None = None, fused: dict[str, tuple[str, ...]] | None = None):
        self.stats = stats if isinstance(stats, CalibrationStats) else read_calibration(stats)
        self.damping, self.device, self.warn = damping, device, warn
        self.module_key = dict(self.stats.module_key)  # module -> its input's key
        for module, parts in (fused or {}).items():  # a fused module (Flux's qkv, linear1) reads its parts' input
            keys = {self.stats.module_key.get(part) for part in parts}
            if len(keys) == 1 and None not in keys:  # one input for all parts: the fused layer's, as in the model
                self.module_key.setdefault(module, keys.pop())
        self.plain: list[str] = []  # selected modules factored without statistics
        self._last: tuple[str, Whitener] | None = None
        self._plain_unit: float | None = None

    def check(self, layers: dict[str, ModuleKind], in_features: dict[str, int]) -> None:
        """Match the selected layers (tensor name -> kind; their (out, in_flat) input widths) with the statistics:
        Linear and transformers Conv1D layers and conv kernels (in_flat = in * prod(kernel), the patch width of
        calibrate's conv rows)."""
        matched = 0
        for name, kind in layers.items():
            mod = module_name(name)
            key = self.module_key.get(mod)
            if key is None or kind not in (ModuleKind.LINEAR, ModuleKind.CONV1D, ModuleKind.CONV):
                self.plain.append(mod)
                continue
            width = self.stats.in_features(key)
            if width != in_features[name]:
                raise ShapeMismatch(f"{self.stats.path}: statistics of {mod} are {width} x {width} but its weight "
                                    f"takes {in_features[name]} inputs: calibrate the model this fine-tune is of")
            matched += 1
        if layers and not matched:
            some = next(iter(self.stats.module_key), "none")
            raise DataError(f"{self.stats.path}: no layer of the checkpoints has statistics (they name e.g. {some!r}, "
                            f"the checkpoints e.g. {module_name(next(iter(layers)))!r}): calibrate this model")

    def note(self) -> str | None:
        if not self.plain:
            return None
        shown = ", ".join(self.plain[:5]) + (f" and {len(self.plain) - 5} more" if len(self.plain) > 5 else "")
        return f"--calibration: {len(self.plain)} layer(s) have no input statistics and were factored plainly: {shown}"

    def get(self, mod: str) -> Whitener | None:
        """The whitener of module ``mod``'s input, or None when it is factored plainly."""
        key = self.module_key.get(mod)
        if key is None or mod in self.plain:
            return None
        if self._last is None or self._last[0] != key:
            self._last = None  # release the previous factor first: one (in, in) float64 matrix at a time
            w = whitener(self.stats.xtx(key), damping=self.damping, device=self.device)
            if w.note and self.warn:
                self.warn(f"{mod}: {w.note}")
            self._last = (key, w)
        return self._last[1]

    def unit(self, mod: str) -> float:
        """``1 / sqrt(tokens)`` of ``mod``'s input: whitened singular values times it are per-token output errors,
        comparable across layers whose statistics summed different token counts (--budget)."""
        key = self.module_key[mod]
        return 1.0 / math.sqrt(max(self.stats.tokens(key), 1))

    def plain_unit(self) -> float:
        """The factor a layer without statistics gets under --budget: ``sqrt(median mean(diag X^T X) / tokens)``
        over every input of the statistics (the typical per-token energy of one input coordinate)."""
        if self._plain_unit is None:
            values = [v for v in self.stats.mean_squares().values() if v > 0]
            self._plain_unit = math.sqrt(statistics.median(values)) if values else 1.0
        return self._plain_unit


def whitened_record(mod: str, weight_shape: tuple[int, ...], *, rank: int, values, output_norm: float,
                    output_err: float, norm: float, err: float, params: int, method: str,
                    extra: dict | None = None) -> LayerRecord:
    """The record of a whitened layer: ``values`` the singular values of dW L (``retained_energy`` is the output
    energy kept), ``output_norm`` = ||dW L||_F, ``output_err`` = ||(dW - s B A) L||_F; ``delta_norm`` and
    ``rel_error`` stay weight-space (``norm`` = ||dW||_F, ``err`` = ||dW - s B A||_F)."""
    record = factor_record(mod, weight_shape, rank=rank, values=values, norm=output_norm, err=err, params=params,
                           extra={"method": method, "whitened": True, **(extra or {}),
                                  "output_rel_error": output_err / output_norm if output_norm else 0.0})
    record.delta_norm, record.rel_error = norm, err / norm if norm else 0.0
    return record
