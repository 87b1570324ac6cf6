"""Load and save adapters in whatever format: one :class:`Adapter` type in memory.

- PEFT folder (``adapter_config.json`` + ``adapter_model.safetensors``), written by PEFT, mergekit or us;
- diffusers LoRA file (``pytorch_lora_weights.safetensors``: ``unet.<module>.lora_A.weight``, LoraConfigs in
  its metadata) or any single file of PEFT-style keys;
- kohya / A1111 / ComfyUI safetensors file (``lora_down`` / ``lora_up`` / ``alpha``).

Saving in ``peft`` format writes a PEFT folder, or for a diffusers pipeline's adapter (every module under
``unet.`` / ``text_encoder.`` / ``text_encoder_2.`` / ``transformer.``, and no evidence of one model: see
:func:`~lowrank_tools.io.diffusers_lora.is_diffusers_adapter`) a folder holding diffusers'
``pytorch_lora_weights.safetensors``, which ``pipe.load_lora_weights(folder)`` loads. A kohya file cannot hold
transformers ``Conv1D`` modules (GPT-2: weight stored (in, out)): refused, naming one. Every write goes through
:func:`~lowrank_tools.io.checkpoint.atomic_output`: a temporary name beside the target, renamed into place at the end.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import replace
from enum import Enum
from pathlib import Path

import torch

from ..adapter import Adapter, ModuleKind, module_name
from .checkpoint import Checkpoint, as_checkpoint, atomic_output, open_checkpoint
from ..errors import AdapterFormatError, CheckpointNotFound, ConversionError, UsageError
from .adapter_extras import check_peft_extras
from .architectures import detect_architecture, needs_base
from .layers import NOT_HELD, compile_filters, kohya_refuses_conv1d, matches
from .kohya import is_kohya_keys, kohya_state_dict, read_kohya, write_kohya
from .lycoris import fit_kernels, is_lycoris_keys, read_lycoris, read_peft_lycoris
from .diffusers_lora import (DIFFUSERS_COMPONENTS, DIFFUSERS_NAME, is_diffusers_adapter, pipeline_components,
                             read_peft_file, write_diffusers, lone_component)
from .peft import WEIGHTS_NAME, is_peft_folder, lora_keys_seen, peft_folder_parts, read_peft, write_peft

__all__ = ["AdapterFormat", "load_adapter", "save_adapter", "detect_format", "describe_adapter", "describe_modules",
           "check_target", "output_format", "fit_format", "fit_all", "left_out_warning", "select_modules", "LEFT_OUT",
           "LEFT_OUT_WHOLE", "check_kohya_target", "in_output_naming"]


class AdapterFormat(str, Enum):
    PEFT = "peft"
    KOHYA = "kohya"


# report.skipped reasons of what an output format cannot hold (the same words in extract, convert, resize and merge)
LEFT_OUT = NOT_HELD
LEFT_OUT_WHOLE = "saved whole (the target format cannot hold it: use --format peft)"


def output_format(target: str | os.PathLike, format: AdapterFormat | str | None = None) -> AdapterFormat:
    """The format an adapter written to ``target`` (``-o``) takes; one rule for extract, convert, resize and merge.

    No ``format``: a name ending in ``.safetensors`` is a kohya file, anything else a PEFT folder. ``kohya`` needs a
    ``.safetensors`` name (a kohya adapter is one file); ``peft`` refuses one (a PEFT adapter is a folder, and a
    folder named ``x.safetensors`` would fool every tool that reads it as a file). Raises :class:`UsageError`.
    """
    target = Path(target)
    file_name = target.suffix.lower() == ".safetensors"
    fmt = AdapterFormat(format) if format is not None else (AdapterFormat.KOHYA if file_name else AdapterFormat.PEFT)
    if fmt is AdapterFormat.KOHYA and not file_name:
        raise UsageError(f"-o {target}: a kohya adapter is one file: give a name ending in .safetensors, or "
                         f"--format peft for a PEFT folder")
    if fmt is AdapterFormat.PEFT and file_name:
        raise UsageError(f"-o {target}: a PEFT adapter is a folder: give a name without .safetensors, or "
                         f"--format kohya for one kohya file")
    return fmt


def _unholdable(adapter: Adapter, fmt: AdapterFormat) -> tuple[list[str], list[str]]:
    """(modules, tensors saved whole) that ``fmt`` cannot hold: a kohya file holds LoRA factors of linear and conv
    layers only. Conv1D modules are refused (:class:`ConversionError`): leaving out every layer of a GPT-2 would
    write an empty file."""
    if fmt is not AdapterFormat.KOHYA:
        return [], []
    _refuse_conv1d(adapter)
    return [n for n, m in adapter.modules.items() if m.kind is ModuleKind.EMBEDDING], sorted(adapter.full_tensors)


def fit_format(adapter: Adapter, format: AdapterFormat | str, *, warn=None) -> tuple[Adapter, dict[str, list[str]]]:
    """``adapter`` without what ``format`` cannot hold (embeddings and tensors saved whole, in kohya), and what was
    left out as {report.skipped reason: names}; ``warn`` gets one line naming them. Called before any work (the same
    in extract, convert, resize and merge), so a run never ends in a refusal after its progress bar is full."""
    (fitted,), left_out = fit_all([adapter], format, warn=warn)
    return fitted, left_out


def fit_all(adapters, format: AdapterFormat | str, *, warn=None) -> tuple[list[Adapter], dict[str, list[str]]]:
    """:func:`fit_format` for the inputs of a merge: one warning for all of them."""
    fitted, modules, whole = [], [], []
    for adapter in adapters:
        drop, drop_whole = _unholdable(adapter, AdapterFormat(format))
        modules += [n for n in drop if n not in modules]
        whole += [n for n in drop_whole if n not in whole]
        fitted.append(replace(adapter, modules={n: m for n, m in adapter.modules.items() if n not in drop},
                              full_tensors={}) if drop or drop_whole else adapter)
    if warn and (modules or whole):
        warn(left_out_warning(modules + whole, format))
    return fitted, {k: v for k, v in {LEFT_OUT: modules, LEFT_OUT_WHOLE: whole}.items() if v}


def left_out_warning(names, format: AdapterFormat | str) -> str:
    """The one warning line for modules an output format cannot hold (extract, convert, resize and merge)."""
    names = list(names)
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    return (f"left out {len(names)} module(s) a {AdapterFormat(format).value} file cannot hold (embeddings, tensors "
            f"saved whole): {shown}; keep them with --format peft and an -o folder name")


def select_modules(adapter: Adapter, include=(), exclude=()) -> Adapter:
    """``adapter`` with only the modules (and tensors saved whole) whose name passes --include / --exclude."""
    include, exclude = compile_filters(include, "--include"), compile_filters(exclude, "--exclude")
    if not include and not exclude:
        return adapter
    return replace(adapter, modules={n: m for n, m in adapter.modules.items() if matches(n, include, exclude)},
                   full_tensors={n: t for n, t in adapter.full_tensors.items()
                                 if matches(module_name(n), include, exclude)})


def _single_file(folder: Path) -> Path | None:
    for name in (DIFFUSERS_NAME, WEIGHTS_NAME):
        if (folder / name).is_file():
            return folder / name
    return None


def detect_format(path: Path) -> str:
    """'peft' (folder), 'kohya' or 'peft-file' (PEFT-style keys in one file, diffusers' included); else raises."""
    path = Path(path)
    if not path.exists():
        raise CheckpointNotFound(f"adapter {path} does not exist: check the path")
    if path.is_dir():
        if is_peft_folder(path):
            return "peft"
        if _single_file(path) is not None:
            return "peft-file"
        raise AdapterFormatError(f"{path}: a folder without adapter_config.json or {DIFFUSERS_NAME}: not an adapter "
                                 f"folder")
    keys = open_checkpoint(path, dequantize=False).keys()
    if is_lycoris_keys(keys):  # LoHa / LoKr / Tucker / DoRA / diffs, with or without plain LoRA modules
        return "lycoris"
    if is_kohya_keys(keys):
        return "kohya"
    if any(".lora_A." in k or ".lora_B." in k or "lora_embedding_" in k for k in keys):
        return "peft-file"
    raise AdapterFormatError(f"{path}: unknown adapter layout (key patterns seen: {lora_keys_seen(keys)}): expected "
                             f"PEFT '*.lora_A.weight' / '*.lora_B.weight' or kohya '*.lora_down.weight' / "
                             f"'*.lora_up.weight' keys")


def _module_names(base) -> tuple[list[str], str]:
    ckpt = as_checkpoint(base)
    # every weight a kohya key may name: matrices and kernels (LoRA modules), and 1-D norm weights (w_norm / b_norm)
    names = [module_name(k) for k in ckpt.keys() if len(ckpt.shape(k)) >= 2 or k.endswith(".weight")]
    return names, str(getattr(ckpt, "path", base))


def load_adapter(path: str | os.PathLike, *, base: Checkpoint | str | os.PathLike | None = None,
                 rank_cap: int | None = None) -> Adapter:
    """Read an adapter in any supported format.

    ``base``: the checkpoint the adapter was made for; kohya keys without recorded module names are matched
    against its module names (else they are guessed from the known diffusers/transformers naming, with a note).
    ``rank_cap``: LoHa / LoKr / diff modules are read as their optimal truncation to that rank (only the top
    triplets of a LoKr's full factors are computed); plain LoRA modules are read as stored.
    """
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "peft":
        config, weights, peft_type = peft_folder_parts(path)
        if peft_type == "LORA":
            adapter = read_peft(path)
        else:
            adapter = read_peft_lycoris(path, config, weights, rank_cap=rank_cap)
    elif fmt in ("kohya", "lycoris"):
        names, label = _module_names(base) if base is not None else (None, None)
        if fmt == "lycoris":
            adapter = read_lycoris(path, module_names=names, base=label, rank_cap=rank_cap)
        else:
            adapter = read_kohya(path, module_names=names, base=label)
    else:
        adapter = read_peft_file(_single_file(path) if path.is_dir() else path)
    if base is not None:  # LoHa / LoKr conv factors stored flattened get their kernel from the base
        fit_kernels(adapter, _base_shapes(base))
    return adapter


def _base_shapes(base):
    ckpt = as_checkpoint(base)

    def shape_of(name: str):
        for candidate in (name, *(name[len(c):] for c in DIFFUSERS_COMPONENTS if name.startswith(c))):
            if f"{candidate}.weight" in ckpt:
                return tuple(ckpt.shape(f"{candidate}.weight"))
        return None
    return shape_of


def in_output_naming(adapter: Adapter, format: AdapterFormat | str) -> Adapter:
    """A transformer diffusion model's adapter (Flux, SD3, Wan) in the names ``format``'s consumers load: kohya
    files the original (BFL/SAI/Wan) names with fused layers fused, PEFT/diffusers files diffusers' names, split
    exactly (:mod:`.arch_convert`); any other adapter unchanged."""
    from .arch_convert import for_format  # its linalg (the QR core) only when writing: info stays light

    base_names = None
    if needs_base(adapter.modules) and adapter.base_model and Path(adapter.base_model).exists():
        base_names = _module_names(adapter.base_model)[0]  # names two models share: the base decides
    kohya = AdapterFormat(format) is AdapterFormat.KOHYA
    out, found = for_format(adapter, kohya, base_names=base_names)
    if found is not None and out is not adapter and not kohya:  # renamed into a pipeline's transformer.: the names
        out = replace(out, pipeline=None)                         # decide where to write it, as they did before
    return out


def _refuse_conv1d(adapter: Adapter) -> None:
    kohya_refuses_conv1d(n for n, m in adapter.modules.items() if m.kind is ModuleKind.CONV1D)


def check_target(adapter: Adapter, format: AdapterFormat | str, *, prefix: str = "lora_unet_") -> None:
    """Raise :class:`ConversionError` (naming the module) when ``format`` cannot hold the adapter."""
    if AdapterFormat(format) is AdapterFormat.KOHYA:
        _refuse_conv1d(adapter)
        kohya_state_dict(adapter, prefix=prefix)
        return
    check_peft_extras(adapter)  # DoRA all-or-none on the output axis, deltas only as lora_B.bias
    if is_diffusers_adapter(adapter) and adapter.full_tensors:
        name = next(iter(adapter.full_tensors))
        raise ConversionError(f"tensor {name} is saved whole, which a diffusers LoRA file cannot hold: drop "
                              f"--full-modules, or extract the component folder alone (PEFT modules_to_save)")


def check_kohya_target(target: str | os.PathLike) -> None:
    """A kohya adapter is one ``.safetensors`` file: :class:`UsageError` for any other name."""
    if Path(target).suffix != ".safetensors":
        raise UsageError(f"-o {target}: a kohya adapter is one file: give a name ending in .safetensors")


def save_adapter(adapter: Adapter, target: str | os.PathLike, *, format: AdapterFormat | str | None = None,
                 force: bool = False, inputs=(), dtype: torch.dtype | None = None, prefix: str = "lora_unet_",
                 transaction=None) -> Path:
    """Write ``adapter`` atomically in ``format`` (PEFT: a folder; kohya: a .safetensors file).

    ``format`` None: decided by :func:`output_format` from the name (``.safetensors``: kohya, else PEFT).
    ``prefix``: the kohya prefix of modules without a pipeline component (``unet.`` and ``text_encoder.`` modules
    take ``lora_unet_`` / ``lora_te_``). Nothing is written when the format cannot hold a module (the commands
    leave those out first, with :func:`fit_format`). ``transaction`` (an
    :class:`~lowrank_tools.io.outputs.OutputTransaction`): written under a temporary name and installed with the
    run's other outputs when it commits (its ``force`` applies).
    """
    target = Path(target)
    fmt = output_format(target, format)
    if dtype is not None:
        adapter = adapter.to(dtype=dtype)
    adapter = in_output_naming(adapter, fmt)
    check_target(adapter, fmt, prefix=prefix)
    with atomic_output(target, force=force, inputs=inputs, transaction=transaction) as tmp:
        if fmt is AdapterFormat.KOHYA:
            write_kohya(adapter, tmp, prefix=prefix)
        elif is_diffusers_adapter(adapter):
            write_diffusers(adapter, tmp)
        else:
            write_peft(adapter, tmp)
            if lone_component(adapter):  # one diffusers component: also the file its load_lora_adapter reads
                write_diffusers(adapter, tmp, lone=True)
    return target


def _counts(values) -> dict[str, int]:
    return {str(k): v for k, v in sorted(Counter(values).items())}


def _scale_rule(adapter: Adapter) -> str:
    rs = {m.rslora for m in adapter.modules.values()}
    if rs == {True}:
        return "alpha / sqrt(r) (rsLoRA)"
    return "alpha / r" if rs != {True, False} else "alpha / r, alpha / sqrt(r) for rsLoRA modules"


def _architecture(adapter: Adapter) -> str | None:
    """What ``info`` says the module names were read as: "Flux (BFL names)", "SD3 (diffusers names)", ..."""
    found = detect_architecture(adapter.modules)
    return found.describe() if found else None


def describe_adapter(adapter: Adapter, path: str | os.PathLike) -> dict:
    """Facts for ``info``: format, module count, rank and alpha distribution, scale rule, params, dtype, base."""
    mods = adapter.modules.values()
    return {
        "path": str(path),
        "format": adapter.source_format,
        "architecture": _architecture(adapter),
        "modules": len(adapter.modules),
        "kinds": _counts(m.kind.value for m in mods),
        "types": _counts(m.kind_name for m in mods),  # lora, loha, lokr, tucker, dora, diff
        "exact_ranks": {t: _counts(m.rank for m in mods if m.kind_name == t) for t in sorted({m.kind_name for m in mods})
                        if t != "lora"},
        "tensor_deltas": len(adapter.tensor_deltas),
        "components": pipeline_components(adapter),
        "ranks": _counts(m.rank for m in mods),
        "alphas": _counts(round(m.alpha, 6) for m in mods),
        "scale_rule": _scale_rule(adapter),
        "scales": _counts(round(m.scale, 6) for m in mods),
        "params": adapter.params,
        "saved_whole": sorted(adapter.full_tensors),
        "dtype": str(adapter.dtype).replace("torch.", "") if adapter.dtype else None,
        "base_model": adapter.base_model,
        # the diffusers class extract read from the base (check --for diffusers judges by it without --base)
        "base_class": f"{adapter.base_class.name} ({adapter.base_class.file})" if adapter.base_class else None,
        "notes": adapter.notes,
    }


def describe_modules(adapter: Adapter) -> list[dict]:
    """One row per module for ``info --modules``, in the adapter's order: name, kind, rank, alpha, scale (alpha / r,
    or alpha / sqrt(r) for rsLoRA), the shape of the weight it adapts and its parameters; tensors saved
    whole follow as kind ``whole`` (rank and alpha None)."""
    rows = [{"name": name, "kind": m.kind.value, "rank": m.rank, "alpha": round(m.alpha, 6),
             "scale": round(m.scale, 6), "shape": list(m.weight_shape), "params": m.params}
            for name, m in adapter.modules.items()]
    rows += [{"name": name, "kind": "whole", "rank": None, "alpha": None, "scale": None, "shape": list(t.shape),
              "params": int(t.numel())} for name, t in adapter.full_tensors.items()]
    return rows
