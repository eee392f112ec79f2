"""The one progress callback every long stage reports to: ``progress(stage, done, total)``."""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[str, int, int], None]
"""``(stage, done, total)``: the stage's name, units done so far and the stage's total."""
