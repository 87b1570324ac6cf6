"""The analyze command: spectra, recommended ranks, tables, JSON/CSV and plots."""

from __future__ import annotations

from pathlib import Path

import click

from .options import DEVICES, SEED, Progress, warner



@click.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path), metavar="(BASE TUNED | ADAPTER)")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write every layer's spectrum and metrics.")
@click.option("--csv", "csv_path", type=click.Path(path_type=Path), help="Write one row per layer.")
@click.option("--plot", "plot_dir", type=click.Path(path_type=Path),
              help="Write PNG figures into this folder (needs the .[plot] extra: matplotlib).")
@click.option("--top", type=click.IntRange(min=1), metavar="K",
              help="BASE TUNED: only the top K singular values per layer (randomized); the tail is estimated from "
                   "||dW||_F. Layers whose smaller side is <= K are computed in full, with a warning.")
@click.option("--oversample", type=click.IntRange(min=0), help="Extra sketch columns for --top (default: K).")
@click.option("--power-iters", type=click.IntRange(min=0), default=3, show_default=True, help="Power iterations for --top.")
@click.option("--device", type=DEVICES, default="cpu", show_default=True,
              help="Where the linear algebra runs.")
@click.option("--include", multiple=True, metavar="REGEX", help="Only modules whose name matches (repeatable).")
@click.option("--exclude", multiple=True, metavar="REGEX", help="Skip modules whose name matches (repeatable).")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the randomized SVD (--top).")
@click.option("--force", is_flag=True, help="Overwrite outputs that exist.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar, table or warnings.")
def analyze(paths, json_path, csv_path, plot_dir, top, oversample, power_iters, device, include, exclude, seed, force,
            quiet):
    """Singular-value spectra of BASE -> TUNED per layer, or of ADAPTER's modules, grouped, with recommended ranks."""
    from ..analyze.report import check_analysis_outputs, format_analysis, write_analysis
    from ..analyze.spectra import analyze_adapter, analyze_delta

    if len(paths) > 2:
        raise click.UsageError(f"analyze takes BASE TUNED or one ADAPTER, got {len(paths)} paths")
    outputs = {"json_path": json_path, "csv_path": csv_path, "plot_dir": plot_dir}
    check_analysis_outputs(**outputs, force=force, inputs=paths)
    warn, progress = warner(quiet), Progress(quiet, "analyze")
    if len(paths) == 2:
        result = analyze_delta(*paths, top=top, include=include, exclude=exclude, device=device, seed=seed,
                               oversample=oversample, n_iter=power_iters, progress=progress, warn=warn)
    else:
        if top is not None and warn:
            warn(f"--top {top} is ignored for an adapter: its spectrum comes exactly from the small QR core")
        result = analyze_adapter(paths[0], include=include, exclude=exclude, device=device, progress=progress,
                                 warn=warn)
    if not result.layers:
        raise click.ClickException(f"no changed layer in {' vs '.join(map(str, paths))}: nothing to analyze, "
                                   f"nothing written")
    written = write_analysis(result, **outputs, force=force, inputs=paths)
    if not quiet:
        click.echo(format_analysis(result))
        for path in written:
            click.echo(f"wrote {path}")

