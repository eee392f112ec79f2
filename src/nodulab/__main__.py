"""``python -m nodulab`` runs the command-line interface."""

from nodulab.cli import app

app(prog_name="nodulab")
