"""apply: bake weighted adapters into full weights, streaming the base checkpoint tensor by tensor.

    W = W0 + sum_i w_i scale_i B_i A_i        in float32, cast back to W0's dtype (or ``dtype``)

Every check (each module exists in the base with a matching shape) runs before anything is written.
Then each base tensor is read, updated in place a block of rows at a time (``addmm_`` into a float32
copy of the block: no dense delta, no float32 copy of the whole weight) and handed to
:class:`~lowrank_tools.checkpoint.ShardedWriter` inside :func:`~lowrank_tools.checkpoint.atomic_output`;
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

import difflib
import json
import math
import os
import re
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .adapter import LoraModule, ModuleKind
from .io.atomic import header_bound
from .io.checkpoint import Checkpoint, ShardedWriter, as_checkpoint, atomic_output, check_output, parse_size
from .errors import AdapterMismatch, NonFiniteWeight, NumericalError, UsageError
from .io.layers import WORD_EMBEDDINGS, compile_filters, matches
from .linalg.svd import resolve_device
from .linalg.norms import lowrank_frobenius_diff, lowrank_frobenius_norm
from .weighted import WeightedAdapter, as_weighted
from .report import Progress, Warn

__all__ = ["ApplyResult", "Term", "plan_apply", "applied_tensors", "apply"]


_BLOCK_ELEMENTS = 1 << 20  # rows per block: 4 MiB of float32 working memory, one buffer per tensor
_WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf"}
_COMPONENTS = ("unet.", "text_encoder.", "text_encoder_2.", "transformer.")  # diffusers pipeline components
_EMBEDDINGS = tuple(f"{leaf}.weight" for leaf in WORD_EMBEDDINGS)  # input embeddings an output head may be tied to


@dataclass(frozen=True)
class Term:
    """One adapter module's contribution to a base tensor viewed as a (rows, cols) matrix: ``coef * L @ R``."""

    module: str
    source: str
    L: Tensor  # (rows, r): B, or A^T for embeddings
    R: Tensor  # (r, cols): A, or B^T for embeddings
    coef: float  # weight * scale


@dataclass
class ApplyResult:
    output: Path
    files: list[Path]
    tensors: int  # tensors written
    modified: dict[str, list[str]] = field(default_factory=dict)  # tensor -> adapter modules added to it
    replaced: list[str] = field(default_factory=list)  # tensors taken whole from an adapter (modules_to_save)
    copied: list[str] = field(default_factory=list)  # config files copied from the base folder


# --------------------------------------------------------------------------------------------- planning


def _resolve(name: str, base: Checkpoint) -> str | None:
    """The base tensor a module adapts: ``<name>.weight``, or the same without a pipeline component prefix
    (a ``unet.`` adapter applied to the ``unet`` folder)."""
    if f"{name}.weight" in base:
        return f"{name}.weight"
    for component in _COMPONENTS:
        if name.startswith(component) and f"{name[len(component):]}.weight" in base:
            return f"{name[len(component):]}.weight"
    return None


def _missing(name: str, source: str, base: Checkpoint) -> AdapterMismatch:
    close = difflib.get_close_matches(f"{name}.weight", base.keys(), n=1)
    hint = f" (closest: {close[0]})" if close else ""
    return AdapterMismatch(f"{source}: module {name} is not in base {base.path} (no tensor {name}.weight{hint}): "
                           f"use the adapter's base model, or leave it out with --exclude '^{re.escape(name)}$'")


def _term(name: str, m: LoraModule, item: WeightedAdapter, tensor: str, base: Checkpoint) -> Term:
    shape = tuple(base.shape(tensor))
    out, inp = m.matrix_shape
    if m.kind is ModuleKind.EMBEDDING:
        fits = shape == tuple(m.weight_shape)
    else:  # a linear LoRA on a 1x1 conv (or the reverse) fits when the matrix views agree
        fits = len(shape) >= 2 and shape[0] == out and math.prod(shape[1:]) == inp
    if not fits or not base.dtype(tensor).is_floating_point:
        what = f"{base.dtype(tensor)} {shape}".replace("torch.", "")
        raise AdapterMismatch(f"{item.source}: module {name} is {m.kind.value} {tuple(m.weight_shape)} but base "
                              f"tensor {tensor} is {what}: the adapter was made for another model")
    if not (torch.isfinite(m.B).all() and torch.isfinite(m.A).all()):
        raise NonFiniteWeight(f"{item.source}: module {name} holds NaN/Inf factors: repair or re-export the adapter")
    L, R = (m.A.mT, m.B.mT) if m.kind is ModuleKind.EMBEDDING else (m.B, m.A)  # weight (rows, cols) = L @ R
    return Term(module=name, source=item.source, L=L, R=R, coef=float(item.weight) * m.scale)


def _tied_embedding(name: str, m: LoraModule, base: Checkpoint) -> str | None:
    """The input embedding an output head shares when the base stores no weight for it (``tie_word_embeddings``)."""
    if name.rsplit(".", 1)[-1] != "lm_head" or (base.config or {}).get("tie_word_embeddings", True) is False:
        return None
    prefix = name[: -len("lm_head")]
    found = sorted((k for k in base.keys() if k.startswith(prefix) and k.endswith(_EMBEDDINGS)
                    and tuple(base.shape(k)) == tuple(m.weight_shape)), key=len)
    return found[0] if found else None


def _same_product(a: Term, b: Term) -> bool:
    norm = lowrank_frobenius_norm(a.L, a.R, a.coef)
    return lowrank_frobenius_diff(a.L, a.R, a.coef, b.L, b.R, b.coef) <= 1e-5 * norm


def _add_tied_head(plan: dict[str, list[Term]], name: str, m: LoraModule, item: WeightedAdapter,
                   base: Checkpoint) -> None:
    """A head tied to the embedding: its delta goes to the shared weight, once when it repeats the embedding's
    own (extract writes both sides of a tie), else beside it (as PEFT's merge_and_unload does)."""
    emb = _tied_embedding(name, m, base)
    if emb is None:
        raise _missing(name, item.source, base)
    head = _term(name, m, item, emb, base)  # (vocab, r) @ (r, dim) on the embedding weight (vocab, dim)
    if not any(t.source == item.source and _same_product(t, head) for t in plan.get(emb, [])):
        plan.setdefault(emb, []).append(head)


def _add_whole(whole: dict[str, Tensor], item: WeightedAdapter, base: Checkpoint, include, exclude,
               warn: Warn | None) -> None:
    for name, t in item.adapter.full_tensors.items():
        if not matches(name.rsplit(".", 1)[0], include, exclude):
            continue
        if name not in base or tuple(base.shape(name)) != tuple(t.shape):
            got = tuple(base.shape(name)) if name in base else "missing"
            raise AdapterMismatch(f"{item.source}: tensor {name} saved whole has shape {tuple(t.shape)} but the "
                                  f"base has {got}: the adapter was made for another model")
        if warn and (name in whole or item.weight != 1.0):
            warn(f"{item.source}: tensor {name} is saved whole: it replaces the base tensor (weights do not apply)")
        whole[name] = t


def plan_apply(base: Checkpoint, adapters: Sequence[WeightedAdapter], *, include: Sequence[str] = (),
               exclude: Sequence[str] = (), warn: Warn | None = None) -> tuple[dict[str, list[Term]], dict[str, Tensor]]:
    """Check every selected module against the base; return {tensor: terms} and {tensor: whole replacement}.

    An ``lm_head`` the base does not store, tied to its input embedding, adds to the embedding's weight.
    Raises :class:`AdapterMismatch` naming the first module the base lacks or has with another shape."""
    plan: dict[str, list[Term]] = {}
    whole: dict[str, Tensor] = {}
    for item in adapters:
        heads = []
        for name, m in item.adapter.modules.items():
            if not matches(name, include, exclude):
                continue
            tensor = _resolve(name, base)
            if tensor is None:
                heads.append((name, m))
                continue
            plan.setdefault(tensor, []).append(_term(name, m, item, tensor, base))
        for name, m in heads:  # after the embedding's own terms
            _add_tied_head(plan, name, m, item, base)
        _add_whole(whole, item, base, include, exclude, warn)
    return plan, whole


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
        if dtype == torch.float16:  # bf16 has float32's range; float16 overflows past 65504
            _check_overflow(target, block, name)
    return out


def _check_overflow(target: Tensor, block: Tensor, name: str) -> None:
    if math.isinf(float(target.abs().amax())) and bool(torch.isfinite(block).all()):
        raise NumericalError(f"applying the adapters to {name} overflows {target.dtype}: pass --dtype float32")


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
        if whole and name in whole:
            t = whole[name].to(t.dtype).clone()
        target = dtype if dtype is not None and t.is_floating_point() else t.dtype
        if name in plan:
            t = _add_terms(t, plan[name], device=dev, dtype=target, name=name)
        elif target != t.dtype:
            t = t.to(target)
        yield name, t
        del t  # before the next read: one tensor in memory at a time
    if progress:
        progress(len(names), len(names), "")


# --------------------------------------------------------------------------------------------- writing


def _copy_configs(base_path: Path, folder: Path) -> list[str]:
    """Copy the base folder's top-level non-weight files (config.json, tokenizer files, ...)."""
    copied = []
    if not base_path.is_dir():
        return copied
    for entry in sorted(base_path.iterdir()):
        weights = entry.suffix.lower() in _WEIGHT_SUFFIXES or entry.name.endswith(".index.json")
        if entry.is_file() and not weights and not entry.name.startswith("."):
            shutil.copy2(entry, folder / entry.name)
            copied.append(entry.name)
    return copied


def _rename_stem(folder: Path, files: list[Path], stem: str) -> list[Path]:
    """``model*.safetensors`` (+ index) -> ``<stem>*.safetensors``, as diffusers component folders name them."""
    if stem == "model":
        return files
    renamed = {p.name: stem + p.name[len("model"):] for p in files if p.name.endswith(".safetensors")}
    for old, new in renamed.items():
        os.replace(folder / old, folder / new)
    index = folder / "model.safetensors.index.json"
    if not index.exists():
        return [folder / renamed.get(p.name, p.name) for p in files]
    data = json.loads(index.read_text())
    data["weight_map"] = {k: renamed.get(v, v) for k, v in data["weight_map"].items()}
    new_index = folder / f"{stem}.safetensors.index.json"
    new_index.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    index.unlink()
    return [folder / renamed[p.name] for p in files if p.name in renamed] + [new_index]


def _metadata(base: Checkpoint, adapters: Sequence[WeightedAdapter]) -> dict[str, str]:
    meta = {k: v for k, v in base.metadata.items() if k != "format"}
    meta["lowrank_tools.applied"] = json.dumps([{"adapter": a.source, "weight": a.weight} for a in adapters])
    return meta


@torch.no_grad()
def apply(base, adapters: Sequence[WeightedAdapter], output: str | os.PathLike, *,
          shard_size: int | str | None = None, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
          include: Sequence[str] = (), exclude: Sequence[str] = (), force: bool = False,
          inputs: Sequence[str | os.PathLike] = (), progress: Progress | None = None,
          warn: Warn | None = None) -> ApplyResult:
    """Write ``base + sum_i w_i scale_i B_i A_i`` to ``output``: a ``.safetensors`` file when the name ends so,
    else an HF folder with shards of at most ``shard_size`` (default ``"5GB"`` = 5*10^9 bytes; ``"500MiB"``;
    a size with a ``.safetensors`` output is a :class:`UsageError`: one file has no shards).

    ``base``: a checkpoint path, :class:`Checkpoint` or name -> tensor mapping (not a diffusers pipeline).
    Modules filtered out by ``include`` / ``exclude`` are not applied. ``inputs``: paths the output may
    not overwrite (the base and adapters). Nothing is written when any check fails.
    """
    output = Path(output)
    if output.suffix == ".safetensors" and shard_size is not None:
        raise UsageError(f"--shard-size {shard_size} needs a folder output, but -o {output} is one .safetensors "
                         f"file: drop --shard-size, or give a folder to write shards into")
    size = None if output.suffix == ".safetensors" else parse_size(shard_size if shard_size is not None else "5GB")
    include, exclude = compile_filters(include, "--include"), compile_filters(exclude, "--exclude")
    check_output(output, force=force, inputs=[*inputs, *([base] if isinstance(base, (str, os.PathLike)) else [])])
    ckpt = as_checkpoint(base)
    if ckpt.components:
        raise UsageError(f"base {ckpt.path} is a diffusers pipeline: apply writes one model, so give one component "
                         f"folder (e.g. {ckpt.path / next(iter(ckpt.components))}) and keep its modules with --include")
    items = as_weighted(adapters)
    plan, whole = plan_apply(ckpt, items, include=include, exclude=exclude, warn=warn)
    with atomic_output(output, force=force, inputs=inputs) as tmp:
        files, count = _write(ckpt, items, plan, whole, tmp, shard_size=size, dtype=dtype, device=device,
                              progress=progress)
    files = [output if size is None else output / Path(f).name for f in files]
    copied = [f.name for f in files if f.suffix != ".safetensors" and not f.name.endswith(".index.json")]
    modified = {k: [t.module for t in v] for k, v in plan.items()}
    return ApplyResult(output=output, files=files, tensors=count, modified=modified, replaced=sorted(whole),
                       copied=copied)


def _write(ckpt: Checkpoint, items: Sequence[WeightedAdapter], plan, whole, tmp: Path, *, shard_size: int | None,
           dtype: torch.dtype | None, device, progress: Progress | None) -> tuple[list[Path], int]:
    """Stream the applied tensors into ``tmp`` (a file, or a folder with the base folder's configs)."""
    metadata = _metadata(ckpt, items)
    entries = [(k, dtype if dtype is not None and ckpt.dtype(k).is_floating_point else ckpt.dtype(k), ckpt.shape(k))
               for k in ckpt.keys()]
    reserve = header_bound(entries, metadata)  # every name and shape is known: the writer streams from the start
    count = 0
    with ShardedWriter(tmp, shard_size=shard_size, metadata=metadata, header_reserve=reserve) as writer:
        for name, tensor in applied_tensors(ckpt, plan, whole, device=device, dtype=dtype, progress=progress):
            writer.add(name, tensor)
            count += 1
            del tensor  # one tensor in memory at a time
    files = writer.close()
    if shard_size is None:
        return files, count
    stem = "diffusion_pytorch_model" if any(ckpt.path.glob("diffusion_pytorch_model*")) else "model"
    copied = _copy_configs(ckpt.path, tmp)
    return _rename_stem(tmp, files, stem) + [tmp / name for name in copied], count
