"""Will this adapter file load in a given consumer (PEFT, diffusers, ComfyUI, A1111)? A list of typed problems.

Checks, each a :class:`Problem` naming the key: every key maps to a module the consumer loads (its naming table
in :mod:`lowrank_tools.io.consumer_keys`; for diffusers the judge is diffusers' own ``lora_state_dict``); with a
base, the module exists there with a shape that fits; alpha anomalies (placeholders, 0, negative, non-finite, a
rank 3x its siblings' with their alpha: the fused/split mistake of sd-scripts #2204); zero-padded ranks;
non-finite factors; dtypes loaders reject. Errors and warnings are problems; notes are not.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import torch

from .errors import AdapterFormatError, CheckpointNotFound
from .io.base_class import base_class_from_metadata
from .io.checkpoint import as_checkpoint, open_checkpoint
from .io.base_lookup import BaseIndex
from .io.json_input import load_json
from .io.consumer_keys import KOHYA_LIKE_PREFIXES, Consumer, Role, key_accepted, split_key, unknown_to_architecture
from .io.diffusers_judge import LDM_WORKAROUND, judge_for, ldm_unet_keys, trace_modules
from .io.diffusers_lora import DIFFUSERS_NAME
from .io.layers import compile_filters, conv1d_rule, matches
from .io.module_names import checkpoint_index
from .io.patterns import peft_pattern_value
from .io.peft import CONFIG_NAME, WEIGHTS_NAME, key_saved_whole

__all__ = ["Severity", "Problem", "CheckResult", "check_adapter", "Consumer"]

PLACEHOLDER_ALPHA = 1e9
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)



class Severity(str, Enum):
    ERROR = "error"      # the consumer refuses the file, drops a key or computes garbage
    WARNING = "warning"  # loads, but almost surely not what was meant (or wastes size)
    NOTE = "note"        # a fact worth knowing, not a problem


@dataclass(frozen=True)
class Problem:
    severity: Severity
    code: str           # short id: unknown-key, layout, shape, missing-module, alpha, alpha-3x, zero-rank, ...
    key: str | None     # the tensor (or module) it is about; None for the whole file
    message: str

    def line(self) -> str:
        return f"{self.severity.value}: {self.key + ': ' if self.key else ''}{self.message}"

    def as_dict(self) -> dict:
        return {"severity": self.severity.value, "code": self.code, "key": self.key, "message": self.message}


@dataclass
class CheckResult:
    adapter: str
    consumer: Consumer
    tensors: int = 0
    modules: int = 0
    findings: list[Problem] = field(default_factory=list)

    @property
    def problems(self) -> list[Problem]:
        return [p for p in self.findings if p.severity is not Severity.NOTE]

    @property
    def notes(self) -> list[Problem]:
        return [p for p in self.findings if p.severity is Severity.NOTE]

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        if self.ok:
            return (f"ok: {self.adapter} loads in {self.consumer.value} ({self.modules} modules, {self.tensors} "
                    f"tensors)")
        return f"{len(self.problems)} problem(s): {self.adapter} will not load as meant in {self.consumer.value}"

    def as_dict(self) -> dict:
        return {"adapter": self.adapter, "consumer": self.consumer.value, "ok": self.ok, "modules": self.modules,
                "tensors": self.tensors, "problems": [p.as_dict() for p in self.problems],
                "notes": [p.as_dict() for p in self.notes]}


@dataclass
class _Module:
    tensors: dict[str, str] = field(default_factory=dict)   # suffix -> key
    roles: dict[Role, str] = field(default_factory=dict)    # role -> key
    alpha: float | None = None
    rank: int | None = None


def _weights_file(path: Path, consumer: Consumer) -> tuple[Path, dict | None]:
    if not path.exists():
        raise CheckpointNotFound(f"adapter {path} does not exist: check the path")
    if not path.is_dir():
        return path, None
    config = None
    if (path / CONFIG_NAME).is_file():
        config = load_json(path / CONFIG_NAME, error=AdapterFormatError, fix="re-save the adapter")
        if not isinstance(config, dict):
            raise AdapterFormatError(f"{path / CONFIG_NAME}: expected a JSON object: re-save the adapter")
    peft = (WEIGHTS_NAME, "adapter_model.bin")  # a lone component's folder holds both: each consumer reads its own
    for name in (DIFFUSERS_NAME, *peft) if consumer is Consumer.DIFFUSERS else (*peft, DIFFUSERS_NAME):
        if (path / name).is_file():
            return path / name, config
    raise AdapterFormatError(f"{path}: a folder without {WEIGHTS_NAME} or {DIFFUSERS_NAME}: not an adapter folder")


def check_adapter(path: str | os.PathLike, consumer: Consumer | str, *, base=None, include=(),
                  exclude=()) -> CheckResult:
    """Every problem ``consumer`` would have with the adapter at ``path`` (file or folder); ``base``: a checkpoint
    whose modules and shapes the adapter must fit. ``include`` / ``exclude``: regexes on module keys."""
    path, consumer = Path(path), Consumer(consumer)
    include, exclude = compile_filters(include, "--include"), compile_filters(exclude, "--exclude")
    weights, config = _weights_file(path, consumer)
    ckpt = open_checkpoint(weights, dequantize=False)
    result = CheckResult(str(path), consumer)
    add = result.findings.append
    modules: dict[str, _Module] = defaultdict(_Module)
    for key in ckpt.keys():
        module, suffix, role = split_key(key)
        if not matches(module, include, exclude):
            continue
        result.tensors += 1
        if key_saved_whole(key, config):  # modules_to_save: PEFT loads the tensor as it is
            continue
        why = key_accepted(consumer, module, suffix)
        if why is not None and consumer is not Consumer.DIFFUSERS:
            add(Problem(Severity.ERROR, "unknown-key", key, f"not loaded by {consumer.value}: {why}"))
        if suffix is not None:
            modules[module].tensors[suffix] = key
            if role is not None and role is not Role.OTHER:
                modules[module].roles[role] = key
    result.modules = len(modules)
    if consumer is Consumer.COMFYUI:
        for module, why in unknown_to_architecture(modules)[1].items():
            add(Problem(Severity.ERROR, "unknown-module", module, f"not loaded by comfyui: {why}"))
    _collapse(result, consumer, any(m.startswith(KOHYA_LIKE_PREFIXES) for m in modules))
    _peft_layout(result, modules, config, path, weights, consumer)
    _tensors(result, ckpt, modules)
    _alphas(result, ckpt, modules, config)
    if consumer is Consumer.PEFT and config is not None:
        _peft_ranks(result, modules, config)
    base = as_checkpoint(base) if base is not None else None
    if base is not None:
        _against_base(result, ckpt, modules, base, config if consumer is Consumer.PEFT else None)
    if consumer is Consumer.DIFFUSERS:
        _diffusers_judge(result, ckpt, [k for m in modules.values() for k in m.tensors.values()], base)
    return result


def _collapse(result, consumer, kohya: bool) -> None:
    """One line instead of one per key when no key at all is named for the consumer (a whole-file layout problem)."""
    unknown = [p for p in result.findings if p.code == "unknown-key"]
    if not unknown or len(unknown) < result.tensors or len(unknown) == 1:
        return
    result.findings[:] = [p for p in result.findings if p.code != "unknown-key"]
    if not (consumer is Consumer.PEFT and kohya):  # the layout line below says it for PEFT
        first = unknown[0]
        result.findings.append(Problem(Severity.ERROR, "layout", first.key, f"no key of the file is named for "
                                       f"{consumer.value} ({len(unknown)} keys, this one first): "
                                       f"{first.message.split(': ', 1)[1]}"))


def _peft_layout(result, modules, config, path, weights, consumer) -> None:
    add = result.findings.append
    kohya = any(m.startswith(KOHYA_LIKE_PREFIXES) for m in modules)
    if consumer is not Consumer.PEFT:
        return
    if kohya:
        add(Problem(Severity.ERROR, "layout", None, f"a kohya-named file: PEFT cannot load it as is; run "
                    f"`lowrank-tools convert {path} -o OUT --format peft`"))
    if config is None:
        add(Problem(Severity.ERROR, "config", None, f"no {CONFIG_NAME} beside the weights: PeftModel.from_pretrained "
                    f"needs a folder; run `lowrank-tools convert {path} -o OUT --format peft`"))
        return
    targets = config.get("target_modules")
    for module in modules:
        name = module[len("base_model.model."):] if module.startswith("base_model.model.") else module
        if targets is not None and not _targeted(name, targets):
            add(Problem(Severity.ERROR, "not-targeted", module, f"module not in target_modules {targets!r}: PEFT "
                        f"silently drops its weights"))


def _peft_ranks(result, modules, config) -> None:
    """PEFT builds each layer at the config's rank (``rank_pattern`` or ``r``) and then refuses a size mismatch."""
    pattern = config.get("rank_pattern") or {}
    for module, m in modules.items():
        name = module[len("base_model.model."):] if module.startswith("base_model.model.") else module
        want = peft_pattern_value(pattern, name, config.get("r"), error=AdapterFormatError)
        if m.rank is not None and want is not None and m.rank != int(want):
            result.findings.append(Problem(Severity.ERROR, "rank", module, f"rank {m.rank} in the file but {want} in "
                                           f"{CONFIG_NAME} (r / rank_pattern): PEFT refuses the size mismatch"))


def _targeted(name: str, targets) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _tensors(result, ckpt, modules) -> None:
    """dtypes, finiteness and exactly-zero rank components of every factor pair."""
    add = result.findings.append
    for module, m in modules.items():
        for key in m.tensors.values():
            dtype = ckpt.dtype(key)
            if dtype == torch.float64:
                add(Problem(Severity.WARNING, "dtype", key, "float64: twice the size, and some loaders refuse it; "
                            "write it again with --dtype float32"))
            elif dtype not in _FLOATS:
                add(Problem(Severity.ERROR, "dtype", key, f"{str(dtype).replace('torch.', '')} is not a float factor "
                            f"any loader applies (float16/bfloat16/float32)"))
                continue
            if not bool(torch.isfinite(ckpt.get(key).float()).all()):
                add(Problem(Severity.ERROR, "non-finite", key, "holds NaN or Inf: the adapted model outputs NaN"))
        _zero_rank(result, ckpt, module, m)


def _zero_rank(result, ckpt, module, m) -> None:
    down, up = m.roles.get(Role.DOWN), m.roles.get(Role.UP)
    if down is None or up is None:
        return
    A, B = ckpt.get(down).float(), ckpt.get(up).float()
    A, Bt = A.reshape(A.shape[0], -1), B.transpose(0, 1).reshape(B.shape[1], -1)  # (r, in), (r, out)
    m.rank = A.shape[0]
    if Bt.shape[0] != A.shape[0]:
        result.findings.append(Problem(Severity.ERROR, "shape", up, f"rank {Bt.shape[0]} of up/B disagrees with rank "
                                       f"{A.shape[0]} of {down}"))
        return
    zero = int(((A == 0).all(1) | (Bt == 0).all(1)).sum())
    if zero and zero < m.rank:
        result.findings.append(Problem(Severity.WARNING, "zero-rank", module, f"{zero} of its {m.rank} rank components "
                                       f"are exactly zero: rank {m.rank - zero} holds it losslessly; run "
                                       f"`lowrank-tools resize ADAPTER -o OUT --energy 1`"))
    elif zero:
        result.findings.append(Problem(Severity.WARNING, "zero-rank", module, "every rank component is zero: the "
                                       "module changes nothing"))


def _peft_alpha(name: str, config: dict) -> float | None:
    value = peft_pattern_value(config.get("alpha_pattern") or {}, name, config.get("lora_alpha", config.get("alpha")),
                               what="alpha_pattern", error=AdapterFormatError)
    return None if value is None else float(value)


def _alphas(result, ckpt, modules, config) -> None:
    add = result.findings.append
    for module, m in modules.items():
        if "alpha" in m.tensors:
            m.alpha = float(ckpt.get(m.tensors["alpha"]).float().reshape(-1)[0])
        elif config is not None:
            name = module[len("base_model.model."):] if module.startswith("base_model.model.") else module
            m.alpha = _peft_alpha(name, config)
        elif module.startswith(KOHYA_LIKE_PREFIXES) and Role.DOWN in m.roles:
            add(Problem(Severity.NOTE, "no-alpha", module, "no .alpha: loaders use scale 1 (alpha = rank)"))
        key = m.tensors.get("alpha", module)
        a = m.alpha
        if a is None:
            continue
        if not math.isfinite(a):
            add(Problem(Severity.ERROR, "alpha", key, f"alpha is {a}: the scale alpha/r is not a number"))
        elif a == 0:
            add(Problem(Severity.ERROR, "alpha", key, "alpha is 0: the module changes nothing"))
        elif a < 0:
            add(Problem(Severity.ERROR, "alpha", key, f"alpha {a:g} is negative: the update is applied sign-flipped"))
        elif a >= PLACEHOLDER_ALPHA and Role.DOWN in m.roles:
            add(Problem(Severity.ERROR, "alpha", key, f"alpha {a:g} is a placeholder (LyCORIS' 'no alpha'): a LoRA "
                        f"loader scales by alpha/r = {a / max(m.rank or 1, 1):.3g}"))
    _alpha_3x(result, modules)


def _alpha_3x(result, modules) -> None:
    """A module with 3x its siblings' rank but their alpha: fused or split without rescaling (sd-scripts #2204)."""
    lora = [m for m in modules.values() if m.rank and m.alpha is not None]
    if len(lora) < 2:
        return
    rank = Counter(m.rank for m in lora).most_common(1)[0][0]
    alpha = Counter(m.alpha for m in lora if m.rank == rank).most_common(1)[0][0]
    for module, m in modules.items():
        if m.rank == 3 * rank and m.alpha == alpha:
            result.findings.append(Problem(
                Severity.WARNING, "alpha-3x", module,
                f"rank {m.rank} = 3x its siblings' {rank} with their alpha {alpha:g}: scale alpha/r is a third of "
                f"theirs, the fused/split mistake of sd-scripts #2204; a fused q/k/v needs alpha {3 * alpha:g}"))


def _against_base(result, ckpt, modules, base, peft_config: dict | None) -> None:
    """Each module in the base with a shape its update fits; an output head the base does not store fits the input
    embedding it is tied to (as apply adds it); a transformers Conv1D weight (GPT-2 family, stored (in, out), known
    from the base's config.json) takes the transposed (out, in) update, as PEFT lays it; a layer PEFT cannot wrap."""
    index = BaseIndex(base)
    if any(index.find(module) is None for module in modules):  # a transformers model's names (v5, tied aliases)
        index.add_names(checkpoint_index(base, ckpt.metadata))
    conv1d = conv1d_rule(base)
    add = result.findings.append
    flagged = peft_config is None or peft_config.get("fan_in_fan_out") is True
    for module, m in modules.items():
        found = index.find(module)
        if found is None:
            near = index.closest(module)
            hint = f"; closest: {near}" if near else ""
            add(Problem(Severity.ERROR, "missing-module", module, f"no such module in the base{hint}"))
            continue
        shape = tuple(base.shape(found))
        if conv1d(found) and len(shape) == 2:
            shape = (shape[1], shape[0])  # the (out, in) matrix a Conv1D weight is the transpose of
            if not flagged:
                flagged = True  # one note for the file: PEFT sets it per layer
                add(Problem(Severity.NOTE, "fan-in-fan-out", module, f"{found} is a transformers Conv1D (weight "
                            f"(in, out)) but adapter_config.json has fan_in_fan_out false: PEFT warns and sets it "
                            f"true for such layers; the factors fit either way"))
        want = _fit(ckpt, m, shape)
        if want is not None:
            add(Problem(Severity.ERROR, "shape", module, f"adapts {want} but {found} is {tuple(base.shape(found))}"))
        why = index.refused(found, m.rank) if result.consumer in (Consumer.PEFT, Consumer.DIFFUSERS) else None
        if why:  # diffusers loads through PEFT too
            add(Problem(Severity.ERROR, "peft-layer", module, why))


def _fit(ckpt, m, shape) -> str | None:
    """None when the module's update fits a base weight of ``shape``; else the update's (out, in) as text."""
    down, up = m.roles.get(Role.DOWN), m.roles.get(Role.UP)
    if down is None or up is None:
        return None
    d, u = ckpt.shape(down), ckpt.shape(up)
    if "lora_mid.weight" in m.tensors:  # Tucker conv LoRA: down (r, in, 1, 1), mid (r, r, kh, kw) holds the kernel
        d = (*d[:2], *ckpt.shape(m.tensors["lora_mid.weight"])[2:])
    out, inp = u[0], math.prod(d[1:])
    embedding = down.endswith("lora_embedding_A")
    want = (shape[1], shape[0]) if embedding and len(shape) == 2 else (shape[0], math.prod(shape[1:]))
    if (out, inp) == want and (len(d) < 3 or len(shape) < 3 or tuple(d[2:]) == tuple(shape[2:])):
        return None
    return f"(out, in) = ({out}, {inp})" + (f" kernel {tuple(d[2:])}" if len(d) > 2 else "")


def _diffusers_judge(result, ckpt, keys, base) -> None:
    """Run diffusers' own ``<Pipeline>.lora_state_dict`` on the tensors (the base's pipeline when known): what it
    refuses, and each module ``load_lora_weights`` would silently leave out
    (:mod:`~lowrank_tools.io.diffusers_judge`), is a problem; a pipeline diffusers has no LoRA loader for is one.
    Without diffusers, the naming table decides (a note says so)."""
    add = result.findings.append
    try:
        import diffusers
    except ImportError:
        add(Problem(Severity.NOTE, "no-diffusers", None, "diffusers is not installed: judged by naming alone"))
        for key in keys:
            why = key_accepted(Consumer.DIFFUSERS, *split_key(key)[:2])
            if why:
                add(Problem(Severity.ERROR, "unknown-key", key, f"not loaded by diffusers: {why}"))
        return
    judge = judge_for(diffusers, keys, base, recorded=base_class_from_metadata(ckpt.metadata))
    name, pipeline, components = judge.name, judge.loader, judge.components
    if pipeline is None:
        add(Problem(Severity.ERROR, "no-loader", None, f"diffusers {diffusers.__version__} has no LoRA loader for "
                    f"{name} (from {judge.evidence}): neither load_lora_weights nor load_lora_adapter loads this "
                    f"adapter; merge it into the model instead (`lowrank-tools apply BASE ADAPTER -o OUT`)"))
        return
    try:
        pipeline.lora_state_dict({k: ckpt.get(k) for k in keys})
    except Exception as exc:  # noqa: BLE001 - whatever diffusers raises is its verdict
        _refused(result, name, exc, keys)
        return
    for module, named in trace_modules(pipeline, keys, ckpt.get, components).items():
        if named is not None:
            how = (f"its converter names it {named}, outside {', '.join(components)}" if named else
                   "its converter leaves it out (unsupported: a log line at most)")
            add(Problem(Severity.ERROR, "diffusers-dropped", module, f"{name}.load_lora_weights silently drops it: "
                        f"{how}"))
    ldm = ldm_unet_keys(name, {split_key(k)[0] for k in keys})
    if ldm:
        add(Problem(Severity.ERROR, "ldm-names", ldm[0], f"{len(ldm)} modules in SD 1.x LDM UNet names (this one "
                    f"first): {name}.load_lora_weights does not map them (it makes input_blocks_1_1 down_blocks.1.1, "
                    f"no such module) and refuses or drops them; only lora_state_dict(..., unet_config=) maps them: "
                    f"{LDM_WORKAROUND} (lowrank-tools has no LDM -> diffusers UNet renaming yet)"))
    add(Problem(Severity.NOTE, "judge", None, f"judged by diffusers {diffusers.__version__} {name}.lora_state_dict "
                f"(from {judge.evidence})"))


def _refused(result, name: str, exc: Exception, keys) -> None:
    text = str(exc).strip() or type(exc).__name__
    named = [k for k in keys if k in text] or [None]
    first = text.splitlines()[0].strip()
    if isinstance(exc, AssertionError) and any("_linear1." in k for k in keys):  # FORMAT-FACTS: hard-coded widths
        first = "its kohya-Flux converter splits single_blocks linear1 only at full-size Flux widths [3072]*3+[12288]"
    for key in named:
        result.findings.append(Problem(Severity.ERROR, "diffusers-refused", key, f"diffusers {name}.lora_state_dict "
                                       f"refuses the file ({type(exc).__name__}: {first})"))
