"""A study's seed-level tables, built from its store's tables (design.md "Evaluation and
explanation", "Expected behaviour"); ``findings`` words them.

Every number is over training seeds, one value per seed: the tuning draw the study selected for
that (scenario, loss, seed) (kNN balanced accuracy on ``val``, the same score for every loss).

- **Readout rule.** A loss's own behaviour is its ``head`` where its runs have one (``ce``,
  ``ce+supcon``, ``ce+triplet``), else the ``probe`` fitted on ``train``. ``dfr`` is a
  feature-quality oracle and ``*_init`` are untrained controls: never a loss's behaviour.
- **IID and OOD.** ``val`` shares the training distribution; the OOD gap of a split is
  ``val`` minus that split, per seed.
- **The matched ceiling.** Each confounded scenario's ceiling is the scenario the study names
  (``studies.config``: it differs only in the confounds; ``lidc`` -> ``lidc-balanced``). Its runs
  are scored on the confounded scenario's own test splits (``metrics.dataset``), so the gap is read
  on the same images (``matched_scores``, ``ceiling_gaps``). A loss's ceiling is that score of the
  same loss, else of ``ce``; the gap has a Welch interval over seeds (different runs, not paired).
- **Differences to ce** are ``results.comparisons``: declared hypotheses, like-for-like readouts,
  intervals with the test set's noise, Holm over the declared family only.

Numpy, scipy and pandas only, so the report never loads torch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from nodulab.common.seedstats import seed_summary, welch_difference
from nodulab.synth.scenario import source_mode

ALPHA = 0.05
REFERENCE = "ce"
METRIC = "balanced_accuracy"
IID_SPLITS = ("test_iid", "val")
"""The in-distribution split, in order of preference: ``test_iid`` (held out, shares the training
distribution) where the scenario has it, else ``val`` (which also chose the probe's C and the draw)."""


def iid_split(splits: Iterable[str]) -> str:
    """The scenario's IID split among ``splits`` (``IID_SPLITS``; ``val`` when neither is there)."""
    present = set(splits)
    return next((s for s in IID_SPLITS if s in present), IID_SPLITS[-1])


MIN_SEEDS = 3
"""Fewest paired seeds for which a difference can be claimed."""
SUMMARY = ["n", "mean", "sd", "low", "high"]
Manifests = Mapping[str, Mapping[str, Any]]


def readout_map(metrics: pd.DataFrame) -> dict[str, str]:
    """Each loss's own readout: ``head`` where any of its runs has one (the store's metrics say), else ``probe``."""
    with_head = set(metrics.loc[metrics["classifier"] == "head", "loss"])
    return {loss: "head" if loss in with_head else "probe" for loss in sorted(set(metrics["loss"]))}


def own_rows(table: pd.DataFrame, readouts: Mapping[str, str], *, selected_only: bool = True) -> pd.DataFrame:
    """The rows of each loss's own readout (of selected draws only, by default), with ``readout``."""
    readout = table["loss"].map(readouts)
    keep = table["classifier"] == readout
    if selected_only:
        keep &= table["selected"] == 1
    return table[keep].assign(readout=readout[keep]).reset_index(drop=True)


def own_scores(
    metrics: pd.DataFrame,
    readouts: Mapping[str, str] | None = None,
    *,
    metric: str = METRIC,
    selected_only: bool = True,
) -> pd.DataFrame:
    """Own-behaviour ``metric`` per run and split: scenario, loss, seed, draw, split, readout, value."""
    frame = metrics[metrics["metric"] == metric]
    if "dataset" in frame:  # a run's scores on its own images (a ceiling's on others' are ``matched_scores``)
        frame = frame[frame["dataset"] == frame["scenario"]]
    frame = own_rows(frame, readouts or readout_map(metrics), selected_only=selected_only)
    return frame[["scenario", "loss", "seed", "draw", "split", "readout", "value"]]


def summarise(frame: pd.DataFrame, by: list[str], value: str = "value") -> pd.DataFrame:
    """``seed_summary`` of ``value`` per group of ``by``: columns ``by`` then n, mean, sd, low, high."""
    if frame.empty:
        return pd.DataFrame(columns=[*by, *SUMMARY])
    rows = [
        (*(key if isinstance(key, tuple) else (key,)), *vars(seed_summary(part[value])).values())
        for key, part in frame.groupby(by, sort=True)
    ]
    return pd.DataFrame(rows, columns=[*by, *SUMMARY])


def _scenario(manifest: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return (manifest or {}).get("scenario", {})


def _source_mode(scenario: Mapping[str, Any], split: str) -> str | None:
    """``real`` or ``broken`` for a split of a ``[source]`` scenario (``nodulab.synth.twins``), else None."""
    source = scenario.get("source")
    if not isinstance(source, Mapping):
        return None
    split_confounds = scenario.get("splits", {}).get(split, {}).get("confounds")
    return source_mode(source.get("confounds", "real"), split, split_confounds)


def confounds_of(manifest: Mapping[str, Any] | None) -> list[str]:
    """The confounded factors of a dataset manifest (``[]`` when unknown or clean).

    A ``[source]`` scenario trained on the table's joint ratings is confounded by them all
    (``"<table> ratings"``); one trained with its confounds broken is clean.
    """
    scenario = _scenario(manifest)
    if _source_mode(scenario, "train") == "real":
        return [f"{scenario['source'].get('table', 'source')} ratings"]
    return [c["factor"] for c in scenario.get("confounds", [])]


def _reversed(agreement: Any, confounds: list[str]) -> bool:
    """Whether a split's agreement puts some confound against the label more often than with it."""
    if isinstance(agreement, Mapping):
        return any(float(agreement.get(c, 1.0)) < 0.5 for c in confounds)
    return agreement is not None and float(agreement) < 0.5


def conflict_splits(manifest: Mapping[str, Any] | None, splits: list[str]) -> list[str]:
    """The test splits of ``splits`` where a confound disagrees with the label.

    Read from the manifest (agreement below 0.5 for some confound) when it names confounds;
    otherwise the test splits named ``*conflict*``, else every test split.
    """
    tests = sorted(s for s in set(splits) if s.startswith("test_"))
    confounds, specs = confounds_of(manifest), _scenario(manifest).get("splits", {})
    if confounds and _source_mode(_scenario(manifest), "train") is not None:  # the broken test splits
        return [s for s in tests if s in specs and _source_mode(_scenario(manifest), s) == "broken"]
    if confounds and specs:
        return [s for s in tests if s in specs and _reversed(specs[s].get("agreement"), confounds)]
    return [s for s in tests if "conflict" in s] or tests


def implied_ceilings(manifests: Manifests) -> dict[str, str]:
    """Ceilings a store that names none implies: with exactly one confound-free scenario drawing from
    the same source (a synthetic one, or a ``[source]`` table), that one (``studies.config`` names them)."""

    def table(name: str) -> Any:
        source = _scenario(manifests[name]).get("source")
        return source.get("table") if isinstance(source, Mapping) else None

    free = [n for n in sorted(manifests) if "confounds" in _scenario(manifests[n]) and not confounds_of(manifests[n])]
    out = {}
    for name in sorted(manifests):
        candidates = [c for c in free if table(c) == table(name)]
        if confounds_of(manifests[name]) and len(candidates) == 1:
            out[name] = candidates[0]
    return out


def matched_scores(
    metrics: pd.DataFrame, ceilings: Mapping[str, str], readouts: Mapping[str, str] | None = None
) -> pd.DataFrame:
    """The ceilings' own-behaviour scores on the confounded scenarios' images (``dataset`` column).

    Columns: scenario (the confounded one), ceiling, loss, seed, draw, split, readout, value.
    """
    columns = ["scenario", "ceiling", "loss", "seed", "draw", "split", "readout", "value"]
    if "dataset" not in metrics or metrics.empty:
        return pd.DataFrame(columns=columns)
    frame = metrics[metrics["metric"] == METRIC]
    frame = own_rows(frame, readouts or readout_map(metrics))
    keep = [ceilings.get(d) == s for d, s in zip(frame["dataset"], frame["scenario"])]
    frame = frame[np.asarray(keep, dtype=bool)]
    return frame.rename(columns={"scenario": "ceiling"}).rename(columns={"dataset": "scenario"})[columns]


def _values(scores: pd.DataFrame, scenario: str, loss: str, split: str) -> pd.Series:
    cell = scores[(scores["scenario"] == scenario) & (scores["loss"] == loss) & (scores["split"] == split)]
    return cell.set_index("seed")["value"]


def ceiling_gaps(scores: pd.DataFrame, matched: pd.DataFrame) -> pd.DataFrame:
    """Per confounded scenario, loss and test split: the score, its matched ceiling on the same images, the gap.

    ``matched`` is ``matched_scores``: the ceiling scenario's runs scored on this scenario's test
    splits. A loss's ceiling is the same loss there, else ``ce``. Columns: scenario, split, loss,
    readout, n, mean, low, high, ceiling_loss, ceiling_n, ceiling_mean, ceiling_low, ceiling_high,
    gap (ceiling − score), gap_low, gap_high (Welch: different runs), ceiling (its scenario).
    """
    columns = [
        "scenario",
        "split",
        "loss",
        "readout",
        "n",
        "mean",
        "low",
        "high",
        "ceiling_loss",
        "ceiling_n",
        "ceiling_mean",
        "ceiling_low",
        "ceiling_high",
        "gap",
        "gap_low",
        "gap_high",
        "ceiling",
    ]
    if matched.empty:
        return pd.DataFrame(columns=columns)
    tests = scores[scores["split"].str.startswith("test_") & scores["scenario"].isin(set(matched["scenario"]))]
    rows = []
    for (scenario, split, loss), part in tests.groupby(["scenario", "split", "loss"], sort=True):
        here = matched[(matched["scenario"] == scenario) & (matched["split"] == split)]
        ceiling_loss = loss if loss in set(here["loss"]) else REFERENCE
        top = _values(here, scenario, ceiling_loss, split)
        if top.empty:
            continue
        own, best = seed_summary(part["value"]), seed_summary(top)
        gap = welch_difference(top, part["value"])
        rows.append(
            (
                scenario,
                split,
                loss,
                part["readout"].iloc[0],
                own.n,
                own.mean,
                own.low,
                own.high,
                ceiling_loss,
                best.n,
                best.mean,
                best.low,
                best.high,
                *gap,
                here["ceiling"].iloc[0],
            )
        )
    return pd.DataFrame(rows, columns=columns)


def ood_gaps(scores: pd.DataFrame) -> pd.DataFrame:
    """Per scenario, loss and test split: the seed-level summary of IID − split (the OOD gap; ``iid_split``)."""
    keys = ["scenario", "loss", "seed"]
    chosen = {scenario: iid_split(part["split"]) for scenario, part in scores.groupby("scenario")}
    is_iid = scores["split"] == scores["scenario"].map(chosen)
    iid = scores.loc[is_iid, [*keys, "value"]].rename(columns={"value": "iid"})
    tests = scores[scores["split"].str.startswith("test_") & ~is_iid].merge(iid, on=keys, how="inner")
    return summarise(tests.assign(gap=tests["iid"] - tests["value"]), ["scenario", "loss", "split"], "gap")


def read_splits(table: pd.DataFrame, manifests: Manifests) -> dict[str, list[str]]:
    """Per scenario of ``table``, the splits its reliance is read on: ``conflict_splits``, else every test split."""
    found = {}
    for scenario, part in table.groupby("scenario", sort=True):
        splits = list(part["split"])
        found[scenario] = conflict_splits(manifests.get(scenario), splits) or sorted(
            s for s in set(splits) if s.startswith("test_")
        )
    return found


def _rows_on(table: pd.DataFrame, readouts: Mapping[str, str], splits: Mapping[str, Sequence[str]]) -> pd.DataFrame:
    """Own-readout rows of selected runs on the given splits of each scenario."""
    own = own_rows(table, readouts)
    keep = [split in splits.get(scenario, ()) for scenario, split in zip(own["scenario"], own["split"])]
    return own[np.asarray(keep, dtype=bool)]


def reliance_summary(
    reliance: pd.DataFrame, readouts: Mapping[str, str], splits: Mapping[str, Sequence[str]]
) -> pd.DataFrame:
    """Per scenario and loss, on ``splits[scenario]``: the excess flip rate (over the null switches)
    of the cue vs the confound switches.

    Per seed the mean over the switches of each kind of ``excess_flip_rate`` (the flip rate where
    the table has no null switches), then the mean over seeds; ``null`` is the mean null flip rate
    and ``degenerate`` the share of seeds whose readout predicts one class on >= 95% of the rows
    (never read as relying on anything). ``difference`` is confound − cue (mean over seeds) with its
    seed-level t-interval (``difference_low``, ``difference_high``) and ``verdict``
    (``reliance_verdict``). Columns: scenario, loss, readout, seeds, cue, confound, null,
    degenerate, difference, difference_low, difference_high, verdict.
    """
    columns = [
        "scenario",
        "loss",
        "readout",
        "seeds",
        "cue",
        "confound",
        "null",
        "degenerate",
        "difference",
        "difference_low",
        "difference_high",
        "verdict",
    ]
    rows = _rows_on(reliance, readouts, splits)
    if rows.empty:
        return pd.DataFrame(columns=columns)
    has_null = "excess_flip_rate" in rows and rows["excess_flip_rate"].notna().any()
    rows = rows.assign(
        rate=rows["excess_flip_rate"] if has_null else rows["flip_rate"],
        null=rows["null_flip_rate"] if "null_flip_rate" in rows else np.nan,
        degenerate=rows["degenerate"] if "degenerate" in rows else 0,
    )
    keys = ["scenario", "loss", "readout", "seed"]
    per_seed = (
        rows[rows["kind"].isin(["cue", "confound"])]
        .groupby([*keys, "kind"])["rate"]
        .mean()
        .unstack("kind")
        .reindex(columns=["cue", "confound"])
    )
    seeds = rows.groupby(keys)
    per_seed = per_seed.join(seeds["null"].mean(), how="outer").join(seeds["degenerate"].max(), how="outer")
    per_seed["difference"] = per_seed["confound"] - per_seed["cue"]
    grouped = per_seed.groupby(level=["scenario", "loss", "readout"])
    summary = grouped.mean().assign(seeds=grouped.size()).reset_index()
    intervals = [seed_summary(part["difference"]) for _, part in grouped]
    summary["difference_low"] = [i.low for i in intervals]
    summary["difference_high"] = [i.high for i in intervals]
    summary["verdict"] = [reliance_verdict(r) for r in summary.to_dict("records")]
    return summary[columns]


def reliance_verdict(row: Mapping[str, Any]) -> str:
    """What a reliance row supports: ``degenerate``, ``cannot tell`` (fewer than ``MIN_SEEDS`` seeds or
    no excess rates), ``confound`` or ``cue`` (the seed-level interval of confound − cue excludes 0),
    else ``not resolved``."""
    if row.get("degenerate", 0) > 0.5:
        return "degenerate"
    low, high = row.get("difference_low", np.nan), row.get("difference_high", np.nan)
    if row.get("seeds", 0) < MIN_SEEDS or not (np.isfinite(low) and np.isfinite(high)):
        return "cannot tell"
    if low > 0:
        return "confound"
    if high < 0:
        return "cue"
    return "not resolved"


def cue_summary(cue: pd.DataFrame, readouts: Mapping[str, str], splits: Mapping[str, Sequence[str]]) -> pd.DataFrame:
    """Per scenario, loss and confound, on ``splits[scenario]``: the cue index shares, mean over seeds.

    Columns: scenario, loss, readout, confound, seeds, label_only, confound_only, both, neither.
    """
    rows = _rows_on(cue, readouts, splits)
    shares = ["label_only", "confound_only", "both", "neither"]
    per_seed = rows.groupby(["scenario", "loss", "readout", "confound", "seed"])[shares].mean()
    grouped = per_seed.groupby(level=["scenario", "loss", "readout", "confound"])
    return (
        grouped[shares]
        .mean()
        .assign(seeds=grouped.size())
        .reset_index()[["scenario", "loss", "readout", "confound", "seeds", *shares]]
    )


def conflict_cells(scores: pd.DataFrame, manifests: Manifests) -> list[tuple[str, str]]:
    """(scenario, conflict split) of every confounded scenario that has scores there.

    A scenario whose manifest is missing counts as confounded through its ``*conflict*`` splits.
    """
    cells = []
    for scenario in sorted(set(scores["scenario"])):
        manifest = manifests.get(scenario)
        if manifest is not None and not confounds_of(manifest):
            continue
        found = conflict_splits(manifest, list(scores.loc[scores["scenario"] == scenario, "split"]))
        cells += [(scenario, s) for s in found if manifest is not None or "conflict" in s]
    return cells


CONVERGED_SHARE = 0.02
"""A run has converged when its training loss changed by less than this share of its total decrease
over the last ``LAST_SHARE`` of its epochs (for triplet, its count of mined triplets, whose loss is
a mean over what it mines)."""
LAST_SHARE = 0.2


def convergence(history: pd.DataFrame) -> pd.DataFrame:
    """Per selected run of ``history`` (the store's long table): whether its training curve is flat.

    The curve is ``mined_triplets`` where the run records it, else ``train_loss``; the change over the
    last ``LAST_SHARE`` of epochs (at least one) is compared with the total decrease from the first
    epoch to the lowest value. Columns: scenario, loss, seed, epochs, curve, change, decrease, converged.
    """
    columns = ["scenario", "loss", "seed", "epochs", "curve", "change", "decrease", "converged"]
    history = history[history["selected"] == 1] if "selected" in history else history
    rows = []
    for (scenario, loss, seed), part in history.groupby(["scenario", "loss", "seed"], sort=True):
        names = set(part["name"])
        curve = "mined_triplets" if "mined_triplets" in names else "train_loss"
        if curve not in names:
            continue
        values = part[part["name"] == curve].sort_values("epoch")["value"].to_numpy(dtype=float)
        if len(values) < 2:
            continue
        back = max(1, int(round(LAST_SHARE * len(values))))
        change = abs(values[-1] - values[-1 - back])
        decrease = abs(values[0] - (values.min() if curve == "train_loss" else values[-1]))
        converged = bool(change < CONVERGED_SHARE * decrease) if decrease > 0 else change == 0
        rows.append((scenario, loss, int(seed), len(values), curve, change, decrease, converged))
    return pd.DataFrame(rows, columns=columns)
