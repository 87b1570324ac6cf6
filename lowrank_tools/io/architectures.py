"""Transformer diffusion models: their original module names, diffusers' names, and which layers are fused.

Our own tables, written from the public converters (read, not copied):
- Flux: diffusers ``loaders/lora_conversion_utils.py`` (``_convert_kohya_flux_lora_to_diffusers``) and
  ``loaders/single_file_utils.py`` (``convert_flux_transformer_checkpoint_to_diffusers``); kohya sd-scripts
  ``networks/lora_flux.py``; ComfyUI ``comfy/utils.py`` (``flux_to_diffusers``). Original = BFL names (what
  kohya's ``lora_unet_double_blocks_0_img_attn_qkv`` and ComfyUI's ``diffusion_model.double_blocks.0...`` name).
- SD3 / SD3.5: ``single_file_utils.convert_sd3_transformer_checkpoint_to_diffusers``; sd-scripts
  ``networks/lora_sd3.py``. Original = SAI MMDiT names (``joint_blocks.N.x_block.attn.qkv``).
- Wan 2.x: ``lora_conversion_utils._convert_musubi_wan_lora_to_diffusers`` / ``_convert_non_diffusers_wan_lora_to_
  diffusers``; musubi-tuner. Original = Wan names (``blocks.N.self_attn.q``); nothing fused.
- HunyuanVideo: ``lora_conversion_utils._convert_hunyuan_video_lora_to_diffusers``. Original = Tencent's names
  (``double_blocks.N.img_attn_qkv``, ``single_blocks.N.linear1``, the ``txt_in`` token refiner); fused like Flux's,
  and its shared names (qkv, linear1, linear2, proj) split to the same diffusers names, so a file that only has those
  reads as Flux unless a base decides (``yields_to``): the conversion is the same either way.
- Qwen-Image: ``_convert_non_diffusers_qwen_lora_to_diffusers``; ComfyUI ``comfy/ldm/qwen_image/model.py`` keeps
  diffusers' names, so both namings are one (kohya ``lora_unet_transformer_blocks_0_img_mod_1``).

A :class:`Rule` maps one original module to its ordered diffusers parts. A fused one (``sizes``) stacks its parts
by rows: part j has ``sizes[j] * in_features`` rows, e.g. Flux's ``linear1`` = [q; k; v; mlp].
``swap``: BFL/SAI final modulations yield (shift, scale), diffusers' ``AdaLayerNormContinuous`` (scale, shift): the
row halves trade places when a module has ``2 * in_features`` rows (SD3 also swaps its last block's context
modulation, which is the only one of that size).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum

__all__ = ["Naming", "Rule", "Architecture", "ARCHITECTURES", "Detected", "detect_architecture", "body_of",
           "TRANSFORMER", "architecture_named", "needs_base"]

TRANSFORMER = "transformer."  # the diffusers pipeline component of these models
_ORIGINAL_PREFIXES = ("model.diffusion_model.", "diffusion_model.")  # SGM single files, ComfyUI


class Naming(str, Enum):
    ORIGINAL = "original"    # BFL / SAI / Wan: what kohya, musubi-tuner and ComfyUI name
    DIFFUSERS = "diffusers"  # diffusers' transformer classes


@dataclass(frozen=True)
class Rule:
    original: str                        # "double_blocks.{i}.img_attn.qkv"
    parts: tuple[str, ...]               # diffusers names, in row order
    sizes: tuple[int, ...] = ()          # fused: row multiples of in_features per part; () for one part
    swap: bool = False                   # (shift, scale) <-> (scale, shift) when rows == 2 * in_features

    def pattern(self, naming: Naming, part: int = 0, sep: str = ".") -> re.Pattern:
        text = self.original if naming is Naming.ORIGINAL else self.parts[part]
        text = re.escape(text.replace(".", sep)).replace(r"\{i\}", r"(?P<i>\d+)")
        return re.compile(f"^{text}$")


@dataclass(frozen=True)
class Architecture:
    name: str                            # flux, sd3, wan
    label: str                           # for info: "Flux", "SD3", "Wan"
    original_label: str                  # "BFL", "SAI MMDiT", "Wan"
    rules: tuple[Rule, ...]
    base_markers: tuple[str, ...] = ()   # regexes on a base checkpoint's module names that tell the model apart
    one_naming: bool = False             # the original model uses diffusers' names (Qwen-Image)
    yields_to: str = ""                  # names this and that architecture share are read as that one's
    t5: str = ""                         # the diffusers pipeline component of its T5 encoder (kohya's lora_te3_)
    _compiled: dict = field(default_factory=dict, compare=False, repr=False)

    def compiled(self, naming: Naming, sep: str = ".") -> list[tuple[re.Pattern, Rule, int]]:
        """[(regex, rule, part)] of every name of ``naming`` (``sep``: "_" for kohya bodies)."""
        key = (naming, sep)
        if key not in self._compiled:
            self._compiled[key] = [(r.pattern(naming, j, sep), r, j) for r in self.rules
                                   for j in (range(len(r.parts)) if naming is Naming.DIFFUSERS else (0,))]
        return self._compiled[key]

    def prefixes(self, naming: Naming, sep: str = ".") -> tuple[str, ...]:
        """The literal beginnings of every name of ``naming`` (each rule's text up to its block index): a body that
        starts with none of them is none of this architecture's names. ``str.startswith`` of this tuple rejects a
        Llama's names at C speed, instead of every regex of every table (0.2 s of an extract's output naming)."""
        key = ("prefixes", naming, sep)
        if key not in self._compiled:
            texts = {r.original if naming is Naming.ORIGINAL else r.parts[j] for r in self.rules
                     for j in (range(len(r.parts)) if naming is Naming.DIFFUSERS else (0,))}
            self._compiled[key] = tuple(sorted({t.split("{i}")[0].replace(".", sep) for t in texts}))
        return self._compiled[key]

    def match(self, body: str, naming: Naming, sep: str = ".") -> tuple[Rule, str, int] | None:
        """(rule, block index or "", part) of a module body in ``naming``; None when not one of its names."""
        if not body.startswith(self.prefixes(naming, sep)):
            return None
        for rx, rule, part in self.compiled(naming, sep):
            found = rx.match(body)
            if found:
                return rule, found.groupdict().get("i") or "", part
        return None

    def module_name(self, rule: Rule, index: str, naming: Naming, part: int = 0) -> str:
        text = rule.original if naming is Naming.ORIGINAL else rule.parts[part]
        return text.replace("{i}", index)


def _r(original: str, *parts: str, sizes=(), swap=False) -> Rule:
    return Rule(original, parts, tuple(sizes), swap)


def _embedder(src: str, leaves: tuple[str, str], dst: str) -> tuple[Rule, Rule]:
    """A two-layer MLP embedder: ``src.<leaves[0]>`` -> ``dst.linear_1``, ``src.<leaves[1]>`` -> ``dst.linear_2``."""
    return _r(f"{src}.{leaves[0]}", f"{dst}.linear_1"), _r(f"{src}.{leaves[1]}", f"{dst}.linear_2")


def _double_single(attn_sep: str, mod: str, mlp: tuple[str, str]) -> tuple[Rule, ...]:
    """Flux's (BFL) and HunyuanVideo's (Tencent) double and single stream blocks: one layout, other leaf names
    (``img_attn.qkv`` / ``img_attn_qkv``, ``img_mod.lin`` / ``img_mod.linear``, ``img_mlp.0`` / ``img_mlp.fc1``)."""
    rules = []
    for side, (q, k, v, out), norm, ff in (("img", ("to_q", "to_k", "to_v", "to_out.0"), "norm1", "ff"),
                                           ("txt", ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"),
                                            "norm1_context", "ff_context")):
        src, dst = f"double_blocks.{{i}}.{side}", "transformer_blocks.{i}"
        rules += [_r(f"{src}_attn{attn_sep}qkv", *(f"{dst}.attn.{p}" for p in (q, k, v)), sizes=_QKV),
                  _r(f"{src}_attn{attn_sep}proj", f"{dst}.attn.{out}"),
                  _r(f"{src}_mlp.{mlp[0]}", f"{dst}.{ff}.net.0.proj"), _r(f"{src}_mlp.{mlp[1]}", f"{dst}.{ff}.net.2"),
                  _r(f"{src}_mod.{mod}", f"{dst}.{norm}.linear")]
    src, dst = "single_blocks.{i}", "single_transformer_blocks.{i}"
    return (*rules, _r(f"{src}.linear1", *(f"{dst}.attn.to_{p}" for p in "qkv"), f"{dst}.proj_mlp", sizes=(1, 1, 1, 4)),
            _r(f"{src}.linear2", f"{dst}.proj_out"), _r(f"{src}.modulation.{mod}", f"{dst}.norm.linear"))  # mlp_ratio 4


_QKV = (1, 1, 1)
_IN_OUT, _MLP = ("in_layer", "out_layer"), ("0", "2")
_FLUX = Architecture("flux", "Flux", "BFL", (
    *_double_single(".", "lin", _MLP),
    _r("img_in", "x_embedder"),
    _r("txt_in", "context_embedder"),
    *_embedder("time_in", _IN_OUT, "time_text_embed.timestep_embedder"),
    *_embedder("vector_in", _IN_OUT, "time_text_embed.text_embedder"),
    *_embedder("guidance_in", _IN_OUT, "time_text_embed.guidance_embedder"),
    _r("final_layer.linear", "proj_out"),
    _r("final_layer.adaLN_modulation.1", "norm_out.linear", swap=True),
), base_markers=(r"^single_transformer_blocks\.", r"^single_blocks\.", r"^double_blocks\.\d+\.img_attn\.qkv"),
    t5="text_encoder_2.")


def _mmdit_block(side: str, attn: str, diff: str) -> tuple[Rule, ...]:
    """One SD3 joint block side: x_block (image) or context_block (text)."""
    q, k, v, out = (("to_q", "to_k", "to_v", "to_out.0") if side == "x_block" else
                    ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"))
    ff, norm = ("ff", "norm1") if side == "x_block" else ("ff_context", "norm1_context")
    src, dst = f"joint_blocks.{{i}}.{side}", "transformer_blocks.{i}"
    rules = [_r(f"{src}.{attn}.qkv", *(f"{dst}.{diff}.{p}" for p in (q, k, v)), sizes=_QKV),
             _r(f"{src}.{attn}.proj", f"{dst}.{diff}.{out}")]
    if attn == "attn":
        rules += [_r(f"{src}.mlp.fc1", f"{dst}.{ff}.net.0.proj"), _r(f"{src}.mlp.fc2", f"{dst}.{ff}.net.2"),
                  _r(f"{src}.adaLN_modulation.1", f"{dst}.{norm}.linear", swap=side == "context_block")]
    return tuple(rules)


_SD3 = Architecture("sd3", "SD3", "SAI MMDiT", (
    *_mmdit_block("x_block", "attn", "attn"), *_mmdit_block("x_block", "attn2", "attn2"),
    *_mmdit_block("context_block", "attn", "attn"),
    _r("x_embedder.proj", "pos_embed.proj"),
    _r("context_embedder", "context_embedder"),
    *_embedder("t_embedder.mlp", _MLP, "time_text_embed.timestep_embedder"),
    *_embedder("y_embedder.mlp", _MLP, "time_text_embed.text_embedder"),
    _r("final_layer.linear", "proj_out"),
    _r("final_layer.adaLN_modulation.1", "norm_out.linear", swap=True),
), base_markers=(r"^joint_blocks\.", r"^pos_embed\.pos_embed$", r"^pos_embed$"), t5="text_encoder_3.")

_WAN = Architecture("wan", "Wan", "Wan", (
    *(_r(f"blocks.{{i}}.self_attn.{o}", f"blocks.{{i}}.attn1.{d}")
      for o, d in zip("qkvo", ("to_q", "to_k", "to_v", "to_out.0"))),
    *(_r(f"blocks.{{i}}.cross_attn.{o}", f"blocks.{{i}}.attn2.{d}")
      for o, d in zip(("q", "k", "v", "o", "k_img", "v_img"),
                      ("to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj"))),
    _r("blocks.{i}.ffn.0", "blocks.{i}.ffn.net.0.proj"),
    _r("blocks.{i}.ffn.2", "blocks.{i}.ffn.net.2"),
    _r("patch_embedding", "patch_embedding"),
    *_embedder("text_embedding", _MLP, "condition_embedder.text_embedder"),
    *_embedder("time_embedding", _MLP, "condition_embedder.time_embedder"),
    _r("time_projection.1", "condition_embedder.time_proj"),
    _r("img_emb.proj.1", "condition_embedder.image_embedder.ff.net.0.proj"),
    _r("img_emb.proj.3", "condition_embedder.image_embedder.ff.net.2"),
    _r("head.head", "proj_out"),
), base_markers=(r"^blocks\.\d+\.(self_attn|attn1)\.", r"^blocks\.\d+\.ffn\."))

_HY_REFINER = "txt_in.individual_token_refiner.blocks.{i}"
_HY_REFINED = "context_embedder.token_refiner.refiner_blocks.{i}"
_HUNYUAN_VIDEO = Architecture("hunyuan_video", "HunyuanVideo", "Tencent", (
    *_double_single("_", "linear", ("fc1", "fc2")),
    _r(f"{_HY_REFINER}.self_attn_qkv", f"{_HY_REFINED}.attn.to_q", f"{_HY_REFINED}.attn.to_k",
       f"{_HY_REFINED}.attn.to_v", sizes=_QKV),
    _r(f"{_HY_REFINER}.self_attn_proj", f"{_HY_REFINED}.attn.to_out.0"),
    _r(f"{_HY_REFINER}.mlp.fc1", f"{_HY_REFINED}.ff.net.0.proj"),
    _r(f"{_HY_REFINER}.mlp.fc2", f"{_HY_REFINED}.ff.net.2"),
    _r(f"{_HY_REFINER}.adaLN_modulation.1", f"{_HY_REFINED}.norm_out.linear"),
    _r("txt_in.input_embedder", "context_embedder.proj_in"),
    *_embedder("txt_in.t_embedder.mlp", _MLP, "context_embedder.time_text_embed.timestep_embedder"),
    *_embedder("txt_in.c_embedder", ("linear_1", "linear_2"), "context_embedder.time_text_embed.text_embedder"),
    _r("img_in.proj", "x_embedder.proj"),
    *_embedder("time_in.mlp", _MLP, "time_text_embed.timestep_embedder"),
    *_embedder("vector_in", _IN_OUT, "time_text_embed.text_embedder"),
    *_embedder("guidance_in.mlp", _MLP, "time_text_embed.guidance_embedder"),
    _r("final_layer.linear", "proj_out"),
    _r("final_layer.adaLN_modulation.1", "norm_out.linear", swap=True),
), base_markers=(r"^txt_in\.individual_token_refiner\.", r"^context_embedder\.token_refiner\.",
                 r"^double_blocks\.\d+\.img_attn_qkv"), yields_to="flux")

# Qwen-Image: ComfyUI's model (comfy/ldm/qwen_image) and diffusers' QwenImageTransformer2DModel share one naming
_QWEN_BLOCK = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
               "attn.add_v_proj", "attn.to_add_out", "img_mod.1", "txt_mod.1", "img_mlp.net.0.proj", "img_mlp.net.2",
               "txt_mlp.net.0.proj", "txt_mlp.net.2")
_QWEN = Architecture("qwen_image", "Qwen-Image", "diffusers", (
    *(_r(f"transformer_blocks.{{i}}.{n}", f"transformer_blocks.{{i}}.{n}") for n in _QWEN_BLOCK),
    *(_r(n, n) for n in ("img_in", "txt_in", "time_text_embed.timestep_embedder.linear_1",
                         "time_text_embed.timestep_embedder.linear_2", "norm_out.linear", "proj_out")),
), base_markers=(r"^transformer_blocks\.\d+\.img_mod\.1", r"^txt_norm\."), one_naming=True)

ARCHITECTURES = (_FLUX, _SD3, _WAN, _QWEN, _HUNYUAN_VIDEO)


def architecture_named(name: str) -> Architecture:
    return next(a for a in ARCHITECTURES if a.name == name)


def body_of(name: str) -> str:
    """A module name without its ``transformer.`` / ``diffusion_model.`` / ``model.diffusion_model.`` prefix."""
    for prefix in (TRANSFORMER, *_ORIGINAL_PREFIXES):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


@dataclass(frozen=True)
class Detected:
    architecture: Architecture
    naming: Naming
    matched: int          # module names of the adapter it explains

    def describe(self) -> str:
        arch = self.architecture
        naming = arch.original_label if self.naming is Naming.ORIGINAL and not arch.one_naming else "diffusers"
        return f"{self.architecture.label} ({naming} names)"


# Per architecture, names (bodies, either naming, "." or "_" between parts) no model outside the tables has: its
# blocks. Without a base, an adapter with none of them is not that model, whatever else it shares (Lumina2's
# x_embedder is Flux's diffusers name for img_in; PixArt's, Sana's and LTX's attn2 are SD3.5's).
_MMDIT = r"^transformer_blocks[._]\d+[._](attn[._]|ff_context|norm1_context)"  # Flux's, SD3's, HunyuanVideo's alike
_DOUBLE_SINGLE = r"^(double_blocks|single_blocks|single_transformer_blocks)[._]\d+[._]"
_MARKERS = {"flux": (_DOUBLE_SINGLE, _MMDIT), "sd3": (r"^joint_blocks[._]\d+[._]", _MMDIT),
            "wan": (r"^blocks[._]\d+[._](self_attn|cross_attn|attn1|attn2|ffn)[._]",),
            "qwen_image": (r"^transformer_blocks[._]\d+[._](img|txt)_(mod|mlp)[._]", _MMDIT),
            "hunyuan_video": (_DOUBLE_SINGLE, _MMDIT, r"^(txt_in|context_embedder)[._].*token_refiner")}


def _marked(found: dict[tuple[str, Naming], set[str]], names) -> dict[tuple[str, Naming], set[str]]:
    """The candidates among ``found`` whose architecture has a marker (:data:`_MARKERS`) among ``names``."""
    bodies = [body_of(n) for n in names]
    return {key: hit for key, hit in found.items()
            if any(re.search(m, b) for m in _MARKERS.get(key[0], ("",)) for b in bodies)}


def _matches(names, sep: str = ".") -> dict[tuple[str, Naming], set[str]]:
    found: dict[tuple[str, Naming], set[str]] = {}
    bodies = [(n, body_of(n)) for n in names]
    for arch in ARCHITECTURES:
        for naming in (Naming.ORIGINAL,) if arch.one_naming else Naming:
            prefixes = arch.prefixes(naming, sep)  # the fast reject of match, without a call per name
            hit = {n for n, body in bodies if body.startswith(prefixes) and arch.match(body, naming, sep)}
            if hit:
                found[(arch.name, naming)] = hit
    return found


def _distinct(found: dict[tuple[str, Naming], set[str]]) -> dict[tuple[str, Naming], set[str]]:
    """Per candidate, the names no other candidate explains; an architecture that yields to this one does not count."""
    def rivals(key):
        return [h for k, h in found.items() if k != key and architecture_named(k[0]).yields_to != key[0]]
    return {key: hit - set().union(*rivals(key)) for key, hit in found.items()}


def detect_architecture(names, *, base_names=None, sep: str = ".") -> Detected | None:
    """The architecture and naming of module names (a whole file's, not a guess per name): the one that explains
    names no other explains (Flux's single blocks, SD3's joint blocks...), most names first, among those whose
    blocks the names include (:data:`_MARKERS`: a name shared with a model outside the tables never decides alone). With ``base_names``, a
    base checkpoint's module names, the base's architecture when it explains the names: it decides names several
    models share (a Flux or SD3 ``transformer_blocks.0.attn.to_q``); None when nothing decides."""
    names = [n for n in names if not n.startswith("text_encoder")]
    found = _matches(names, sep)
    arch = _base_architecture(base_names) if base_names is not None else None
    ranked = sorted((k for k in found if arch and k[0] == arch.name), key=lambda k: -len(found[k]))
    if not ranked:  # no base that decides: the names alone, of an architecture whose blocks they name
        found = _marked(found, names)
        distinct = _distinct(found)
        ranked = sorted((key for key in found if distinct[key]), key=lambda k: (-len(found[k]), -len(distinct[k])))
    if not ranked:
        return None
    arch_name, naming = ranked[0]
    return Detected(architecture_named(arch_name), naming, len(found[ranked[0]]))


def _base_architecture(base_names) -> Architecture | None:
    bodies = [body_of(n) for n in base_names]
    for arch in sorted(ARCHITECTURES, key=lambda a: not a.yields_to):  # the more specific markers first
        if any(re.search(m, b) for m in arch.base_markers for b in bodies):
            return arch
    return None


def needs_base(names) -> bool:
    """True when some names are a table's but only a base checkpoint can tell which model's (see
    :func:`detect_architecture`)."""
    names = [n for n in names if not n.startswith("text_encoder")]
    return detect_architecture(names) is None and bool(_marked(_matches(names), names))
