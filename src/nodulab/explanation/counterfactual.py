"""What each model learned (design.md "Evaluation and explanation"): counterfactual reliance,
sweeps and the cue-reliance index.

``explain_run`` re-renders test samples with one factor switched (same seed, everything else
equal; the switches are ``nodulab.explanation.switches``) and asks every classifier of a run again. It writes
``RUN/explain/`` (a temporary folder renamed into place):

- ``reliance.csv`` (``split,classifier,factor,kind,value_from,value_to,n,flip_rate,delta_p,
  in_support,null_flip_rate,excess_flip_rate,excess_low,excess_high,degenerate``): per switch and
  classifier, over the ``n`` rows the switch applied to, the share of predictions (P >= 0.5) that
  change (``flip_rate``) and the mean change in P(malignant) (``delta_p``); ``in_support`` (1/0)
  whether the switch's output stays in the training support (``switches.rows_in_support``);
  ``null_flip_rate`` the classifier's null flip rate on those rows (per row, the mean flip over
  the in-support ``null`` switches: a fresh nuisance draw, rotation +90 degrees, the mirrored
  offset; then the mean over rows); ``excess_flip_rate`` = flip minus null flip, paired per row,
  averaged, with ``excess_low``, ``excess_high`` its percentile bootstrap 95% interval over the
  rows (``BOOTSTRAP_DRAWS`` resamples, numpy, seeded by split, classifier and switch, so reruns
  give the same bytes); ``degenerate`` (1/0) whether the classifier calls one class on at least
  ``DEGENERATE_SHARE`` of the split's explained rows. A degenerate classifier flips on nothing
  because it decides nothing: it must never be read as relying (or not relying) on a factor.
  Rows no in-support null switch applied to are left out of the three excess columns and of
  ``null_flip_rate`` (NaN when none is left);
- ``sweep.csv`` (``split,classifier,factor,value,mean_p,n``) and ``sweep.png``: mean P(malignant)
  of the same rows re-rendered at each value of a continuous factor (``SWEEPS``; a diameter keeps
  the spicules in mm, ``switches.with_diameter``);
- ``cue.csv`` (``split,classifier,confound,label_only,confound_only,both,neither``): on rows
  where both the label-cue switch and the confound switch apply, the share whose prediction flips
  under the label switch only, the confound switch only, each of the two, or neither (sums to 1);
- ``explain.json``: the dataset (manifest hash), splits, row counts, thread count, and per switch
  how many rows were left out because the switched lesion would not fit the patch.

Every table covers every classifier the run has: ``head`` (the loss's own behaviour where it has
one; ``probe`` otherwise), ``probe`` and ``knn`` (fitted on confounded ``train``), ``dfr`` (a
feature-quality oracle) and the ``_init`` controls (the untrained encoder).

The stage functions take ``predict`` (int16 HU images -> ``{classifier: P(malignant)}``), so a
hand-built model can stand in for a network. More tables plug in as ``Writer`` functions:
``explain_run(..., writers=[...])`` calls each with the ``ExplainContext`` and the temporary
folder, after the tables above are written; the CLI passes ``EXTRA_WRITERS``: ``probes.csv`` and
``embedding.png`` (``nodulab.explanation.probes.write_probes``), ``cam.csv`` and ``cam.png``
(``nodulab.explanation.cam.write_cam``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from nodulab.common.plaintext import plain_text
from nodulab.common.progress import Progress
from nodulab.common.tables import RESULT_TABLES
from nodulab.explanation.context import Predict
from nodulab.explanation.switches import Switch, fits, with_diameter
from nodulab.synth.renderer import render

EXPLAIN_DIR = "explain"
THRESHOLD = 0.5
CHUNK = 256
"""Rows rendered and predicted at once: each chunk is rendered once and predicted once."""
SWEEPS: dict[str, tuple[float, ...]] = {
    "diameter_mm": tuple(float(d) for d in range(6, 19)),  # 1 mm steps, values no sample had included
    "margin_sigma_mm": (0.0, 0.4, 0.8, 1.2, 1.6, 2.0),
    "noise_hu": (0.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0),
}
SWEEP_ROWS = 256
"""Rows per split in the sweep (the first ones): a mean P over 256 rows has SE <= 0.03, and the
sweep re-renders every row at every value (26 values), so it is capped to keep ``explain`` fast."""
SWEEP_SETTERS: dict[str, Callable[[pd.DataFrame, float], pd.DataFrame]] = {"diameter_mm": with_diameter}
"""Sweeps that set more than their column: a diameter keeps the spicules in mm."""
BOOTSTRAP_DRAWS = 1000
"""Resamples of the rows behind ``excess_low``, ``excess_high``."""
DEGENERATE_SHARE = 0.95
"""A classifier calling one class on at least this share of a split's explained rows is ``degenerate``."""


@dataclass
class Counterfactual:
    """One switch applied to a split's rows: which rows, their switched P, how many did not fit."""

    switch: Switch
    where: np.ndarray
    p: dict[str, np.ndarray]
    skipped: int


# ----------------------------------------------------------------------------- stages
def predict_rows(
    rows: pd.DataFrame,
    predict: Predict,
    size: int,
    dim: int,
    *,
    device: str = "cpu",
    chunk: int = CHUNK,
    tick: Callable[[int], None] | None = None,
    view: int = 0,
) -> dict[str, np.ndarray]:
    """Render rows chunk by chunk (at render ``view``: 0 as stored) and predict each chunk once;
    ``{classifier: (N,) P}``."""
    parts: list[dict[str, np.ndarray]] = []
    for start in range(0, len(rows), chunk):
        images, _ = render(rows.iloc[start : start + chunk], size, dim, device, view=view, chunk=chunk)
        parts.append(predict(images))
        if tick:
            tick(len(images))
    if not parts:
        return {}
    return {c: np.concatenate([p[c] for p in parts]) for c in parts[0]}


def counterfactuals(
    rows: pd.DataFrame,
    predict: Predict,
    switches: Sequence[Switch],
    size: int,
    dim: int,
    *,
    device: str = "cpu",
    chunk: int = CHUNK,
    progress: Progress | None = None,
) -> list[Counterfactual]:
    """Apply each switch to the rows it concerns, re-render, predict.

    Rows whose switched lesion would not fit the patch are left out and counted in ``skipped``.
    """
    planned = []
    for switch in switches:
        where, switched = switch.change(rows)
        ok = fits(switched, size, dim) if len(switched) else np.zeros(0, bool)
        planned.append((switch, where[ok], switched.iloc[np.flatnonzero(ok)], int((~ok).sum())))
    total, done = sum(len(s) for _, _, s, _ in planned), 0
    if progress:
        progress("reliance", 0, total)

    def tick(k: int) -> None:
        nonlocal done
        done += k
        if progress:
            progress("reliance", done, total)

    return [
        Counterfactual(
            switch,
            where,
            predict_rows(switched, predict, size, dim, device=device, chunk=chunk, tick=tick, view=switch.view),
            skipped,
        )
        for switch, where, switched, skipped in planned
    ]


def null_flips(n: int, base: np.ndarray, results: Sequence[Counterfactual], classifier: str) -> np.ndarray:
    """Per row: the mean flip over the in-support ``null`` switches that applied to it (NaN where none did)."""
    total, count = np.zeros(n), np.zeros(n)
    for r in results:
        if r.switch.kind != "null" or not r.switch.in_support or len(r.where) == 0:
            continue
        total[r.where] += (r.p[classifier] >= THRESHOLD) != (base[r.where] >= THRESHOLD)
        count[r.where] += 1
    return np.divide(total, count, out=np.full(n, np.nan), where=count > 0)


def is_degenerate(p: np.ndarray) -> bool:
    """Whether a classifier calls one class (P >= 0.5, or < 0.5) on at least ``DEGENERATE_SHARE`` of the rows."""
    if len(p) == 0:
        return False
    share = float(np.mean(np.asarray(p) >= THRESHOLD))
    return max(share, 1.0 - share) >= DEGENERATE_SHARE


def bootstrap_seed(split: str, classifier: str, switch: Switch) -> int:
    """The excess interval's seed: a hash of the split, the classifier and the switch (its key in ``reliance.csv``)."""
    key = "\x1f".join((split, classifier, switch.factor, switch.kind, switch.value_from, switch.value_to))
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")


def bootstrap_interval(values: np.ndarray, seed: int, draws: int = BOOTSTRAP_DRAWS) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of the mean of ``values`` (rows resampled with replacement)."""
    values = np.asarray(values, dtype=float)
    if len(values) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = np.empty(draws)
    step = max(1, 2**22 // len(values))  # resamples at once: a few MB of indices
    for start in range(0, draws, step):
        k = min(step, draws - start)
        means[start : start + k] = values[rng.integers(0, len(values), (k, len(values)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def reliance_frame(split: str, base: dict[str, np.ndarray], results: Sequence[Counterfactual]) -> pd.DataFrame:
    """``reliance.csv`` rows: per switch and classifier, flip rate, mean change of P, and the
    flips beyond the null switches' (module docstring).

    Switches that applied to no row are left out.
    """
    out = []
    for classifier, p0 in base.items():
        null = null_flips(len(p0), p0, results, classifier)
        degenerate = int(is_degenerate(p0))
        for r in results:
            if len(r.where) == 0:
                continue
            before, after = p0[r.where], r.p[classifier]
            flips = ((after >= THRESHOLD) != (before >= THRESHOLD)).astype(float)
            floor = null[r.where]
            paired = ~np.isnan(floor)
            excess = flips[paired] - floor[paired]
            nan = float("nan")
            low, high = bootstrap_interval(excess, bootstrap_seed(split, classifier, r.switch))
            s = r.switch
            out.append(
                (
                    split,
                    classifier,
                    s.factor,
                    s.kind,
                    s.value_from,
                    s.value_to,
                    len(r.where),
                    float(flips.mean()),
                    float(np.mean(after - before)),
                    int(s.in_support),
                    float(floor[paired].mean()) if paired.any() else nan,
                    float(excess.mean()) if paired.any() else nan,
                    low,
                    high,
                    degenerate,
                )
            )
    return pd.DataFrame(out, columns=list(RESULT_TABLES["reliance"].columns))


def _flips(n: int, base: np.ndarray, results: Sequence[Counterfactual], classifier: str) -> np.ndarray:
    """Per row: 1 if the prediction flips under these switches, 0 if not, NaN where none applied."""
    flips = np.full(n, np.nan)
    for r in results:
        flips[r.where] = (r.p[classifier] >= THRESHOLD) != (base[r.where] >= THRESHOLD)
    return flips


def cue_frame(split: str, base: dict[str, np.ndarray], results: Sequence[Counterfactual]) -> pd.DataFrame:
    """``cue.csv`` rows: the cue-reliance index per classifier and confound (design.md "Evaluation and explanation").

    On the rows where both the label-cue switch and the confound switch applied: the shares whose
    prediction flips under the label switch only, the confound switch only, both, neither.
    """
    n = len(next(iter(base.values()))) if base else 0
    cue = [r for r in results if r.switch.kind == "cue"]
    confounds = list(dict.fromkeys(r.switch.factor for r in results if r.switch.kind == "confound"))
    out = []
    for classifier, p0 in base.items():
        label = _flips(n, p0, cue, classifier)
        for confound in confounds:
            other = _flips(
                n, p0, [r for r in results if r.switch.kind == "confound" and r.switch.factor == confound], classifier
            )
            both_apply = ~np.isnan(label) & ~np.isnan(other)
            a, b = label[both_apply] == 1, other[both_apply] == 1
            shares = [float(np.mean(x)) if len(x) else float("nan") for x in (a & ~b, ~a & b, a & b, ~a & ~b)]
            out.append((split, classifier, confound, *shares))
    return pd.DataFrame(out, columns=list(RESULT_TABLES["cue"].columns))


def sweep_frame(
    split: str,
    rows: pd.DataFrame,
    predict: Predict,
    size: int,
    dim: int,
    *,
    sweeps: dict[str, Sequence[float]] = SWEEPS,
    device: str = "cpu",
    chunk: int = CHUNK,
    progress: Progress | None = None,
) -> pd.DataFrame:
    """``sweep.csv`` rows: mean P(malignant) of the same rows re-rendered at each value (a
    diameter keeps the spicules in mm, ``SWEEP_SETTERS``).

    Rows whose lesion would not fit the patch at a value are left out there (``n`` counts the rest;
    ``mean_p`` is NaN where none fit).
    """
    plan = []
    for factor, values in sweeps.items():
        for value in values:
            if factor in SWEEP_SETTERS:
                switched = SWEEP_SETTERS[factor](rows, value)
            else:
                switched = rows.copy()
                switched[factor] = value
            plan.append((factor, value, switched[fits(switched, size, dim)]))
    total, done, found = sum(len(s) for *_, s in plan), 0, []
    for factor, value, switched in plan:
        found.append(
            (factor, value, predict_rows(switched, predict, size, dim, device=device, chunk=chunk), len(switched))
        )
        done += len(switched)
        if progress:
            progress("sweep", done, total)
    classifiers = next((list(p) for *_, p, _ in found if p), [])
    out = [
        (split, classifier, factor, float(value), float(np.mean(p[classifier])) if k else float("nan"), k)
        for classifier in classifiers
        for factor, value, p, k in found
    ]
    return pd.DataFrame(out, columns=list(RESULT_TABLES["sweep"].columns))


def explain_split(
    split: str,
    rows: pd.DataFrame,
    images: np.ndarray | None,
    predict: Predict,
    switches: Sequence[Switch],
    size: int,
    dim: int,
    *,
    device: str = "cpu",
    chunk: int = CHUNK,
    sweep_rows: int = SWEEP_ROWS,
    progress: Progress | None = None,
) -> tuple[dict[str, pd.DataFrame], list[Counterfactual]]:
    """Reliance, cue and sweep tables of one split.

    Args:
        split: the split's name (the tables' first column).
        rows: its factor rows (``index``, ``label``, ``agrees_*`` and the §2 columns).
        images: the stored images of those rows (the unswitched predictions come from them), or
            ``None`` to render them.
        predict: images -> P(malignant) per classifier.
        switches: from ``nodulab.explanation.switches.build_switches``.
        size, dim: the image geometry.
        sweep_rows: rows swept (the first ones).

    Returns:
        ``{"reliance", "cue", "sweep"}`` frames, and the counterfactuals behind them.
    """
    if progress:
        progress("predict", 0, len(rows))
    if images is None:
        base = predict_rows(rows, predict, size, dim, device=device, chunk=chunk)
    else:  # the stored images are these rows rendered: predict them, do not render them again
        parts = [predict(np.asarray(images[i : i + chunk])) for i in range(0, len(rows), chunk)]
        base = {c: np.concatenate([p[c] for p in parts]) for c in parts[0]}
    if progress:
        progress("predict", len(rows), len(rows))
    results = counterfactuals(rows, predict, switches, size, dim, device=device, chunk=chunk, progress=progress)
    tables = {
        "reliance": reliance_frame(split, base, results),
        "cue": cue_frame(split, base, results),
        "sweep": sweep_frame(
            split, rows.iloc[:sweep_rows], predict, size, dim, device=device, chunk=chunk, progress=progress
        ),
    }
    return tables, results


# ----------------------------------------------------------------------------- the run folder
@plain_text
def sweep_figure(frame: pd.DataFrame) -> Any:
    """``sweep.png``: one panel per (split, factor), a line per classifier (a matplotlib Figure)."""
    from matplotlib.figure import Figure

    splits = list(dict.fromkeys(frame["split"])) or [""]
    factors = list(dict.fromkeys(frame["factor"])) or [""]
    fig = Figure(figsize=(3.2 * len(factors), 2.6 * len(splits)), layout="constrained")
    axes = fig.subplots(len(splits), len(factors), squeeze=False)
    for i, split in enumerate(splits):
        for j, factor in enumerate(factors):
            ax = axes[i][j]
            part = frame[(frame["split"] == split) & (frame["factor"] == factor)]
            for classifier, line in part.groupby("classifier", sort=False):
                ax.plot(
                    line["value"],
                    line["mean_p"],
                    marker=".",
                    label=classifier,
                    linestyle="--" if classifier.endswith("_init") else "-",
                )
            ax.axhline(THRESHOLD, color="0.7", linewidth=0.8)
            ax.set_ylim(-0.02, 1.02)
            ax.set_xlabel(factor)
            ax.set_title(split, fontsize=9)
            if j == 0:
                ax.set_ylabel("mean P(malignant)")
    if len(frame):
        axes[0][-1].legend(fontsize=7)
    return fig


def reliance_table(frame: pd.DataFrame, top: int = 4) -> Any:
    """The console summary: per split and classifier, the switches ranked by flip rate with their
    excess over the null flips, and the null flip rate (rich Table)."""
    from rich.table import Table

    table = Table(title=f"flip rate per switch (top {top}; ex: excess over the null switches)")
    table.add_column("split", no_wrap=True)
    table.add_column("classifier", no_wrap=True)
    table.add_column("null", no_wrap=True)
    table.add_column("switches ranked by flip rate")
    for (split, classifier), part in frame.groupby(["split", "classifier"], sort=False):
        nulls = part[(part["kind"] == "null") & (part["in_support"] == 1)]
        ranked = part[part["kind"] != "null"].sort_values("flip_rate", ascending=False, kind="stable").head(top)
        cells = [
            f"{r.factor} {r.value_from}→{r.value_to} {r.flip_rate:.2f}"
            + (f" (ex {r.excess_flip_rate:+.2f})" if r.excess_flip_rate == r.excess_flip_rate else "")
            + (" (rob)" if r.kind == "robustness" else "")
            for r in ranked.itertuples(index=False)
        ]
        degenerate = bool(len(part)) and bool(part["degenerate"].iloc[0])
        name = f"{classifier} (degenerate)" if degenerate else classifier
        null = f"{nulls['flip_rate'].mean():.2f}" if len(nulls) else "-"
        table.add_row(split, name, null, "; ".join(cells))
    return table
