"""``python -m nodulab`` (and the ``nodulab`` script) runs the command-line interface."""

from __future__ import annotations

import sys


def main() -> None:
    """Run the CLI; Ctrl-C while it is still starting up exits 130 with one line, no traceback."""
    try:
        from nodulab.cli import app
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    app(prog_name="nodulab")


if __name__ == "__main__":
    main()
