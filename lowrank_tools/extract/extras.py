"""What ``extract`` can carry beside the low-rank factors: DoRA magnitudes, bias and norm deltas.

- ``--dora``: each module gets ``m = ||W'||_row`` (the tuned weight's row norms), its factors stay the truncated
  delta: the DoRA weight ``m (W0 + s B A) / ||W0 + s B A||_row`` then has the tuned row norms exactly, and only the
  direction is approximated. Whether that beats plain LoRA at equal parameters depends on the pair (see the tests:
  rank r DoRA against rank r + 1 LoRA).
- ``--keep-bias``: ``tuned.bias - base.bias`` of every adapted module (PEFT ``lora_B.bias``, kohya ``diff_b``).
- ``--keep-norms``: deltas of 1-D weights and biases of modules without factors (norm layers): kohya ``w_norm`` /
  ``b_norm``; for PEFT they are saved whole instead (``modules_to_save``: the tuned tensors).
Tensors are read one at a time from the checkpoints (lazy readers).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..adapter import Adapter, ModuleKind
from ..io.checkpoint import as_checkpoint

__all__ = ["with_magnitudes", "carry_tensors"]


def _tuned_weight(ckpt, name: str):
    for candidate in (name, *(name.split(".", 1)[1:] if "." in name else [])):
        if f"{candidate}.weight" in ckpt:
            return ckpt.get(f"{candidate}.weight")
    return None


@torch.no_grad()
def with_magnitudes(adapter: Adapter, tuned) -> Adapter:
    """Every linear / conv module becomes DoRA with ``m = ||W'||_row`` of the tuned weight (float32)."""
    ckpt = as_checkpoint(tuned)
    modules = {}
    for name, m in adapter.modules.items():
        W = _tuned_weight(ckpt, name) if m.kind is not ModuleKind.EMBEDDING else None
        modules[name] = m if W is None else replace(
            m, magnitude=W.reshape(W.shape[0], -1).double().norm(dim=1).float(), dora_axis="out")
    return replace(adapter, modules=modules)


@torch.no_grad()
def carry_tensors(adapter: Adapter, base, tuned, *, biases: bool, norms: bool, whole: bool = False) -> Adapter:
    """Add ``tuned - base`` of biases of adapted modules (``biases``) and of 1-D tensors of other modules (``norms``)
    to ``adapter.tensor_deltas``; with ``whole`` (PEFT), the norm modules' tuned tensors go to ``full_tensors``."""
    b_ckpt, t_ckpt = as_checkpoint(base), as_checkpoint(tuned)
    deltas, full = dict(adapter.tensor_deltas), dict(adapter.full_tensors)
    for key in t_ckpt.keys():
        if key not in b_ckpt or tuple(t_ckpt.shape(key)) != tuple(b_ckpt.shape(key)) or len(t_ckpt.shape(key)) != 1:
            continue
        owner, leaf = key.rsplit(".", 1) if "." in key else ("", key)
        adapted = owner in adapter.modules
        if not ((biases and adapted and leaf == "bias") or (norms and not adapted and leaf in ("weight", "bias"))):
            continue
        t, b = t_ckpt.get(key), b_ckpt.get(key)
        if not t.is_floating_point() or torch.equal(t, b):
            continue
        if norms and not adapted and whole:
            full[key] = t
        else:
            deltas[key] = (t.double() - b.double()).float()
    return replace(adapter, tensor_deltas=deltas, full_tensors=full)

