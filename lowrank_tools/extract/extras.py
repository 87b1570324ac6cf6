"""What ``extract`` can carry beside the low-rank factors: DoRA magnitudes, bias and norm deltas.

- ``--dora``: each module gets ``m = ||W'||_row`` (the tuned weight's row norms), its factors stay the truncated
  delta: the DoRA weight ``m (W0 + s B A) / ||W0 + s B A||_row`` then has the tuned row norms exactly, and only the
  direction is approximated. Whether that beats plain LoRA at equal parameters depends on the pair (see the tests:
  rank r DoRA against rank r + 1 LoRA).
- ``--keep-bias``: ``tuned.bias - base.bias`` of every adapted module (PEFT ``lora_B.bias``, kohya ``diff_b``).
- ``--keep-norms``: deltas of 1-D weights and biases of modules without factors (norm layers): kohya ``w_norm`` /
  ``b_norm``; for PEFT they are saved whole instead (``modules_to_save``: the tuned tensors).
Tensors are read one at a time from the checkpoints (lazy readers).

The carried tensors count: under ``--budget`` their parameters (:func:`carried_budget`, an upper bound taken before
the factors' allocation) come out of the budget, so factors + carried tensors stay within it; the report's ``params``
includes them and ``carried_params`` / ``carried_tensors`` say how many (:func:`count_carried`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from ..adapter import Adapter, ModuleKind, matrix_shape, matrix_view
from ..io.checkpoint import as_checkpoint
from ..io.layers import compile_filters, conv1d_rule, layer_kind, matches

__all__ = ["with_magnitudes", "carry_tensors", "carried_budget", "count_carried"]


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
        modules[name] = m if W is None else replace(  # rows of the (out, in_flat) view (a Conv1D's columns)
            m, magnitude=matrix_view(W, m.kind).double().norm(dim=1).float(), dora_axis="out")
    return replace(adapter, modules=modules)


def _changed(b_ckpt, t_ckpt, adapted, *, biases: bool, norms: bool):
    """``(key, adapted owner?, tuned, base)`` of every changed float 1-D tensor the flags carry; ``adapted(owner)``
    says whether the owner module has factors."""
    for key in t_ckpt.keys():
        if key not in b_ckpt or tuple(t_ckpt.shape(key)) != tuple(b_ckpt.shape(key)) or len(t_ckpt.shape(key)) != 1:
            continue
        owner, leaf = key.rsplit(".", 1) if "." in key else ("", key)
        owned = adapted(owner)
        if not ((biases and owned and leaf == "bias") or (norms and not owned and leaf in ("weight", "bias"))):
            continue
        t, b = t_ckpt.get(key), b_ckpt.get(key)
        if t.is_floating_point() and not torch.equal(t, b):
            yield key, owned, t, b


@torch.no_grad()
def carry_tensors(adapter: Adapter, base, tuned, *, biases: bool, norms: bool, whole: bool = False) -> Adapter:
    """Add ``tuned - base`` of biases of adapted modules (``biases``) and of 1-D tensors of other modules (``norms``)
    to ``adapter.tensor_deltas``; with ``whole`` (PEFT), the norm modules' tuned tensors go to ``full_tensors``."""
    deltas, full = dict(adapter.tensor_deltas), dict(adapter.full_tensors)
    for key, owned, t, b in _changed(as_checkpoint(base), as_checkpoint(tuned), adapter.modules.__contains__,
                                     biases=biases, norms=norms):
        if not owned and whole:
            full[key] = t
        else:
            deltas[key] = (t.double() - b.double()).float()
    return replace(adapter, tensor_deltas=deltas, full_tensors=full)


@torch.no_grad()
def carried_budget(base, tuned, *, biases: bool, norms: bool, dora: bool = False, include: Sequence[str] = (),
                   exclude: Sequence[str] = ()) -> int:
    """Parameters ``carry_tensors`` / ``with_magnitudes`` can add, known before the extraction (shapes and 1-D
    tensors only): a module counts as adapted when its ``.weight`` is a matrix or kernel of one shape in both
    checkpoints that the filters keep, what extract factors; with ``dora`` each non-embedding one adds its output
    size. An upper bound of what is carried (a module with no change or left at rank 0 gets no magnitude and
    carries no --keep-bias bias), so the budget holds."""
    b_ckpt, t_ckpt = as_checkpoint(base), as_checkpoint(tuned)
    include, exclude = compile_filters(include, "--include"), compile_filters(exclude, "--exclude")
    conv1d = conv1d_rule(b_ckpt, t_ckpt)

    def kind(owner: str):
        key = f"{owner}.weight"
        if key not in t_ckpt or key not in b_ckpt or tuple(t_ckpt.shape(key)) != tuple(b_ckpt.shape(key)):
            return None
        if not matches(owner, include, exclude):
            return None
        return layer_kind(key, t_ckpt.shape(key), conv1d=bool(conv1d(key)))
    total = sum(t.numel() for _, _, t, _ in _changed(b_ckpt, t_ckpt, lambda o: kind(o) is not None, biases=biases,
                                                      norms=norms))
    if dora:
        owners = {k.rsplit(".", 1)[0] for k in t_ckpt.keys() if k.endswith(".weight")}
        total += sum(matrix_shape(t_ckpt.shape(f"{o}.weight"), kind(o))[0] for o in owners
                     if kind(o) not in (None, ModuleKind.EMBEDDING))
    return total


def count_carried(before: Adapter, after: Adapter) -> dict:
    """What ``after`` carries beyond ``before``'s factors: tensors (bias / norm deltas, norm tensors saved whole,
    DoRA magnitudes) and their parameters, as the report's ``carried_tensors`` / ``carried_params``."""
    tensors = [v for k, v in after.tensor_deltas.items() if k not in before.tensor_deltas]
    tensors += [v for k, v in after.full_tensors.items() if k not in before.full_tensors]
    tensors += [m.magnitude for n, m in after.modules.items()
                if m.magnitude is not None and before.modules[n].magnitude is None]
    return {"carried_tensors": len(tensors), "carried_params": sum(int(t.numel()) for t in tensors)}

