"""Which tensors of a checkpoint become which LoRA modules: kinds, filters, tied weights, what is saved whole.

- Kinds: 2-D weights are linear, or embeddings when their leaf is named so (PEFT's ``lora_embedding_A/B``), or
  transformers ``Conv1D`` layers (weight (in, out): GPT-2 and kin) when the checkpoint's ``config.json`` says so
  (:func:`conv1d_rule`, from :data:`~lowrank_tools.io.model_config.CONV1D_LAYERS`; shapes cannot tell);
  3-D to 5-D weights are conv kernels (Conv1d/2d/3d), factored as (out, in * prod(kernel)).
- Tied weights: an output head (``lm_head``, or what the model class ties: Whisper's ``proj_out``, see
  :func:`~lowrank_tools.io.base_model.tied_head_name`) that is the input embedding -- stored equal to it, or absent
  because ``tie_word_embeddings`` is set -- is factored once, as the embedding, and the adapter carries the
  delta on both sides (:func:`tied_head_module`). A LoRA on one side alone would change only the token lookup
  or only the output projection and silently lose the rest of the fine-tune.
- Saved whole: tensors of modules matching ``--full-modules`` go to PEFT ``modules_to_save`` as they are in the
  tuned checkpoint. A weight whose shape changed (a vocabulary that grew) cannot be a LoRA: without
  ``--full-modules`` it is an error naming the tensor.
- 1-D tensors (biases, norms) are never low-rank: they are listed with ||d|| / ||W0|| so the user sees what the
  adapter leaves out.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..adapter import LoraModule, ModuleKind, module_name
from .checkpoint import Checkpoint, Pairing
from ..errors import ConversionError, ShapeMismatch, UnsupportedTensor
from .base_model import WORD_EMBEDDINGS, TiedHead, component_configs, find_tied_heads, tied_head_module
from .ldm_names import is_vae
from .model_config import conv1d_leaves, grouped_convs, wrapper_hidden
from .module_names import model_names
from .patterns import check_patterns, safe_search

__all__ = ["FACTORABLE_DTYPES", "check_factorable", "layer_kind", "compile_filters", "matches", "select_layers",
           "relative_change", "LayerPlan", "plan_layers",
           "conv1d_rule", "kohya_refuses_conv1d", "WHOLE_LEAVES", "FUSED_EXPERTS", "GROUPED", "grouped_warning"]

#: weights stored in these dtypes are factored; integer and quantized ones (int8, float8, packed uint8) are refused
FACTORABLE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# leaf names of nn.Embedding weights in transformers / diffusers models, matched whole: a substring test would
# take Linear layers such as Flux's x_embedder, GPT-NeoX's embed_out or Qwen-MoE's shared_expert_gate
EMBEDDING_LEAVES = frozenset(WORD_EMBEDDINGS + (
    "wpe", "embed_positions", "position_embeddings", "position_embedding", "token_embedding", "token_type_embeddings",
    "class_embedding", "relative_attention_bias", "embeddings", "embedding", "embed"))
# weights a PEFT LoRA cannot carry although PEFT wraps their module: learned positional embeddings whose forward
# takes positions or a mask, not token ids (OPT, BART, Whisper: PEFT's Embedding wrapper breaks it), and DeBERTa's
# relative position table, read as ``.weight`` (a LoRA there is never used); saved whole for PEFT targets
WHOLE_LEAVES = frozenset({"embed_positions", "rel_embeddings"})
# report.skipped reason of fused 3-D MoE expert parameters (GPT-OSS / transformers v5 ``experts.gate_up_proj``
# (experts, in, 2 * ff), no ``.weight``): per-expert LoRA factors of them have no file layout here yet
FUSED_EXPERTS = ("fused MoE experts (experts, in, out) stored without .weight: left out, no LoRA layout here carries "
                 "them (PEFT would need target_parameters)")


def layer_kind(name: str, shape: Sequence[int], *, conv1d: bool = False) -> ModuleKind | None:
    """How a weight is adapted: linear (2-D), conv (3-D/4-D kernels), embedding (2-D, named so), conv1d (2-D, a
    transformers Conv1D: ``conv1d`` says so, see :func:`conv1d_rule`); None if not."""
    if not name.endswith(".weight") or len(shape) < 2 or 0 in shape:
        return None
    if len(shape) == 2:
        leaf = module_name(name).rsplit(".", 1)[-1]
        if leaf in EMBEDDING_LEAVES:
            return ModuleKind.EMBEDDING
        return ModuleKind.CONV1D if conv1d else ModuleKind.LINEAR
    return ModuleKind.CONV if len(shape) in (3, 4, 5) else None


def conv1d_rule(*ckpts: Checkpoint | None):
    """``rule(name) -> bool | None`` for tensor or module names of ``ckpts`` (the first whose config speaks wins,
    pipeline components by their own config): True for a transformers Conv1D layer (weight (in, out)), False when
    a config says it is not one, None when no config.json says anything (then it is taken as nn.Linear)."""
    rules: dict[str, frozenset[str]] = {}  # name prefix -> Conv1D leaves of the model there
    for ckpt in ckpts:
        for prefix, config in component_configs(ckpt) if ckpt is not None else ():
            leaves = conv1d_leaves(config)
            if leaves is not None:
                rules.setdefault(prefix, leaves)
    ordered = sorted(rules.items(), key=lambda item: -len(item[0]))  # a component's prefix before ""

    def rule(name: str) -> bool | None:
        mod = module_name(name)
        for prefix, leaves in ordered:
            if mod.startswith(prefix):
                return mod.rsplit(".", 1)[-1] in leaves
        return None
    return rule


def matches(name: str, include: Sequence[str], exclude: Sequence[str]) -> bool:
    """``re.search`` semantics, with each pattern's worst-case work bounded (:mod:`lowrank_tools.patterns`)."""
    if include and not safe_search(include, name, what="--include"):
        return False
    return not safe_search(exclude, name, what="--exclude")


def compile_filters(patterns: Sequence[str], option: str) -> tuple[str, ...]:
    """Check regexes up front: valid, and no pattern whose matching could take exponential time."""
    check_patterns(patterns, option)
    return tuple(patterns)


def check_factorable(name: str, *ckpts: Checkpoint | None) -> None:
    """Raise :class:`UnsupportedTensor` when weight ``name`` is stored as integers or a quantized float (int8,
    float8, 4-bit packed in uint8) in any of ``ckpts``: its raw values are not the weights, so no delta exists."""
    for ckpt in ckpts:
        if ckpt is not None and name in ckpt and ckpt.dtype(name) not in FACTORABLE_DTYPES:
            what = f"{ckpt.dtype(name)} {tuple(ckpt.shape(name))}".replace("torch.", "")
            raise UnsupportedTensor(f"tensor {name} in {ckpt.path} is {what}: integer and quantized weights (int8, "
                                    f"float8, 4-bit packed in uint8) cannot be factored: dequantize the checkpoint to "
                                    f"float16/bfloat16/float32 first, or --exclude '{re.escape(module_name(name))}'")


def select_layers(names: Sequence[str], tuned: Checkpoint, include, exclude, *,
                  base: Checkpoint | None = None) -> tuple[dict, dict, list]:
    """Split paired tensor names into layers to factor ({name: kind}), skipped ones, and 1-D float tensors.

    A selected weight stored as integers or quantized (in ``tuned``, or ``base`` when given) raises
    :class:`UnsupportedTensor` (see :func:`check_factorable`)."""
    selected: dict[str, ModuleKind] = {}
    skipped: dict[str, list[str]] = {"filtered out": [], "not a float tensor": [], "not a weight matrix": [],
                                     "zero-size": []}
    one_d = []
    conv1d = conv1d_rule(base, tuned)
    for name in names:
        shape, dt = tuned.shape(name), tuned.dtype(name)
        if is_vae(name):  # a single-file checkpoint's VAE is never adapted
            skipped.setdefault("VAE of a single-file checkpoint (first_stage_model., vae.)", []).append(name)
            continue
        if 0 in shape:
            skipped["zero-size"].append(name)
            continue
        if layer_kind(name, shape) is not None and matches(module_name(name), include, exclude):
            check_factorable(name, tuned, base)
        if not dt.is_floating_point:
            skipped["not a float tensor"].append(name)
            continue
        kind = layer_kind(name, shape, conv1d=bool(conv1d(name)))
        if kind is None:
            (one_d if len(shape) == 1 else skipped.setdefault(_not_a_matrix(name, shape), [])).append(name)
            continue
        if not matches(module_name(name), include, exclude):
            skipped["filtered out"].append(name)
            continue
        selected[name] = kind
    return selected, skipped, one_d


def _not_a_matrix(name: str, shape: Sequence[int]) -> str:
    """The skip reason of a tensor no layer kind takes: fused MoE experts are named as such (extract reports their
    relative change: the part of the fine-tune the adapter leaves out)."""
    return FUSED_EXPERTS if len(shape) == 3 and ".experts." in f".{name}" else "not a weight matrix"


def relative_change(W0: Tensor, W1: Tensor) -> float:
    d = float(torch.linalg.vector_norm(W1.float() - W0.float(), dtype=torch.float64))
    n = float(torch.linalg.vector_norm(W0.float(), dtype=torch.float64))
    return d / n if n else (math.inf if d else 0.0)


# -------------------------------------------------------------------------------------------------- plan

# report.skipped reason of embeddings a target format cannot hold (also formats.fit_format's)
NOT_HELD = "embedding (the target format cannot hold it: use --format peft)"
# report.skipped reason of convs with groups > 1 (their model's class says: io/model_config.grouped_convs)
GROUPED = "grouped conv (groups > 1: PEFT refuses a LoRA on it; save it whole with --full-modules)"


@dataclass
class LayerPlan:
    """What extract does with each tensor of the tuned checkpoint."""

    layers: dict[str, ModuleKind]  # tensor name -> kind, to factor
    skipped: dict[str, list[str]]  # reason -> tensor names
    one_d: list[str]  # 1-D float tensors left out (their relative change is reported)
    full: dict[str, str] = field(default_factory=dict)  # tensor saved whole -> tuned tensor holding its value
    tied: dict[str, TiedHead] = field(default_factory=dict)  # embedding tensor -> head module sharing it
    notes: list[str] = field(default_factory=list)

    def finish(self, modules: dict[str, LoraModule], tuned: Checkpoint) -> dict[str, Tensor]:
        """Add each tied head's module beside its embedding's (in ``modules``); return the tensors saved whole."""
        for emb, tie in self.tied.items():
            if module_name(emb) in modules:
                modules[tie.head] = tied_head_module(modules[module_name(emb)])
        return {name: tuned.get(source) for name, source in self.full.items()}

    def unsaved(self, pairing: Pairing) -> Pairing:
        """The pairing without the tensors saved whole (so its warning lists only what is really left out)."""
        return Pairing(pairing.names, [n for n in pairing.only_base if n not in self.full],
                       [n for n in pairing.only_tuned if n not in self.full],
                       [m for m in pairing.shape_mismatch if m[0] not in self.full])


def _module_of(tensor: str) -> str:
    return tensor.rsplit(".", 1)[0] if "." in tensor else tensor


def _full_tensors(tuned: Checkpoint, patterns: Sequence[str]) -> dict[str, str]:
    if not patterns:
        return {}
    return {n: n for n in tuned.keys() if safe_search(patterns, _module_of(n), what="--full-modules")}


def _apply_ties(plan: LayerPlan, ties: list[TiedHead], patterns: Sequence[str]) -> None:
    for t in ties:
        head_weight = f"{t.head}.weight"
        if t.embedding in plan.full or head_weight in plan.full or safe_search(patterns, t.head, what="--full-modules"):
            plan.full[t.embedding] = t.embedding
            plan.full[head_weight] = head_weight if t.stored else t.embedding
            plan.notes.append(f"{t.head} shares {t.embedding}: both are saved whole")
        elif t.embedding in plan.layers:
            plan.tied[t.embedding] = t
            plan.layers.pop(head_weight, None)
            how = "stored equal to it" if t.stored else "tie_word_embeddings"
            plan.notes.append(f"{t.head} shares {t.embedding} ({how}): factored once, the delta is carried on both "
                              f"sides (lora_embedding_A/B and {t.head} lora_A/B)")
        elif t.stored and plan.layers.pop(head_weight, None) is not None:
            plan.skipped.setdefault("tied to an embedding left out", []).append(head_weight)


def _drop(plan: LayerPlan, names) -> None:
    names = set(names)
    plan.layers = {n: k for n, k in plan.layers.items() if n not in names}
    plan.one_d = [n for n in plan.one_d if n not in names]
    plan.skipped = {r: [n for n in v if n not in names] for r, v in plan.skipped.items()}


def _drop_embeddings(plan: LayerPlan) -> None:
    embeddings = [n for n, k in plan.layers.items() if k is ModuleKind.EMBEDDING]
    _drop(plan, embeddings)
    heads = [f"{plan.tied.pop(n).head}.weight" for n in embeddings if n in plan.tied]
    if embeddings:
        plan.skipped.setdefault(NOT_HELD, []).extend(embeddings + heads)


def _check_shapes(pairing: Pairing, plan: LayerPlan, include, exclude, ckpts=()) -> None:
    """A weight whose shape changed cannot be a LoRA: say so, and how to keep it (saved whole) or drop it.
    A quantized weight (4-bit packed: another shape) is named as such."""
    for name, before, after in pairing.shape_mismatch:
        if name in plan.full or layer_kind(name, after) is None or not matches(module_name(name), include, exclude):
            continue
        check_factorable(name, *ckpts)
        what = "the vocabulary grew" if before[1:] == after[1:] else "the layer was resized"
        mod = module_name(name)
        raise ShapeMismatch(f"{name} changed shape in the fine-tune ({tuple(before)} -> {tuple(after)}: {what}); a "
                            f"LoRA cannot change a weight's shape: pass --full-modules '{re.escape(mod)}' to save it "
                            f"whole (PEFT modules_to_save), or --exclude '{re.escape(mod)}'")


def plan_layers(base: Checkpoint, tuned: Checkpoint, pairing: Pairing, *, include: Sequence[str] = (),
                exclude: Sequence[str] = (), full_modules: Sequence[str] = (), embeddings: bool = True) -> LayerPlan:
    """Decide per tensor: factor (and of which kind), tie, save whole, or leave out with a reason.

    ``full_modules``: regexes searched in module names; their tensors are saved whole, whatever the filters.
    ``embeddings=False`` (a target such as kohya that cannot hold them) leaves embeddings and their tied heads out.
    Raises :class:`ShapeMismatch` for a weight that changed shape and is not saved whole.
    """
    full_modules = compile_filters(full_modules, "--full-modules")
    selected, skipped, one_d = select_layers(pairing.names, tuned, include, exclude, base=base)
    plan = LayerPlan(layers=selected, skipped=skipped, one_d=one_d, full=_full_tensors(tuned, full_modules))
    if embeddings:  # a PEFT / diffusers target: tensors saved whole are held (modules_to_save)
        _save_hidden_whole(plan, base, tuned)
    _apply_ties(plan, find_tied_heads(base, tuned), full_modules)
    if embeddings:  # a PEFT target
        _save_unadaptable(plan, base)
    _drop(plan, plan.full)
    if embeddings:  # kohya consumers merge a grouped conv's dense delta: only PEFT refuses it
        _drop_grouped(plan, base, tuned)
    if not embeddings:
        _drop_embeddings(plan)
        _refuse_conv1d(plan)
    _check_shapes(pairing, plan, include, exclude, (tuned, base))
    _note_unknown_layout(plan, conv1d_rule(base, tuned))
    return plan


def _save_unadaptable(plan: LayerPlan, base: Checkpoint) -> None:
    """Weights PEFT cannot load as a LoRA (:data:`WHOLE_LEAVES`, and modules of a transformers model that are no
    LoRA layer: MoE routers) go to modules_to_save, whole, with a note."""
    names = model_names(base)
    other = names.unadaptable if names is not None else frozenset()
    whole = [n for n in plan.layers if n not in plan.full and n not in plan.tied
             and (module_name(n).rsplit(".", 1)[-1] in WHOLE_LEAVES or module_name(n) in other)]
    modules = {module_name(n) for n in whole}
    for n in [*plan.layers, *plan.one_d]:  # the module's every tensor (a router's bias too): PEFT loads them all
        if _module_of(n) in modules:
            plan.full[n] = n
    if whole:
        shown = ", ".join(module_name(n) for n in whole[:4]) + (f" and {len(whole) - 4} more" if len(whole) > 4 else "")
        plan.notes.append(f"saved whole (PEFT modules_to_save), not as a LoRA PEFT would refuse or not apply "
                          f"(learned positional embeddings, relative position tables, MoE routers): {shown}")
def _save_hidden_whole(plan: LayerPlan, base: Checkpoint, tuned: Checkpoint) -> None:
    """Layers whose parent reads an attribute PEFT's LoRA wrapper hides (Whisper's ``conv1.stride``) are saved whole,
    every tensor of the module: PEFT's ``modules_to_save`` wrapper passes attributes through. Not in a pipeline:
    its diffusers file cannot hold tensors saved whole."""
    if base.components or tuned.components:
        return
    for name, why in (wrapper_hidden(base) or wrapper_hidden(tuned)).items():
        if name in plan.layers:
            module = module_name(name)
            plan.full.update({n: n for n in tuned.keys() if _module_of(n) == module})
            plan.notes.append(f"{module} is saved whole: {why}, which a LoRA wrapper hides (PEFT modules_to_save "
                              f"passes it through)")


def _drop_grouped(plan: LayerPlan, base: Checkpoint, tuned: Checkpoint) -> None:
    """Convs with groups > 1 (a depthwise conv) are left out under :data:`GROUPED`: no LoRA of ours loads on them."""
    if not any(k is ModuleKind.CONV for k in plan.layers.values()):
        return
    grouped = [n for n in (grouped_convs(base) or grouped_convs(tuned)) if n in plan.layers]
    if grouped:
        _drop(plan, grouped)
        plan.skipped.setdefault(GROUPED, []).extend(grouped)


def grouped_warning(tensors) -> str:
    """The one-line warning for grouped convs left out (:data:`GROUPED`), with the option that keeps them."""
    names = [module_name(n) for n in tensors]
    return (f"left out {len(names)} grouped conv(s) (groups > 1: PEFT refuses a LoRA on them): {', '.join(names)}; "
            f"save them whole with --full-modules '^({'|'.join(re.escape(n) for n in names)})$' (a PEFT folder: of a "
            f"pipeline, extract the component folder alone)")


def kohya_refuses_conv1d(names) -> None:
    """:class:`ConversionError` naming the first of ``names``, modules of transformers Conv1D layers: a kohya file
    has no way to say that a weight is stored (in, out), and its consumers would add the delta transposed."""
    for name in names:
        raise ConversionError(f"module {name} is a transformers Conv1D (weight stored (in, out), GPT-2 family): a "
                              f"kohya file cannot say so and its consumers would add the delta transposed: write a "
                              f"PEFT folder (--format peft, an -o name without .safetensors)")


def _refuse_conv1d(plan: LayerPlan) -> None:
    """A target that cannot hold embeddings (kohya) cannot hold Conv1D layers either: refused before any work."""
    kohya_refuses_conv1d(module_name(n) for n, k in plan.layers.items() if k is ModuleKind.CONV1D)


def _note_unknown_layout(plan: LayerPlan, conv1d) -> None:
    """GPT-2-style names (``attn.c_attn``) with no config.json to say whether they are Conv1D: a note, not a guess
    (gpt_bigcode's c_attn is an nn.Linear)."""
    unknown = [module_name(n) for n in plan.layers if module_name(n).endswith(".c_attn") and conv1d(n) is None]
    if unknown:
        plan.notes.append(f"{unknown[0]}: no config.json says whether the c_attn / c_fc / c_proj layers are "
                          f"transformers Conv1D (GPT-2: weight (in, out)) or nn.Linear: taken as nn.Linear; for a "
                          f"GPT-2-family model give its folder (with config.json) instead of bare weight files")
