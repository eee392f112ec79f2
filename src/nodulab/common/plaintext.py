"""Figures show user strings as plain text (design.md "Conventions").

Scenario, loss, split and factor names come from user files. Matplotlib reads a string with two
``$`` as mathtext (a name like ``a$b$`` renders as maths, ``$\\x$`` raises); ``plain_text`` builds a
figure with ``text.parse_math`` off, so every text made meanwhile (titles, labels, tick labels,
legends) is drawn as typed. Matplotlib is imported only when a decorated function runs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")


def plain_text(build: Callable[P, R]) -> Callable[P, R]:
    """Run a figure-building function with mathtext off (its texts keep that when saved later)."""

    @functools.wraps(build)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        import matplotlib

        with matplotlib.rc_context({"text.parse_math": False}):
            return build(*args, **kwargs)

    return wrapper
