"""Options and helpers shared by the commands: rank rules, dtypes, progress, reports, warnings."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import click
import torch

from ..io.formats import AdapterFormat
from ..linalg.svd import Device, RankRule

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
FORMATS = click.Choice([f.value for f in AdapterFormat])  # peft | kohya
DEVICES = click.Choice([d.value for d in Device])  # cpu | cuda | auto
class _Seed(click.ParamType):
    """A whole number that torch.Generator.manual_seed takes, 0 to 2^64 - 1 (a larger one is a usage error)."""

    name = "seed"

    def convert(self, value, param, ctx) -> int:
        number = click.INT.convert(value, param, ctx)
        if not 0 <= number < 2**64:
            self.fail(f"{number} is not a seed: give a whole number from 0 to 2^64 - 1", param, ctx)
        return number


SEED = _Seed()


def finite(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    """click callback: NaN passes click's range checks (every comparison with it is false), so refuse it here."""
    if value is not None and value != value:
        raise click.BadParameter(f"{value} is not a number", ctx=ctx, param=param)
    return value



def rank_options(f):
    """--rank / --energy / --sv-ratio / --threshold / --budget (extract, resize, merge)."""
    opts = [
        click.option("--rank", "-r", type=int, help="Fixed rank; also the cap for the dynamic rules."),
        click.option("--energy", type=float, help="Smallest r with retained energy >= F, F in (0, 1]."),
        click.option("--sv-ratio", type=float, help="Keep singular values S_i >= S_1 / F (F >= 1)."),
        click.option("--threshold", type=float, help="Keep singular values S_i > F (F >= 0)."),
        click.option("--budget", type=int, help="Total adapter parameters, spread over layers to minimise error; "
                     "--rank and the dynamic rules then cap each layer (extract: at most 256 without --rank)."),
    ]
    return functools.reduce(lambda g, o: o(g), reversed(opts), f)


def common_options(f):
    """--device / --dtype / --include / --exclude / --seed / --force / --quiet."""
    opts = [
        click.option("--device", type=DEVICES, default="cpu", show_default=True,
                     help="Where the linear algebra runs."),
        click.option("--dtype", "dtype_name", type=click.Choice(["auto", *DTYPES]), default="auto", show_default=True,
                     help="dtype of what is written (auto: that of the input)."),
        click.option("--include", multiple=True, metavar="REGEX", help="Only modules whose name matches (repeatable)."),
        click.option("--exclude", multiple=True, metavar="REGEX", help="Skip modules whose name matches (repeatable)."),
        click.option("--seed", type=SEED, default=0, show_default=True,
                     help="Seed of the randomized SVD (extract). resize, merge and apply are exact and use no "
                          "randomness: accepted there so every command takes the shared options, it changes nothing."),
        click.option("--force", is_flag=True, help="Overwrite the output if it exists."),
        click.option("--quiet", "-q", is_flag=True, help="No progress bar, table or warnings."),
    ]
    return functools.reduce(lambda g, o: o(g), reversed(opts), f)


def allow_tf32_option(f):
    """--allow-tf32 (extract): TF32 matmuls on CUDA; off by default for float32-exact factors and errors."""
    return click.option("--allow-tf32", is_flag=True,
                        help="Let CUDA float32 matmuls use TF32 (faster, ~1e-3 relative rounding); off by default.")(f)


def make_rule(rank, energy, sv_ratio, threshold, *, default_rank: int | None = None) -> RankRule | None:
    """The rank rule from the options; ``default_rank`` when none is given (None: no truncation asked)."""
    if rank is None and energy is None and sv_ratio is None and threshold is None:
        return RankRule(rank=default_rank) if default_rank is not None else None
    return RankRule(rank=rank, energy=energy, sv_ratio=sv_ratio, threshold=threshold)


def warner(quiet: bool):
    """The library's ``warn`` callback: one ``warning:`` line on stderr each; None (silent) with -q."""
    return None if quiet else (lambda msg: Progress.echo(f"warning: {msg}"))


def warn_all(quiet: bool, notes) -> None:
    """Show notes an input carried (e.g. guessed module names) as warnings."""
    for note in () if quiet else notes:
        click.echo(f"warning: {note}", err=True)


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
    def echo(cls, line: str) -> None:
        """One line on stderr, above an open bar (else it would be glued to the bar's line)."""
        if any(bar.bar is not None for bar in cls._open):
            from tqdm import tqdm

            tqdm.write(line, file=sys.stderr)
        else:
            click.echo(line, err=True)

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


def check_outputs(output: Path, report_path: Path | None, *, force: bool, inputs) -> None:
    """Fail before any work when -o or --report would overwrite something or an input."""
    from ..io.checkpoint import check_output

    check_output(output, force=force, inputs=inputs)
    if report_path is not None:
        check_output(report_path, force=force, inputs=[*inputs, output])


def write_report(report, path: str | None, *, force: bool, inputs=()) -> None:
    """The report as JSON (or CSV for a .csv name), atomically; never over an input or the adapter."""
    if not path:
        return
    from ..io.checkpoint import atomic_output
    from ..report import report_csv, report_json

    target = Path(path)
    text = report_csv(report) if target.suffix.lower() == ".csv" else report_json(report)
    with atomic_output(target, force=force, inputs=inputs) as tmp:
        tmp.write_text(text)


def out_dtype(name: str):
    return None if name == "auto" else DTYPES[name]


def check_kohya_options(fmt: str | None, prefix: str, full_modules) -> None:
    """Before any work: a well-formed --prefix, and nothing a kohya file cannot hold."""
    from ..io.kohya_names import check_prefix

    check_prefix(prefix)
    if fmt == "kohya" and full_modules:
        raise click.UsageError("--full-modules needs --format peft: kohya files hold LoRA factors only")


def show(report, quiet: bool) -> None:
    if not quiet:
        from ..report import format_table

        click.echo(format_table(report))
