"""The analyze command: spectra, recommended ranks, tables, JSON/CSV and plots."""

from __future__ import annotations

from pathlib import Path

import click

from .options import (SEED, Progress, device_option, examples, filter_options, hub_paths, quiet_option, revision_option,
                      warner)



@click.command(short_help="Singular-value spectra per layer, with recommended ranks.",
              epilog=examples("lowrank-tools analyze base/ tuned/ --json spectra.json",
                              "lowrank-tools analyze base/ tuned/ --top 64 --plot figures/",
                              "lowrank-tools analyze adapter/ --csv modules.csv --include 'attn'"))
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path), metavar="(BASE TUNED | ADAPTER)")
@click.option("--json", "json_path", type=click.Path(path_type=Path),
              help="Write every layer's spectrum and metrics (strict JSON; relative_change is null for an adapter or "
                   "an all-zero base, as the README's Reports table says).")
@click.option("--csv", "csv_path", type=click.Path(path_type=Path),
              help="Write one row per layer (an empty field where the JSON has null).")
@click.option("--plot", "plot_dir", type=click.Path(path_type=Path),
              help="Write PNG figures into this folder (needs the .[plot] extra: matplotlib).")
@click.option("--top", type=click.IntRange(min=1), metavar="K",
              help="BASE TUNED: only the top K singular values per layer (randomized); the tail is estimated from "
                   "||dW||_F. Layers whose smaller side is <= K are computed in full, with a warning.")
@click.option("--oversample", type=click.IntRange(min=0), show_default="K",
              help="Extra sketch columns of the randomized SVD for --top.")
@click.option("--power-iters", type=click.IntRange(min=0), default=3, show_default=True, help="Power iterations for --top.")
@revision_option
@device_option
@filter_options
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the randomized SVD (--top).")
@click.option("--force", is_flag=True, help="Overwrite outputs that exist.")
@quiet_option
def analyze(paths, json_path, csv_path, plot_dir, top, oversample, power_iters, revision, device, include, exclude,
            seed, force, quiet):
    """Singular-value spectra of BASE -> TUNED per layer, or of ADAPTER's modules, grouped, with recommended ranks."""
    from ..analyze.report import check_analysis_outputs, format_analysis, write_analysis
    from ..analyze.spectra import analyze_adapter, analyze_delta

    if len(paths) > 2:
        raise click.UsageError(f"analyze takes BASE TUNED or one ADAPTER, got {len(paths)} paths")
    if len(paths) == 2:
        paths = tuple(hub_paths(paths, revision))
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

