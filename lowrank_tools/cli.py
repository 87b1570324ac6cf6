"""The command line: parse options, make one library call, print or write. The only module that imports click.

Exit status: 0 ok, 1 a data or file problem, 2 a usage problem. Errors are one line on stderr; a
traceback only with ``--debug``.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click
import torch

from . import __version__
from .errors import LowRankError, UsageError
from .linalg import Method, RankRule

__all__ = ["main"]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class _Group(click.Group):
    """Turns library errors into one-line click errors (exit 1 data, 2 usage); --debug keeps tracebacks."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort):
            raise
        except LowRankError as exc:
            if ctx.meta.get("debug"):
                raise
            if exc.exit_code == 2:
                raise click.UsageError(str(exc)) from None
            raise click.ClickException(str(exc)) from None
        except KeyboardInterrupt:
            click.echo("interrupted: nothing was written", err=True)
            ctx.exit(130)
        except Exception as exc:  # noqa: BLE001 - last resort: one line, traceback with --debug
            if ctx.meta.get("debug"):
                raise
            raise click.ClickException(f"unexpected {type(exc).__name__}: {exc} (run with --debug for the "
                                       f"traceback and report it)") from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lowrank-tools")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Post-hoc low-rank adapters: extract, resize, merge, apply and analyze LoRA factors."""
    ctx.meta["debug"] = debug


# ------------------------------------------------------------------------------------ shared options


def rank_options(f):
    """--rank / --energy / --sv-ratio / --threshold / --budget (extract, resize, merge)."""
    opts = [
        click.option("--rank", "-r", type=int, help="Fixed rank; also the cap for the dynamic rules."),
        click.option("--energy", type=float, help="Smallest r with retained energy >= F, F in (0, 1]."),
        click.option("--sv-ratio", type=float, help="Keep singular values S_i >= S_1 / F (F >= 1)."),
        click.option("--threshold", type=float, help="Keep singular values S_i > F (F >= 0)."),
        click.option("--budget", type=int, help="Total adapter parameters, spread over layers to minimise error."),
    ]
    return functools.reduce(lambda g, o: o(g), reversed(opts), f)


def common_options(f):
    """--device / --dtype / --include / --exclude / --seed / --force / --quiet."""
    opts = [
        click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default="cpu", show_default=True,
                     help="Where the linear algebra runs."),
        click.option("--dtype", "dtype_name", type=click.Choice(["auto", *DTYPES]), default="auto", show_default=True,
                     help="dtype of what is written (auto: that of the input)."),
        click.option("--include", multiple=True, metavar="REGEX", help="Only modules whose name matches (repeatable)."),
        click.option("--exclude", multiple=True, metavar="REGEX", help="Skip modules whose name matches (repeatable)."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed of the randomized SVD."),
        click.option("--force", is_flag=True, help="Overwrite the output if it exists."),
        click.option("--quiet", "-q", is_flag=True, help="No progress bar, table or warnings."),
    ]
    return functools.reduce(lambda g, o: o(g), reversed(opts), f)


def make_rule(rank, energy, sv_ratio, threshold, *, default_rank: int | None = None) -> RankRule | None:
    """The rank rule from the options; ``default_rank`` when none is given (None: no truncation asked)."""
    if rank is None and energy is None and sv_ratio is None and threshold is None:
        return RankRule(rank=default_rank) if default_rank is not None else None
    return RankRule(rank=rank, energy=energy, sv_ratio=sv_ratio, threshold=threshold)


def warner(quiet: bool):
    return None if quiet else (lambda msg: click.echo(f"warning: {msg}", err=True))


class Progress:
    """A tqdm bar on stderr fed by the library's (done, total, name) callback; silent with -q."""

    def __init__(self, quiet: bool, desc: str) -> None:
        self.quiet, self.desc, self.bar = quiet, desc, None

    def __call__(self, done: int, total: int, name: str) -> None:
        if self.quiet:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=self.desc, unit="layer", file=sys.stderr, leave=False)
        self.bar.n = done
        self.bar.set_postfix_str(name[-40:], refresh=True)
        if done >= total:
            self.bar.close()


def write_report(report, path: str | None, *, force: bool) -> None:
    if not path:
        return
    from .checkpoint import atomic_output
    from .report import report_csv, report_json

    target = Path(path)
    text = report_csv(report) if target.suffix.lower() == ".csv" else report_json(report)
    with atomic_output(target, force=force) as tmp:
        tmp.write_text(text)


def out_dtype(name: str):
    return None if name == "auto" else DTYPES[name]


def show(report, quiet: bool) -> None:
    if not quiet:
        from .report import format_table

        click.echo(format_table(report))


# ----------------------------------------------------------------------------------------- commands


@main.command()
@click.argument("base", type=click.Path(path_type=Path))
@click.argument("tuned", type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Adapter to write.")
@rank_options
@click.option("--alpha", type=float, help="LoRA alpha (default: r per layer, so scale = 1).")
@click.option("--format", "fmt", type=click.Choice(["peft", "kohya"]), default="peft", show_default=True)
@click.option("--prefix", default="lora_unet_", show_default=True, help="kohya key prefix for modules without a component.")
@click.option("--method", type=click.Choice([m.value for m in Method]), default="auto", show_default=True,
              help="SVD: exact, randomized (range finder), or auto (randomized when r is small against the sides).")
@click.option("--oversample", type=click.IntRange(min=0), default=10, show_default=True)
@click.option("--power-iters", type=click.IntRange(min=0), default=4, show_default=True)
@click.option("--strict", is_flag=True, help="Tensors on one side only, or of different shapes, are errors.")
@click.option("--report", "report_path", type=click.Path(path_type=Path), help="Write the per-layer report (.json or .csv).")
@common_options
def extract(base, tuned, output, rank, energy, sv_ratio, threshold, budget, alpha, fmt, prefix, method, oversample,
            power_iters, strict, report_path, device, dtype_name, include, exclude, seed, force, quiet):
    """Extract a LoRA adapter from BASE and fully fine-tuned TUNED checkpoints (default --rank 16)."""
    from .checkpoint import check_output
    from .extract import extract as run
    from .formats import save_adapter

    rule = make_rule(rank, energy, sv_ratio, threshold, default_rank=16)
    check_output(output, force=force, inputs=[base, tuned])
    result = run(base, tuned, rule=rule, method=method, alpha=alpha, dtype=out_dtype(dtype_name), device=device,
                 include=include, exclude=exclude, strict=strict, seed=seed, oversample=oversample, n_iter=power_iters,
                 progress=Progress(quiet, "extract"), warn=warner(quiet))
    if not result.adapter.modules:
        raise click.ClickException(f"no layer of {tuned} differs from {base}: nothing to extract, nothing written")
    save_adapter(result.adapter, output, format=fmt, force=force, inputs=[base, tuned], prefix=prefix)
    write_report(result.report, report_path, force=force)
    show(result.report, quiet)
    if not quiet:
        click.echo(f"wrote {output} ({len(result.adapter.modules)} modules, {result.adapter.params:,} parameters)")


@main.command()
@click.argument("adapter", type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["peft", "kohya"]), required=True)
@click.option("--prefix", default="lora_unet_", show_default=True, help="kohya key prefix for modules without a component.")
@click.option("--dtype", "dtype_name", type=click.Choice(["auto", *DTYPES]), default="auto", show_default=True)
@click.option("--force", is_flag=True, help="Overwrite the output if it exists.")
@click.option("--quiet", "-q", is_flag=True)
def convert(adapter, output, fmt, prefix, dtype_name, force, quiet):
    """Convert ADAPTER between PEFT and kohya formats; every module's product is unchanged."""
    from .checkpoint import check_output
    from .formats import load_adapter, save_adapter

    check_output(output, force=force, inputs=[adapter])
    loaded = load_adapter(adapter)
    for note in loaded.notes:
        warner(quiet) and warner(quiet)(note)
    save_adapter(loaded, output, format=fmt, force=force, inputs=[adapter], dtype=out_dtype(dtype_name), prefix=prefix)
    if not quiet:
        click.echo(f"wrote {output} ({fmt}, {len(loaded.modules)} modules)")


@main.command()
@click.argument("adapter", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def info(adapter, as_json):
    """Describe ADAPTER: format, modules, ranks, alphas, scale rule, parameters, dtype, base model."""
    from .formats import describe_adapter, load_adapter

    facts = describe_adapter(load_adapter(adapter), adapter)
    if as_json:
        click.echo(json.dumps(facts, indent=2))
        return
    for key, value in facts.items():
        click.echo(f"{key:>14}: {value}")


@main.command()
@click.option("-o", "--output", "out_dir", type=click.Path(path_type=Path), default=Path("lowrank-demo"),
              show_default=True, help="Folder for the generated checkpoints and adapters.")
@click.option("--seconds", type=click.FloatRange(min=0.5), default=5.0, show_default=True, help="Fine-tuning time.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--force", is_flag=True, help="Reuse the output folder if it exists.")
@click.option("--quiet", "-q", is_flag=True)
def demo(out_dir, seconds, seed, force, quiet):
    """The whole flow on a generated pair: fine-tune a small model for real, extract at two ranks, report."""
    from .demo import run_demo

    run_demo(out_dir, seconds=seconds, seed=seed, force=force, echo=None if quiet else click.echo,
             progress=lambda desc: Progress(quiet, desc), warn=warner(quiet))


if __name__ == "__main__":  # pragma: no cover
    main()
