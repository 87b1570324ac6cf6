"""The command line: parse options, make one library call, print or write. The cli package is the only
place that imports click (split in modules by command family, each under ~400 lines).

Exit status: 0 ok, 1 a data or file problem, 2 a usage problem. Errors are one line on stderr; a
traceback only with ``--debug``. Ctrl-C, SIGTERM and SIGHUP unwind the run (every temporary removed, nothing
installed): one line, exit 128 + the signal's number (130, 143, 129). A closed stdout or stderr ends the run
quietly with 141 (128 + SIGPIPE), as coreutils do.
"""

from __future__ import annotations

from . import adapters, analyze, calibrate, check, evaluate, extract
from .group import main

__all__ = ["main"]

COMMANDS = (extract.extract, adapters.resize, adapters.merge, adapters.apply, analyze.analyze, extract.convert,
            extract.info, extract.demo, evaluate.evaluate, calibrate.calibrate,
            check.check)  # each module defines its commands; the group is built here, in one place

for _command in COMMANDS:
    main.add_command(_command)
