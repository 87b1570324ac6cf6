"""An :class:`~lowrank_tools.evaluate.run.Evaluation` as a terminal table, JSON, CSV and a PNG curve.

JSON is strict (``allow_nan=False``); an undefined value (a ratio over base_kl == 0, a measure of the other
model kind) is ``null``. ``write_evaluation`` renders every output in memory first and renames them all into
place at the end: a failure leaves nothing half-written.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path

from ..io.outputs import check_output, rendered, write_files
from ..errors import MissingExtra, OutputError, UsageError
from .curve import LEVELS, smallest_reaching
from ..io.models import ModelKind
from .run import Evaluation, Score

__all__ = ["PLOT_FILE", "dora_comparison", "evaluation_json", "evaluation_csv", "format_evaluation",
           "check_evaluation_outputs", "write_evaluation"]

PLOT_FILE = "recovered_vs_params.png"
_CSV_KEYS = ("path", "params", "megabytes", "kl", "kl_recovered", "cosine", "recovered", "rel_l2_error",
             "noise_error", "top1_agreement", "loss", "rank", "budget", "energy", "dora_rank", "dora_budget",
             "dora_energy")


_SERIES_LABELS = {"rank": "uniform rank", "budget": "--budget", "energy": "--energy", "dora_rank": "DoRA, uniform rank",
                  "dora_budget": "DoRA, --budget", "dora_energy": "DoRA, --energy"}


def _megabytes(params: int) -> float:
    return params * 4 / 1e6  # float32 factors, as evaluated (a bf16/fp16 file is half)


def evaluation_json(evaluation: Evaluation) -> str:
    data = evaluation.to_dict()
    data["reached"] = {series: {f"{level:g}": (s.path if s else None) for level, s in levels.items()}
                       for series, levels in _reached(evaluation).items()}
    comparison = dora_comparison(evaluation)
    if comparison:
        data["dora_vs_lora"] = comparison
    return json.dumps(data, indent=2, allow_nan=False) + "\n"


def evaluation_csv(evaluation: Evaluation) -> str:
    """One row per adapter (and a first row for the base, params 0)."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(_CSV_KEYS)
    for s in [evaluation.base, *evaluation.adapters]:
        row = {**s.to_dict(), **s.size, "megabytes": _megabytes(s.params)}
        writer.writerow(["" if row.get(k) is None else row[k] for k in _CSV_KEYS])
    return out.getvalue()


def dora_comparison(evaluation: Evaluation) -> list[dict]:
    """Per DoRA rank r of a ``--dora`` curve: its recovered share beside LoRA's at rank r (the same factors) and at
    rank r + 1 (about the same parameters: DoRA adds one magnitude per output row, a rank adds out + in)."""
    lora = {s.size["rank"]: s for s in evaluation.adapters if "rank" in s.size}
    rows = []
    for s in evaluation.adapters:
        r = s.size.get("dora_rank")
        if r is None:
            continue
        same, more = lora.get(r), lora.get(r + 1)
        rows.append({"rank": r, "dora_params": s.params, "dora_recovered": s.behaviour_recovered,
                     "lora_recovered": same.behaviour_recovered if same else None,
                     "lora_next_params": more.params if more else None,
                     "lora_next_recovered": more.behaviour_recovered if more else None})
    return rows


def _comparison_lines(evaluation: Evaluation) -> list[str]:
    return [f"DoRA rank {row['rank']} ({row['dora_params']:,} params) {_num(row['dora_recovered'], '.2%')} vs LoRA "
            f"rank {row['rank']} {_num(row['lora_recovered'], '.2%')}, LoRA rank {row['rank'] + 1} "
            f"({_num(row['lora_next_params'], ',')} params) {_num(row['lora_next_recovered'], '.2%')}"
            for row in dora_comparison(evaluation)]


def _reached(evaluation: Evaluation) -> dict[str, dict[float, Score | None]]:
    """Per series (rank, budget, energy, or the adapters given), the smallest adapter reaching each level."""
    return {series: smallest_reaching(scores, LEVELS) for series, scores in _series(evaluation).items()}


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _short(name: str, width: int) -> str:
    return name if len(name) <= width else "..." + name[-(width - 3):]


def _cells(evaluation: Evaluation):
    """(column heads, score -> cells) of the model kind."""
    if evaluation.kind is ModelKind.CAUSAL:
        return ("kl", "recovered", "top1", "loss"), lambda s: (
            _num(s.kl, '.5g'), _num(s.kl_recovered, '.2%'), _num(s.top1_agreement, '.2%'), _num(s.loss, '.4f'))
    if evaluation.kind is ModelKind.DIFFUSION:
        return ("error", "recovered"), lambda s: (_num(s.noise_error, '.5g'), _num(s.recovered, '.2%'))
    return ("cosine", "recovered", "rel_l2"), lambda s: (
        _num(s.cosine, '.6f'), _num(s.recovered, '.2%'), _num(s.rel_l2_error, '.4g'))


def _summary(evaluation: Evaluation) -> str:
    if evaluation.kind is ModelKind.DIFFUSION:
        return (f"evaluate (diffusion): {evaluation.samples} seeded draws, {evaluation.tokens:,} predicted values, "
                f"{evaluation.wall_time_s:.2f} s")
    tuned = f", tuned loss {evaluation.tuned_loss:.4f}" if evaluation.tuned_loss is not None else ""
    return (f"evaluate ({evaluation.kind.value}): {evaluation.samples} texts, {evaluation.tokens} tokens{tuned}, "
            f"{evaluation.wall_time_s:.2f} s")


def format_evaluation(evaluation: Evaluation) -> str:
    """One row per adapter (and the base): params, MB, KL / cosine / noise error, recovered, ...; then the levels."""
    rows = [evaluation.base, *evaluation.adapters]
    width = min(48, max(len(s.path) for s in rows + [Score(path="adapter", params=0)]))
    head, cells = _cells(evaluation)
    lines = [f"{'adapter':<{width}}  {'params':>12}  {'MB':>9}  " + "  ".join(f"{h:>10}" for h in head)]
    for s in rows:
        lines.append(f"{_short(s.path, width):<{width}}  {s.params:>12,}  {_megabytes(s.params):>9.2f}  "
                     + "  ".join(f"{c:>10}" for c in cells(s)))
    if len(evaluation.adapters) > 1:
        for level in LEVELS:
            found = [(series, levels[level]) for series, levels in _reached(evaluation).items()]
            lines.append(f"smallest reaching {level:.0%}: " + "; ".join(
                f"{s.path} ({s.params:,} params)" if s else f"{series}: not reached" for series, s in found))
    lines += _comparison_lines(evaluation)
    lines.append(_summary(evaluation))
    return "\n".join(lines)


def _require_matplotlib() -> None:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
    except ImportError:
        raise MissingExtra("--plot needs matplotlib, which is not installed: pip install 'lowrank-tools[plot]' "
                           "(or pip install matplotlib)") from None


def _series(evaluation: Evaluation) -> dict[str, list[Score]]:
    out: dict[str, list[Score]] = {}
    for s in evaluation.adapters:
        if s.behaviour_recovered is not None:
            key = next(iter(s.size), "adapters")
            out.setdefault(key, []).append(s)
    return {k: sorted(v, key=lambda s: s.params) for k, v in out.items()}


def render_curve(evaluation: Evaluation) -> bytes:
    """Recovered share against adapter parameters (log x), one line per series, 90/95/99 % levels labelled."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    reached = _reached(evaluation)
    for key, scores in _series(evaluation).items():
        line, = ax.plot([s.params for s in scores], [s.behaviour_recovered for s in scores], marker="o",
                        label=_SERIES_LABELS.get(key, key), linestyle="--" if key.startswith("dora_") else "-")
        marks = {id(s): s for s in reached[key].values() if s is not None}.values()  # the smallest reaching a level
        ax.scatter([s.params for s in marks], [s.behaviour_recovered for s in marks], s=160, facecolors="none",
                   edgecolors=line.get_color(), linewidths=1.5, zorder=3)
    for level, style in zip(LEVELS, (":", "--", "-.")):
        ax.axhline(level, color="0.45", linestyle=style, linewidth=0.8)
        ax.annotate(f"{level:.0%}", xy=(1.0, level), xycoords=("axes fraction", "data"), xytext=(3, 0),
                    textcoords="offset points", va="center", fontsize=8, color="0.3")
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels overlap on short ranges
    ax.set_xlabel("adapter parameters")
    ax.set_ylabel({ModelKind.CAUSAL: "kl_recovered", ModelKind.ENCODER: "recovered (cosine)",
                   ModelKind.DIFFUSION: "recovered (noise prediction)"}[evaluation.kind])
    data = (f"{evaluation.samples} seeded draws" if evaluation.kind is ModelKind.DIFFUSION
            else f"{evaluation.samples} texts, {evaluation.tokens} tokens")
    ax.set_title(f"behaviour recovered vs adapter size, circled: smallest reaching a level\n({data})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def check_evaluation_outputs(*, json_path=None, csv_path=None, plot_dir=None, force: bool = False,
                             inputs: Sequence[str | os.PathLike] = ()) -> None:
    """Fail before any work: an output over an input, one that exists without ``force``, two at one path, a
    plot folder that is a file, or ``plot_dir`` without matplotlib."""
    targets = [Path(p) for p in (json_path, csv_path) if p is not None]
    if plot_dir is not None:
        _require_matplotlib()
        if Path(plot_dir).exists() and not Path(plot_dir).is_dir():
            raise OutputError(f"--plot {plot_dir} is not a folder: choose another --plot")
        targets.append(Path(plot_dir) / PLOT_FILE)
    resolved = [t.resolve() for t in targets]
    if len(set(resolved)) < len(resolved):
        raise UsageError(f"two outputs share one path ({', '.join(map(str, targets))}): give each its own")
    for target in targets:
        check_output(target, force=force, inputs=inputs)


def write_evaluation(evaluation: Evaluation, *, json_path=None, csv_path=None, plot_dir=None, force: bool = False,
                     inputs: Sequence[str | os.PathLike] = ()) -> list[Path]:
    """Write the requested outputs all or nothing; return their paths."""
    check_evaluation_outputs(json_path=json_path, csv_path=csv_path, plot_dir=plot_dir, force=force, inputs=inputs)
    files = rendered([(json_path, lambda: evaluation_json(evaluation)), (csv_path, lambda: evaluation_csv(evaluation)),
                      (Path(plot_dir) / PLOT_FILE if plot_dir is not None else None, lambda: render_curve(evaluation))])
    return write_files(files, force=force, inputs=inputs)
