"""Run a model over texts with a forward hook on every ``nn.Linear``, transformers ``Conv1D`` (GPT-2 family),
``nn.Conv1d`` and ``nn.Conv2d`` and sum ``X^T X`` of each distinct input.

A transformers ``Conv1D`` computes ``x @ W + b`` with its weight stored (in, out): its input is the in side, rows
``(tokens, in)`` exactly as an ``nn.Linear``'s, so its statistics are the (in, in) ``X^T X`` that extract whitens
the (out, in) delta with (extract lays the weight out as (out, in) itself: see :mod:`lowrank_tools.io.layers`).

Protocol: every text is tokenized on its own and truncated to ``max_length`` tokens, batched with right padding
(as evaluate does); a hook sees each Linear's input ``x (batch, seq, in)`` and adds ``x_m^T x_m``, where
``x_m (tokens, in)`` keeps the real (unpadded) positions only: one batch's product in float32 as the model computes
(twice as fast as float64, within ~1e-7 of it), the running sum in float64. Modules that read the same tensor object in a
forward pass (q/k/v after one norm; gate/up) are found on the first batch and share one matrix: only the first of
them (the group's key) accumulates.

Convolutions (``groups == 1``; grouped and depthwise ones are left to plain SVD): the rows are the receptive
fields of every output position, ``F.unfold`` of the padded input, each flattened ``(in, kh, kw)`` like the
weight's ``(out, in * kh * kw)`` matrix view, so that ``||conv(x, W)||^2 = tr(W C W^T)``; every position is summed
(a conv's input has no token mask). Convs share a matrix only with convs of the same geometry on the same tensor.

Memory: one float64 ``(in, in)`` matrix per distinct input, on the model's device, for the whole run: ``8 * sum
in^2`` bytes. For a 3-block Llama of width 32 that is nothing; for an 8B Llama (32 blocks; inputs 4096 x 3 and 14336
per block) it is 32 * 8 * (3 * 4096^2 + 14336^2) bytes ~= 65 GB, more than the model: such a model needs a
machine with that much device (or, with ``--device cpu``, host) memory until per-block passes exist.
"""

from __future__ import annotations

import math
import os
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..errors import DataError, InvalidOption, Warn
from ..io.calibration import InputStats
from ..io.checkpoint import as_checkpoint
from ..io.models import is_conv1d_layer, load_model, load_tokenizer, model_kind, padded_batches, token_ids
from ..linalg.svd import resolve_device
from ..report import Progress

__all__ = ["Calibration", "calibrate", "conv_patches"]

@dataclass
class Calibration:
    """What :func:`calibrate` measured: one :class:`~lowrank_tools.io.calibration.InputStats` per distinct input."""

    stats: list[InputStats]
    samples: int
    tokens: int  # real tokens run through the model
    unmasked: list[str]  # modules whose input was not (batch, seq, in): every row was summed, padding included
    wall_time_s: float = 0.0


class _Hooks:
    """The forward hooks and the sums; ``mask`` (batch, seq) bool is set before each forward pass."""

    def __init__(self, model: nn.Module, prefix: str = ""):
        self.mask: Tensor | None = None
        self.prefix = prefix  # put before every module name (see checkpoint_prefix)
        self.sums: dict[str, Tensor] = {}  # key -> (in, in) float64
        self.tokens: dict[str, int] = {}
        self.groups: dict[str, list[str]] = {}
        self.member: dict[str, str | None] = {}  # module -> its group's key (None: not seen yet)
        self.seen: dict[int, tuple[weakref.ref, str]] = {}  # id(input) -> (its weak reference, key): first batch
        self.unmasked: set[str] = set()
        self.handles = [m.register_forward_hook(self._hook(prefix + name)) for name, m in model.named_modules()
                        if _is_linear(m) or (isinstance(m, (nn.Conv1d, nn.Conv2d)) and m.groups == 1)]

    def _hook(self, name: str):
        def hook(module, args, output):
            if not args or not isinstance(args[0], Tensor):
                return
            self.add(name, args[0], module)
        return hook

    def add(self, name: str, x: Tensor, module: nn.Module | None = None) -> None:
        key = self.member.get(name)
        if key is None:  # first call: same tensor (still alive) and geometry as an earlier module's -> its group
            seen = (id(x), _geometry(module))
            ref = self.seen.get(seen)
            key = ref[1] if ref is not None and ref[0]() is x else name
            self.member[name] = key
            self.groups.setdefault(key, []).append(name)
            if key != name:
                return
            self.seen[seen] = (weakref.ref(x), key)
        if key != name:
            return  # a member of another module's group: the key sums this input
        rows = conv_patches(module, x) if isinstance(module, (nn.Conv1d, nn.Conv2d)) else self._rows(name, x)
        rows = rows.to(torch.float64 if rows.dtype == torch.float64 else torch.float32)  # (tokens, in_flat)
        if name not in self.sums:
            self.sums[name] = torch.zeros(rows.shape[1], rows.shape[1], dtype=torch.float64, device=x.device)
            self.tokens[name] = 0
        self.sums[name] += rows.mT @ rows  # (in, in): one batch's X^T X in the model's float32, summed in float64
        self.tokens[name] += rows.shape[0]

    def _rows(self, name: str, x: Tensor) -> Tensor:
        mask = self.mask
        if mask is not None and x.ndim == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
            return x[mask]  # real positions only
        self.unmasked.add(name)
        return x.reshape(-1, x.shape[-1])

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def _is_linear(module: nn.Module) -> bool:
    """An ``nn.Linear``, or a transformers ``Conv1D`` (a linear layer whose weight is stored (in, out))."""
    return isinstance(module, nn.Linear) or is_conv1d_layer(module)


def checkpoint_prefix(net: nn.Module, model: str | os.PathLike) -> str:
    """``"bert."`` when the model's files name its tensors under ``base_model_prefix`` but ``net`` (loaded as
    ``AutoModel``) does not: the statistics then carry the names extract reads in the checkpoint; else ``""``."""
    prefix = getattr(net, "base_model_prefix", "") or ""
    if not prefix or any(name.startswith(prefix + ".") for name, _ in net.named_parameters()):
        return ""
    names = as_checkpoint(model).keys()
    own = {name for name, _ in net.named_parameters()}
    return prefix + "." if any(n.startswith(prefix + ".") and n[len(prefix) + 1:] in own for n in names) else ""


def _geometry(module: nn.Module | None) -> tuple:
    """What must match, besides the tensor, for two modules to share statistics: nothing for Linear layers."""
    if not isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return ()
    return (type(module).__name__, module.kernel_size, module.stride, module.dilation, str(module.padding),
            module.padding_mode)


def conv_patches(module: nn.Conv1d | nn.Conv2d, x: Tensor) -> Tensor:
    """The rows ``(positions, in * prod(kernel))`` of a conv input ``x (N, in, *spatial)`` (or unbatched): the
    receptive field of every output position, padded as the module pads, in the layout of its weight's matrix view
    ``(out, in * prod(kernel))``, so that ``conv(x, W)`` at each position is ``W_flat @ row``. ``groups == 1``."""
    if module.groups != 1:
        raise ValueError(f"conv_patches needs groups == 1, got {module.groups}")
    two_d = isinstance(module, nn.Conv2d)
    if x.ndim == (3 if two_d else 2):
        x = x.unsqueeze(0)  # unbatched input
    pads = module._reversed_padding_repeated_twice  # what the module pads (ints, 'same', 'valid'; any mode)
    if any(pads):
        x = F.pad(x, pads, mode="constant" if module.padding_mode == "zeros" else module.padding_mode)
    kernel, dilation, stride = module.kernel_size, module.dilation, module.stride
    if not two_d:  # (N, in, L) -> (N, in, 1, L), kernel (1, k): the rows keep the weight's (in, k) order
        x, kernel, dilation, stride = x.unsqueeze(2), (1, *kernel), (1, *dilation), (1, *stride)
    patches = F.unfold(x, kernel, dilation=dilation, stride=stride)  # (N, in * prod(kernel), positions)
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])


def _without_logits(net: nn.Module, hooks: _Hooks):
    """The forward pass to run: for a causal LM whose output head is an ``nn.Linear`` fed by its base model's last
    hidden state (Llama, Mistral, Qwen, GPT-2, ...), the base model only, the head's statistics summed from that
    state: the (batch, seq, vocab) logits are never computed (a sixth of a 135M model's work, 200 MB a batch)."""
    head = net.get_output_embeddings() if hasattr(net, "get_output_embeddings") else None
    base = getattr(net, getattr(net, "base_model_prefix", "") or "", None)
    name = next((n for n, m in net.named_modules() if m is head), None)
    if not isinstance(head, nn.Linear) or not isinstance(base, nn.Module) or base is net or not name:
        return net

    def forward(**inputs):
        out = base(**inputs)
        hooks.add(hooks.prefix + name, out[0], head)  # last_hidden_state: the head's input
    return forward


def _check_options(max_length: int, batch_size: int) -> None:
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise InvalidOption(f"--max-length {max_length!r} must be a whole number of 1 or more")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidOption(f"--batch-size {batch_size!r} must be a whole number of 1 or more")


@torch.no_grad()
def calibrate(model: str | os.PathLike, *, texts: Sequence[str], max_length: int = 128, batch_size: int = 8,
              device: str | torch.device = "auto", progress: Progress | None = None, warn: Warn | None = None) -> Calibration:
    """Sum ``X^T X`` (float64) of the real-token inputs of every ``nn.Linear`` (and conv patches) of the model folder
    ``model`` over ``texts`` (see the module doc). ``progress`` hears (done, total, label) per batch."""
    _check_options(max_length, batch_size)
    start = time.perf_counter()
    dev = resolve_device(device)
    kind = model_kind(model)
    tokenizer = load_tokenizer(model)
    ids, skipped = token_ids(tokenizer, texts, max_length, 1)
    if not ids:
        raise DataError("every text is empty once tokenized: nothing to run; give longer texts")
    if skipped and warn:
        warn(f"{skipped} empty text(s) left out")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    net = load_model(model, kind, dev)
    hooks = _Hooks(net, checkpoint_prefix(net, model))
    if not hooks.handles:
        raise InvalidOption(f"{model} has no nn.Linear, Conv1D, nn.Conv1d or nn.Conv2d layer: nothing to calibrate")
    total = math.ceil(len(ids) / batch_size)
    forward = _without_logits(net, hooks)
    try:
        for done, (input_ids, mask) in enumerate(padded_batches(ids, batch_size, pad, dev)):
            if progress:
                progress(done, total, f"batch {done + 1}")
            hooks.mask = mask.bool()
            forward(input_ids=input_ids, attention_mask=mask)
            hooks.seen.clear()  # groups are decided on the first batch; ids of freed tensors are reused later
    finally:
        hooks.close()
    if progress:
        progress(total, total, "")
    stats = [InputStats(tuple(hooks.groups[key]), hooks.sums.pop(key).cpu(), hooks.tokens[key])
             for key in list(hooks.sums)]
    return Calibration(stats=stats, samples=len(ids), tokens=sum(len(x) for x in ids),
                       unmasked=sorted(hooks.unmasked), wall_time_s=time.perf_counter() - start)
