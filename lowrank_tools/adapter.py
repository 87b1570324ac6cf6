"""The in-memory LoRA adapter: per-module factors B, A and alpha, whatever file format they came from.

Every module is kept as a 2-D factor pair, the matrix view of its delta:

    delta_matrix = scale * B @ A        B: (out, r)   A: (r, in_flat)
    scale        = alpha / r            (alpha / sqrt(r) for rsLoRA)

and ``weight_shape`` says how that matrix maps back onto the base weight:

- linear:    weight (out, in)              = delta_matrix
- conv:      weight (out, in, *kernel)     = delta_matrix.reshape(weight_shape)   (A is (r, in*kh*kw))
- embedding: weight (vocab, dim)           = delta_matrix.T   (PEFT's lora_embedding_A (r, vocab), _B (dim, r))
- conv1d:    weight (in, out)              = delta_matrix.T   (transformers' ``Conv1D`` of the GPT-2 family: a linear
             layer stored transposed; PEFT's ``fan_in_fan_out``. Not ``nn.Conv1d``, whose kernels are ``conv``)

File formats (PEFT folders, kohya files) read and write this type in ``peft_format`` and ``kohya_format``;
LyCORIS-style modules in ``lycoris_format``.

Parametrisations (``Param``): whatever a module was stored as (LoHa, LoKr, Tucker LoCon, a full diff), B and A are
always its exact plain-LoRA factors, the factored view every operation consumes (see :mod:`structured`). When the
reader built them from an exact SVD, ``spectrum`` holds its singular values and ``B = U sqrt(S / s)``,
``A = sqrt(S / s) Vh``, so a truncation is a column slice (:func:`refactor.module_core` uses it). DoRA modules add a
``magnitude`` m: the adapted weight is ``m * (W0 + s B A) / ||W0 + s B A||`` (norm per output row, or per input
column for LyCORIS' legacy ``wd_on_out=False`` files, ``dora_axis = "in"``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from enum import Enum

import torch
from torch import Tensor

from .errors import InvalidOption, NumericalError

__all__ = ["Param", "ModuleKind", "LoraModule", "Adapter", "BaseClass", "module_name", "matrix_view", "matrix_shape",
           "weight_from_matrix", "cast_whole", "cast_factors", "check_alpha", "as_conv1d"]


_SVD_DTYPES = (torch.float32, torch.float64)  # factors exact to their rounding: the spectrum still describes them


class Param(str, Enum):
    """How a module was parametrised in its file (``info`` names it); B, A are its exact LoRA factors whatever it is."""

    LORA = "lora"
    LOHA = "loha"
    LOKR = "lokr"
    TUCKER = "tucker"
    DIFF = "diff"


class ModuleKind(str, Enum):
    """What kind of layer a LoRA module adapts; decides how factors are laid out in files."""

    LINEAR = "linear"
    CONV = "conv"
    EMBEDDING = "embedding"
    CONV1D = "conv1d"  # transformers' Conv1D (GPT-2, ...): weight (in, out), the transpose of nn.Linear's


_TRANSPOSED = (ModuleKind.EMBEDDING, ModuleKind.CONV1D)  # weights stored as the transpose of the (out, in) matrix


def module_name(tensor_name: str) -> str:
    """``model.layers.0.q_proj.weight`` -> ``model.layers.0.q_proj`` (names without ``.weight`` are kept)."""
    return tensor_name[: -len(".weight")] if tensor_name.endswith(".weight") else tensor_name


def matrix_view(weight: Tensor, kind: ModuleKind) -> Tensor:
    """The 2-D matrix a LoRA of ``kind`` approximates: (out, in_flat); for embeddings (dim, vocab)."""
    if kind in _TRANSPOSED:
        return weight.t()  # embedding (dim, vocab): PEFT's B (dim, r) @ A (r, vocab); Conv1D (out, in)
    return weight.reshape(weight.shape[0], -1)  # conv (out, in, *k) -> (out, in*prod(k))


def matrix_shape(weight_shape: tuple[int, ...], kind: ModuleKind) -> tuple[int, int]:
    """The (out, in_flat) shape of :func:`matrix_view` for a weight of ``weight_shape``; for embeddings (dim, vocab)."""
    if kind in _TRANSPOSED:
        return int(weight_shape[1]), int(weight_shape[0])
    return int(weight_shape[0]), math.prod(int(d) for d in weight_shape[1:])


def check_alpha(alpha: float | None) -> None:
    """``--alpha``: None (alpha = r per module) or a positive finite number."""
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float))
                              or not math.isfinite(alpha) or alpha <= 0):
        raise InvalidOption(f"--alpha {alpha!r} must be a positive number (scale = alpha / r)")


def cast_factors(B: Tensor, A: Tensor, dtype: torch.dtype, name: str) -> tuple[Tensor, Tensor]:
    """``B``, ``A`` cast to the output ``dtype``, the one cast of the factors (they are computed in float32 or
    float64); :class:`NumericalError` naming module ``name`` when a value overflows."""
    B, A = B.to(dtype), A.to(dtype)
    if not (torch.isfinite(B).all() and torch.isfinite(A).all()):
        raise NumericalError(f"{name}: factors overflow {dtype} when cast: pass --dtype float32")
    return B, A


def weight_from_matrix(matrix: Tensor, kind: ModuleKind, weight_shape: tuple[int, ...]) -> Tensor:
    """Inverse of :func:`matrix_view`: lay a delta matrix out in the base weight's shape."""
    if kind in _TRANSPOSED:
        return matrix.t()
    return matrix.reshape(weight_shape)


@dataclass
class LoraModule:
    """One adapted module: ``delta = scale * B @ A`` laid out as ``weight_shape``."""

    B: Tensor  # (out, r)
    A: Tensor  # (r, in_flat)
    alpha: float
    kind: ModuleKind = ModuleKind.LINEAR
    weight_shape: tuple[int, ...] = ()
    rslora: bool = False
    param: Param = Param.LORA  # how the file stored it (B, A: its exact LoRA factors)
    spectrum: Tensor | None = None  # (r,) when B, A are a balanced exact SVD (see the module doc)
    magnitude: Tensor | None = None  # DoRA m: (out,) ("out" axis) or (in_flat,) ("in" axis)
    dora_axis: str = "out"
    stored_rank: str | None = None  # the file's own rank, e.g. "8x8" for a LoHa (info)

    def __post_init__(self) -> None:
        if not self.weight_shape:
            self.weight_shape = (
                (self.A.shape[1], self.B.shape[0])
                if self.kind in _TRANSPOSED
                else (self.B.shape[0], self.A.shape[1])
            )
        self.weight_shape = tuple(int(d) for d in self.weight_shape)

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def kind_name(self) -> str:
        """What ``info`` calls it: dora (with a magnitude, whatever its delta), else the parametrisation."""
        return "dora" if self.magnitude is not None else self.param.value

    @property
    def scale(self) -> float:
        """alpha / r (alpha / sqrt(r) with rsLoRA); 0 for an empty module."""
        if self.rank == 0:
            return 0.0
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    @property
    def matrix_shape(self) -> tuple[int, int]:
        return int(self.B.shape[0]), int(self.A.shape[1])

    @property
    def params(self) -> int:
        return int(self.B.numel() + self.A.numel() + (self.magnitude.numel() if self.magnitude is not None else 0))

    def delta_matrix(self) -> Tensor:
        """scale * B @ A in float32, (out, in_flat). Dense: for tests and small modules only."""
        return self.scale * (self.B.float() @ self.A.float())

    def delta(self) -> Tensor:
        """The dense delta in the base weight's layout (float32)."""
        return weight_from_matrix(self.delta_matrix(), self.kind, self.weight_shape)

    def with_factors(self, B: Tensor, A: Tensor, alpha: float) -> "LoraModule":
        """A copy with new factors (same kind, layout, scale rule and magnitude; plain LoRA from now on)."""
        return replace(self, B=B, A=A, alpha=float(alpha), param=Param.LORA, spectrum=None, stored_rank=None)

    def to(self, *, dtype: torch.dtype | None = None, device: str | torch.device | None = None) -> "LoraModule":
        keep = dtype is None or dtype in _SVD_DTYPES  # a pair cast to half precision is no longer an exact SVD
        mag = self.magnitude.to(device=device, dtype=dtype) if self.magnitude is not None else None
        return replace(self, B=self.B.to(device=device, dtype=dtype), A=self.A.to(device=device, dtype=dtype),
                       spectrum=self.spectrum if keep else None, magnitude=mag)

    @classmethod
    def from_svd(cls, svd, *, param: Param, dtype: torch.dtype, kind: ModuleKind = ModuleKind.LINEAR,
                 weight_shape: tuple[int, ...] = (), stored_rank: str | None = None) -> "LoraModule":
        """Exact LoRA factors of a :class:`~lowrank_tools.structured.ExactSVD` (scale 1, alpha = rank); a zero
        delta becomes one zero component."""
        svd = svd.trimmed(torch.finfo(dtype).eps)  # the smallest rank whose product is exact to dtype's rounding
        B, A = svd.factors()  # (out, R), (R, in) float64
        S = svd.S
        if svd.rank == 0:
            B, A, S = B.new_zeros(B.shape[0], 1), A.new_zeros(1, A.shape[1]), None
        return cls(B=B.to(dtype), A=A.to(dtype), alpha=float(B.shape[1]), kind=kind, weight_shape=weight_shape,
                   param=param, spectrum=S if dtype in _SVD_DTYPES else None, stored_rank=stored_rank)


def as_conv1d(m: LoraModule, conv1d: bool) -> LoraModule:
    """``m`` laid out on a transformers ``Conv1D`` weight (``conv1d``: weight (in, out)) or on an ``nn.Linear`` one
    (out, in). The factors B (out, r), A (r, in) stay as they are (PEFT stores them so with or without
    ``fan_in_fan_out``): only the weight's layout changes. Modules of other kinds are returned unchanged."""
    if m.kind not in (ModuleKind.LINEAR, ModuleKind.CONV1D) or (m.kind is ModuleKind.CONV1D) == conv1d:
        return m
    out, inp = m.matrix_shape
    return replace(m, kind=ModuleKind.CONV1D if conv1d else ModuleKind.LINEAR,
                   weight_shape=(inp, out) if conv1d else (out, inp))


@dataclass(frozen=True)
class BaseClass:
    """The diffusers class of the base an adapter was extracted from, as read there (never guessed)."""

    name: str        # the ``_class_name`` read: SanaPipeline, or a lone component's SanaTransformer2DModel
    file: str        # where: "model_index.json" (a pipeline folder) or "config.json" (a lone component's folder)

    @property
    def component(self) -> bool:
        """Read from a lone component's config (not a pipeline's ``model_index.json``)."""
        return self.file == "config.json"


@dataclass
class Adapter:
    """A set of LoRA modules keyed by module name, plus tensors saved whole (PEFT ``modules_to_save``)."""

    modules: dict[str, LoraModule] = field(default_factory=dict)
    full_tensors: dict[str, Tensor] = field(default_factory=dict)  # tensor name -> whole tensor
    base_model: str | None = None
    task_type: str | None = None  # PEFT's task_type (CAUSAL_LM, SEQ_CLS, ...) from the base's config, if known
    # made for a diffusers pipeline (True: modules under unet. / text_encoder. / transformer. are its components),
    # for one model (False: a transformers model, or one diffusers component), or unknown (None: the names decide;
    # see io.peft.is_diffusers_adapter). Set from the evidence: the base's config / model_index.json, the file read.
    pipeline: bool | None = None
    source_format: str | None = None
    notes: list[str] = field(default_factory=list)  # e.g. module names guessed when reading kohya files
    # deltas added to base tensors whole (``x.bias`` from kohya ``.diff_b`` / PEFT ``lora_B.bias``, norm weights
    # from ``w_norm`` / ``b_norm``): base tensor name -> delta, already scaled
    tensor_deltas: dict[str, Tensor] = field(default_factory=dict)
    # written in a transformers model's names (io.module_names): {name in the file: the checkpoint's module name};
    # a name not among the modules is a tied alias whose factors are its owner's (written, not held, twice)
    model_names: dict[str, str] = field(default_factory=dict)
    # the diffusers class of the base it was extracted from (io.base_class: recorded in the files written, read
    # back, kept by resize and convert, by merge only when every input has the same); None: not known
    base_class: BaseClass | None = None

    @property
    def params(self) -> int:
        return (sum(m.params for m in self.modules.values()) + sum(int(t.numel()) for t in self.full_tensors.values())
                + sum(int(t.numel()) for t in self.tensor_deltas.values()))

    @property
    def dtype(self) -> torch.dtype | None:
        for m in self.modules.values():
            return m.B.dtype
        return None

    @property
    def ranks(self) -> dict[str, int]:
        return {name: m.rank for name, m in self.modules.items()}

    def to(self, *, dtype: torch.dtype | None = None, device: str | torch.device | None = None) -> "Adapter":
        """Factors and tensors saved whole, cast (``--dtype`` is that of everything written) and/or moved."""
        modules = {n: m.to(dtype=dtype, device=device) for n, m in self.modules.items()}
        full = {n: t.to(device=device) for n, t in cast_whole(self.full_tensors, dtype).items()}
        deltas = {n: t.to(device=device) for n, t in cast_whole(self.tensor_deltas, dtype).items()}
        return replace(self, modules=modules, full_tensors=full, tensor_deltas=deltas)


def cast_whole(tensors: dict[str, Tensor], dtype: torch.dtype | None) -> dict[str, Tensor]:
    """Floating-point tensors saved whole, cast to ``dtype`` (others unchanged); an overflow names the tensor."""
    if dtype is None:
        return dict(tensors)
    out = {}
    for name, t in tensors.items():
        out[name] = t.to(dtype) if t.is_floating_point() else t
        if out[name] is not t and not bool(torch.isfinite(out[name]).all()) and bool(torch.isfinite(t).all()):
            raise NumericalError(f"tensor {name} (saved whole) overflows {dtype} when cast: pass --dtype float32 "
                                 f"or leave --dtype at auto")
    return out
