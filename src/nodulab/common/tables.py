"""Result tables: how every table a run or a study writes is written (exact floats, ``nan``, no index)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def float_text(value: float) -> str:
    return repr(float(value))  # shortest text that reads back to the same float64


def write_table(frame: pd.DataFrame, path: Path | str) -> None:
    """Write a result table (metrics, groups, explain tables): no index, exact floats, NaN as ``nan``."""
    frame.to_csv(path, index=False, lineterminator="\n", na_rep="nan", float_format=float_text)
