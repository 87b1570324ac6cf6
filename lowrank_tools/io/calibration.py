"""The input-statistics file of ``calibrate`` (read by ``extract --calibration``): one safetensors file.

Per distinct layer input (the modules that read the same tensor share it: q/k/v, gate/up), keyed by the first
such module's name:

    <key>.xtx      float64 (in, in)   X^T X summed over the real (unpadded) calibration tokens (rows of X)
    <key>.tokens   int64 (1,)         how many tokens were summed

Metadata: ``lowrank_tools_calibration`` = ``"1"`` (the format version), ``groups`` = a JSON object key -> list of
module names reading that input, ``model`` = the model that was run. Tensors are read one at a time, on demand.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointNotFound, CorruptCheckpoint, NotACheckpoint
from .atomic import ShardedWriter, atomic_output
from .safetensors import SafetensorsFile

__all__ = ["FORMAT_KEY", "InputStats", "CalibrationStats", "read_calibration", "write_calibration"]

FORMAT_KEY = "lowrank_tools_calibration"
_VERSION = "1"


@dataclass
class InputStats:
    """The statistics of one distinct layer input."""

    modules: tuple[str, ...]  # module names reading this input (the first is the key)
    xtx: torch.Tensor  # (in, in) float64, X^T X over the tokens
    tokens: int


class CalibrationStats:
    """A statistics file opened for reading: the groups from its metadata, each matrix read when asked for."""

    def __init__(self, path: Path, file: SafetensorsFile, groups: dict[str, tuple[str, ...]], model: str | None):
        self.path, self._file, self.groups, self.model = path, file, groups, model
        self.module_key = {m: key for key, mods in groups.items() for m in mods}  # module -> its input's key
        self._mean_squares: dict[str, float] | None = None

    def in_features(self, key: str) -> int:
        return self._file.info(f"{key}.xtx")[1][0]

    def tokens(self, key: str) -> int:
        return int(self._file.read(f"{key}.tokens")[0])

    def mean_squares(self) -> dict[str, float]:
        """key -> mean(diag X^T X) / tokens (the mean squared input coordinate): from the metadata when the file
        has it, else read from every matrix (once)."""
        if self._mean_squares is None:
            self._mean_squares = self._stored_mean_squares() or {
                key: float(self.xtx(key).diagonal().mean()) / max(self.tokens(key), 1) for key in self.groups}
        return self._mean_squares

    def _stored_mean_squares(self) -> dict[str, float] | None:
        try:
            raw = json.loads(self._file.metadata.get("mean_square", ""))
        except json.JSONDecodeError:
            return None
        if not isinstance(raw, dict) or set(raw) != set(self.groups) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
                for v in raw.values()):
            return None
        return {k: float(v) for k, v in raw.items()}

    def xtx(self, key: str) -> torch.Tensor:
        """(in, in) float64, CPU."""
        return self._file.read(f"{key}.xtx")


def read_calibration(path: str | os.PathLike) -> CalibrationStats:
    """Open a statistics file written by :func:`write_calibration`, checking its metadata, names and shapes."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFound(f"calibration statistics {path} do not exist: make them with lowrank-tools "
                                 f"calibrate MODEL --data TEXTS -o {path.name}")
    file = SafetensorsFile(path)
    where = f"{path}: "
    if file.metadata.get(FORMAT_KEY) != _VERSION:
        raise NotACheckpoint(f"{where}not a statistics file of lowrank-tools calibrate (no {FORMAT_KEY} = "
                             f"{_VERSION} in its metadata): make one with lowrank-tools calibrate")
    try:
        raw = json.loads(file.metadata.get("groups", ""))
    except json.JSONDecodeError:
        raw = None
    if not isinstance(raw, dict) or not all(isinstance(v, list) and v and all(isinstance(m, str) for m in v)
                                            for v in raw.values()):
        raise CorruptCheckpoint(f"{where}metadata 'groups' is not an object of module-name lists: recompute it")
    groups = {str(k): tuple(v) for k, v in raw.items()}
    for key in groups:
        for name, dtype, ndim in ((f"{key}.xtx", torch.float64, 2), (f"{key}.tokens", torch.int64, 1)):
            if name not in file.entries:
                raise CorruptCheckpoint(f"{where}tensor {name!r} is missing: recompute the statistics")
            got_dtype, shape = file.info(name)
            if got_dtype != dtype or len(shape) != ndim or (ndim == 2 and shape[0] != shape[1]) or (ndim == 1
                                                                                                 and shape != (1,)):
                raise CorruptCheckpoint(f"{where}tensor {name!r} is {got_dtype} {shape}, not {dtype} "
                                        f"{'(in, in)' if ndim == 2 else '(1,)'}: recompute the statistics")
    return CalibrationStats(path, file, groups, file.metadata.get("model"))


def write_calibration(path: str | os.PathLike, stats: list[InputStats], *, model: str | None = None,
                      force: bool = False, inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Write ``stats`` to ``path`` atomically (a temporary beside it, installed at the end, no-clobber unless
    ``force``). The list is emptied as it is written: each matrix is released once it is on disk."""
    groups = {item.modules[0]: list(item.modules) for item in stats}
    mean_square = {item.modules[0]: float(item.xtx.diagonal().double().mean()) / max(int(item.tokens), 1)
                   if item.xtx.numel() else 0.0 for item in stats}
    metadata = {FORMAT_KEY: _VERSION, "groups": json.dumps(groups, sort_keys=True), "model": str(model or ""),
                "mean_square": json.dumps(mean_square, sort_keys=True)}
    with atomic_output(path, force=force, inputs=tuple(inputs)) as tmp:
        with ShardedWriter(tmp, shard_size=None, metadata=metadata) as writer:
            while stats:
                item = stats.pop(0)
                writer.add(f"{item.modules[0]}.xtx", item.xtx.detach().to(torch.float64).contiguous())
                writer.add(f"{item.modules[0]}.tokens", torch.tensor([int(item.tokens)], dtype=torch.int64))
                del item
    return Path(path)
