"""An adapter of a transformer diffusion model in its other naming: original (BFL/SAI/Wan, fused) <-> diffusers (split).

    to_original:  diffusers parts -> one fused module: A = [A_q; A_k; A_v], B = blockdiag(B_q, B_k, B_v), exact
                  (rank = sum of the parts'), or the optimal truncation with ``rank`` (:func:`linalg.fused.fuse_rows`);
                  alpha = s * R when every part has the scale s, else the scales are folded into B and alpha = R.
    to_diffusers: one fused module -> its parts: row slices of B, the A columns each uses, rank r_j each and
                  alpha_j = s * r_j, so the scale s is kept (never alpha = 3r with rank r: sd-scripts #2204).

Writing picks the naming the consumer loads (:func:`for_format`): kohya files take the original names (what kohya's,
musubi-tuner's, ComfyUI's and diffusers' kohya converters read), PEFT/diffusers files the diffusers names under
``transformer.``. The architecture is detected once from all names (:func:`~.architectures.detect_architecture`).

Reading against a model (:func:`to_base_naming`: apply, evaluate) brings the adapter to the model's naming and name
prefix (a BFL/kohya Flux adapter onto a diffusers transformer, a diffusers one onto a ComfyUI single file); merging
(:func:`to_common_naming`) brings every input to the first one's. Both exact: fuse = concatenation, split = slices.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..adapter import Adapter, LoraModule, ModuleKind
from ..errors import ConversionError
from ..linalg.fused import fuse_rows, split_rows, swap_halves
from .architectures import (TRANSFORMER, Architecture, Detected, Naming, Rule, body_of, detect_architecture,
                            needs_base)

__all__ = ["to_original", "to_diffusers", "for_format", "row_sizes", "to_base_naming", "to_common_naming"]


def row_sizes(rule: Rule, in_features: int) -> list[int]:
    """Rows of each part of a fused ``rule`` for a layer of ``in_features`` inputs."""
    return [m * in_features for m in rule.sizes]


def _swapped(m: LoraModule, rule: Rule) -> LoraModule:
    if not (rule.swap and m.B.shape[0] == 2 * m.A.shape[1]):
        return m
    magnitude = swap_halves(m.magnitude) if m.magnitude is not None and m.dora_axis == "out" else m.magnitude
    return replace(m, B=swap_halves(m.B), magnitude=magnitude, spectrum=None)


def _fusable(name: str, m: LoraModule, target: str) -> None:
    if m.kind is not ModuleKind.LINEAR or m.magnitude is not None:
        raise ConversionError(f"module {name} ({m.kind_name} {m.kind.value}) cannot be fused into {target}: only "
                              f"plain LoRA linear parts fuse; use --format peft to keep the diffusers names")


def _fuse(arch: Architecture, rule: Rule, index: str, parts: dict[int, tuple[str, LoraModule]],
          rank: int | None) -> LoraModule:
    target = arch.module_name(rule, index, Naming.ORIGINAL)
    for name, m in parts.values():
        _fusable(name, m, target)
    first = next(iter(parts.values()))[1]
    n, dtype = first.A.shape[1], first.B.dtype
    scales = {m.scale for _, m in parts.values()}
    common = scales.pop() if len(scales) == 1 else 1.0
    common = common if common > 0 else 1.0  # an empty part (scale 0) or a negative scale: folded into B
    pieces = []
    for j, rows in enumerate(row_sizes(rule, n)):
        if j in parts:
            name, m = parts[j]
            if m.B.shape[0] != rows or m.A.shape[1] != n:
                raise ConversionError(f"module {name} is {m.B.shape[0]}x{m.A.shape[1]}, but part {j} of {target} "
                                      f"is {rows}x{n}: the adapter does not fit {arch.label}")
            pieces.append((m.B, m.A, m.scale / common))
        else:  # a part the adapter leaves alone: zero rows, no rank
            pieces.append((first.B.new_zeros(rows, 0), first.A.new_zeros(0, n), 1.0))
    B, A = fuse_rows(pieces, rank=rank)
    return LoraModule(B=B.to(dtype), A=A.to(dtype), alpha=common * A.shape[0], weight_shape=(B.shape[0], n))


def _split(arch: Architecture, rule: Rule, index: str, name: str, m: LoraModule) -> dict[str, LoraModule]:
    sizes = row_sizes(rule, m.A.shape[1])
    if sum(sizes) != m.B.shape[0] or m.kind is not ModuleKind.LINEAR or m.magnitude is not None:
        raise ConversionError(f"module {name} ({m.kind_name}, {m.B.shape[0]}x{m.A.shape[1]}) does not split into "
                              f"{arch.label}'s parts of {sizes} rows: use --format kohya to keep it fused")
    out = {}
    for j, (B, A) in enumerate(split_rows(m.B, m.A, sizes)):
        if A.shape[0]:
            out[TRANSFORMER + arch.module_name(rule, index, Naming.DIFFUSERS, j)] = LoraModule(
                B=B, A=A, alpha=m.scale * A.shape[0], weight_shape=(B.shape[0], A.shape[1]))
    return out


def _tensor_owner(tensor: str) -> tuple[str, str]:
    owner, _, leaf = tensor.rpartition(".")
    return owner, leaf


def _renamed_deltas(adapter: Adapter, rename: dict[str, str]) -> dict[str, torch.Tensor]:
    """Tensor deltas (``diff_b`` biases, norms) of 1:1 renamed modules follow them; of fused layers they refuse."""
    out = {}
    for tensor, delta in adapter.tensor_deltas.items():
        owner, leaf = _tensor_owner(tensor)
        if owner in rename and rename[owner] is None:
            raise ConversionError(f"tensor delta {tensor} belongs to a fused layer, which this conversion cannot "
                                  f"carry yet: leave it out (--exclude) or keep the file's naming")
        out[f"{rename[owner]}.{leaf}" if owner in rename else tensor] = delta
    return out


def to_original(adapter: Adapter, arch: Architecture, *, rank: int | None = None) -> Adapter:
    """``adapter`` in ``arch``'s original names, diffusers parts fused (exact, or rank ``rank`` at most)."""
    groups: dict[tuple[Rule, str], dict[int, tuple[str, LoraModule]]] = {}
    order: list[tuple[str, object]] = []
    rename: dict[str, str | None] = {}
    for name, m in adapter.modules.items():
        hit = None if name.startswith("text_encoder") else arch.match(body_of(name), Naming.DIFFUSERS)
        if hit is None:
            order.append((name, m))
            continue
        rule, index, part = hit
        if (rule, index) not in groups:
            groups[(rule, index)] = {}
            order.append((arch.module_name(rule, index, Naming.ORIGINAL), (rule, index)))
        groups[(rule, index)][part] = (name, m)
        rename[name] = arch.module_name(rule, index, Naming.ORIGINAL) if not rule.sizes else None
    modules = {}
    for name, item in order:
        if isinstance(item, LoraModule):
            modules[name] = item
            continue
        rule, index = item
        parts = groups[(rule, index)]
        modules[name] = _swapped(_fuse(arch, rule, index, parts, rank) if rule.sizes else parts[0][1], rule)
    return replace(adapter, modules=modules, tensor_deltas=_renamed_deltas(adapter, rename))


def to_diffusers(adapter: Adapter, arch: Architecture) -> Adapter:
    """``adapter`` in diffusers names under ``transformer.``, fused layers split exactly."""
    modules, rename = {}, {}
    for name, m in adapter.modules.items():
        hit = None if name.startswith("text_encoder") else arch.match(body_of(name), Naming.ORIGINAL)
        if hit is None:
            modules[name] = m
            continue
        rule, index, _ = hit
        if rule.sizes:
            modules.update(_split(arch, rule, index, name, m))
            rename[name] = None
        else:
            rename[name] = TRANSFORMER + arch.module_name(rule, index, Naming.DIFFUSERS)
            modules[rename[name]] = _swapped(m, rule)
    return replace(adapter, modules=modules, tensor_deltas=_renamed_deltas(adapter, rename))


def _without_model_prefix(adapter: Adapter) -> Adapter:
    """ComfyUI's / SGM's ``diffusion_model.`` / ``model.diffusion_model.`` off the names: a kohya key is
    ``lora_unet_<original name>``, not ``lora_unet_diffusion_model_...``."""
    bare = {n: body_of(n) if not n.startswith(TRANSFORMER) else n for n in adapter.modules}
    if all(k == v for k, v in bare.items()):
        return adapter
    return replace(adapter, modules={bare[n]: m for n, m in adapter.modules.items()},
                   tensor_deltas=_renamed_deltas(adapter, bare))


def for_format(adapter: Adapter, kohya: bool, *, base_names=None) -> tuple[Adapter, Detected | None]:
    """The adapter in the naming its output format's consumers load: kohya -> original, else diffusers; unchanged
    when no architecture of the tables is detected."""
    found = detect_architecture(adapter.modules, base_names=base_names)
    if found is None:
        return adapter, None
    if kohya and found.naming is Naming.DIFFUSERS:
        return to_original(adapter, found.architecture), found
    if kohya:
        return _without_model_prefix(adapter), found
    if not kohya and found.naming is Naming.ORIGINAL:
        return to_diffusers(adapter, found.architecture), found
    return adapter, found


def _prefix(name: str) -> str:
    return name[:len(name) - len(body_of(name))]


def _naming_in(names, arch: Architecture) -> tuple[Naming, str] | None:
    """The naming of ``arch`` most of ``names`` (not text encoders') have, and the prefix of its first name there."""
    names = [n for n in names if not n.startswith("text_encoder")]
    best = None
    for naming in (Naming.ORIGINAL,) if arch.one_naming else Naming:
        hits = [n for n in names if arch.match(body_of(n), naming)]
        if hits and (best is None or len(hits) > best[0]):
            best = (len(hits), naming, _prefix(hits[0]))
    return best and best[1:]


def _to_naming(adapter: Adapter, arch: Architecture, naming: Naming, prefix: str) -> Adapter:
    """``adapter`` in ``arch``'s ``naming`` (converted exactly when it has the other), its names under ``prefix``."""
    have = _naming_in(adapter.modules, arch)
    if have is None:
        return adapter
    if have[0] is not naming and not arch.one_naming:
        adapter = to_original(adapter, arch) if naming is Naming.ORIGINAL else to_diffusers(adapter, arch)
    rename = {n: prefix + body_of(n) for n in adapter.modules
              if not n.startswith("text_encoder") and arch.match(body_of(n), naming)}
    if all(k == v for k, v in rename.items()):
        return adapter
    return replace(adapter, modules={rename.get(n, n): m for n, m in adapter.modules.items()},
                   tensor_deltas=_renamed_deltas(adapter, rename))


def to_base_naming(adapter: Adapter, base_names) -> Adapter:
    """``adapter`` in the naming and name prefix of a model whose module names are ``base_names`` (a diffusers
    ``FluxTransformer2DModel``'s, a BFL single file's ``model.diffusion_model.double_blocks...``), fused layers
    fused or split exactly; unchanged when the model or the adapter is none of the tables' architectures."""
    if detect_architecture(adapter.modules) is None and not needs_base(adapter.modules):
        return adapter  # no table's names (an LLM's adapter): the base's names are not read
    base_names = list(base_names)
    base = detect_architecture(base_names)
    if base is None:
        return adapter
    found = detect_architecture(adapter.modules, base_names=base_names)
    if found is None or found.architecture is not base.architecture:
        return adapter
    naming, prefix = _naming_in(base_names, base.architecture)
    return _to_naming(adapter, base.architecture, naming, prefix)


def to_common_naming(adapters: list[Adapter]) -> list[Adapter]:
    """Adapters of one architecture in several namings (a BFL/kohya Flux file and a diffusers one) all in the first
    detected one's naming and prefix, exactly; unchanged when they already agree or no architecture is found."""
    found = detect_architecture([n for a in adapters for n in a.modules])
    if found is None:
        return adapters
    arch = found.architecture
    namings = [_naming_in(a.modules, arch) for a in adapters]
    target = next((n for n in namings if n is not None), None)
    if target is None or all(n in (None, target) for n in namings):
        return adapters
    return [a if n in (None, target) else _to_naming(a, arch, *target) for a, n in zip(adapters, namings)]
