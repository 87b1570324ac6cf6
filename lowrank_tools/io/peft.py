"""PEFT adapter folders: ``adapter_config.json`` + ``adapter_model.safetensors`` (diffusers' pipeline files, which
use the same keys, are read and written by :mod:`.diffusers_lora`).

Keys are ``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight`` (linear: A (r, in), B (out, r); conv:
A (r, in, *kernel), B (out, r, 1, ...)) and ``base_model.model.<module>.lora_embedding_A`` (r, vocab) /
``.lora_embedding_B`` (dim, r) for embeddings. Tensors saved whole (``modules_to_save``) are stored under the
module's own name, ``base_model.model.<module>.weight``, as PEFT saves them. Per-module ranks and alphas that
differ from ``r`` / ``lora_alpha`` go to ``rank_pattern`` / ``alpha_pattern``, whose keys PEFT matches as regular
expressions against the end of the module name (``re.match(rf"(.*\\.)?({key})$", name)``, first match wins), so
names are written escaped. ``use_rslora`` makes the scale alpha / sqrt(r).

transformers ``Conv1D`` layers (GPT-2 family, weight stored (in, out)) keep the same A (r, in) and B (out, r):
PEFT's ``fan_in_fan_out`` only transposes the product onto the weight. It is written true when the adapter has such
modules (PEFT sets it per layer from the module's class anyway, warning when the config disagrees: a GPT-2 adapter
that also adapts the tied ``lm_head``, an nn.Linear, makes it warn); a folder read with it true has its 2-D modules
of a Conv1D leaf name laid out as Conv1D until a base says otherwise (:func:`~lowrank_tools.io.layers.conv1d_rule`).
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..adapter import Adapter, LoraModule, ModuleKind, as_conv1d
from .atomic import check_finite_output
from .base_class import base_class_from_metadata, base_class_metadata
from .checkpoint import open_checkpoint
from ..errors import AdapterFormatError
from .adapter_extras import attach_extras, peft_extras, peft_extras_config, split_extras
from .json_input import get_bool, get_number, get_str, get_str_list, load_json, type_name
from .model_config import CONV1D_LEAVES
from .module_names import fold_aliases, names_from_metadata, names_metadata, with_aliases
from .patterns import peft_pattern_value

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "is_peft_folder", "read_peft", "write_peft", "peft_config",
           "peft_state_dict", "collect_factors", "build_module", "lora_keys_seen", "pattern_value", "peft_folder_parts",
           "modules_from_config", "file_factors", "is_saved_whole", "key_saved_whole"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_SUFFIXES = {
    ".lora_A.weight": ("A", False),
    ".lora_B.weight": ("B", False),
    ".lora_embedding_A": ("A", True),
    ".lora_embedding_B": ("B", True),
}
# keys saved with the adapter name inside (``x.lora_A.default.weight``, ``x.lora_embedding_A.default``)
_NAMED_LINEAR = re.compile(r"\.(lora_[AB])\.[A-Za-z0-9_-]+\.weight$")
_NAMED_EMBEDDING = re.compile(r"\.(lora_embedding_[AB])\.[A-Za-z0-9_-]+$")
_SAVED_WHOLE = re.compile(r"^(.*)\.modules_to_save(?:\.[A-Za-z0-9_-]+)?\.([A-Za-z0-9_]+)$")
_BASE_LAYER = re.compile(r"\.base_layer\.[A-Za-z0-9_]+$")
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def is_peft_folder(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG_NAME).is_file()


# ----------------------------------------------------------------------------------------------- write


def _mode(values: list) -> object:
    """Most common value; ties go to the largest (so the common rank is a stable choice)."""
    counts = Counter(values)
    return max(counts, key=lambda v: (counts[v], v))


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def file_factors(m: LoraModule) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) as files store them: conv kernels (r, in, *k) / (out, r, 1, ...) for conv modules, 2-D otherwise."""
    if m.kind is ModuleKind.CONV:
        kernel_ones = [1] * (len(m.weight_shape) - 2)
        return m.A.reshape(m.rank, *m.weight_shape[1:]), m.B.reshape(m.B.shape[0], m.rank, *kernel_ones)
    return m.A, m.B


def _pattern_keys(names) -> dict[str, str]:
    """Pattern keys for rank_pattern / alpha_pattern: the escaped name; anchored with ``^`` (PEFT >= 0.15 reads it
    as "the whole name") when the name is also the dotted tail of another module's, which it would match too."""
    tails = {n.split(".", i)[-1] for n in names for i in range(1, n.count(".") + 1)}
    return {n: ("^" if n in tails else "") + re.escape(n) for n in names}


def peft_config(adapter: Adapter) -> dict:
    """adapter_config.json content; alphas are written in the alpha / r convention (product unchanged)."""
    ranks = {n: m.rank for n, m in adapter.modules.items()}
    alphas = {n: float(m.scale * m.rank) for n, m in adapter.modules.items()}
    r = int(_mode(list(ranks.values()))) if ranks else 0
    alpha = float(_mode([alphas[n] for n in ranks if ranks[n] == r])) if ranks else 0.0
    keys = _pattern_keys(adapter.modules)
    return {
        "peft_type": "LORA",
        "task_type": adapter.task_type,
        "base_model_name_or_path": adapter.base_model,
        "r": r,
        "lora_alpha": _number(alpha),
        "target_modules": sorted(adapter.modules),
        "rank_pattern": {keys[n]: k for n, k in ranks.items() if k != r},
        "alpha_pattern": {keys[n]: _number(a) for n, a in alphas.items() if a != alpha},
        "modules_to_save": sorted({n.rsplit(".", 1)[0] for n in adapter.full_tensors}) or None,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": any(m.kind is ModuleKind.CONV1D for m in adapter.modules.values()),
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
        **peft_extras_config(adapter),  # use_dora, lora_bias
    }


def peft_state_dict(adapter: Adapter, *, prefix: str = _PREFIX) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for name, m in adapter.modules.items():
        A, B = file_factors(m)
        a_key, b_key = (
            ("lora_embedding_A", "lora_embedding_B") if m.kind is ModuleKind.EMBEDDING else ("lora_A.weight", "lora_B.weight")
        )
        tensors[f"{prefix}{name}.{a_key}"] = A.contiguous()
        tensors[f"{prefix}{name}.{b_key}"] = B.contiguous()
    for tensor_name, t in adapter.full_tensors.items():
        tensors[f"{prefix}{tensor_name}"] = t.contiguous()  # PEFT saves modules_to_save under the module's own name
    tensors.update(peft_extras(adapter, prefix))  # DoRA magnitudes, lora_B.bias
    return tensors


def write_peft(adapter: Adapter, folder: Path) -> None:
    """Write ``adapter`` as a PEFT folder at ``folder`` (created; the caller makes it atomic). Tied aliases
    recorded in ``adapter.model_names`` get their owner's factors (:func:`~.module_names.with_aliases`)."""
    adapter = replace(adapter, modules=with_aliases(adapter))
    tensors = peft_state_dict(adapter)
    for key, tensor in tensors.items():  # save_file does not pass through our writer: the same check, here
        check_finite_output(key, tensor, folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt", **names_metadata(adapter),
                                                                   **base_class_metadata(adapter)})
    (folder / CONFIG_NAME).write_text(json.dumps(peft_config(adapter), indent=2, allow_nan=False) + "\n")


# ------------------------------------------------------------------------------------------------ read


def _pattern_value(patterns: dict, name: str, default, what: str = "rank_pattern / alpha_pattern"):
    """PEFT's rule (``get_pattern_key``): the first pattern key matching the end of the module name wins; plain names
    are matched as strings and other keys' work is bounded (:mod:`lowrank_tools.patterns`)."""
    return peft_pattern_value(patterns, name, default, what=what, error=AdapterFormatError)


pattern_value = _pattern_value  # public: LoHa / LoKr folders (lycoris_format) follow the same rule


def _split_key(key: str) -> tuple[str, str, bool] | None:
    """``base_model.model.x.lora_A.weight`` -> (``x``, ``A``, is_embedding); None for other keys."""
    key = _NAMED_EMBEDDING.sub(r".\1", _NAMED_LINEAR.sub(r".\1.weight", key))
    for suffix, (which, emb) in _SUFFIXES.items():
        if key.endswith(suffix):
            return _strip(key[: -len(suffix)]), which, emb
    return None


def _strip(key: str) -> str:
    return key[len(_PREFIX):] if key.startswith(_PREFIX) else key


def lora_keys_seen(keys) -> str:
    """A few distinct key endings (digits as N) to show what an unreadable file holds."""
    endings = []
    for k in keys:
        ending = re.sub(r"\d+", "N", ".".join(k.split(".")[-3:]))
        if ending not in endings:
            endings.append(ending)
    return ", ".join(f"*{e}" if "." in e else e for e in endings[:6]) or "no tensors"


def is_saved_whole(module: str, modules_to_save) -> bool:
    """PEFT's rule: a module is saved whole when its name is, or ends with ``.`` +, an entry of modules_to_save."""
    return any(module == m or module.endswith(f".{m}") for m in modules_to_save)


def key_saved_whole(key: str, config: dict | None) -> bool:
    """Whether tensor ``key`` of a PEFT file is one of a module saved whole (``config``: its adapter_config.json's
    modules_to_save, matched by :func:`is_saved_whole`)."""
    saved = (config or {}).get("modules_to_save") or ()
    plain = key[len("base_model.model."):] if key.startswith("base_model.model.") else key
    return bool(saved) and isinstance(saved, list) and "." in plain and is_saved_whole(plain.rsplit(".", 1)[0], saved)


def collect_factors(ckpt, where: Path, *, modules_to_save=()) -> tuple[dict, dict, dict, list]:
    """Group a file's tensors: ({module: {"A", "B", "emb", "A_key", "B_key"}}, {tensor: whole tensor},
    {module: alpha key}, notes). Keys that are none of these raise :class:`AdapterFormatError`."""
    halves: dict[str, dict] = {}
    full: dict[str, torch.Tensor] = {}
    alphas: dict[str, str] = {}
    ignored = []
    for key in ckpt.keys():
        parsed = _split_key(key)
        if parsed is not None:
            name, which, emb = parsed
            halves.setdefault(name, {"emb": emb}).update({which: ckpt.get(key), f"{which}_key": key})
            continue
        plain = _strip(key)
        whole = _SAVED_WHOLE.match(plain)
        if key.endswith(".alpha") and "." in plain:
            alphas[plain[: -len(".alpha")]] = key
        elif whole or ("." in plain and is_saved_whole(plain.rsplit(".", 1)[0], modules_to_save or ())):
            full[f"{whole.group(1)}.{whole.group(2)}" if whole else plain] = ckpt.get(key)
        elif _BASE_LAYER.search(plain):
            ignored.append(key)
        else:
            raise _unknown_key(ckpt, key, where)
    if not halves and not full:
        raise AdapterFormatError(f"{where}: unknown adapter layout, no LoRA factors (keys seen: "
                                 f"{lora_keys_seen(ckpt.keys())}): expected '<module>.lora_A.weight' / '.lora_B.weight'")
    for name, parts in halves.items():
        for which, other in (("A", "B"), ("B", "A")):
            if which not in parts:
                raise AdapterFormatError(f"{where}: key {parts[f'{other}_key']} has no matching lora_{which} "
                                         f"(module {name}): the file is incomplete")
    notes = [f"{where}: ignored {len(ignored)} base-layer tensors PEFT saved beside the adapter (e.g. {ignored[0]}): "
             f"they are the base model's weights, not part of the delta"] if ignored else []
    return halves, full, alphas, notes


def _unknown_key(ckpt, key: str, where: Path) -> AdapterFormatError:
    if "lora_magnitude_vector" in key:
        return AdapterFormatError(f"{where}: key {key} is a DoRA magnitude: DoRA adapters are not supported")
    return AdapterFormatError(f"{where}: key {key} is not a LoRA factor (keys seen: {lora_keys_seen(ckpt.keys())}): "
                              f"expected '<module>.lora_A.weight' / '.lora_B.weight' / '.lora_embedding_A'")


def build_module(name: str, A: torch.Tensor, B: torch.Tensor, alpha: float, *, embedding: bool,
                 rslora: bool = False, source: Path | str = "", keys: tuple[str, str] | None = None) -> LoraModule:
    """Check factor shapes and flatten them to the 2-D view (conv kernels -> matrices)."""
    r = A.shape[0] if A.ndim else 0
    b_rank = B.shape[1] if B.ndim >= 2 else -1
    a_key, b_key = keys or (f"{name} lora_A", f"{name} lora_B")
    if A.ndim < 2 or B.ndim < 2 or b_rank != r or any(d != 1 for d in B.shape[2:]) or A.ndim != max(B.ndim, 2):
        raise AdapterFormatError(f"{source}: {a_key} {tuple(A.shape)} and {b_key} {tuple(B.shape)} do not fit "
                                 f"(expected A (r, in...) and B (out, r, 1...) of the same r): the file is corrupt")
    if A.dtype not in _FLOATS or B.dtype not in _FLOATS:  # int8 / float8 factors are quantized, not the factors
        raise AdapterFormatError(f"{source}: {a_key} has dtype {A.dtype}, {b_key} {B.dtype}: factors must be floats "
                                 f"(float16, bfloat16, float32 or float64)")
    if 0 in A.shape or 0 in B.shape:
        raise AdapterFormatError(f"{source}: {a_key} {tuple(A.shape)} and {b_key} {tuple(B.shape)} are empty (rank 0 "
                                 f"or a zero-size side): the file is corrupt; re-save the adapter without module "
                                 f"{name}")
    if not math.isfinite(alpha):
        raise AdapterFormatError(f"{source}: module {name}: alpha {alpha} is not a finite number")
    if embedding:
        return LoraModule(B=B, A=A, alpha=alpha, kind=ModuleKind.EMBEDDING, rslora=rslora)
    if A.ndim > 2:
        shape = (B.shape[0], *A.shape[1:])
        return LoraModule(B=B.reshape(B.shape[0], r), A=A.reshape(r, -1), alpha=alpha, kind=ModuleKind.CONV,
                          weight_shape=shape, rslora=rslora)
    return LoraModule(B=B, A=A, alpha=alpha, rslora=rslora)


def _config_number(config: dict, key: str, where: Path, default) -> float:
    return get_number(config, key, str(where), default=float(default), error=AdapterFormatError)


def _patterns(config: dict, key: str, where: Path) -> dict:
    patterns = config.get(key) or {}
    if not isinstance(patterns, dict):
        raise AdapterFormatError(f"{where}: {key} must map module patterns to numbers, got {type(patterns).__name__}")
    for pattern in patterns:
        get_number(patterns, pattern, f"{where}: {key}", error=AdapterFormatError)
    return patterns


def _read_config(path: Path) -> dict:
    config = load_json(path, error=AdapterFormatError, fix="re-save the adapter")
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{path}: expected a JSON object, found {type_name(config)}")
    for key, get in (("peft_type", get_str), ("use_dora", get_bool), ("use_rslora", get_bool),
                     ("base_model_name_or_path", get_str), ("modules_to_save", get_str_list)):
        get(config, key, str(path), default=None, error=AdapterFormatError)
    peft_type = str(config.get("peft_type") or "LORA").upper()
    if peft_type not in ("LORA", "LOHA", "LOKR"):
        raise AdapterFormatError(f"{path}: peft_type {peft_type} is not LORA, LOHA or LOKR: not supported")
    return config


def _weights_file(folder: Path) -> Path:
    for candidate in (WEIGHTS_NAME, "adapter_model.bin"):
        if (folder / candidate).is_file():
            return folder / candidate
    raise AdapterFormatError(f"{folder}: no {WEIGHTS_NAME} (or adapter_model.bin) beside {CONFIG_NAME}")


def modules_from_config(halves: dict, config: dict, where: Path, source: Path, *, strip: str = "") -> dict:
    """Modules with their alphas under a LoraConfig: rank_pattern must agree with the factors' shapes; with
    ``fan_in_fan_out`` the 2-D ones of a Conv1D leaf name (``c_attn``, ``c_fc``, ...) are laid out as transformers
    Conv1D (weight (in, out)); a base's config decides for good where one is given (apply, check, evaluate)."""
    r = _config_number(config, "r", where, 8)
    lora_alpha = _config_number(config, "lora_alpha", where, 8)  # PEFT's defaults
    rank_pattern, alpha_pattern = _patterns(config, "rank_pattern", where), _patterns(config, "alpha_pattern", where)
    rslora = get_bool(config, "use_rslora", str(where), default=False, error=AdapterFormatError)
    conv1d = bool(get_bool(config, "fan_in_fan_out", str(where), default=False, error=AdapterFormatError))
    modules = {}
    for name, parts in halves.items():
        local = name[len(strip):]
        A, B = parts["A"], parts["B"]
        want = int(_pattern_value(rank_pattern, local, r, f"{where}: rank_pattern"))
        if A.ndim >= 1 and A.shape[0] != want:
            raise AdapterFormatError(f"{where}: rank {want} for {local} (r / rank_pattern) but {parts['A_key']} has "
                                     f"{A.shape[0]} rows: the config and weights disagree")
        alpha = float(_pattern_value(alpha_pattern, local, lora_alpha, f"{where}: alpha_pattern"))
        module = build_module(name, A, B, alpha, embedding=parts["emb"], rslora=rslora, source=source,
                              keys=(parts["A_key"], parts["B_key"]))
        modules[name] = as_conv1d(module, conv1d and local.rsplit(".", 1)[-1] in CONV1D_LEAVES)
    return modules


def peft_folder_parts(folder: Path) -> tuple[dict, Path, str]:
    """The checked ``adapter_config.json``, the weights file and the ``peft_type`` (LORA, LOHA or LOKR) of a PEFT
    folder: LoHa / LoKr folders are read by :func:`~lowrank_tools.io.lycoris.read_peft_lycoris`."""
    config = _read_config(folder / CONFIG_NAME)
    return config, _weights_file(folder), str(config.get("peft_type", "LORA")).upper()


def read_peft(folder: Path) -> Adapter:
    """Read a PEFT LoRA folder (written by PEFT, mergekit, or this tool) into an :class:`Adapter`."""
    config, weights, peft_type = peft_folder_parts(folder)
    if peft_type != "LORA":
        raise AdapterFormatError(f"{folder}: a PEFT {peft_type} folder, not LoRA: read it with load_adapter")
    ckpt, extras = split_extras(open_checkpoint(weights, dequantize=False))  # DoRA magnitudes, lora_B.bias
    halves, full, alphas, notes = collect_factors(ckpt, weights, modules_to_save=config.get("modules_to_save") or ())
    if alphas:
        key = next(iter(alphas.values()))
        raise AdapterFormatError(f"{weights}: key {key} is a kohya alpha inside a PEFT folder: alphas belong in "
                                 f"{CONFIG_NAME} (lora_alpha / alpha_pattern)")
    modules = modules_from_config(halves, config, folder / CONFIG_NAME, weights)
    deltas = attach_extras(modules, extras, ckpt, weights)
    task = config.get("task_type")
    return fold_aliases(Adapter(modules=modules, full_tensors=full, base_model=config.get("base_model_name_or_path"),
                                task_type=task if isinstance(task, str) else None, source_format="peft", notes=notes,
                                tensor_deltas=deltas, pipeline=False,  # adapter_config.json: PEFT's file for one model
                                model_names=names_from_metadata(ckpt.metadata),
                                base_class=base_class_from_metadata(ckpt.metadata)))
