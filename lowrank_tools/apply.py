"""apply: bake weighted adapters into full weights, streaming the base checkpoint tensor by tensor.

    W = W0 + sum_i w_i scale_i B_i A_i        in float32, cast back to W0's dtype (or ``dtype``)

An fp8 W0 (plain or ComfyUI-scaled, read dequantized: :mod:`lowrank_tools.io.fp8`) is written as bfloat16 unless
``dtype`` says otherwise: fp8 + delta cannot stay fp8 without requantizing, and bf16 holds every fp8 value exactly.

Every check (each module exists in the base with a matching shape: :mod:`lowrank_tools.apply_plan`) runs before
anything is written.
Then each base tensor is read, updated in place a block of rows at a time (``addmm_`` into a float32
copy of the block: no dense delta, no float32 copy of the whole weight) and handed to
:class:`~lowrank_tools.io.checkpoint.ShardedWriter` inside :func:`~lowrank_tools.io.checkpoint.atomic_output`;
tensors no adapter touches are copied unchanged. Every name and shape being known, the writer reserves the
header up front and writes each tensor straight to disk: peak memory is about one base tensor, one block and
the adapters.

The output is one ``.safetensors`` file, or an HF folder: shards + ``model.safetensors.index.json`` and
the base folder's config files (``diffusion_pytorch_model*`` names when the base folder used them). A
diffusers pipeline base is refused: apply to one component folder (``BASE/unet``) at a time; adapter
names with that component's prefix (``unet.``) map onto it (load kohya files with ``load_adapter(path, base=...)``
so that their keys are matched to the base's module names).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .apply_plan import Term, plan_apply
from .io.atomic import all_finite, header_bound
from .io.checkpoint import Checkpoint, ShardedWriter, as_checkpoint, atomic_output, check_output, parse_size
from .errors import AdapterMismatch, NonFiniteWeight, NumericalError, UsageError
from .io.layers import compile_filters
from .linalg.svd import resolve_device
from .linalg.norms import delta_stats
from .io.outputs import OutputTransaction
from .io.model_folder import config_files, copy_config_files, rename_stem, shard_stem
from .io.replaceable import COPIED_KEY
from .linalg.structured import dora_rescale_
from .weighted import WeightedAdapter, as_weighted
from .report import Progress, Warn

__all__ = ["ApplyResult", "Term", "plan_apply", "applied_tensors", "apply"]


_BLOCK_ELEMENTS = 1 << 20  # rows per block: 4 MiB of float32 working memory, one buffer per tensor


@dataclass
class ApplyResult:
    output: Path
    files: list[Path]
    tensors: int  # tensors written
    modified: dict[str, list[str]] = field(default_factory=dict)  # tensor -> adapter modules added to it
    replaced: list[str] = field(default_factory=list)  # tensors taken whole from an adapter (modules_to_save)
    copied: list[str] = field(default_factory=list)  # config files copied from the base folder
    changes: dict[str, dict] = field(default_factory=dict)  # tensor -> delta_stats (apply(measure=True))


# --------------------------------------------------------------------------------------------- the math


@torch.no_grad()
def _add_terms(W: Tensor, terms: Sequence[Term], *, device: torch.device, dtype: torch.dtype, name: str) -> Tensor:
    """``W + sum coef * L @ R`` in float32 a block of rows at a time, cast to ``dtype``; W (rows, ...) is
    updated in place when ``dtype`` is its own (it is a fresh buffer from the checkpoint reader)."""
    out = W if dtype == W.dtype else torch.empty(W.shape, dtype=dtype)
    rows = W.shape[0]
    M, O = W.reshape(rows, -1), out.reshape(rows, -1)  # (rows, cols) views, no copies
    # float32 math whatever the stored dtype: bf16/fp16 products and sums lose digits otherwise
    factors = [(t.L.to(device, torch.float32) * t.coef, t.R.to(device, torch.float32)) for t in terms]  # (rows, r), (r, cols)
    step = max(1, _BLOCK_ELEMENTS // max(1, M.shape[1]))
    in_place = M.dtype == torch.float32 and M.device == device  # float32 on the device: add into W itself
    work = None if in_place else torch.empty((min(step, rows), M.shape[1]), dtype=torch.float32, device=device)
    for i in range(0, rows, step):
        rows_i = M[i:i + step]  # (b, cols)
        block = rows_i if work is None else work[:rows_i.shape[0]].copy_(rows_i)  # one buffer, reused
        for L, R in factors:
            block.addmm_(L[i:i + step], R)  # in place: block += L_b @ R
        target = O[i:i + step]
        if block.data_ptr() != target.data_ptr():
            target.copy_(block)  # the cast to the stored dtype (and the move back to CPU), no temporary
        _check_overflow(target, block, name, terms)
    return out


@torch.no_grad()
def _add_terms_dora(W: Tensor, terms: Sequence[Term], *, device: torch.device, dtype: torch.dtype, name: str) -> Tensor:
    """DoRA: ``W' = W0 + sum coef L @ R`` (all terms, in float32), then each output row (``axis="out"``: PEFT, LyCORIS)
    or input channel (``"in"``: LyCORIS' legacy ``wd_on_out=False``) scaled by ``w (m / ||W'|| - 1) + 1``, which is
    ``m / ||W'||`` at weight 1 (PEFT's ``m * W' / ||W' ||_row``; PEFT adds no epsilon, LyCORIS adds float32 eps: the
    two agree to float32 rounding on any row that is not ~0). One float32 copy of the tensor."""
    dora = [t for t in terms if t.magnitude is not None]
    if len(dora) > 1:
        raise AdapterMismatch(f"tensor {name} gets DoRA modules from {dora[0].source} and {dora[1].source}: two "
                              f"magnitudes for one weight are not defined; apply them one after another")
    d = dora[0]
    work = _add_terms(W, terms, device=device, dtype=torch.float32, name=name)  # W' (float32, fresh or in place)
    M = work.reshape(work.shape[0], -1).to(device)  # (out, in_flat); a Conv1D's (in, out): rescaled on its .mT
    M = dora_rescale_(M.mT if d.conv1d else M, d.magnitude, d.axis, d.weight)
    out = (M.mT if d.conv1d else M).reshape(W.shape).to("cpu", dtype)
    _check_overflow(out, M, name, terms)
    return out


def _check_overflow(target: Tensor, block: Tensor, name: str, terms: Sequence[Term]) -> None:
    """Every written value finite: the float32 sum (a huge weight) or its cast (float16 stops at 65504)."""
    if all_finite(target):
        return
    if not all_finite(block):  # the base is finite (checked when read): the adapters overflowed
        coef = max(abs(t.coef) for t in terms)
        raise NumericalError(f"applying the adapters to {name} overflows float32 (weight x scale up to {coef:.3g}): "
                             f"use smaller adapter weights")
    raise NumericalError(f"applying the adapters to {name} overflows {target.dtype}: pass --dtype float32")


def _check_input(t: Tensor, what: str) -> None:
    """A tensor read that already holds NaN/Inf is refused, naming it: apply writes only finite tensors."""
    if not all_finite(t):
        bad = int((~torch.isfinite(t)).sum())
        raise NonFiniteWeight(f"{what} holds {bad} NaN/Inf values: apply writes only finite tensors: repair or "
                              f"re-export it")


def _cast(t: Tensor, dtype: torch.dtype, what: str) -> Tensor:
    """``t`` as ``dtype``; a value past the new dtype's range is an error naming the tensor (``what``)."""
    if dtype == t.dtype:
        return t
    out = t.to(dtype)
    if not all_finite(out):
        peak = float(t.detach().abs().amax())
        raise NumericalError(f"{what} holds values up to {peak:.4g}, past the range of {dtype}: pass --dtype float32, "
                             f"or --dtype auto to keep each tensor's own dtype")
    return out


def applied_tensors(base: Checkpoint, plan: Mapping[str, Sequence[Term]], whole: Mapping[str, Tensor] | None = None,
                    *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                    progress: Progress | None = None) -> Iterator[tuple[str, Tensor]]:
    """Yield ``(name, tensor)`` for every base tensor in file order, one at a time, adapters added.

    ``dtype`` casts every floating tensor written (default: each keeps its own dtype)."""
    dev = resolve_device(device)
    names = base.keys()
    for i, name in enumerate(names):
        if progress:
            progress(i, len(names), name)
        t = base.get(name)
        _check_input(t, f"base tensor {name} in {base.path}")
        # no dtype asked: each tensor keeps its stored dtype (fp8, read dequantized, is written as bfloat16)
        target = dtype if dtype is not None and t.is_floating_point() else base.write_dtype(name)
        if whole and name in whole:
            what = f"tensor {name} saved whole in the adapter"
            _check_input(whole[name], what)
            t = _cast(whole[name], target, what).clone()
        if name in plan:
            add = _add_terms_dora if any(term.magnitude is not None for term in plan[name]) else _add_terms
            t = add(t, plan[name], device=dev, dtype=target, name=name)
        else:  # untouched: the very bytes read (byte for byte), or their cast to --dtype
            t = _cast(t, target, f"base tensor {name}")
        yield name, t
        del t  # before the next read: one tensor in memory at a time
    if progress:
        progress(len(names), len(names), "")


# --------------------------------------------------------------------------------------------- writing


def _metadata(base: Checkpoint, adapters: Sequence[WeightedAdapter], copied: Sequence[str]) -> dict[str, str]:
    """The base's metadata, the adapters applied and (a folder) the config files copied: the last tells a later
    ``--force`` that those files are ours to replace (:func:`~lowrank_tools.outputs.foreign_entries`)."""
    meta = {k: v for k, v in base.metadata.items() if k not in ("format", COPIED_KEY)}
    meta["lowrank_tools.applied"] = json.dumps([{"adapter": a.source, "weight": a.weight} for a in adapters], allow_nan=False)
    if copied:
        meta[COPIED_KEY] = json.dumps(list(copied), allow_nan=False)
    return meta


@torch.no_grad()
def apply(base, adapters: Sequence[WeightedAdapter], output: str | os.PathLike, *,
          shard_size: int | str | None = None, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
          include: Sequence[str] = (), exclude: Sequence[str] = (), force: bool = False,
          inputs: Sequence[str | os.PathLike] = (), progress: Progress | None = None,
          warn: Warn | None = None, transaction: OutputTransaction | None = None,
          measure: bool = False) -> ApplyResult:
    """Write ``base + sum_i w_i scale_i B_i A_i`` to ``output``: a ``.safetensors`` file when the name ends so,
    else an HF folder with shards of at most ``shard_size`` (default ``"5GB"`` = 5*10^9 bytes; ``"500MiB"``;
    a size with a ``.safetensors`` output is a :class:`UsageError`: one file has no shards).

    ``base``: a checkpoint path, :class:`Checkpoint` or name -> tensor mapping (not a diffusers pipeline).
    Modules filtered out by ``include`` / ``exclude`` are not applied. ``inputs``: paths the output may
    not overwrite (the base and adapters). Nothing is written when any check fails. ``transaction``: the output
    is installed with the run's other outputs when it commits. ``measure``: fill ``ApplyResult.changes`` with each
    changed tensor's max |dW|, ||dW||_F and ||W0||_F (one more read of each changed base tensor).
    """
    output = Path(output)
    if output.suffix == ".safetensors" and shard_size is not None:
        raise UsageError(f"--shard-size {shard_size} needs a folder output, but -o {output} is one .safetensors "
                         f"file: drop --shard-size, or give a folder to write shards into")
    size = None if output.suffix == ".safetensors" else parse_size(shard_size if shard_size is not None else "5GB")
    include, exclude = compile_filters(include, "--include"), compile_filters(exclude, "--exclude")
    check_output(output, force=force, inputs=[*inputs, *([base] if isinstance(base, (str, os.PathLike)) else [])])
    ckpt = as_checkpoint(base, split_qkv=False)  # written in its own layout: fused q/k/v stay fused
    if ckpt.components:
        raise UsageError(f"base {ckpt.path} is a diffusers pipeline: apply writes one model, so give one component "
                         f"folder (e.g. {ckpt.path / next(iter(ckpt.components))}) and keep its modules with --include")
    items = as_weighted(adapters)
    plan, whole = plan_apply(ckpt, items, include=include, exclude=exclude, warn=warn)
    changes: dict[str, dict] = {}
    with atomic_output(output, force=force, inputs=inputs, transaction=transaction) as tmp:
        files, count = _write(ckpt, items, plan, whole, tmp, shard_size=size, dtype=dtype, device=device,
                              progress=progress, changes=changes if measure else None)
    files = [output if size is None else output / Path(f).name for f in files]
    copied = [f.name for f in files if f.suffix != ".safetensors" and not f.name.endswith(".index.json")]
    modified = {k: [t.module for t in v] for k, v in plan.items()}
    return ApplyResult(output=output, files=files, tensors=count, modified=modified, replaced=sorted(whole),
                       copied=copied, changes=changes)


def _write(ckpt: Checkpoint, items: Sequence[WeightedAdapter], plan, whole, tmp: Path, *, shard_size: int | None,
           dtype: torch.dtype | None, device, progress: Progress | None,
           changes: dict[str, dict] | None) -> tuple[list[Path], int]:
    """Stream the applied tensors into ``tmp`` (a file, or a folder with the base folder's configs); with
    ``changes``, measure each changed tensor against the base."""
    copied = config_files(ckpt.path) if shard_size is not None else []
    metadata = _metadata(ckpt, items, copied)
    entries = [(k, dtype if dtype is not None and ckpt.dtype(k).is_floating_point else ckpt.write_dtype(k),
                ckpt.shape(k)) for k in ckpt.keys()]
    reserve = header_bound(entries, metadata)  # every name and shape is known: the writer streams from the start
    count = 0
    with ShardedWriter(tmp, shard_size=shard_size, metadata=metadata, header_reserve=reserve) as writer:
        for name, tensor in applied_tensors(ckpt, plan, whole, device=device, dtype=dtype, progress=progress):
            writer.add(name, tensor)
            if changes is not None and (name in plan or name in whole):
                sources = list(dict.fromkeys(t.source for t in plan.get(name, ())))
                changes[name] = {**delta_stats(ckpt.get(name), tensor), "adapters": sources}
            count += 1
            del tensor  # one tensor in memory at a time
    files = writer.close()
    if shard_size is None:
        return files, count
    stem = shard_stem(ckpt.path)
    copy_config_files(ckpt.path, tmp, copied, dequantized=ckpt.dequantized)  # fp8 written bf16: no quantization_config
    return rename_stem(tmp, files, stem) + [tmp / name for name in copied], count
