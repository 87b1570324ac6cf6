"""Re-factor LoRA modules through their QR core, truncated by a rank rule or a budget (resize and merge).

For a module ``M = s * B @ A`` (B (m, R), A (R, n)), with the R factors of ``B = Q_B R_B`` and
``A^T = Q_A R_A``, the small core ``C = s R_B R_A^T = U_c S V_c^T`` has M's singular values S, and

    U_r S_r  = s B (R_A^T V_c,r)        (m, r)     since  M V = U S,   V = Q_A V_c
    S_r Vh_r = s (U_c,r^T R_B) A        (r, n)     since  U^T M = S Vh, U = Q_B U_c

so the Eckart-Young optimal rank-r truncation of M comes from R-only QRs, one R x R SVD and two skinny
products: no (m, n) matrix and no explicit Q (Bjorck, "Numerical Methods for Least Squares Problems", 1996,
on the R factor of a QR). The new factors are the balanced split ``B' = U_r sqrt(S_r / s')``,
``A' = sqrt(S_r / s') Vh_r`` with ``s' = alpha / r`` (alpha = r, scale 1, unless given). A module whose rank is
kept keeps its factors as they are (its product is unchanged bit for bit).

float64 throughout: it is cheap here (O((m + n) R^2)) and rank rules then see the stored factors' exact
spectrum, so boundaries are not lost to rounding; the cast to the output dtype happens once, at the end.
Errors are measured on the factors as written, against the exact module, without densifying:
``||s B A - s' B' A'||_F`` by :func:`~lowrank_tools.norms.lowrank_frobenius_diff`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .adapter import LoraModule
from .linalg.budget import LayerSpectrum, allocate_budget
from .errors import InvalidOption, NonFiniteWeight, NumericalError
from .linalg.svd import RankRule, resolve_device, truncated_svd
from .linalg.norms import lowrank_frobenius_diff
from .report import MAX_SINGULAR_VALUES, LayerRecord, Progress, Warn

__all__ = ["Core", "Refactored", "module_core", "truncated_factors", "budget_ranks", "refactor_modules",
           "check_alpha"]


_EPS64 = torch.finfo(torch.float64).eps


@dataclass
class Refactored:
    """New modules (in input order), one measured record per module kept, names dropped at rank 0."""

    modules: dict[str, LoraModule] = field(default_factory=dict)
    records: list[LayerRecord] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)


@dataclass
class Core:
    """The small matrices of one module's exact SVD (float64, on the working device)."""

    S: Tensor  # (k,) descending: the singular values of s * B @ A, k = min(p, q)
    Uc: Tensor  # (p, k)
    Vhc: Tensor  # (k, q)
    R_B: Tensor  # (p, R), p = min(m, R)
    R_A: Tensor  # (q, R), q = min(n, R)


def check_alpha(alpha: float | None) -> None:
    if alpha is not None and not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise InvalidOption(f"--alpha {alpha!r} must be a positive number (scale = alpha / r)")


def _on(name: str, warn: Warn | None) -> Warn | None:
    return (lambda msg: warn(f"{name}: {msg}")) if warn else None


@torch.no_grad()
def module_core(module: LoraModule, *, device: torch.device, name: str = "", warn: Warn | None = None) -> Core:
    """R-only QRs of B and A^T and the exact SVD of the core ``s R_B R_A^T`` (signs fixed, float64).
    Raises :class:`NonFiniteWeight` naming the module when a factor holds NaN or Inf."""
    for which, factor in (("B", module.B), ("A", module.A)):
        if not bool(torch.isfinite(factor).all()):
            bad = int((~torch.isfinite(factor)).sum())
            raise NonFiniteWeight(f"module {name or '?'}: factor {which} {tuple(factor.shape)} holds {bad} NaN/Inf "
                                  f"values: repair or re-export the adapter, or leave the module out with --exclude")
    R_B = torch.linalg.qr(module.B.to(device, torch.float64), mode="r").R  # (p, R)
    R_A = torch.linalg.qr(module.A.to(device, torch.float64).mT, mode="r").R  # (q, R)
    core = module.scale * (R_B @ R_A.mT)  # (p, q)
    svd = truncated_svd(core, min(core.shape), method="exact", on_warning=_on(name, warn))
    return Core(S=svd.S, Uc=svd.U, Vhc=svd.Vh, R_B=R_B, R_A=R_A)


@torch.no_grad()
def truncated_factors(module: LoraModule, core: Core, r: int, *, scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """Balanced rank-r factors ``B' (m, r)``, ``A' (r, n)`` with ``scale * B' @ A'`` the optimal rank-r
    truncation of ``module``'s delta; float64 on the core's device. Components numerically zero (below
    ``S_1 * max(m, n, R) * eps``) get zero columns rather than a division by ~0."""
    device = core.S.device
    B = module.B.to(device, torch.float64)  # (m, R)
    A = module.A.to(device, torch.float64)  # (R, n)
    S = core.S[:r]  # (r,)
    tol = float(core.S[0]) * max(*B.shape, A.shape[1]) * _EPS64 if len(core.S) else 0.0
    inv_root = torch.where(S > tol, (S.clamp_min(tol) * scale).rsqrt(), torch.zeros_like(S))  # (r,)
    US = module.scale * (B @ (core.R_A.mT @ core.Vhc[:r].mT))  # (m, r): U_r S_r
    SV = module.scale * ((core.Uc[:, :r].mT @ core.R_B) @ A)  # (r, n): S_r Vh_r
    return US * inv_root, inv_root.unsqueeze(1) * SV  # U_r sqrt(S_r / scale), sqrt(S_r / scale) Vh_r


def budget_ranks(modules: Mapping[str, LoraModule], budget: int, *, rule: RankRule | None, device: torch.device,
                 warn: Warn | None = None) -> dict[str, int]:
    """Ranks per module under ``budget`` parameters (cost of a rank unit: out + in of the matrix view).

    Every spectrum is computed first (they are small), capped by ``rule`` (its rank, or what its dynamic
    rule keeps), then :func:`~lowrank_tools.budget.allocate_budget` spreads the budget."""
    layers = []
    for name, m in modules.items():
        S = module_core(m, device=device, name=name, warn=warn).S.cpu()  # (k,)
        cap = rule.choose(S) if rule is not None else len(S)
        layers.append(LayerSpectrum(name=name, shape=m.matrix_shape, singular_values=S[:cap]))
    return allocate_budget(layers, int(budget))


def _kept(module: LoraModule, alpha: float | None, dtype: torch.dtype) -> LoraModule:
    """The module's own factors (cast to ``dtype``); with ``alpha``, B is rescaled so the product stays."""
    if alpha is None:
        return module.to(dtype=dtype, device="cpu")
    ratio = module.scale / (alpha / module.rank)  # old scale / new scale
    B = (module.B.to("cpu", torch.float64) * ratio).to(dtype)  # float64: one rounding, at the cast
    return LoraModule(B=B, A=module.A.to("cpu", dtype), alpha=float(alpha), kind=module.kind,
                      weight_shape=module.weight_shape)


def _truncated(module: LoraModule, core: Core, r: int, alpha: float | None, dtype: torch.dtype,
               name: str) -> LoraModule:
    """Balanced rank-r factors, ``scale = alpha / r`` (alpha = r unless given), cast to ``dtype``."""
    alpha_out = float(alpha) if alpha is not None else float(r)
    B, A = truncated_factors(module, core, r, scale=alpha_out / r)  # (m, r), (r, n) float64
    B, A = B.to(dtype), A.to(dtype)  # the cast happens once, here, at the boundary
    if not (torch.isfinite(B).all() and torch.isfinite(A).all()):
        raise NumericalError(f"{name}: factors overflow {dtype} when cast: pass --dtype float32")
    return LoraModule(B=B.cpu(), A=A.cpu(), alpha=alpha_out, kind=module.kind, weight_shape=module.weight_shape)


def _record(name: str, exact: LoraModule, new: LoraModule, S: Tensor, r: int, device: torch.device,
            extra: dict) -> LayerRecord:
    S = S.double().cpu()  # (k,)
    total = float((S**2).sum())
    norm = math.sqrt(total)
    err = lowrank_frobenius_diff(exact.B.to(device), exact.A.to(device), exact.scale,
                                 new.B.to(device), new.A.to(device), new.scale)
    return LayerRecord(
        name=name, shape=tuple(exact.weight_shape), rank=new.rank, delta_norm=norm,
        singular_values=[float(s) for s in S[:MAX_SINGULAR_VALUES]],
        retained_energy=min(1.0, float((S[:r] ** 2).sum()) / total) if total else 1.0,
        rel_error=err / norm if norm else 0.0, params=new.params, weight_params=math.prod(exact.weight_shape),
        extra=dict(extra),
    )


@torch.no_grad()
def refactor_modules(modules: Mapping[str, LoraModule], *, rule: RankRule | None = None, budget: int | None = None,
                     alpha: float | None = None, dtypes: Mapping[str, torch.dtype] | None = None,
                     device: str | torch.device = "cpu", extra: Mapping[str, dict] | None = None,
                     progress: Progress | None = None, warn: Warn | None = None) -> Refactored:
    """Truncate each module of ``modules`` (the exact deltas) through its QR core.

    ``rule`` and ``budget`` pick each rank (both None: keep every module exactly, rescaled to ``alpha``);
    a module whose new rank equals its rank keeps its factors. A rank of 0 drops the module. ``dtypes``:
    per-module output dtype (default: the module's). ``extra``: per-module fields for the records.
    Math on ``device``, results on CPU.
    """
    check_alpha(alpha)
    dev = resolve_device(device)
    ranks = budget_ranks(modules, budget, rule=rule, device=dev, warn=warn) if budget is not None else None
    out = Refactored()
    for i, (name, m) in enumerate(modules.items()):
        if progress:
            progress(i, len(modules), name)
        core = module_core(m, device=dev, name=name, warn=warn)  # core.S: (k,) the exact spectrum of the delta
        if ranks is not None:
            r = ranks[name]
        else:
            r = rule.choose(core.S) if rule is not None else m.rank
        if r == 0:
            out.dropped.append(name)
            continue
        dtype = (dtypes or {}).get(name, m.B.dtype)
        new = _kept(m, alpha, dtype) if r >= m.rank else _truncated(m, core, r, alpha, dtype, name)
        out.modules[name] = new
        out.records.append(_record(name, m, new, core.S, r, dev, (extra or {}).get(name, {})))
    if progress:
        progress(len(modules), len(modules), "")
    return out
