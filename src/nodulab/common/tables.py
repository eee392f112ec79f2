"""Result tables: every table a run writes, declared once (``RESULT_TABLES``), and how it is written.

A result table is its writer plus one ``ResultTable`` entry here: the file in the run folder, its
columns in the order the writer writes them, the columns that make a row unique within a run,
and the columns stored as text. The study's store (``nodulab.results.store``: schema, CSV export),
the runner's read-back of a run folder (``nodulab.studies.runner``) and the writers themselves read
this declaration. Tables are written with exact floats, ``nan`` and no index (``write_table``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pandas as pd


@dataclass(frozen=True)
class ResultTable:
    """One result table of a run.

    Attributes:
        file: its path in the run folder (``explain/reliance.csv``).
        columns: its columns in the order the writer writes them; the store and the study's CSVs
            keep that order (after ``run_id`` and the run keys).
        key: the columns that make a row unique within a run (the store's ``UNIQUE``), in that order.
        text: the columns stored as ``TEXT``; the others are ``REAL``.
        wide: the run folder's file is wide (the first of ``columns``, then one column per name)
            and is stored long, as ``columns`` (id, name, value): ``history.csv``.
        exported: the study writes it as ``OUT/<name>.csv`` too (the per-sample predictions stay
            in the store and the run folders only: they are most of the study's rows).
    """

    file: str
    columns: tuple[str, ...]
    key: tuple[str, ...]
    text: tuple[str, ...]
    wide: bool = False
    exported: bool = True

    def __post_init__(self) -> None:
        for part in ("key", "text"):
            stray = [c for c in getattr(self, part) if c not in self.columns]
            if stray:
                raise ValueError(f"{self.file}: {part} names columns it does not have: {', '.join(stray)}")
        if self.wide and len(self.columns) != 3:
            raise ValueError(f"{self.file}: a wide table is stored as three columns (id, name, value)")

    @property
    def file_name(self) -> str:
        """The file's name without its folder: what a writer given that folder writes."""
        return PurePosixPath(self.file).name

    def long(self, frame: pd.DataFrame) -> pd.DataFrame:
        """The table as the store holds it: a wide file melted to ``columns``, any other as it is."""
        if not self.wide:
            return frame
        index, name, value = self.columns
        return frame.melt(id_vars=index, var_name=name, value_name=value)


REAL_DATASET = "lidc-idri"
"""The ``dataset`` column of scores on real nodules (``nodulab import-lidc``): never a scenario's name."""
SPICULATION_SUFFIX = "_spiculation"
"""A real split scored against the spiculation rating (>= 4 vs 1) is named ``<split>_spiculation``."""
REAL_SPLITS = ("test_lidc", "test_lidc" + SPICULATION_SUFFIX)
"""The real dataset's splits a study stores: malignancy on its held-out patients (``test_lidc``) and the
spiculation rating, >= 4 vs 1 (``test_lidc_spiculation``: the synthetic studies' cue)."""

RESULT_TABLES: dict[str, ResultTable] = {
    "metrics": ResultTable(  # dataset: the scenario whose images were scored (a ceiling's runs score others')
        "metrics.csv",
        ("dataset", "split", "classifier", "metric", "value", "ci_low", "ci_high"),
        key=("dataset", "split", "classifier", "metric"),
        text=("dataset", "split", "classifier", "metric"),
    ),
    "predictions": ResultTable(  # per test sample: what each classifier said (the study's intervals resample them)
        "predictions.csv",
        ("dataset", "split", "classifier", "row", "label", "p", "predicted"),
        key=("dataset", "split", "classifier", "row"),
        text=("dataset", "split", "classifier"),
        exported=False,
    ),
    "groups": ResultTable(
        "groups.csv",
        ("split", "classifier", "label", "group", "n", "accuracy"),
        key=("split", "classifier", "label", "group"),
        text=("split", "classifier", "label", "group"),
    ),
    "reliance": ResultTable(
        "explain/reliance.csv",
        (
            "split",
            "classifier",
            "factor",
            "kind",
            "value_from",
            "value_to",
            "n",
            "flip_rate",
            "delta_p",
            "in_support",  # 1/0: the switch's output stays in the training support
            "null_flip_rate",  # the classifier's mean flip under the null switches, on the same rows
            "excess_flip_rate",  # flip_rate - null_flip_rate, paired per row
            "excess_low",  # percentile bootstrap 95% interval of the excess over the rows
            "excess_high",
            "degenerate",  # 1/0: the classifier calls one class on >= 95% of the split's rows
        ),
        key=("split", "classifier", "factor", "kind", "value_from", "value_to"),
        text=("split", "classifier", "factor", "kind", "value_from", "value_to"),
    ),
    "sweep": ResultTable(
        "explain/sweep.csv",
        ("split", "classifier", "factor", "value", "mean_p", "n"),
        key=("split", "classifier", "factor", "value"),
        text=("split", "classifier", "factor"),
    ),
    "cue": ResultTable(
        "explain/cue.csv",
        ("split", "classifier", "confound", "label_only", "confound_only", "both", "neither"),
        key=("split", "classifier", "confound"),
        text=("split", "classifier", "confound"),
    ),
    "probes": ResultTable(
        "explain/probes.csv",
        ("factor", "target", "metric", "score", "control"),
        key=("factor", "target", "metric", "control"),
        text=("factor", "target", "metric", "control"),
    ),
    "cam": ResultTable(
        "explain/cam.csv",
        ("split", "classifier", "region", "mass", "area_share"),
        key=("split", "classifier", "region"),
        text=("split", "classifier", "region"),
    ),
    "dynamics": ResultTable(  # written by explanation.dynamics from the run's checkpoints
        "dynamics.csv",
        ("epoch", "split", "classifier", "measure", "value", "ci_low", "ci_high"),
        key=("epoch", "split", "classifier", "measure"),
        text=("split", "classifier", "measure"),
    ),
    "history": ResultTable(  # written by training.loop: epoch, then one column per curve
        "history.csv",
        ("epoch", "name", "value"),
        key=("epoch", "name"),
        text=("name",),
        wide=True,
    ),
}
"""Every result table of a run, by its name in the store (and in the study's ``<name>.csv``).

The order is the store's: its tables are created, and the study's CSVs exported, in this order."""
RUN_FIGURES: dict[str, str] = {"history": "history.png", "cam": "explain/cam.png", "embedding": "explain/embedding.png"}
"""Figures of a run the store keeps and the report shows as they are, by name: their file in the run
folder (the report draws the sweep and the heatmaps from the tables)."""


def float_text(value: float) -> str:
    return repr(float(value))  # shortest text that reads back to the same float64


def write_table(frame: pd.DataFrame, path: Path | str) -> None:
    """Write a result table (metrics, groups, explain tables): no index, exact floats, NaN as ``nan``."""
    frame.to_csv(path, index=False, lineterminator="\n", na_rep="nan", float_format=float_text)
