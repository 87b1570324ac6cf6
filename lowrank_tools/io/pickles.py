"""Torch pickles (``.bin/.pt/.pth/.ckpt``): ``torch.load(weights_only=True)`` only, memory-mapped when zip-based, and
every tensor bounded by the bytes its storage holds before anything is copied (a 1.5 KB file with a stride-0
``expand`` must not allocate gigabytes). :class:`TensorDict` serves them, or any dict of tensors, per tensor."""

from __future__ import annotations

import errno
import pickle
from pathlib import Path

import torch

from ..errors import CorruptCheckpoint, NotACheckpoint, UnsafeCheckpoint, UnsupportedTensor

__all__ = ["TensorDict", "load_pickle"]

_FIX = "re-download or re-save it"
# a pickled tensor may read as at most this many times its storage's bytes (plus the slack): a stride-0 expand
# of a few bytes to gigabytes is refused before anything is allocated
_VIEW_FACTOR, _VIEW_SLACK = 2, 1 << 20


class TensorDict:
    """Tensors already at hand: a loaded torch pickle (memory-mapped when zip-based) or a dict."""

    metadata: dict[str, str] = {}

    def __init__(self, path: Path, tensors: dict[str, torch.Tensor]):
        self.path = path
        self.tensors = tensors

    def names(self) -> list[str]:
        return list(self.tensors)

    def info(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        tensor = self.tensors[name]
        return tensor.dtype, tuple(tensor.shape)

    def read(self, name: str) -> torch.Tensor:
        # a copy that owns its memory: the source may be a view into the file mapping
        return self.tensors[name].detach().clone(memory_format=torch.contiguous_format)

    def close(self) -> None:
        self.tensors = {}


def load_pickle(path: Path, *, use_mmap: bool) -> dict[str, torch.Tensor]:
    """The tensors of a torch pickle, ``torch.load(weights_only=True)`` only, each checked against its storage."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=use_mmap)
    except RuntimeError as exc:
        if use_mmap and "mmap" in str(exc):  # an old non-zip file: load it without mmap
            return load_pickle(path, use_mmap=False)
        raise _pickle_error(path, exc) from exc
    except (pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise _pickle_error(path, exc) from exc
    except OSError as exc:  # torch's zip reader seeking past the end of a truncated file: EINVAL
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise  # open_checkpoint says it cannot be read
        raise CorruptCheckpoint(f"{path} cannot be read as a torch file ({exc.strerror or exc}: truncated?): "
                                f"{_FIX}") from exc
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise NotACheckpoint(f"{path} holds a {type(obj).__name__}, not a dict of tensors: save model.state_dict()")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise NotACheckpoint(f"{path} holds no tensors: give the file with the model weights")
    for name, tensor in tensors.items():
        _check_storage(path, name, tensor)
    return tensors


def _check_storage(path: Path, name: str, tensor: torch.Tensor) -> None:
    """Refuse a view that reads as far more bytes than its storage holds (a stride-0 ``expand``, overlapping
    strides): reading it would allocate its logical size, which the file does not bound. Nothing is copied here."""
    try:
        if tensor.layout is not torch.strided:
            raise RuntimeError(f"a {tensor.layout} tensor")
        logical = tensor.numel() * tensor.element_size()
        stored = tensor.untyped_storage().nbytes()
    except RuntimeError as exc:  # sparse, quantized or nested: no plain storage to bound it by
        raise UnsupportedTensor(f"tensor {name!r} in {path} is {str(exc).splitlines()[0][:80]}, not a plain dense "
                                f"tensor: re-save it with tensor.to_dense().contiguous()") from None
    if logical > _VIEW_FACTOR * stored + _VIEW_SLACK:
        raise CorruptCheckpoint(f"tensor {name!r} in {path} is a view of {tuple(tensor.shape)} "
                                f"({logical:,} bytes) over {stored:,} stored bytes (repeated by zero or overlapping "
                                f"strides): refusing to expand it; re-save it with tensor.contiguous()")


def _pickle_error(path: Path, exc: BaseException) -> Exception:
    """Classify a torch.load failure: a refused Python object, or a damaged file."""
    text = str(exc)
    refused = "weights_only" in text or "Weights only" in text
    if refused and "Unsupported operand" not in text:
        return UnsafeCheckpoint(f"{path} holds Python objects other than tensors; refusing to unpickle it. Convert it "
                                "to .safetensors with a trusted tool, or re-save model.state_dict()")
    reason = text.splitlines()[0][:200] if text.strip() else type(exc).__name__
    return CorruptCheckpoint(f"{path} cannot be read as a torch file ({reason}): {_FIX}")
