"""calibrate: the input statistics ``X^T X`` of every Linear layer of a transformers model over texts (issue 17),
for ``extract --calibration`` (activation-whitened factors, :mod:`lowrank_tools.linalg.whiten`). An operation: it
imports io, linalg and errors only; the file format lives in :mod:`lowrank_tools.io.calibration`."""

from __future__ import annotations

from .run import Calibration, calibrate

__all__ = ["Calibration", "calibrate"]
