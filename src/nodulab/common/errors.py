"""The one error path for bad input (design.md "Conventions").

Every error a command raises on bad input (a scenario, study, dataset, run folder, store or an
option) is an ``InputError``: the CLI prints its message as one line and exits 2, whichever
modules a command happened to import. A new input error subclasses it; nothing else registers it.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad input from the user: printed as one line ``error: ...``, exit code 2."""
