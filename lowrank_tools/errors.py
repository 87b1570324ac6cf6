"""One exception class per failure a user can cause.

Every message is one line that says what went wrong, where (file, tensor or module) and how to
fix it. The CLI turns :class:`LowRankError` into exit status 1 and :class:`UsageError` into 2.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = [
    "Warn",
    "LowRankError",
    "UsageError",
    "InvalidOption",
    "CheckpointNotFound",
    "NotACheckpoint",
    "CorruptCheckpoint",
    "UnsafeCheckpoint",
    "NoCommonTensors",
    "ShapeMismatch",
    "MissingTensor",
    "NonFiniteWeight",
    "NonFiniteOutput",
    "UnsupportedTensor",
    "AdapterFormatError",
    "AdapterMismatch",
    "ConversionError",
    "OutputExists",
    "OutputError",
    "NumericalError",
    "MissingExtra",
    "DistributedError",
    "DataError",
]


Warn = Callable[[str], None]  # receives one-line warnings (the non-fatal messages); nothing below the CLI prints


class LowRankError(Exception):
    """Base class: a problem with the data or files a user gave (exit status 1)."""

    exit_code = 1


class UsageError(LowRankError):
    """A problem with how the tool was called: options or arguments (exit status 2)."""

    exit_code = 2


class InvalidOption(UsageError, ValueError):
    """An option value outside its allowed range (rank <= 0, energy outside (0, 1], ...)."""


class CheckpointNotFound(LowRankError, FileNotFoundError):
    """A checkpoint or adapter path that does not exist."""


class NotACheckpoint(LowRankError):
    """A path that exists but is not a checkpoint layout this tool reads."""


class CorruptCheckpoint(LowRankError):
    """A checkpoint file that is truncated or whose header cannot be parsed."""


class UnsafeCheckpoint(LowRankError):
    """A pickle that holds more than tensors; it is refused rather than executed."""


class NoCommonTensors(LowRankError):
    """Base and tuned checkpoints share no tensor name, or no shape agrees."""


class ShapeMismatch(LowRankError):
    """Two tensors that must agree in shape do not (with --strict, or inside an adapter)."""


class MissingTensor(LowRankError):
    """A tensor present on one side only (with --strict) or a module the base lacks."""


class NonFiniteWeight(LowRankError):
    """A weight or delta that holds NaN or Inf."""


class NonFiniteOutput(LowRankError):
    """A tensor about to be written holds NaN or Inf (a value past the output dtype's range, a huge weight)."""


class UnsupportedTensor(LowRankError):
    """A tensor of a dtype or rank that cannot be factored (integer, quantized, 0-size)."""


class AdapterFormatError(LowRankError):
    """An adapter whose layout is unknown or inconsistent (missing factor, bad alpha)."""


class AdapterMismatch(LowRankError):
    """Adapters (or adapter and base) that disagree on a module's shape."""


class ConversionError(LowRankError):
    """A target format that cannot hold one of the adapter's modules."""


class OutputExists(LowRankError):
    """The output path exists and --force was not given."""


class OutputError(LowRankError):
    """The output cannot be written (same as an input, unwritable folder, full disk)."""


class NumericalError(LowRankError):
    """A factorisation that failed even after the float64 and exact fallbacks."""


class MissingExtra(UsageError):
    """An optional dependency is needed for the requested feature (install the named extra)."""


class DistributedError(LowRankError):
    """A distributed run that cannot go on: no process group, ranks that disagree, a rank that was lost."""


class DataError(LowRankError):
    """A data file (evaluation or calibration texts) that is empty, unreadable or malformed at a given line."""
