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
            return self._invoke(ctx)
        except BaseException:
            Progress.close_all()  # an open bar would otherwise share its line with the error
            raise

    def _invoke(self, ctx: click.Context):
        try:
            return click.Group.invoke(self, ctx)
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

    _open: list["Progress"] = []

    def __init__(self, quiet: bool, desc: str) -> None:
        self.quiet, self.desc, self.bar = quiet, desc, None

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self in Progress._open:
            Progress._open.remove(self)

    @classmethod
    def close_all(cls) -> None:
        for bar in list(cls._open):
            bar.close()

    def __call__(self, done: int, total: int, name: str) -> None:
        if self.quiet:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=self.desc, unit="layer", file=sys.stderr, leave=False)
            Progress._open.append(self)
        self.bar.n = done
        self.bar.set_postfix_str(name[-40:], refresh=True)
        if done >= total:
            self.close()


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


def _check_kohya_options(fmt: str | None, prefix: str, full_modules) -> None:
    """Before any work: a well-formed --prefix, and nothing a kohya file cannot hold."""
    from .kohya_names import check_prefix

    check_prefix(prefix)
    if fmt == "kohya" and full_modules:
        raise click.UsageError("--full-modules needs --format peft: kohya files hold LoRA factors only")


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
@click.option("--conv-rank", type=int, help="Rank (or cap) for conv kernels (default: that of --rank).")
@click.option("--full-modules", multiple=True, metavar="REGEX",
              help="Save these modules' tensors whole (PEFT modules_to_save), e.g. a grown vocabulary (repeatable).")
@common_options
def extract(base, tuned, output, rank, energy, sv_ratio, threshold, budget, alpha, fmt, prefix, method, oversample,
            power_iters, strict, report_path, conv_rank, full_modules, device, dtype_name, include, exclude, seed, force,
            quiet):
    """Extract a LoRA adapter from BASE and fully fine-tuned TUNED checkpoints (default --rank 16).

    --budget N spreads ranks over layers within N parameters (one pass: the top K singular values per layer,
    K = --rank if given, else min(smaller side, 256), then the allocation)."""
    from .checkpoint import check_output
    from .extract import extract as run
    from .formats import save_adapter

    rule = make_rule(rank, energy, sv_ratio, threshold, default_rank=None if budget is not None else 16)
    _check_kohya_options(fmt, prefix, full_modules)
    check_output(output, force=force, inputs=[base, tuned])
    result = run(base, tuned, rule=rule, budget=budget, method=method, alpha=alpha, dtype=out_dtype(dtype_name),
                 device=device, include=include, exclude=exclude, conv_rank=conv_rank, full_modules=full_modules,
                 embeddings=fmt != "kohya", strict=strict, seed=seed, oversample=oversample,
                 n_iter=power_iters, progress=Progress(quiet, "extract"), warn=warner(quiet))
    if not result.adapter.modules and not result.adapter.full_tensors:
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
@click.option("--base", type=click.Path(path_type=Path),
              help="Checkpoint the adapter was made for: kohya keys without recorded names are matched against it.")
@click.option("--force", is_flag=True, help="Overwrite the output if it exists.")
@click.option("--quiet", "-q", is_flag=True)
def convert(adapter, output, fmt, prefix, dtype_name, base, force, quiet):
    """Convert ADAPTER between PEFT and kohya formats; every module's product is unchanged.

    Modules under unet. / text_encoder. / text_encoder_2. take their component's kohya prefix, others --prefix.
    A pipeline's adapter converted to peft is written as diffusers' pytorch_lora_weights.safetensors."""
    from .checkpoint import check_output
    from .formats import load_adapter, save_adapter

    _check_kohya_options(fmt, prefix, ())
    check_output(output, force=force, inputs=[adapter])
    loaded = load_adapter(adapter, base=base)
    for note in loaded.notes:
        warner(quiet) and warner(quiet)(note)
    save_adapter(loaded, output, format=fmt, force=force, inputs=[adapter], dtype=out_dtype(dtype_name), prefix=prefix)
    if not quiet:
        click.echo(f"wrote {output} ({fmt}, {len(loaded.modules)} modules)")


@main.command()
@click.argument("adapter", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.option("--base", type=click.Path(path_type=Path),
              help="Checkpoint the adapter was made for: kohya keys without recorded names are matched against it.")
def info(adapter, as_json, base):
    """Describe ADAPTER: format, modules, ranks, alphas, scale rule, parameters, dtype, base model."""
    from .formats import describe_adapter, load_adapter

    facts = describe_adapter(load_adapter(adapter, base=base), adapter)
    if as_json:
        click.echo(json.dumps(facts, indent=2))
        return
    for key, value in facts.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}: {v}" for k, v in value.items()) or "-"
        elif isinstance(value, list):
            value = "; ".join(map(str, value)) or "-"
        click.echo(f"{key:>14}: {value if value is not None else '-'}")


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


# ------------------------------------------------------------------------------- resize, merge, apply


def _output_format(fmt: str | None, output: Path) -> str:
    """--format, else what -o names: a ``.safetensors`` file is kohya, anything else a PEFT folder (so a kohya
    input resized or merged to a .safetensors name keeps its format, a PEFT folder to a folder keeps its)."""
    kohya_name = output.suffix == ".safetensors"
    if fmt == "kohya" and not kohya_name:
        raise click.UsageError(f"-o {output}: a kohya adapter is one file: give a name ending in .safetensors")
    return fmt or ("kohya" if kohya_name else "peft")


def _check_outputs(output: Path, report_path: Path | None, *, force: bool, inputs) -> None:
    """Fail before any work when -o or --report would overwrite something or an input."""
    from .checkpoint import check_output

    check_output(output, force=force, inputs=inputs)
    if report_path is not None:
        check_output(report_path, force=force, inputs=[*inputs, output])


def _finish_adapter(result, output: Path, *, fmt: str, prefix: str, force: bool, inputs, report_path, quiet) -> None:
    from .formats import save_adapter

    if not result.adapter.modules:
        raise click.ClickException(f"every module was left out or truncated to rank 0: nothing to write to {output}")
    save_adapter(result.adapter, output, format=fmt, force=force, inputs=inputs, prefix=prefix)
    write_report(result.report, report_path, force=force)
    show(result.report, quiet)
    if not quiet:
        click.echo(f"wrote {output} ({fmt}, {len(result.adapter.modules)} modules, {result.adapter.params:,} parameters)")


_OUT_FORMAT = click.option("--format", "fmt", type=click.Choice(["peft", "kohya"]), default=None,
                           help="Output format (default: kohya when -o ends in .safetensors, else a PEFT folder).")
_PREFIX = click.option("--prefix", default="lora_unet_", show_default=True,
                       help="kohya key prefix for modules without a component.")
_ALPHA = click.option("--alpha", type=float, help="LoRA alpha of new modules (default: r per module, so scale = 1).")
_REPORT = click.option("--report", "report_path", type=click.Path(path_type=Path),
                       help="Write the per-module report (.json or .csv).")


@main.command()
@click.argument("adapter", type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Adapter to write.")
@rank_options
@_ALPHA
@_OUT_FORMAT
@_PREFIX
@_REPORT
@common_options
def resize(adapter, output, rank, energy, sv_ratio, threshold, budget, alpha, fmt, prefix, report_path, device,
           dtype_name, include, exclude, seed, force, quiet):
    """Shrink ADAPTER's ranks exactly through each module's QR core (never forms B @ A)."""
    from .formats import load_adapter
    from .resize import resize as run

    rule = make_rule(rank, energy, sv_ratio, threshold)
    if rule is None and budget is None:
        raise click.UsageError("resize needs a rank option: --rank, --energy, --sv-ratio, --threshold or --budget")
    fmt = _output_format(fmt, output)
    _check_outputs(output, report_path, force=force, inputs=[adapter])
    loaded = load_adapter(adapter)
    for note in loaded.notes:
        warner(quiet) and warner(quiet)(note)
    result = run(loaded, rule=rule, budget=budget, alpha=alpha, dtype=out_dtype(dtype_name), device=device,
                 include=include, exclude=exclude, progress=Progress(quiet, "resize"), warn=warner(quiet))
    _finish_adapter(result, output, fmt=fmt, prefix=prefix, force=force, inputs=[adapter], report_path=report_path,
                    quiet=quiet)


@main.command()
@click.argument("adapters", nargs=-1, required=True, metavar="ADAPTER[:WEIGHT]...")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Adapter to write.")
@rank_options
@_ALPHA
@_OUT_FORMAT
@_PREFIX
@_REPORT
@common_options
def merge(adapters, output, rank, energy, sv_ratio, threshold, budget, alpha, fmt, prefix, report_path, device,
          dtype_name, include, exclude, seed, force, quiet):
    """Merge weighted adapters: sum_i w_i scale_i B_i A_i. No rank option: exact concatenation."""
    from .merge import merge as run
    from .weighted import load_weighted, parse_adapter_spec

    specs = [parse_adapter_spec(a) for a in adapters]
    rule = make_rule(rank, energy, sv_ratio, threshold)
    fmt = _output_format(fmt, output)
    paths = [s.path for s in specs]
    _check_outputs(output, report_path, force=force, inputs=paths)
    loaded = load_weighted(specs)
    for note in (n for item in loaded for n in item.adapter.notes):
        warner(quiet) and warner(quiet)(note)
    result = run(loaded, rule=rule, budget=budget, alpha=alpha, dtype=out_dtype(dtype_name), device=device,
                 include=include, exclude=exclude, progress=Progress(quiet, "merge"), warn=warner(quiet))
    _finish_adapter(result, output, fmt=fmt, prefix=prefix, force=force, inputs=paths, report_path=report_path,
                    quiet=quiet)


@main.command()
@click.argument("base", type=click.Path(path_type=Path))
@click.argument("adapters", nargs=-1, required=True, metavar="ADAPTER[:WEIGHT]...")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path),
              help="A .safetensors file, or an HF folder (shards, index and the base folder's config files).")
@click.option("--shard-size", default="5GB", show_default=True,
              help="Largest shard of a folder output: 5GB = 5*10^9 bytes, 500MiB = 500*2^20.")
@common_options
def apply(base, adapters, output, shard_size, device, dtype_name, include, exclude, seed, force, quiet):
    """Bake weighted adapters into BASE: W = W0 + sum_i w_i scale_i B_i A_i, streamed tensor by tensor."""
    from .apply import apply as run
    from .checkpoint import check_output, parse_size
    from .weighted import load_weighted, parse_adapter_spec

    size = parse_size(shard_size)
    specs = [parse_adapter_spec(a) for a in adapters]
    inputs = [base, *(s.path for s in specs)]
    check_output(output, force=force, inputs=inputs)
    loaded = load_weighted(specs, base=base)
    for note in (n for item in loaded for n in item.adapter.notes):
        warner(quiet) and warner(quiet)(note)
    result = run(base, loaded, output, shard_size=size, dtype=out_dtype(dtype_name), device=device, include=include,
                 exclude=exclude, force=force, inputs=inputs, progress=Progress(quiet, "apply"), warn=warner(quiet))
    if not quiet:
        changed = sum(len(v) for v in result.modified.values())
        click.echo(f"wrote {output} ({len(result.files)} file(s), {result.tensors} tensors: {len(result.modified)} "
                   f"changed by {changed} adapter modules, {len(result.replaced)} replaced whole, the rest copied)")


# ------------------------------------------------------------------------------------------------ analyze


@main.command()
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
@click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default="cpu", show_default=True,
              help="Where the linear algebra runs.")
@click.option("--include", multiple=True, metavar="REGEX", help="Only modules whose name matches (repeatable).")
@click.option("--exclude", multiple=True, metavar="REGEX", help="Skip modules whose name matches (repeatable).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the randomized SVD (--top).")
@click.option("--force", is_flag=True, help="Overwrite outputs that exist.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar, table or warnings.")
def analyze(paths, json_path, csv_path, plot_dir, top, oversample, power_iters, device, include, exclude, seed, force,
            quiet):
    """Singular-value spectra of BASE -> TUNED per layer, or of ADAPTER's modules, grouped, with recommended ranks."""
    from .analysis_report import check_analysis_outputs, format_analysis, write_analysis
    from .analyze import analyze_adapter, analyze_delta

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


if __name__ == "__main__":  # pragma: no cover
    main()
