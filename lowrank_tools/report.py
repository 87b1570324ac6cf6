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

__all__ = ["Progress", "Warn", "AdapterResult", "LayerRecord", "Report", "left_out_lines", "summarize", "format_table", "report_json", "report_csv", "MAX_SINGULAR_VALUES"]
__all__ += ["factor_record", "short_name"]

MAX_SINGULAR_VALUES = 64  # leading singular values kept per layer in reports

Progress = Callable[[int, int, str], None]  # operations report (done, total, current name) through this


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
                "not_low_rank": self.changed_1d, "notes": self.notes}


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
    return json.dumps(report.to_dict(), indent=2, allow_nan=False, default=str) + "\n"


_CSV_FIELDS = ["name", "shape", "rank", "delta_norm", "retained_energy", "rel_error", "params", "weight_params"]


def report_csv(report: Report) -> str:
    extra_keys = sorted({k for r in report.layers for k in r.extra})
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(_CSV_FIELDS + extra_keys + ["singular_values"])
    for r in report.layers:
        writer.writerow([r.name, "x".join(map(str, r.shape)), r.rank, f"{r.delta_norm:.6g}", f"{r.retained_energy:.6g}",
                         f"{r.rel_error:.6g}", r.params, r.weight_params] + [r.extra.get(k, "") for k in extra_keys]
                        + [" ".join(f"{s:.6g}" for s in r.singular_values)])
    return out.getvalue()


def short_name(name: str, width: int) -> str:
    """``name`` cut to ``width`` characters for a table (the one rule of every table)."""
    return name if len(name) <= width else "..." + name[-(width - 3):]


def format_table(report: Report, *, max_rows: int = 40) -> str:
    """A compact terminal table: worst layers first (by absolute error), then the summary."""
    rows = sorted(report.layers, key=lambda r: -r.delta_norm * r.rel_error)
    width = min(48, max([len(r.name) for r in rows] + [5]))
    extra_keys = [k for k in ("old_rank",) if any(k in r.extra for r in rows)]
    head = f"{'layer':<{width}}  {'shape':>13}  " + "".join(f"{k:>8}  " for k in extra_keys)
    lines = [head + f"{'rank':>5}  {'||dW||':>10}  {'energy':>8}  {'rel_err':>8}"]
    for r in rows[:max_rows]:
        shape = "x".join(map(str, r.shape))
        extras = "".join(f"{r.extra.get(k, ''):>8}  " for k in extra_keys)
        lines.append(f"{short_name(r.name, width):<{width}}  {shape:>13}  {extras}{r.rank:>5}  {r.delta_norm:>10.4g}  "
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


def left_out_lines(skipped: dict[str, list[str]], changed_1d: dict[str, float], *, label: str) -> list[str]:
    """Terminal lines for what a run left out: skipped tensors by reason, and the 1-D tensors that changed most."""
    lines = [f"skipped {len(names)} ({reason}): {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"
             for reason, names in skipped.items() if names]
    if changed_1d:
        top = sorted(changed_1d.items(), key=lambda kv: -kv[1])[:5]
        lines.append(f"{label} ({len(changed_1d)} 1-D tensors changed; ||d||/||W0||): "
                     + ", ".join(f"{n} {v:.3g}" for n, v in top))
    return lines

