"""PEFT adapter folders: ``adapter_config.json`` + ``adapter_model.safetensors``.

Keys are ``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight`` (linear and conv) and
``base_model.model.<module>.lora_embedding_A`` / ``.lora_embedding_B`` (embeddings). Per-module ranks
and alphas that differ from ``r`` / ``lora_alpha`` go to ``rank_pattern`` / ``alpha_pattern``, whose keys
PEFT matches as regular expressions against the end of the module name (``re.match(rf"(.*\\.)?({key})$")``),
so module names are written escaped. Tensors saved whole go to ``modules_to_save``.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file

from .adapter import Adapter, LoraModule, ModuleKind
from .checkpoint import open_checkpoint
from .errors import AdapterFormatError

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "is_peft_folder", "read_peft", "write_peft"]

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
_SAVED_WHOLE = re.compile(r"^(.*)\.modules_to_save(?:\.[A-Za-z0-9_-]+)?\.(weight|bias)$")


def is_peft_folder(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG_NAME).is_file()


# ----------------------------------------------------------------------------------------------- write


def _mode(values: list) -> object:
    """Most common value; ties go to the largest (so the common rank is a stable choice)."""
    counts = Counter(values)
    return max(counts, key=lambda v: (counts[v], v))


def _file_factors(m: LoraModule) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors in the layout PEFT stores: conv kernels for conv modules, 2-D otherwise."""
    if m.kind is ModuleKind.CONV:
        kernel_ones = [1] * (len(m.weight_shape) - 2)
        return m.A.reshape(m.rank, *m.weight_shape[1:]), m.B.reshape(m.B.shape[0], m.rank, *kernel_ones)
    return m.A, m.B


def peft_config(adapter: Adapter) -> dict:
    """adapter_config.json content; alphas are written in the alpha / r convention (product unchanged)."""
    ranks = {n: m.rank for n, m in adapter.modules.items()}
    alphas = {n: float(m.scale * m.rank) for n, m in adapter.modules.items()}
    r = int(_mode(list(ranks.values()))) if ranks else 0
    alpha = float(_mode([alphas[n] for n in ranks if ranks[n] == r])) if ranks else 0.0
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": adapter.base_model,
        "r": r,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "target_modules": sorted(adapter.modules),
        "rank_pattern": {re.escape(n): k for n, k in ranks.items() if k != r},
        "alpha_pattern": {re.escape(n): a for n, a in alphas.items() if a != alpha},
        "modules_to_save": sorted({n.rsplit(".", 1)[0] for n in adapter.full_tensors}) or None,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
    }


def peft_state_dict(adapter: Adapter) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for name, m in adapter.modules.items():
        A, B = _file_factors(m)
        a_key, b_key = (
            ("lora_embedding_A", "lora_embedding_B") if m.kind is ModuleKind.EMBEDDING else ("lora_A.weight", "lora_B.weight")
        )
        tensors[f"{_PREFIX}{name}.{a_key}"] = A.contiguous()
        tensors[f"{_PREFIX}{name}.{b_key}"] = B.contiguous()
    for tensor_name, t in adapter.full_tensors.items():
        mod, leaf = tensor_name.rsplit(".", 1)
        tensors[f"{_PREFIX}{mod}.modules_to_save.{leaf}"] = t.contiguous()
    return tensors


def write_peft(adapter: Adapter, folder: Path) -> None:
    """Write ``adapter`` as a PEFT folder at ``folder`` (created; the caller makes it atomic)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file(peft_state_dict(adapter), str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    (folder / CONFIG_NAME).write_text(json.dumps(peft_config(adapter), indent=2) + "\n")


# ------------------------------------------------------------------------------------------------ read


def _pattern_value(patterns: dict, name: str, default):
    """PEFT's rule: the first pattern key matching the end of the module name wins."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _split_key(key: str) -> tuple[str, str, bool] | None:
    """``base_model.model.x.lora_A.weight`` -> (``x``, ``A``, is_embedding); None for other keys."""
    key = _NAMED_EMBEDDING.sub(r".\1", _NAMED_LINEAR.sub(r".\1.weight", key))
    for suffix, (which, emb) in _SUFFIXES.items():
        if key.endswith(suffix):
            name = key[: -len(suffix)]
            return (name[len(_PREFIX):] if name.startswith(_PREFIX) else name), which, emb
    return None


def _read_config(folder: Path) -> dict:
    try:
        config = json.loads((folder / CONFIG_NAME).read_text())
    except (OSError, ValueError) as exc:
        raise AdapterFormatError(f"{folder / CONFIG_NAME}: not valid JSON ({exc}): re-save the adapter") from None
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{folder / CONFIG_NAME}: expected a JSON object")
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise AdapterFormatError(f"{folder / CONFIG_NAME}: peft_type {peft_type} is not LORA: only LoRA adapters are supported")
    return config


def _weights_file(folder: Path) -> Path:
    for candidate in (WEIGHTS_NAME, "adapter_model.bin"):
        if (folder / candidate).is_file():
            return folder / candidate
    raise AdapterFormatError(f"{folder}: no {WEIGHTS_NAME} (or adapter_model.bin) beside {CONFIG_NAME}")


def read_peft(folder: Path) -> Adapter:
    """Read a PEFT LoRA folder (written by PEFT, mergekit, or this tool) into an :class:`Adapter`."""
    config = _read_config(folder)
    weights = _weights_file(folder)
    factors, full = collect_factors(open_checkpoint(weights), weights)
    default_alpha = float(config.get("lora_alpha", config.get("r", 8)))
    rslora = bool(config.get("use_rslora", False))
    modules = {}
    for name, (A, B, emb) in factors.items():
        alpha = float(_pattern_value(config.get("alpha_pattern") or {}, name, default_alpha))
        modules[name] = build_module(name, A, B, alpha, embedding=emb, rslora=rslora, source=weights)
    return Adapter(modules=modules, full_tensors=full, base_model=config.get("base_model_name_or_path"),
                   source_format="peft")


def collect_factors(ckpt, where: Path) -> tuple[dict, dict]:
    """Group ``lora_A``/``lora_B`` tensors by module: {name: (A, B, is_embedding)}, plus tensors saved whole."""
    halves: dict[str, dict] = {}
    full: dict[str, torch.Tensor] = {}
    unknown = []
    for key in ckpt.keys():
        whole = _SAVED_WHOLE.match(key[len(_PREFIX):] if key.startswith(_PREFIX) else key)
        if whole:
            full[f"{whole.group(1)}.{whole.group(2)}"] = ckpt.get(key)
            continue
        parsed = _split_key(key)
        if parsed is None:
            unknown.append(key)
            continue
        name, which, emb = parsed
        halves.setdefault(name, {"emb": emb})[which] = ckpt.get(key)
    if not halves:
        seen = ", ".join(unknown[:3]) or "no tensors"
        raise AdapterFormatError(f"{where}: no LoRA factors found (keys seen: {seen}): expected "
                                 f"'<module>.lora_A.weight' / '.lora_B.weight'")
    factors = {}
    for name, parts in halves.items():
        for which, other in (("A", "B"), ("B", "A")):
            if which not in parts:
                raise AdapterFormatError(f"{where}: module {name} has lora_{other} but no lora_{which}: the file is incomplete")
        factors[name] = (parts["A"], parts["B"], parts["emb"])
    return factors, full


def build_module(name: str, A: torch.Tensor, B: torch.Tensor, alpha: float, *, embedding: bool,
                 rslora: bool = False, source: Path | str = "") -> LoraModule:
    """Check factor shapes and flatten them to the 2-D view (conv kernels -> matrices)."""
    r = A.shape[0] if A.ndim else 0
    b_rank = B.shape[1] if B.ndim >= 2 else -1
    if A.ndim < 2 or B.ndim < 2 or b_rank != r or any(d != 1 for d in B.shape[2:]):
        raise AdapterFormatError(f"{source}: module {name}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} "
                                 f"do not fit (expected A (r, in...) and B (out, r)): the file is corrupt")
    if not math.isfinite(alpha):
        raise AdapterFormatError(f"{source}: module {name}: alpha {alpha} is not a finite number")
    if embedding:
        return LoraModule(B=B, A=A, alpha=alpha, kind=ModuleKind.EMBEDDING, rslora=rslora)
    if A.ndim > 2:
        shape = (B.shape[0], *A.shape[1:])
        return LoraModule(B=B.reshape(B.shape[0], r), A=A.reshape(r, -1), alpha=alpha, kind=ModuleKind.CONV,
                          weight_shape=shape, rslora=rslora)
    return LoraModule(B=B, A=A, alpha=alpha, rslora=rslora)
