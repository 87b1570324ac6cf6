"""An :class:`~lowrank_tools.analyze.records.Analysis` as a terminal table, JSON, CSV and PNG files. Never computes an SVD.

``write_analysis`` renders every requested output in memory first, then writes each under a temporary
name beside its target and installs them all at the end (an :class:`~lowrank_tools.outputs.OutputTransaction`):
a failure leaves nothing half-written and none of them installed.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..io.outputs import OutputTransaction, check_output, rendered, write_files
from ..errors import OutputError, UsageError
from ..report import BASE_IS_ZERO, csv_number, left_out_lines, name_column, ratio_cell, strict_json
from ..linalg.spectrum import ENERGY_LEVELS, level_key

if TYPE_CHECKING:
    from .records import Analysis, LayerAnalysis

__all__ = ["format_analysis", "analysis_json", "analysis_csv", "check_analysis_outputs", "write_analysis"]

CSV_SINGULAR_VALUES = 64  # leading values per CSV row (spreadsheet cells hold ~32k characters)
_LEVEL_KEYS = [level_key(f) for f in ENERGY_LEVELS]


# ------------------------------------------------------------------------------------------ JSON / CSV


def analysis_json(analysis: Analysis) -> str:
    """Per layer ``name``, ``shape``, ``singular_values``, ``energy_rank`` ({"0.5": r, ...}), ``effective_rank``,
    ``stable_rank``, ``relative_change`` (and more); plus summary, groups and recommendation. Strict JSON:
    ``relative_change`` (layers, groups, summary) and ``not_low_rank`` values are null when the ratio has no value
    (an adapter has no base; a base tensor that is all zero)."""
    data = analysis.to_dict()
    for row in data["layers"]:  # float32 values: 8 significant digits say all they hold
        row["singular_values"] = [float(f"{s:.8g}") for s in row["singular_values"]]
    return strict_json(data, indent=2) + "\n"


def _csv_header() -> list[str]:
    return (["name", "module_type", "depth", "kind", "shape", "matrix_shape", "method", "delta_norm", "relative_change",
             "effective_rank", "stable_rank"] + [f"energy_rank_{k}" for k in _LEVEL_KEYS]
            + ["complete", "estimated", "top_singular_values"])


def analysis_csv(analysis: Analysis) -> str:
    """One row per layer; ``top_singular_values`` holds the leading 64, space-separated. An empty field is a value
    with no meaning (``relative_change`` of an adapter, or over an all-zero base tensor)."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(_csv_header())
    for x in analysis.layers:
        m = x.metrics
        change = x.relative_change
        writer.writerow([x.name, x.module_type, x.depth or "", x.kind, "x".join(map(str, x.shape)),
                         "x".join(map(str, x.matrix_shape)), x.method, csv_number(x.delta_norm, ".8g"),
                         csv_number(change), csv_number(m.effective_rank), csv_number(m.stable_rank)]
                        + [m.energy_rank[k] for k in _LEVEL_KEYS]
                        + [int(m.complete), " ".join(m.estimated),
                           " ".join(csv_number(s) for s in x.singular_values[:CSV_SINGULAR_VALUES])])
    return out.getvalue()


# ------------------------------------------------------------------------------------------ table


def _rank(x: LayerAnalysis, key: str) -> str:
    r = x.metrics.energy_rank[key]
    return f"{r}+" if key in x.metrics.estimated else str(r)


def _num(value: float | None, fmt: str) -> str:
    """A ratio cell: "-" for none (an adapter), "n/a" over an all-zero base (explained under the table)."""
    return ratio_cell(value, fmt).replace(BASE_IS_ZERO, "n/a")


def _layer_rows(layers: Sequence[LayerAnalysis], max_rows: int) -> list[str]:
    """Worst first: the most rank needed for 90 % of the layer's energy, then the largest ||dW||_F."""
    key90 = level_key(0.9)
    rows = sorted(layers, key=lambda x: (-x.metrics.energy_rank[key90], -x.delta_norm))
    names, width = name_column([x.name for x in rows[:max_rows]])
    lines = ["layers sorted by r90 (the rank keeping 90% of the layer's energy), then ||dW||, largest first",
             f"{'layer':<{width}}  {'shape':>13}  {'||dW||':>9}  {'change':>8}  {'eff_rank':>9}  {'stable':>7}  "
             + "  ".join(f"{'r' + k[2:].ljust(2, '0'):>6}" for k in _LEVEL_KEYS)]
    for name, x in zip(names, rows[:max_rows]):
        erank = ("~" if "effective_rank" in x.metrics.estimated else "") + f"{x.metrics.effective_rank:.1f}"
        lines.append(f"{name:<{width}}  {'x'.join(map(str, x.shape)):>13}  {x.delta_norm:>9.4g}  "
                     f"{_num(x.relative_change, '.4f'):>8}  {erank:>9}  {x.metrics.stable_rank:>7.2f}  "
                     + "  ".join(f"{_rank(x, k):>6}" for k in _LEVEL_KEYS))
    if len(rows) > max_rows:
        lines.append(f"... {len(rows) - max_rows} more layers (all of them: --json FILE or --csv FILE)")
    zero = [x.name for x in layers if x.base_norm == 0]
    if zero:
        lines.append(f"change n/a: base is zero ({len(zero)} layers, e.g. {zero[0]}): ||dW|| / ||W0|| has no value "
                     "(null in --json, empty in --csv)")
    return lines


def _group_rows(title: str, order: str, groups: dict[str, dict], max_rows: int, missing: str = "-") -> list[str]:
    keys = list(groups)[:max_rows]
    short, width = name_column(keys, 32)
    lines = [f"{title} ({order})", f"{'group':<{width}}  {'layers':>6}  {'energy':>7}  {'change':>8}  "
             f"{'eff_rank':>8}  {'stable':>7}  {'r90 med':>7}  {'r90 max':>7}  {'r90/side':>8}"]
    for name, key in zip(short, keys):
        g = groups[key]
        lines.append(f"{name:<{width}}  {g['layers']:>6}  {100 * g['energy_share']:>6.2f}%  "
                     f"{_num(g['relative_change'], '.4f') if g['relative_change'] is not None else missing:>8}  "
                     f"{g['effective_rank_mean']:>8.1f}  "
                     f"{g['stable_rank_mean']:>7.2f}  {g['rank90_median']:>7g}  {g['rank90_max']:>7}  "
                     f"{g['rank90_share_mean']:>8.3f}")
    if len(groups) > max_rows:
        lines.append(f"... {len(groups) - max_rows} more")
    return lines


def _choice_row(label: str, option: str, choice: dict | None) -> str:
    if choice is None:
        return f"{label:>7}  {option:<18}  not reached by the computed singular values: drop --top or raise it"
    ranks = str(choice["rank_min"]) if choice["rank_min"] == choice["rank_max"] else \
        f"{choice['rank_min']}-{choice['rank_max']}"
    est = "  (estimated)" if choice.get("estimated") else ""
    return (f"{label:>7}  {option:<18}  {choice['params']:>14,}  {choice['megabytes']:>10.2f}  {ranks:>9}  "
            f"{100 * choice['retained_energy']:>8.2f}%{est}")


def _recommendation_rows(recommendation: dict, layers: int) -> list[str]:
    lines = [f"recommendation (share of the energy of all {layers} layers' deltas together):",
             f"{'target':>7}  {'option':<18}  {'params':>14}  {'MB':>10}  {'ranks':>9}  {'retained':>9}"]
    for key, rec in recommendation.items():
        label = f"{100 * float(key):g}%"
        uniform, budget = rec["uniform"], rec["budget"]
        lines.append(_choice_row(label, f"--rank {uniform['rank']}" if uniform else "--rank", uniform))
        lines.append(_choice_row("", f"--energy {key}", rec["energy"]))
        lines.append(_choice_row("", f"--budget {budget['budget']}" if budget else "--budget", budget))
    return lines


def format_analysis(analysis: Analysis, *, max_rows: int = 40) -> str:
    """Layers worst first, the summaries by module type and by depth, the recommendation, then notes."""
    if not analysis.layers:
        return "no changed layer to analyze"
    s = analysis.summary
    lines = _layer_rows(analysis.layers, max_rows) + [""]
    missing = "n/a" if analysis.source == "delta" else "-"  # a group of BASE TUNED without a ratio: its base is zero
    lines += _group_rows("by module type", "in order of first appearance", analysis.groups["module_type"],
                         max_rows, missing) + [""]
    lines += _group_rows("by depth", "blocks in index order, layers outside any block last as -",
                         analysis.groups["depth"], max_rows, missing) + [""]
    lines += _recommendation_rows(analysis.recommendation, len(analysis.layers))
    change = f", ||dW|| / ||W0|| {s['relative_change']:.4f}" if s.get("relative_change") is not None else ""
    lines.append(f"analyze: {s['layers']} layers{change}, median rank for 90% energy {s['rank90_median']:g}, "
                 f"mean effective rank {s['effective_rank_mean']:.1f}, {s['wall_time_s']:.2f} s")
    lines += [f"note: {n}" for n in analysis.notes]
    lines += left_out_lines(analysis.skipped, analysis.changed_1d, label="not low-rank")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ files


def _plot_targets(folder: Path) -> list[Path]:
    from .plots import PLOT_FILES  # matplotlib itself is imported only when rendering

    return [folder / name for name in PLOT_FILES]


def check_analysis_outputs(*, json_path=None, csv_path=None, plot_dir=None, force: bool = False,
                           inputs: Sequence[str | os.PathLike] = ()) -> None:
    """Fail before any work: an output that is an input, exists without ``force``, a plot folder that is a file
    or cannot be written, two outputs at one path, or ``plot_dir`` without matplotlib."""
    targets = [Path(p) for p in (json_path, csv_path) if p is not None]
    if plot_dir is not None:
        from .plots import require_matplotlib

        require_matplotlib()
        _check_folder(Path(plot_dir))
        targets += _plot_targets(Path(plot_dir))
    resolved = [t.resolve() for t in targets]
    if len(set(resolved)) < len(resolved):
        raise UsageError(f"two outputs share one path ({', '.join(map(str, targets))}): give each its own")
    for target in targets:
        check_output(target, force=force, inputs=inputs)


def _check_folder(folder: Path) -> None:
    existing = next(p for p in [folder, *folder.parents] if p.exists() or p == Path(p.anchor))
    what = "plot folder" if existing == folder else f"folder {existing}, parent of the plot folder,"
    if not existing.is_dir():
        raise OutputError(f"--plot {folder}: {what} is not a folder: choose another --plot")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"--plot {folder}: {what} is not writable: choose another --plot")


def write_analysis(analysis: Analysis, *, json_path=None, csv_path=None, plot_dir=None, force: bool = False,
                   inputs: Sequence[str | os.PathLike] = (),
                   transaction: OutputTransaction | None = None) -> list[Path]:
    """Write the requested outputs (JSON file, CSV file, PNGs into ``plot_dir``) all or nothing; return their paths.

    Each is rendered in memory, written under a temporary name and installed when every one is written (with
    ``transaction``: when it commits, with the run's other outputs). ``plot_dir`` may hold other files: only the
    PNG names of :data:`~lowrank_tools.plots.PLOT_FILES` are written there (replaced only with ``force``)."""
    check_analysis_outputs(json_path=json_path, csv_path=csv_path, plot_dir=plot_dir,
                           force=transaction.force if transaction is not None else force, inputs=inputs)
    files = rendered([(json_path, lambda: analysis_json(analysis)), (csv_path, lambda: analysis_csv(analysis))])
    if plot_dir is not None:
        from .plots import render_plots

        files.update({Path(plot_dir) / name: data for name, data in render_plots(analysis).items()})
    return write_files(files, force=force, inputs=inputs, transaction=transaction)
