"""What ``apply`` changed, tensor by tensor: the record written by ``apply --report FILE`` (JSON, or CSV for .csv).

Per changed tensor: the adapter modules added to it and their adapters, ``max_abs_delta`` = max |W - W0|,
``delta_norm`` = ||W - W0||_F, ``base_norm`` = ||W0||_F and ``relative_change`` = ||W - W0||_F / ||W0||_F
(computed by :func:`~lowrank_tools.linalg.norms.delta_stats`; ``null`` when ||W0||_F = 0, with ``note`` saying so). W is the tensor as written, after the cast to the output
dtype: the report measures what the file holds.
"""

from __future__ import annotations

import csv
import io
import json
from typing import TYPE_CHECKING

from .report import finite_or_none

if TYPE_CHECKING:
    from .apply import ApplyResult

__all__ = ["apply_records", "apply_report_json", "apply_report_csv"]

def apply_records(result: ApplyResult) -> list[dict]:
    """One record per changed tensor, in the order written."""
    records = []
    for tensor, stats in result.changes.items():
        base = stats["base_norm"]
        change = stats["delta_norm"] / base if base > 0 else None
        records.append({
            "tensor": tensor,
            "modules": result.modified.get(tensor, []),
            "adapters": stats.get("adapters", []),
            "replaced_whole": tensor in result.replaced,
            "max_abs_delta": finite_or_none(stats["max_abs_delta"]),
            "delta_norm": finite_or_none(stats["delta_norm"]),
            "base_norm": finite_or_none(base),
            "relative_change": finite_or_none(change) if change is not None else None,
            "note": "" if change is not None else "base tensor is all zeros: no relative change",
        })
    return records


def apply_report_json(result: ApplyResult) -> str:
    """``{"output", "tensors_written", "changed": [records], "copied"}`` as strict JSON (no NaN / inf)."""
    data = {"output": str(result.output), "tensors_written": result.tensors,
            "changed": apply_records(result), "copied": result.copied}
    return json.dumps(data, indent=2, allow_nan=False) + "\n"


def apply_report_csv(result: ApplyResult) -> str:
    """One row per changed tensor; list cells are space-separated, a missing number is an empty cell."""
    out = io.StringIO()
    writer = csv.writer(out)
    columns = ["tensor", "modules", "adapters", "replaced_whole", "max_abs_delta", "delta_norm", "base_norm",
               "relative_change", "note"]
    writer.writerow(columns)
    for record in apply_records(result):
        writer.writerow([" ".join(v) if isinstance(v, list) else ("" if v is None else
                         (int(v) if isinstance(v, bool) else (f"{v:.8g}" if isinstance(v, float) else v)))
                         for v in (record[c] for c in columns)])
    return out.getvalue()
