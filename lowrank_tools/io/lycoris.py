"""LyCORIS-style modules: LoHa, LoKr, Tucker LoCon, DoRA magnitudes and full diffs, in kohya files and PEFT folders.

kohya / LyCORIS / ComfyUI files (``<prefix><module>.<suffix>``):

    LoHa    hada_w1_a (out, r), hada_w1_b (r, in_flat), hada_w2_a, hada_w2_b      delta = s (w1a w1b) * (w2a w2b)
            Tucker: hada_t1/t2 (r, r, kh, kw), hada_w*_a (r, out), hada_w*_b (r, in)
    LoKr    lokr_w1 (a, b) | lokr_w1_a/_b;  lokr_w2 (c, d[, kh, kw]) | lokr_w2_a/_b | + lokr_t2 (Tucker)
            delta = s kron(W1, W2)
    LoCon   lora_down / lora_up (+ lora_mid.weight (r, r, kh, kw): Tucker)
    DoRA    dora_scale (out, 1, ...) beside any of them; legacy (1, in, ...) = LyCORIS wd_on_out=False
    diffs   diff (the whole weight delta), diff_b (bias delta), w_norm / b_norm (norm layers' deltas)
    alpha   scale = alpha / r (no alpha: scale 1). LoKr: r is the factored parts' rank; scale 1 when W1 and W2
            are both full (LyCORIS, ComfyUI), or when alpha is a placeholder (>= 1e9, "no alpha").

PEFT LoHa / LoKr folders (``peft_type`` LOHA / LOKR): keys ``base_model.model.<module>.hada_w1_a`` (no ``.weight``),
config ``r`` / ``alpha`` / ``rank_pattern`` / ``alpha_pattern``; the scale is always alpha / r (PEFT's LoKr too).

Every module becomes an exact plain-LoRA factor pair (:mod:`structured`): LoHa and LoKr through their exact SVD
(Khatri-Rao + QR core, Kronecker SVD), Tucker by absorbing the core; nothing of size (out, in) unless the exact
rank reaches min(out, in). Deltas to 1-D tensors go to ``Adapter.tensor_deltas``. Conv modules whose kernel the
file does not record (LoHa and LoKr without Tucker store flattened (r, in*kh*kw) factors) keep the 2-D matrix view,
with a note: ``apply`` fits them to the base's conv weight, a PEFT/kohya writer needs the kernel.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

from ..adapter import Adapter, LoraModule, ModuleKind, Param
from .base_class import base_class_from_metadata
from .checkpoint import open_checkpoint
from ..errors import AdapterFormatError
from .kohya import resolve_module_names
from .peft import CONFIG_NAME, build_module, lora_keys_seen, pattern_value
from ..linalg.structured import (ExactSVD, kron_svd, loha_svd, lokr_w2_tucker, top_svd, tucker_locon_factors,
                                 tucker_loha_pair)

__all__ = ["STRUCTURED_SUFFIXES", "is_lycoris_keys", "read_lycoris", "read_peft_lycoris", "structured_module",
           "PLACEHOLDER_ALPHA", "fit_kernels"]

_LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
_LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
_DIFF = ("diff", "diff_b", "w_norm", "b_norm")
STRUCTURED_SUFFIXES = (*_LOHA, *_LOKR, "lora_mid.weight", "dora_scale", *_DIFF)
_SUFFIXES = (*STRUCTURED_SUFFIXES, "lora_down.weight", "lora_up.weight", "alpha")
_FLOAT32_MAX = torch.finfo(torch.float32).max
PLACEHOLDER_ALPHA = 1e9  # alphas this large stand for "no alpha" (scale 1), never a strength


def is_lycoris_keys(keys) -> bool:
    """True when a kohya-style file holds any LyCORIS-only suffix (LoHa, LoKr, lora_mid, dora_scale, diffs)."""
    return any(k.rsplit(".", 1)[-1] in STRUCTURED_SUFFIXES or k.endswith(".lora_mid.weight") for k in keys)


def _split(key: str) -> tuple[str, str] | None:
    for suffix in sorted(_SUFFIXES, key=len, reverse=True):
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    return None


def _out_dtype(tensors: dict[str, Tensor]) -> torch.dtype:
    """float64 when the file is, else float32: products equal to the original's to float32 rounding."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors.values()) else torch.float32


def _lokr_rank(t: dict[str, Tensor]) -> int | None:
    """LoKr's lora_dim: the inner size of its factored parts (None when W1 and W2 are both full)."""
    if "lokr_w1_a" in t:
        return int(t["lokr_w1_a"].shape[1])
    if "lokr_t2" in t:
        return int(t["lokr_w2_a"].shape[0])  # Tucker: w2_a is (r, c)
    if "lokr_w2_a" in t:
        return int(t["lokr_w2_a"].shape[1])
    return None


def _loha(t: dict[str, Tensor], scale: float, cap: int | None) -> tuple[ExactSVD, ModuleKind, tuple, str]:
    if "hada_t1" in t:
        B1, A1 = tucker_loha_pair(t["hada_t1"].double(), t["hada_w1_a"].double(), t["hada_w1_b"].double())
        B2, A2 = tucker_loha_pair(t["hada_t2"].double(), t["hada_w2_a"].double(), t["hada_w2_b"].double())
        shape = (B1.shape[0], t["hada_w1_b"].shape[1], *t["hada_t1"].shape[2:])
        kind = ModuleKind.CONV
    else:
        B1, B2 = t["hada_w1_a"].double(), t["hada_w2_a"].double()
        A1 = t["hada_w1_b"].double().reshape(B1.shape[1], -1)
        A2 = t["hada_w2_b"].double().reshape(B2.shape[1], -1)
        shape, kind = (B1.shape[0], A1.shape[1]), ModuleKind.LINEAR
    svd = loha_svd(B1 * scale, A1, B2, A2)  # exact, O((out + in) R^2 + R^3): a cap is a slice of it
    return (svd if cap is None else svd.top(cap)), kind, shape, f"{A1.shape[0]}x{A2.shape[0]}"


def _lokr(t: dict[str, Tensor], scale: float, cap: int | None) -> tuple[ExactSVD, ModuleKind, tuple, str]:
    W1 = t["lokr_w1"].double() if "lokr_w1" in t else (t["lokr_w1_a"].double(), t["lokr_w1_b"].double())
    W1 = W1 * scale if isinstance(W1, Tensor) else (W1[0] * scale, W1[1])
    kernel: tuple = ()
    if "lokr_w2" in t:
        w2 = t["lokr_w2"].double()
        W2, kernel = w2.reshape(w2.shape[0], -1), tuple(w2.shape[2:])
        d = w2.shape[1]
    elif "lokr_t2" in t:
        W2 = lokr_w2_tucker(t["lokr_t2"].double(), t["lokr_w2_a"].double(), t["lokr_w2_b"].double())
        kernel, d = tuple(t["lokr_t2"].shape[2:]), t["lokr_w2_b"].shape[1]
    else:
        W2 = (t["lokr_w2_a"].double(), t["lokr_w2_b"].double().reshape(t["lokr_w2_a"].shape[1], -1))
        d = W2[1].shape[1]
    a, b = (W1.shape if isinstance(W1, Tensor) else (W1[0].shape[0], W1[1].shape[1]))
    c = W2.shape[0] if isinstance(W2, Tensor) else W2[0].shape[0]
    shape = (a * c, b * d, *kernel)
    kind = ModuleKind.CONV if kernel else ModuleKind.LINEAR
    rank = _lokr_rank(t)
    return kron_svd(W1, W2, cap), kind, shape, f"kron({a}x{b}, {c}x{d}{', r' + str(rank) if rank else ''})"


def _scale(t: dict[str, Tensor], alpha: float | None, rank: int | None, *, peft: bool) -> float:
    """LyCORIS/ComfyUI rule unless ``peft``: LoKr with both factors full and placeholder alphas mean scale 1."""
    if peft:
        return alpha / rank
    if any(k.startswith("lokr_") for k in t):
        rank = _lokr_rank(t)
        if rank is None:
            return 1.0
    if alpha is None or alpha >= PLACEHOLDER_ALPHA:
        return 1.0
    return alpha / rank


def _diff_module(diff: Tensor, dtype: torch.dtype, cap: int | None) -> LoraModule:
    """A whole-weight delta as exact factors at its exact rank (one dense SVD: a diff is dense by nature), or its
    optimal rank-``cap`` truncation (:func:`top_svd`)."""
    matrix = diff.reshape(diff.shape[0], -1)
    svd = top_svd(matrix, min(matrix.shape) if cap is None else cap)
    kind = ModuleKind.CONV if diff.ndim > 2 else ModuleKind.LINEAR
    return LoraModule.from_svd(svd, param=Param.DIFF, dtype=dtype, kind=kind, weight_shape=tuple(diff.shape),
                               stored_rank="full")


_FAMILIES = {"LoHa": ("hada_",), "LoKr": ("lokr_",), "LoRA": ("lora_down.", "lora_up.", "lora_mid."), "diff": ("diff",)}
# (factor, factor whose rank it must share: (key, axis)): inner sizes checked before any reshape can hide a mismatch
_INNER = (("hada_w1_b", ("hada_w1_a", 1)), ("hada_w2_b", ("hada_w2_a", 1)), ("lokr_w1_b", ("lokr_w1_a", 1)),
          ("lokr_w2_b", ("lokr_w2_a", 1)))
_MATRICES = ("hada_w1_a", "hada_w2_a", "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a")


def _check_parts(name: str, t: dict[str, Tensor], where) -> None:
    """Refuse, naming the module and tensor: two parametrisations in one module, missing halves, empty, non-float or
    non-finite tensors, and factors whose inner (rank) sizes disagree."""
    families = [f for f, prefixes in _FAMILIES.items()
                if any(k.startswith(p) and k != "diff_b" for k in t for p in prefixes)]
    if len(families) > 1:
        raise AdapterFormatError(f"{where}: module {name} holds both {families[0]} and {families[1]} factors "
                                 f"({', '.join(sorted(t))}): one module, one adapter; re-export the file")
    if any(k.startswith("hada_") for k in t):
        missing = [k for k in _LOHA[:4] if k not in t]
        if missing or (("hada_t1" in t) != ("hada_t2" in t)):
            raise AdapterFormatError(f"{where}: module {name} is a LoHa without {', '.join(missing) or 'hada_t1/t2'}:"
                                     f" the file is incomplete")
    if any(k.startswith("lokr_") for k in t):
        ok1 = "lokr_w1" in t or ("lokr_w1_a" in t and "lokr_w1_b" in t)
        ok2 = "lokr_w2" in t or ("lokr_w2_a" in t and "lokr_w2_b" in t)
        if not (ok1 and ok2) or ("lokr_t2" in t and "lokr_w2_a" not in t):
            raise AdapterFormatError(f"{where}: module {name} is a LoKr without {'lokr_w1' if not ok1 else 'lokr_w2'}"
                                     f" (or its _a/_b pair): the file is incomplete")
    if "lora_mid.weight" in t and not {"lora_down.weight", "lora_up.weight"} <= set(t):
        raise AdapterFormatError(f"{where}: module {name} has lora_mid.weight without lora_down.weight and "
                                 f"lora_up.weight: the file is incomplete")
    for k, v in t.items():
        _check_tensor(name, k, v, where)
    _check_inner(name, t, where)


def _check_tensor(name: str, key: str, v: Tensor, where) -> None:
    what = f"{where}: module {name}: {key} {tuple(v.shape)} {str(v.dtype).replace('torch.', '')}"
    if not v.is_floating_point():
        raise AdapterFormatError(f"{what} is not a float tensor: re-export the adapter in float32/float16/bfloat16")
    if v.numel() == 0:
        raise AdapterFormatError(f"{what} is empty (rank 0): remove the module or re-export the adapter")
    if not bool(torch.isfinite(v.float() if v.element_size() == 1 else v).all()):  # isfinite has no float8 kernel
        raise AdapterFormatError(f"{what} holds NaN/Inf: repair or re-export the adapter, or leave the module out "
                                 f"with --exclude")


def _check_inner(name: str, t: dict[str, Tensor], where) -> None:
    for key in _MATRICES:
        if key in t and t[key].ndim != 2:
            raise AdapterFormatError(f"{where}: module {name}: {key} {tuple(t[key].shape)} is not a matrix: the file "
                                     f"is corrupt")
    tucker = "hada_t1" in t or "lokr_t2" in t  # Tucker: w_a (r, out), w_b (r, in): both share axis 0
    for key, (other, axis) in _INNER:
        if key in t and other in t and t[key].ndim >= 1:
            axis = 0 if tucker and key.startswith(("hada_", "lokr_w2")) else axis
            if t[key].shape[0] != t[other].shape[axis]:
                raise AdapterFormatError(f"{where}: module {name}: its factors {other} {tuple(t[other].shape)} and "
                                         f"{key} {tuple(t[key].shape)} do not fit together (rank "
                                         f"{t[other].shape[axis]} vs {t[key].shape[0]}): the file is corrupt")
    if "hada_w1_a" in t and "hada_t1" not in t:  # the two Hadamard terms must have one (out, in_flat) shape
        shapes = [(t[a].shape[0], t[b][0].numel()) for a, b in (("hada_w1_a", "hada_w1_b"), ("hada_w2_a", "hada_w2_b"))]
        if shapes[0] != shapes[1]:
            raise AdapterFormatError(f"{where}: module {name}: its factors do not fit together (hada_w1_a @ hada_w1_b "
                                     f"is {shapes[0]}, hada_w2_a @ hada_w2_b {shapes[1]}): the file is corrupt")


def structured_module(name: str, t: dict[str, Tensor], *, alpha: float | None, rank: int | None = None,
                      peft: bool = False, where: Path | str = "", rank_cap: int | None = None) -> LoraModule | None:
    """One module of any parametrisation (keys of ``t`` are suffixes: ``hada_w1_a``, ``lora_down.weight`` ...) as
    exact LoRA factors; None when it has no weight delta (only ``diff_b`` / norms). ``rank``, ``peft``: PEFT's
    config rank and its always-alpha/r rule. ``rank_cap``: LoHa, LoKr and diff modules are built as the optimal
    truncation to that rank instead (a LoKr's full factors then give only their top triplets: ``convert --rank``).
    Raises :class:`AdapterFormatError` naming the module on bad shapes."""
    _check_parts(name, t, where)
    try:
        module = _build(name, t, alpha, rank, peft, where, rank_cap)
    except (RuntimeError, IndexError, ValueError) as exc:
        raise AdapterFormatError(f"{where}: module {name}: its factors ({', '.join(f'{k} {tuple(v.shape)}' for k, v in t.items())}) "
                                 f"do not fit together ({str(exc).splitlines()[0]}): the file is corrupt") from None
    if module is not None and "dora_scale" in t:
        _attach_dora(module, t["dora_scale"], name, where)
    return module


def _build(name, t, alpha, rank, peft, where, cap) -> LoraModule | None:
    dtype = _out_dtype(t)
    if "hada_w1_a" in t or "lokr_w1" in t or "lokr_w1_a" in t:
        loha = "hada_w1_a" in t
        r = rank if peft else (int(t["hada_w1_b"].shape[0]) if loha else None)
        stored = int(t["hada_w1_b"].shape[0]) if loha else _lokr_rank(t)
        if peft and stored is not None and stored != rank:
            raise AdapterFormatError(f"{where}: rank {rank} for {name} (r / rank_pattern) but its factors have rank "
                                     f"{stored}: the config and weights disagree")
        if peft and alpha is None:
            alpha = float(rank)
        svd, kind, shape, stored = (_loha if loha else _lokr)(t, _scale(t, alpha, r, peft=peft), cap)
        return LoraModule.from_svd(svd, param=Param.LOHA if loha else Param.LOKR, dtype=dtype, kind=kind,
                                   weight_shape=shape, stored_rank=stored)
    if "lora_mid.weight" in t:
        up, mid, down = t["lora_up.weight"], t["lora_mid.weight"], t["lora_down.weight"]
        B, A = tucker_locon_factors(up.double(), mid.double(), down.double())
        r = int(down.shape[0])
        shape = (up.shape[0], down.shape[1], *mid.shape[2:])
        return LoraModule(B=B.to(dtype), A=A.to(dtype), alpha=float(alpha if alpha is not None else r),
                          kind=ModuleKind.CONV, weight_shape=shape, param=Param.TUCKER, stored_rank=f"{r} (Tucker)")
    if "lora_down.weight" in t:
        A, B = t["lora_down.weight"], t["lora_up.weight"]
        r = A.shape[0] if A.ndim else 0
        return build_module(name, A, B, float(alpha if alpha is not None else r), embedding=False, source=where)
    if "diff" in t:
        return _diff_module(t["diff"], dtype, cap)
    return None


def _attach_dora(module: LoraModule, scale: Tensor, name: str, where) -> None:
    out, inp = module.weight_shape[0], module.weight_shape[1] if len(module.weight_shape) > 1 else 0
    if scale.shape[0] == out and scale.numel() == out:
        module.magnitude, module.dora_axis = scale.reshape(out).float(), "out"
    elif scale.ndim >= 2 and scale.shape[0] == 1 and scale.shape[1] == inp and scale.numel() == inp:
        module.magnitude, module.dora_axis = scale.reshape(inp).float(), "in"
    else:
        raise AdapterFormatError(f"{where}: module {name}: dora_scale {tuple(scale.shape)} fits neither ({out}, 1, ...) "
                                 f"nor the legacy (1, {inp}, ...): the file is corrupt")


def _tensor_deltas(name: str, t: dict[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for suffix, target in (("diff_b", "bias"), ("b_norm", "bias"), ("w_norm", "weight")):
        if suffix in t:
            out[f"{name}.{target}"] = t[suffix].float() if t[suffix].dtype != torch.float64 else t[suffix]
    return out


def _alpha(t: Tensor | None, where, key) -> float | None:
    if t is None:
        return None
    value = float(t.reshape(()).item()) if t.numel() == 1 and t.dtype != torch.bool else math.nan
    if not math.isfinite(value) or abs(value) > _FLOAT32_MAX:
        raise AdapterFormatError(f"{where}: key {key} ({tuple(t.shape)} {str(t.dtype).replace('torch.', '')}, "
                                 f"{t.reshape(-1)[:2].tolist()}) is not a finite scalar alpha within float32's range: "
                                 f"write one number, e.g. the rank (LyCORIS writes 1e10 for 'no alpha')")
    return value


def _group(ckpt, path: Path) -> dict[str, dict[str, str]]:
    groups: dict[str, dict[str, str]] = {}
    for key in ckpt.keys():
        parsed = _split(key)
        if parsed is None:
            raise AdapterFormatError(f"{path}: key {key} is not a LoRA/LyCORIS tensor (keys seen: "
                                     f"{lora_keys_seen(ckpt.keys())}): supported are lora_down/up/mid, hada_*, "
                                     f"lokr_*, dora_scale, diff, diff_b, w_norm, b_norm and alpha")
        groups.setdefault(parsed[0], {})[parsed[1]] = key
    for module, parts in groups.items():
        if set(parts) == {"alpha"}:
            raise AdapterFormatError(f"{path}: key {parts['alpha']} has no factors beside it: the file is incomplete")
    return groups


def read_lycoris(path: Path, *, module_names=None, base: str | None = None, rank_cap: int | None = None) -> Adapter:
    """Read a kohya-style file holding LyCORIS modules (any mix with plain LoRA); ``rank_cap``: see
    :func:`structured_module`."""
    ckpt = open_checkpoint(path, dequantize=False)
    groups = _group(ckpt, path)
    names, notes = resolve_module_names(ckpt, list(groups), path, module_names, base)
    modules: dict[str, LoraModule] = {}
    deltas: dict[str, Tensor] = {}
    for key, parts in groups.items():
        name = names[key]
        t = {s: ckpt.get(k) for s, k in parts.items() if s != "alpha"}
        alpha = _alpha(ckpt.get(parts["alpha"]) if "alpha" in parts else None, path, parts.get("alpha"))
        module = structured_module(name, t, alpha=alpha, where=path, rank_cap=rank_cap)
        if module is not None:
            modules[name] = module
        deltas.update(_tensor_deltas(name, t))
    legacy = [n for n, m in modules.items() if m.dora_axis == "in"]
    if legacy:
        notes.append(f"{path}: {len(legacy)} DoRA modules (e.g. {legacy[0]}) hold the legacy input-axis magnitude "
                     f"(LyCORIS wd_on_out=False): apply honours it, but it does not convert exactly to PEFT's "
                     f"output-axis DoRA")
    return Adapter(modules=modules, tensor_deltas=deltas, base_model=ckpt.metadata.get("ss_sd_model_name"),
                   source_format="lycoris", notes=notes, base_class=base_class_from_metadata(ckpt.metadata))


# ------------------------------------------------------------------------------------ PEFT LoHa / LoKr folders

_PEFT_PREFIX = "base_model.model."


def _peft_number(value, where, key: str, *, rank: bool = False) -> float:
    """A finite number from adapter_config.json (``rank``: a whole number >= 1), else one line naming the field."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if ok and rank:
        ok = value >= 1 and float(value).is_integer()
    if not ok:
        need = "a whole number >= 1" if rank else "a finite number"
        raise AdapterFormatError(f"{where}: {key} {value!r} is not {need}: write a number such as 8 there")
    return float(value)


def _peft_pattern(config: dict, key: str, where, *, rank: bool) -> dict:
    pattern = config.get(key) or {}
    if not isinstance(pattern, dict):
        raise AdapterFormatError(f"{where}: {key} is a {type(pattern).__name__}, not an object of module: value")
    for name, value in pattern.items():
        _peft_number(value, where, f"{key}[{name!r}]", rank=rank)
    return pattern


def read_peft_lycoris(folder: Path, config: dict, weights: Path, *, rank_cap: int | None = None) -> Adapter:
    """Read a PEFT LoHa / LoKr folder (``config``: its adapter_config.json, already parsed; ``rank_cap``: see
    :func:`structured_module`)."""
    where = folder / CONFIG_NAME
    ckpt = open_checkpoint(weights, dequantize=False)
    r = _peft_number(config.get("r", 8), where, "r", rank=True)
    alpha = _peft_number(config.get("alpha", 8), where, "alpha")
    rank_pattern = _peft_pattern(config, "rank_pattern", where, rank=True)
    alpha_pattern = _peft_pattern(config, "alpha_pattern", where, rank=False)
    groups: dict[str, dict[str, Tensor]] = {}
    for key in ckpt.keys():
        plain = key[len(_PEFT_PREFIX):] if key.startswith(_PEFT_PREFIX) else key
        parsed = _split(plain)
        if parsed is None or parsed[1] not in (*_LOHA, *_LOKR):
            raise AdapterFormatError(f"{weights}: key {key} is not a {config.get('peft_type')} factor (keys seen: "
                                     f"{lora_keys_seen(ckpt.keys())})")
        groups.setdefault(parsed[0], {})[parsed[1]] = ckpt.get(key)
    modules = {}
    for name, t in groups.items():
        rank = int(pattern_value(rank_pattern, name, r, "rank_pattern"))
        a = float(pattern_value(alpha_pattern, name, alpha, "alpha_pattern"))
        modules[name] = structured_module(name, t, alpha=a, rank=rank, peft=True, where=weights, rank_cap=rank_cap)
    return Adapter(modules=modules, base_model=config.get("base_model_name_or_path"), pipeline=False,  # one model's
                   source_format=f"peft-{str(config.get('peft_type')).lower()}")


def fit_kernels(adapter: Adapter, shape_of) -> list[str]:
    """Give LoHa / LoKr modules stored with flattened conv factors (r, in*kh*kw) their kernel from the base:
    ``shape_of(module name)`` is the base weight's shape or None. Returns the names still without one."""
    unknown = []
    for name, m in adapter.modules.items():
        if m.param not in (Param.LOHA, Param.LOKR) or m.kind is not ModuleKind.LINEAR:
            continue
        shape = shape_of(name)
        if shape is not None and len(shape) > 2 and shape[0] == m.weight_shape[0] \
                and math.prod(shape[1:]) == m.weight_shape[1]:
            m.kind, m.weight_shape = ModuleKind.CONV, tuple(int(d) for d in shape)
        elif shape is None:
            unknown.append(name)
    return unknown
