"""The top-level click group: library errors become one line on stderr (exit 1 data, 2 usage), ``--debug``
keeps tracebacks and is accepted after any command name."""

from __future__ import annotations

import click

from .. import __version__
from ..errors import LowRankError
from .options import Progress

__all__ = ["main"]


def _set_debug(ctx: click.Context, _param, value: bool) -> None:
    if value:
        ctx.meta["debug"] = True  # meta is shared by the group's and the command's contexts


def _flat(exc: BaseException) -> str:
    """The message on one line (a library or torch message with line breaks would break the one-line contract)."""
    return " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__


def _one_line(exc: click.UsageError) -> click.UsageError:
    """click prints a usage error over three lines (usage, hint, error); the contract is one: the error, then where
    to read more. The message is formatted while the context is at hand (option names), then the context dropped."""
    if exc.ctx is None or isinstance(exc, click.exceptions.NoArgsIsHelpError):
        return exc
    line = click.UsageError(f"{exc.format_message()} (see '{exc.ctx.command_path} --help')")
    line.ctx = None  # click fills it from the current context, and prints the usage when it is set
    return line


class _Group(click.Group):
    """Turns library errors into one-line click errors (exit 1 data, 2 usage); --debug keeps tracebacks."""

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        """Every command also takes --debug after its name (``lowrank-tools extract ... --debug``)."""
        cmd.params.append(click.Option(["--debug"], is_flag=True, expose_value=False, is_eager=True,
                                       callback=_set_debug, help="Show full tracebacks on errors."))
        super().add_command(cmd, name)

    def make_context(self, *args, **kwargs) -> click.Context:
        try:
            return super().make_context(*args, **kwargs)
        except click.UsageError as exc:  # the group's own options: lowrank-tools --bogus
            raise _one_line(exc) from None

    def invoke(self, ctx: click.Context):
        try:
            return self._invoke(ctx)
        except BaseException:
            Progress.close_all()  # an open bar would otherwise share its line with the error
            raise

    def _invoke(self, ctx: click.Context):
        try:
            return click.Group.invoke(self, ctx)
        except click.UsageError as exc:  # a subcommand's options and arguments, or no such command
            raise _one_line(exc) from None
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort):
            raise
        except LowRankError as exc:
            if ctx.meta.get("debug"):
                raise
            if exc.exit_code == 2:
                command = " ".join(filter(None, [ctx.command_path, ctx.invoked_subcommand]))
                line = click.UsageError(f"{_flat(exc)} (see '{command} --help')")
                line.ctx = None  # one line: no usage block
                raise line from None
            raise click.ClickException(_flat(exc)) from None
        except KeyboardInterrupt:
            click.echo("interrupted: nothing was written", err=True)
            ctx.exit(130)
        except Exception as exc:  # noqa: BLE001 - last resort: one line, traceback with --debug
            if ctx.meta.get("debug"):
                raise
            raise click.ClickException(f"unexpected {type(exc).__name__}: {_flat(exc)} (run with --debug for the "
                                       f"traceback and report it)") from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lowrank-tools")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Post-hoc low-rank adapters: extract, resize, merge, apply and analyze LoRA factors."""
    ctx.meta["debug"] = debug
