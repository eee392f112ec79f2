"""``python -m nodulab`` (and the ``nodulab`` script) runs the command-line interface."""

from __future__ import annotations

import os
import sys

EXIT_INTERRUPTED = 130


def _exit_interrupted() -> None:
    # A Ctrl-C that lands inside a C extension's start-up code (torch runs Python through the C
    # API while it imports) marks the interpreter, which then kills itself with SIGINT at exit
    # whatever exit code was asked for. The command has already unwound and cleaned up, so
    # leave with the code we mean.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_INTERRUPTED)


def main() -> None:
    """Run the CLI; Ctrl-C, during start-up or later, exits 130 with one line, no traceback."""
    try:
        from nodulab.cli import app

        # typer builds the click command (reading every command's signature) before the CLI's own
        # Ctrl-C handling is in place: an interrupt there lands here.
        code = app(prog_name="nodulab", standalone_mode=False)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        _exit_interrupted()
    if code == EXIT_INTERRUPTED:
        _exit_interrupted()
    sys.exit(code)


if __name__ == "__main__":
    main()
