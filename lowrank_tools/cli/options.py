"""Options and helpers shared by the commands: rank rules, dtypes, progress, reports, warnings."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from ..linalg.rank_rules import RankRule

# The choices are spelled out here, not read from the enums, so that defining the commands (and --help) imports
# neither torch nor the library: tests/test_startup.py checks that they match AdapterFormat, Device and Method.
DTYPES = ("float32", "float16", "bfloat16")  # names of torch dtypes (out_dtype looks them up)
FORMATS = click.Choice(["peft", "kohya"])  # AdapterFormat
FORMAT_HELP = ("Output format: peft (a folder) or kohya (one .safetensors file); a kohya -o must end in .safetensors, "
               "a peft one must not.")
DEVICES = click.Choice(["cpu", "cuda", "auto"])  # Device
METHODS = click.Choice(["auto", "exact", "randomized"])  # Method
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



def rank_options(f=None, *, default_rank: str | None = None):
    """--rank / --energy / --sv-ratio / --threshold / --budget (extract, resize, merge); ``default_rank``: what a run
    without any of them does, shown as --rank's default."""
    def decorate(g):
        opts = [
            click.option("--rank", "-r", type=int, show_default=default_rank or False,
                         help="Fixed rank; also the cap for the dynamic rules."),
            click.option("--energy", type=float, help="Smallest r with retained energy >= F, F in (0, 1]."),
            click.option("--sv-ratio", type=float, help="Keep singular values S_i >= S_1 / F (F >= 1)."),
            click.option("--threshold", type=float, help="Keep singular values S_i > F (F >= 0)."),
            click.option("--budget", type=int, help="Total adapter parameters, spread over layers to minimise error; "
                         "--rank and the dynamic rules then cap each layer (extract: at most 256 without --rank)."),
        ]
        return functools.reduce(lambda h, o: o(h), reversed(opts), g)

    return decorate(f) if f is not None else decorate


def device_option(f):
    """--device (every command that computes): cuda when available unless told otherwise."""
    return click.option("--device", type=DEVICES, default="auto", show_default=True,
                        help="Where the linear algebra runs: auto is cuda when available, else cpu.")(f)


def filter_options(f):
    """--include / --exclude: every command that reads checkpoints or adapters."""
    opts = [click.option("--include", multiple=True, metavar="REGEX",
                         help="Only modules whose name matches (repeatable; default: all)."),
            click.option("--exclude", multiple=True, metavar="REGEX",
                         help="Skip modules whose name matches (repeatable; default: none).")]
    return functools.reduce(lambda g, o: o(g), reversed(opts), f)


def dtype_option(f):
    return click.option("--dtype", "dtype_name", type=click.Choice(["auto", *DTYPES]), default="auto",
                        show_default=True, help="dtype of what is written (auto: that of the input).")(f)


def text_options(f=None, *, data_required: bool = True, data_help: str = "", samples_help: str = ""):
    """The texts a model runs on (evaluate, calibrate): --data, --max-samples, --max-length, --batch-size, --device,
    --text-field. ``text_options(data_required=False, ...)`` for a command that can run without texts (evaluate on
    diffusion models), with the help texts saying when."""
    if f is None:
        return lambda g: text_options(g, data_required=data_required, data_help=data_help, samples_help=samples_help)
    for option in reversed((
        click.option("--data", required=data_required, type=click.Path(path_type=Path),
                     help="Texts: .txt (one per non-empty line), .jsonl (field 'text') or .json (a list of strings)."
                     + (" " + data_help if data_help else "")),
        click.option("--max-samples", type=click.IntRange(min=1), help=samples_help or "Only the first N texts."),
        click.option("--max-length", type=click.IntRange(min=2), default=128, show_default=True,
                     help="Tokens per text (each text is truncated on its own)."),
        click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
                     help="Texts per forward pass (padding never enters the numbers)."),
        click.option("--device", type=DEVICES, default="auto", show_default=True,
                     help="Where the models run: auto is cuda when available, else cpu."),
        click.option("--text-field", show_default="text", help="Field of each .jsonl record holding the text."),
    )):
        f = option(f)
    return f


def quiet_option(f):
    return click.option("--quiet", "-q", is_flag=True, help="No progress bar, table or warnings.")(f)


def force_option(f):
    return click.option("--force", is_flag=True, help="Overwrite the output if it exists.")(f)


def seed_option(f):
    """--seed: only where randomness acts (extract's and analyze's randomized SVD, demo's training)."""
    return click.option("--seed", type=SEED, default=0, show_default=True,
                        help="Seed of the randomized SVD: the same seed gives the same bytes.")(f)


def revision_option(f):
    """--revision: of the checkpoints given as hub ids (extract, apply, analyze, evaluate)."""
    return click.option("--revision", metavar="REV",
                        help="Branch, tag or commit of BASE/TUNED given as hub ids (org/name, not an existing path; "
                             "needs lowrank-tools[hub]): the local cache first, downloads unless HF_HUB_OFFLINE.")(f)


def hub_paths(paths, revision: str | None) -> list[Path]:
    """Each checkpoint input as a local path: a hub id (org/name, not an existing path) becomes its snapshot folder
    (:func:`lowrank_tools.io.hub.resolve_input`)."""
    from ..io.hub import resolve_inputs

    return resolve_inputs(*paths, revision=revision)


def common_options(f):
    """--device / --dtype / --include / --exclude / --force / --quiet (no --seed: resize, merge and apply are exact)."""
    return functools.reduce(lambda g, o: o(g), reversed([device_option, dtype_option, filter_options, force_option,
                                                         quiet_option]), f)


def examples(*lines: str) -> str:
    """A click epilog: the command's examples, kept line by line (click's no-rewrap marker first)."""
    return "\b\nExamples:\n" + "\n".join(f"  {line}" for line in lines)


def allow_tf32_option(f):
    """--allow-tf32 (extract): TF32 matmuls on CUDA; off by default for float32-exact factors and errors."""
    return click.option("--allow-tf32", is_flag=True,
                        help="Let CUDA float32 matmuls use TF32 (faster, ~1e-3 relative rounding); off by default.")(f)


def make_rule(rank, energy, sv_ratio, threshold, *, default_rank: int | None = None) -> RankRule | None:
    """The rank rule from the options; ``default_rank`` when none is given (None: no truncation asked)."""
    from ..linalg.rank_rules import RankRule

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


def write_report(report, path: str | None, *, force: bool = False, inputs=(), transaction=None) -> None:
    """The report as JSON (or CSV for a .csv name), atomically; never over an input or the adapter. With a
    ``transaction`` it is installed with the run's other outputs, or not at all."""
    if not path:
        return
    from ..io.checkpoint import atomic_output
    from ..report import report_csv, report_json

    target = Path(path)
    text = report_csv(report) if target.suffix.lower() == ".csv" else report_json(report)
    with atomic_output(target, force=force, inputs=inputs, transaction=transaction) as tmp:
        tmp.write_text(text)


def out_dtype(name: str):
    import torch

    return None if name == "auto" else getattr(torch, name)


def check_kohya_options(fmt: str | None, prefix: str, full_modules) -> None:
    """Before any work: a well-formed --prefix, and nothing a kohya file cannot hold."""
    from ..io.kohya_names import check_prefix

    check_prefix(prefix)
    if fmt == "kohya" and full_modules:
        raise click.UsageError("--full-modules needs --format peft: kohya files hold LoRA factors only")


def module_table(rows) -> str:
    from ..report import format_modules

    return format_modules(rows)


def nothing_left(left_out: dict, fmt: str) -> str:
    """Why an adapter came out empty, from fit_format's {reason: names}."""
    names = [n for group in left_out.values() for n in group]
    if not names:
        return "no module passed --include / --exclude"
    return (f"{', '.join(names[:3])}{' ...' if len(names) > 3 else ''}: a {fmt} file cannot hold "
            f"{'it' if len(names) == 1 else 'them'}: use --format peft and an -o folder name")


def show(report, quiet: bool) -> None:
    if not quiet:
        from ..report import format_table

        click.echo(format_table(report))
