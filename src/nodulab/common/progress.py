"""The one progress callback every long stage reports to: ``progress(stage, done, total)``."""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[str, int, int], None]
"""``(stage, done, total)``: the stage's name, units done so far and the stage's total."""


def counter(progress: Progress | None, stage: str, total: int) -> Callable[[int], None]:
    """An ``advance(k)`` for loops that count units: reports ``progress(stage, done, total)``."""
    done = 0

    def advance(k: int) -> None:
        nonlocal done
        done += k
        if progress is not None:
            progress(stage, done, total)

    return advance
