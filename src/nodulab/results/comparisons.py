"""Comparisons between losses that a reviewer would sign (design.md "Findings"): declared
hypotheses, like-for-like readouts, intervals that carry the test set's noise, power.

- **Hypotheses** (``Hypotheses``, the study's ``[hypotheses]``): the primary comparisons as
  ``scenario/split`` entries, the reference loss and the readout they are read with. Holm's
  correction runs over that family only, and only its rows may be called significant; every other
  comparison is exploratory (an uncorrected 95% interval, never "significant").
- **Readouts** (``READOUTS``): ``own`` sets each loss's own behaviour (``head`` where it has one,
  else ``probe``) against the reference's; ``probe`` and ``dfr`` compare every loss, the reference
  included, by the same readout (feature quality, like for like).
- **One set of seeds.** Per comparison the seeds both sides have (paired by number); the two means,
  the difference and its test all come from those seeds, so a ranking never disagrees with its test.
- **Both sources of noise.** From the stored per-sample predictions
  (``common.seedstats.shared_sample_difference``): the seeds' and the fixed test set's variance; a
  difference of one test sample or less is never claimed. A store without predictions (older
  runs) falls back to the seed-level interval and says so (``test_noise`` False).
- **Power.** Per comparison, the smallest difference detectable with 80% power at its level and
  seeds, and about how many seeds would resolve the observed difference (none when the test
  set's noise alone is too large).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from nodulab.common.seedstats import (
    LEVEL,
    SharedSampleDifference,
    balanced_accuracy_by_seed,
    holm,
    holm_levels,
    paired_test,
    shared_sample_difference,
)
from nodulab.results.seed_tables import ALPHA, METRIC, MIN_SEEDS, REFERENCE

READOUTS = ("own", "probe", "dfr")
"""How losses are compared: each one's own behaviour, or every loss by the same readout."""


@dataclass(frozen=True)
class Hypotheses:
    """A study's declared primary comparisons (``[hypotheses]``)."""

    comparisons: tuple[str, ...] = ()
    """``scenario/split`` entries."""
    reference: str = REFERENCE
    readout: str = "own"

    @property
    def declared(self) -> bool:
        return bool(self.comparisons)

    def primary(self, scenario: str, split: str, readout: str) -> bool:
        return readout == self.readout and f"{scenario}/{split}" in self.comparisons


def hypotheses_of(config: Mapping[str, Any]) -> Hypotheses:
    """The hypotheses a study record declares (none when it declares none)."""
    found = config.get("hypotheses") if isinstance(config, Mapping) else None
    if not isinstance(found, Mapping):
        return Hypotheses()
    return Hypotheses(
        tuple(str(c) for c in found.get("comparisons", ())),
        str(found.get("reference", REFERENCE)),
        str(found.get("readout", "own")),
    )


COLUMNS = [
    "readout_mode",
    "scenario",
    "split",
    "loss",
    "readout",
    "reference",
    "reference_readout",
    "n",
    "loss_mean",
    "reference_mean",
    "mean",
    "low",
    "high",
    "seeds_low",
    "seeds_high",
    "p",
    "test_noise",
    "smallest",
    "primary",
    "p_holm",
    "holm_low",
    "holm_high",
    "significant",
    "detectable",
    "seeds_needed",
]


def _classifier(mode: str, loss: str, readouts: Mapping[str, str]) -> str:
    return readouts.get(loss, "probe") if mode == "own" else mode


def _matrix(frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(seeds, correct[seed, sample], labels) of one (loss, classifier, split) of selected runs."""
    if frame.empty:
        return None
    wide = frame.pivot_table(index="seed", columns="row", values="correct", aggfunc="first")
    labels = frame.drop_duplicates("row").set_index("row")["label"].reindex(wide.columns)
    if wide.isna().to_numpy().any() or labels.isna().any():
        return None
    return wide.index.to_numpy(), wide.to_numpy(dtype=float), labels.to_numpy()


def _seed_values(cell: pd.DataFrame, loss: str, classifier: str) -> pd.Series:
    """Per seed, balanced accuracy of one loss's ``classifier`` in one (scenario, split) ``cell`` of metrics."""
    keep = (cell["loss"] == loss) & (cell["classifier"] == classifier)
    rows = cell[keep & (cell["metric"] == METRIC) & (cell["selected"] == 1)]
    return rows.set_index("seed")["value"]


def _seed_only(a: pd.Series, b: pd.Series) -> tuple[SharedSampleDifference, float, float]:
    """The seed-level difference (no per-sample predictions): the test set's part left at 0."""
    seeds = sorted(set(a.index) & set(b.index))
    d = (a[seeds] - b[seeds]).to_numpy(dtype=float)
    t = paired_test(d)
    sd = float(d.std(ddof=1)) if len(d) > 1 else math.nan
    tested = SharedSampleDifference(len(d), t.mean, t.se, 0.0, float(len(d) - 1), 0, t.low, t.high, sd, math.inf)
    return tested, float(a[seeds].mean()), float(b[seeds].mean())


def comparisons(
    metrics: pd.DataFrame,
    predictions: pd.DataFrame | None,
    readouts: Mapping[str, str],
    hypotheses: Hypotheses = Hypotheses(),
    *,
    alpha: float = ALPHA,
) -> pd.DataFrame:
    """Every comparison of a loss with the reference, per readout mode, (scenario, test split) and loss.

    Columns ``COLUMNS``: the two means and the difference over the seeds both sides have; ``low``,
    ``high`` its 95% interval with the test set's noise (``seeds_low``, ``seeds_high``: the seeds'
    alone); ``p``; ``primary`` (declared); ``p_holm``, ``holm_low``, ``holm_high`` over the primary
    rows with at least ``MIN_SEEDS`` seeds; ``significant`` (primary, Holm interval excludes 0, more
    than one test sample); ``detectable`` (80% power at the row's level: Holm's strictest for primary
    rows, 95% otherwise) and ``seeds_needed`` for the observed difference.
    """
    reference = hypotheses.reference
    if metrics.empty or reference not in set(metrics["loss"]):
        return pd.DataFrame(columns=COLUMNS)
    if "dataset" not in metrics:
        metrics = metrics.assign(dataset=metrics["scenario"])
    found = _own_predictions(predictions, readouts)
    tests = metrics[metrics["split"].str.startswith("test_") & (metrics["dataset"] == metrics["scenario"])]
    rows, tested = [], []
    for mode in READOUTS:
        for (scenario, split), cell in tests.groupby(["scenario", "split"], sort=True):
            ref_classifier = _classifier(mode, reference, readouts)
            for loss in sorted(set(cell["loss"]) - {reference}):
                classifier = _classifier(mode, loss, readouts)
                if not ((cell["loss"] == loss) & (cell["classifier"] == classifier)).any():
                    continue
                if not ((cell["loss"] == reference) & (cell["classifier"] == ref_classifier)).any():
                    continue
                a = _matrix(found.get((scenario, scenario, split, loss, classifier), _EMPTY))
                b = _matrix(found.get((scenario, scenario, split, reference, ref_classifier), _EMPTY))
                if a is not None and b is not None and np.array_equal(a[2], b[2]):
                    seeds = np.intersect1d(a[0], b[0])
                    xa, xb = a[1][np.isin(a[0], seeds)], b[1][np.isin(b[0], seeds)]
                    difference = shared_sample_difference(xa, xb, a[2])
                    means = balanced_accuracy_by_seed(xa, a[2]).mean(), balanced_accuracy_by_seed(xb, a[2]).mean()
                    noise = True
                else:
                    difference, *means = _seed_only(
                        _seed_values(cell, loss, classifier),
                        _seed_values(cell, reference, ref_classifier),
                    )
                    noise = False
                if difference.n == 0:
                    continue
                low, high = difference.interval(LEVEL)
                primary = hypotheses.primary(scenario, split, mode)
                rows.append(
                    [
                        mode,
                        scenario,
                        split,
                        loss,
                        classifier,
                        reference,
                        ref_classifier,
                        difference.n,
                        float(means[0]),
                        float(means[1]),
                        difference.mean,
                        low,
                        high,
                        difference.seeds_low,
                        difference.seeds_high,
                        difference.p,
                        noise,
                        difference.smallest if noise else math.nan,
                        primary,
                    ]
                )
                tested.append(difference)
    frame = pd.DataFrame(rows, columns=COLUMNS[:19])
    family = frame["primary"] & (frame["n"] >= MIN_SEEDS) if len(frame) else pd.Series(dtype=bool)
    p_family = np.where(family, frame["p"], np.nan) if len(frame) else np.array([])
    frame["p_holm"] = holm(p_family)
    levels = holm_levels(p_family, alpha)
    bounds = [t.interval(1 - lv) if math.isfinite(lv) else (math.nan, math.nan) for t, lv in zip(tested, levels)]
    frame["holm_low"] = [b[0] for b in bounds]
    frame["holm_high"] = [b[1] for b in bounds]
    strictest = 1 - alpha / max(1, int(family.sum())) if len(frame) else 1 - alpha
    frame["significant"] = [
        bool(f) and (lo > 0 or hi < 0) and (not noise or abs(m) > s)
        for f, lo, hi, m, s, noise in zip(
            family, frame["holm_low"], frame["holm_high"], frame["mean"], frame["smallest"], frame["test_noise"]
        )
    ]
    level = [strictest if f else 1 - alpha for f in family]
    frame["detectable"] = [t.detectable(lv) for t, lv in zip(tested, level)]
    frame["seeds_needed"] = [t.seeds_needed(t.mean, lv) for t, lv in zip(tested, level)]
    return frame[COLUMNS]


def _own_predictions(
    predictions: pd.DataFrame | None, readouts: Mapping[str, str]
) -> dict[tuple[str, str, str, str, str], pd.DataFrame]:
    """Selected runs' per-sample rows of the readouts compared (each loss's own, ``probe``, ``dfr``), by
    (scenario the run trained on, dataset scored, split, loss, classifier)."""
    if predictions is None or predictions.empty:
        return {}
    compared = {*READOUTS[1:], *readouts.values()}
    chosen = predictions[(predictions["selected"] == 1) & predictions["classifier"].isin(compared)]
    chosen = chosen.assign(correct=(chosen["predicted"] == chosen["label"]).astype(float))
    keys = ["scenario", "dataset", "split", "loss", "classifier"]
    return {key: part for key, part in chosen.groupby(keys, sort=False)}


def gaps_with_test_noise(
    gaps: pd.DataFrame, predictions: pd.DataFrame | None, readouts: Mapping[str, str]
) -> pd.DataFrame:
    """``seed_tables.ceiling_gaps`` with each gap's interval carrying the test set's noise too.

    The ceiling's runs and the confounded scenario's runs are different runs (unpaired, Welch for
    the seeds' part) scored on the same images, so the test set's part is shared
    (``shared_sample_difference(paired=False)``). Rows without per-sample predictions keep the
    Welch interval over seeds; ``gap_test_noise`` says which.
    """
    gaps = gaps.copy()
    gaps["gap_test_noise"] = False
    found = _own_predictions(predictions, readouts)
    if not found or gaps.empty:
        return gaps
    for i, row in gaps.iterrows():
        own = _matrix(found.get((row["scenario"], row["scenario"], row["split"], row["loss"], row["readout"]), _EMPTY))
        top_readout = readouts.get(row["ceiling_loss"], "probe")
        key = (row["ceiling"], row["scenario"], row["split"], row["ceiling_loss"], top_readout)
        top = _matrix(found.get(key, _EMPTY))
        if own is None or top is None or not np.array_equal(own[2], top[2]):
            continue
        gap = shared_sample_difference(top[1], own[1], own[2], paired=False)
        low, high = gap.interval(LEVEL)
        if np.isfinite(low):
            gaps.loc[i, ["gap", "gap_low", "gap_high", "gap_test_noise"]] = [gap.mean, low, high, True]
    return gaps


_EMPTY = pd.DataFrame()
