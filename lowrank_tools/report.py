"""Per-layer records and their summaries, as JSON, CSV or a terminal table. Never computes an SVD.

Operations (extract, resize, merge) fill :class:`LayerRecord` objects with numbers they measured;
this module only adds them up and lays them out.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from .errors import Warn

if TYPE_CHECKING:
    from .adapter import Adapter

__all__ = ["Progress", "Warn", "AdapterResult", "LayerRecord", "Report", "left_out_lines", "summarize", "format_table",
           "report_json", "report_csv", "strict_json", "finite_or_none", "csv_number", "ratio_cell", "BASE_IS_ZERO",
           "MAX_SINGULAR_VALUES", "short_name", "name_column", "NAME_WIDTH", "format_modules", "factor_record"]

MAX_SINGULAR_VALUES = 64  # leading singular values kept per layer in reports

Progress = Callable[[int, int, str], None]  # operations report (done, total, current name) through this
BASE_IS_ZERO = "n/a (base is zero)"  # a ratio ||d|| / ||W0|| over an all-zero base tensor: null in JSON


# ------------------------------------------------------------------------------------------ strict encoding


def finite_or_none(value: float | None) -> float | None:
    """``value``, or None when it is None, Inf or NaN: how a ratio with no meaning (over a zero norm) is written."""
    return value if value is None or math.isfinite(value) else None


def strict_json(data, **kwargs) -> str:
    """``json.dumps`` that refuses NaN and Inf (``allow_nan=False``): every report, config and ``info --json`` goes
    through it, so a value that should have been made ``null`` is a loud ValueError, never an invalid file."""
    return json.dumps(data, allow_nan=False, **kwargs)


def csv_number(value: float | None, fmt: str = ".6g") -> str:
    """A CSV cell: the number formatted, or an empty field for None (no value) and Inf/NaN (no meaning)."""
    return "" if value is None or not math.isfinite(value) else format(value, fmt)


def ratio_cell(value: float | None, fmt: str = ".4g", *, missing: str = "-") -> str:
    """A table cell for a ratio ``||d|| / ||W0||``: ``BASE_IS_ZERO`` when it is infinite, ``missing`` for None."""
    if value is None:
        return missing
    return format(value, fmt) if math.isfinite(value) else BASE_IS_ZERO


@dataclass
class LayerRecord:
    """What one layer's factorisation gave; rel_error is measured on the factors as written."""

    name: str
    shape: tuple[int, ...]
    rank: int
    delta_norm: float  # ||dW||_F
    singular_values: list[float]  # leading values, at most MAX_SINGULAR_VALUES
    retained_energy: float  # sum(S_r^2) / ||dW||_F^2
    rel_error: float  # ||dW - scale*B@A||_F / ||dW||_F
    params: int = 0  # adapter parameters of this layer: r * (out + in)
    weight_params: int = 0  # parameters of the weight it covers
    extra: dict = field(default_factory=dict)  # per-command fields (old_rank, method, ...)


def factor_record(name: str, weight_shape: tuple[int, ...], *, rank: int, values, norm: float, err: float,
                  params: int, shown=None, extra: dict | None = None) -> LayerRecord:
    """The record of one layer factored at ``rank``: ``values`` its singular values, descending (at least the
    top ``rank``: the retained energy), ``norm`` ``||dW||_F``, ``err`` ``||dW - scale B A||_F`` measured on the
    factors as written; ``shown`` the values listed (default ``values``), at most :data:`MAX_SINGULAR_VALUES`."""
    kept = math.fsum(float(s) ** 2 for s in values[:rank])
    return LayerRecord(name=name, shape=tuple(weight_shape), rank=rank, delta_norm=norm,
                       singular_values=[float(s) for s in (values if shown is None else shown)[:MAX_SINGULAR_VALUES]],
                       retained_energy=min(1.0, kept / norm**2) if norm else 1.0, rel_error=err / norm if norm else 0.0,
                       params=int(params), weight_params=math.prod(weight_shape), extra=dict(extra or {}))


@dataclass
class Report:
    """Layers, a summary, what was skipped (reason -> names) and warnings, for one command run."""

    command: str
    layers: list[LayerRecord]
    summary: dict
    skipped: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    changed_1d: dict[str, float] = field(default_factory=dict)  # 1-D tensors left out: ||d|| / ||W0||

    def to_dict(self) -> dict:
        layers = []
        for rec in self.layers:
            row = asdict(rec)
            row["shape"] = list(rec.shape)
            extra = row.pop("extra")
            row.update(extra)
            layers.append(row)
        return {"command": self.command, "summary": self.summary, "layers": layers, "skipped": self.skipped,
                "not_low_rank": {k: finite_or_none(v) for k, v in self.changed_1d.items()}, "notes": self.notes}


@dataclass
class AdapterResult:
    """What extract, resize and merge return: the adapter and the report that measured it."""

    adapter: "Adapter"
    report: Report
    primary: bool = True  # False on ranks other than 0 of a distributed extract: empty adapter, report of its share


def summarize(layers: list[LayerRecord], *, wall_time: float | None = None, **more) -> dict:
    """Totals over layers. rel_error is norm-weighted: sum ||dW - BA||_F / sum ||dW||_F;
    global_rel_error is the error of the whole model's delta: sqrt(sum err^2 / sum ||dW||^2)."""
    norm = sum(r.delta_norm for r in layers)
    err = sum(r.delta_norm * r.rel_error for r in layers)
    sq_norm = sum(r.delta_norm**2 for r in layers)
    sq_err = sum((r.delta_norm * r.rel_error) ** 2 for r in layers)
    params = sum(r.params for r in layers)
    covered = sum(r.weight_params for r in layers)
    summary = {
        "layers": len(layers),
        "params": params,
        "covered_params": covered,
        "param_share": params / covered if covered else 0.0,
        "rel_error": err / norm if norm else 0.0,
        "global_rel_error": math.sqrt(sq_err / sq_norm) if sq_norm else 0.0,
        "retained_energy": 1.0 - sq_err / sq_norm if sq_norm else 1.0,
        "ranks": {"min": min((r.rank for r in layers), default=0), "max": max((r.rank for r in layers), default=0)},
    }
    if wall_time is not None:
        summary["wall_time_s"] = round(wall_time, 3)
    summary.update(more)
    return summary


def report_json(report: Report) -> str:
    """The report as strict JSON. ``not_low_rank`` maps each changed 1-D tensor to ``||d|| / ||W0||``, null when
    the base tensor is all zero (the ratio has no value)."""
    return strict_json(report.to_dict(), indent=2, default=str) + "\n"


_CSV_FIELDS = ["name", "shape", "rank", "delta_norm", "retained_energy", "rel_error", "params", "weight_params"]


def report_csv(report: Report) -> str:
    extra_keys = sorted({k for r in report.layers for k in r.extra})
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(_CSV_FIELDS + extra_keys + ["singular_values"])
    for r in report.layers:
        writer.writerow([r.name, "x".join(map(str, r.shape)), r.rank, csv_number(r.delta_norm),
                         csv_number(r.retained_energy), csv_number(r.rel_error), r.params, r.weight_params]
                        + [_csv_extra(r.extra.get(k, "")) for k in extra_keys]
                        + [" ".join(csv_number(s) for s in r.singular_values)])
    return out.getvalue()


NAME_WIDTH = 48  # widest layer-name column of a terminal table


def short_name(name: str, width: int = NAME_WIDTH) -> str:
    """``name`` in at most ``width`` characters, shortened in the middle, never cut from the left: its first part,
    the first block index (with its name) and the leaf always stay; other dotted parts come back, alternately from
    after the block index and from before the leaf, while they fit; each gap shows as ``...``, e.g.
    ``down_blocks.1.attentions.0...ff.net.2``. One function for every table (report, analyze, info --modules)."""
    if len(name) <= width:
        return name
    parts = name.split(".")
    index = next((i for i, p in enumerate(parts) if p.isdigit() and i > 0), None)
    leaf = len(parts) - (2 if len(parts) > 2 and parts[-1].isdigit() else 1)
    kept = {0, *range(leaf, len(parts))} | ({index - 1, index} if index is not None else set())
    if len(_render(parts, kept)) > width or len(kept) >= len(parts):  # no part to drop that would help
        keep = max(width - 3, 2)
        return name[:(keep + 1) // 2] + "..." + name[len(name) - keep // 2:]
    for unit in _units(parts, kept, index or 0, leaf):
        if len(_render(parts, kept | unit)) <= width:
            kept |= unit
    return _render(parts, kept)


def _units(parts: list[str], kept: set[int], index: int, leaf: int) -> list[set[int]]:
    """The parts not kept, in the order they are offered back: alternately the next one after the block index
    (with the index that follows it) and the next one before the leaf (an index with the name before it); the
    wrappers between the first part and the block index last."""
    middle = [i for i in range(index + 1, leaf) if i not in kept]
    units: list[set[int]] = []
    taken: set[int] = set()
    for k in range(len(middle)):
        left, right = middle[k], middle[-1 - k]
        for unit in ({left, left + 1} if left + 1 < leaf and parts[left + 1].isdigit() else {left},
                     {right - 1, right} if parts[right].isdigit() and right - 1 > index else {right}):
            if not unit & taken:
                units.append(unit)
                taken |= unit
    return units + [{i} for i in range(1, index) if i not in kept]


def _render(parts: list[str], kept: set[int]) -> str:
    out, gap = "", False
    for i, part in enumerate(parts):
        if i not in kept:
            gap = True
            continue
        out += ("..." if gap else ".") + part if out else part
        gap = False
    return out + ("..." if gap else "")


def name_column(names, width: int = NAME_WIDTH) -> tuple[list[str], int]:
    """The shortened names and the column width that fits them (at least that of the header ``layer``)."""
    short = [short_name(n, width) for n in names]
    return short, max([len(n) for n in short] + [5])


def _csv_extra(value) -> str:
    return csv_number(value) if isinstance(value, float) else value


def format_table(report: Report, *, max_rows: int = 40) -> str:
    """A compact terminal table: worst layers first (by absolute error), then the summary."""
    rows = sorted(report.layers, key=lambda r: -r.delta_norm * r.rel_error)
    names, width = name_column([r.name for r in rows[:max_rows]])
    extra_keys = [k for k in ("old_rank",) if any(k in r.extra for r in rows)]
    head = f"{'layer':<{width}}  {'shape':>13}  " + "".join(f"{k:>8}  " for k in extra_keys)
    lines = [f"{report.command}: layers sorted by absolute error ||dW|| * rel_err, largest first",
             head + f"{'rank':>5}  {'||dW||':>10}  {'energy':>8}  {'rel_err':>8}"]
    for name, r in zip(names, rows[:max_rows]):
        shape = "x".join(map(str, r.shape))
        extras = "".join(f"{r.extra.get(k, ''):>8}  " for k in extra_keys)
        lines.append(f"{name:<{width}}  {shape:>13}  {extras}{r.rank:>5}  {r.delta_norm:>10.4g}  "
                     f"{r.retained_energy:>8.4f}  {r.rel_error:>8.4f}")
    if len(rows) > max_rows:
        lines.append(f"... {len(rows) - max_rows} more layers (full list: --report FILE.json)")
    s = report.summary
    lines.append(
        f"{report.command}: {s['layers']} layers, ranks {s['ranks']['min']}-{s['ranks']['max']}, "
        f"{s['params']:,} adapter params ({100 * s['param_share']:.2f}% of covered weights), "
        f"rel_error {s['rel_error']:.4f} (norm-weighted), retained energy {s['retained_energy']:.4f}"
        + (f", {s['wall_time_s']:.2f} s" if "wall_time_s" in s else "")
    )
    lines += left_out_lines(report.skipped, report.changed_1d, label="not in the adapter")
    return "\n".join(lines)


def format_modules(rows: list[dict]) -> str:
    """``info --modules``: one line per module (rows of :func:`~lowrank_tools.formats.describe_modules`), in the
    adapter's file order, names shortened by :func:`short_name`."""
    names, width = name_column([r["name"] for r in rows])
    lines = ["modules in file order", f"{'module':<{width}}  {'kind':>9}  {'rank':>5}  {'alpha':>9}  {'shape':>15}  "
             f"{'params':>11}"]
    for name, r in zip(names, rows):
        rank, alpha = ("-", "-") if r["rank"] is None else (r["rank"], f"{r['alpha']:g}")
        lines.append(f"{name:<{width}}  {r['kind']:>9}  {rank:>5}  {alpha:>9}  {'x'.join(map(str, r['shape'])):>15}  "
                     f"{r['params']:>11,}")
    return "\n".join(lines)


def left_out_lines(skipped: dict[str, list[str]], changed_1d: dict[str, float], *, label: str) -> list[str]:
    """Terminal lines for what a run left out: skipped tensors by reason, and the 1-D tensors that changed most."""
    lines = [f"skipped {len(names)} ({reason}): {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"
             for reason, names in skipped.items() if names]
    if changed_1d:
        top = sorted(changed_1d.items(), key=lambda kv: -kv[1])[:5]  # inf (base is zero) first
        lines.append(f"{label} ({len(changed_1d)} 1-D tensors changed; ||d||/||W0||): "
                     + ", ".join(f"{n} {ratio_cell(v, '.3g')}" for n, v in top))
    return lines

