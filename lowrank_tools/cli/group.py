"""The top-level click group: library errors become one line on stderr (exit 1 data, 2 usage), ``--debug``
keeps tracebacks and is accepted after any command name."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

import click

from .. import __version__
from ..errors import LowRankError
from .options import Progress
from .threads import set_gc_threshold, set_wait_policy, skip_final_collection

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


_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


class Interrupted(BaseException):
    """SIGTERM or SIGHUP as an exception (a BaseException, like KeyboardInterrupt): it unwinds through every
    ``with`` block, so temporaries are removed and no output is installed."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _on_signal(signum, _frame) -> None:
    for sig in _SIGNALS:  # a second signal must not interrupt the clean-up that the first one starts
        signal.signal(sig, signal.SIG_IGN)
    raise Interrupted(signum)


@contextlib.contextmanager
def _signals_unwind():
    """SIGTERM and SIGHUP raise :class:`Interrupted` in the main thread (where Python runs signal handlers; the
    read-ahead thread only ever sees its consumer stop). A signal already ignored (``nohup``) stays ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _on_signal) for sig in _SIGNALS if signal.getsignal(sig) is signal.SIG_DFL}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _say(line: str) -> None:
    """One line on stderr, if stderr can still take it (a closed terminal after SIGHUP cannot)."""
    with contextlib.suppress(OSError, ValueError):
        click.echo(line, err=True)


def _silence_std_streams() -> None:
    """After a broken pipe: point stdout and stderr at /dev/null, so that nothing (Python's own flush at exit
    included) reports the closed pipe."""
    null = os.open(os.devnull, os.O_WRONLY)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            os.dup2(null, stream.fileno())
    os.close(null)


def _open_missing_std_fds() -> None:
    """A closed descriptor 0, 1 or 2 (``2>&-``) gets /dev/null, as coreutils do: else the first file opened would
    take its number, and a library writing to "stderr" would write into an output."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            got = os.open(os.devnull, os.O_RDWR)
            if got != fd:  # a lower one was free after all: keep the order simple
                os.dup2(got, fd)
                os.close(got)
    if sys.stdout is None:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
    if sys.stderr is None:
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115


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

    def main(self, args=None, *rest, **kwargs):
        _open_missing_std_fds()
        set_wait_policy()  # before any command imports torch (see threads.py)
        set_gc_threshold()
        try:
            return super().main(args, *rest, **kwargs)
        except BrokenPipeError:  # the error line itself met a closed stderr
            _silence_std_streams()
            sys.exit(141)
        finally:  # this process's own command line (not CliRunner's, not standalone_mode=False): it exits now
            if args is None and not rest and kwargs.get("standalone_mode", True):
                skip_final_collection()

    def invoke(self, ctx: click.Context):
        try:
            with _signals_unwind():
                return self._invoke(ctx)
        except BaseException:
            with contextlib.suppress(Exception):
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
            _say("interrupted: nothing was written")
            ctx.exit(130)
        except Interrupted as exc:
            _say(f"interrupted by {signal.Signals(exc.signum).name}: nothing was written")
            ctx.exit(128 + exc.signum)
        except BrokenPipeError:  # stdout (or stderr) closed by the reader: `lowrank-tools info X | head -1`
            _silence_std_streams()
            ctx.exit(141)
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
