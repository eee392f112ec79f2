"""A study's seed-level tables, built from its store's tables (design.md "Evaluation and
explanation", "Expected behaviour"); ``findings`` words them.

Every number is over training seeds, one value per seed: the tuning draw the study selected for
that (scenario, loss, seed) (kNN balanced accuracy on ``val``, the same score for every loss).

- **Readout rule.** A loss's own behaviour is its ``head`` where its runs have one (``ce``,
  ``ce+supcon``, ``ce+triplet``), else the ``probe`` fitted on ``train``. ``dfr`` is a
  feature-quality oracle and ``*_init`` are untrained controls: never a loss's behaviour.
- **IID and OOD.** ``val`` shares the training distribution; the OOD gap of a split is
  ``val`` minus that split, per seed.
- **The clean ceiling.** The first scenario (by name) whose manifest has no confound, read on its
  first test split that overrides no factor; a ``[source]`` scenario's is the first one drawing
  from the same table with its confounds broken (``lidc`` -> ``lidc-balanced``), read on a test
  split with the confounds broken. A loss's ceiling is that score of the same loss,
  else of ``ce``; the gap to it has a Welch interval over seeds (different runs, not paired).
- **Differences to ce.** Per (scenario, test split) and loss, the per-seed difference to ``ce``
  (seeds paired by number), a paired t-test, and Holm's correction over every comparison with
  at least ``MIN_SEEDS`` pairs. A difference is claimed only when its Holm-level interval
  excludes 0 (equivalently, the adjusted p is below ``ALPHA``); fewer seeds cannot tell.

Numpy, scipy and pandas only, so the report never loads torch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from nodulab.common.seedstats import holm, holm_levels, paired_test, seed_summary, welch_difference
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


@dataclass(frozen=True)
class Ceiling:
    """Where the clean ceiling is read: a scenario without confounds and one of its test splits."""

    scenario: str
    split: str

    def __str__(self) -> str:
        return f"{self.scenario}/{self.split}"


def find_ceiling(manifests: Manifests, scores: pd.DataFrame, table: str | None = None) -> Ceiling | None:
    """The first scenario without confounds (by name) and its first scored test split with no factor override.

    With ``table``, only ``[source]`` scenarios drawing from that table count (their test splits
    with the confounds broken); without, only scenarios with no ``[source]``.
    """
    for name in sorted(manifests):
        scenario = _scenario(manifests[name])
        if "confounds" not in scenario or confounds_of(manifests[name]):
            continue
        source = scenario.get("source")
        if (source.get("table") if isinstance(source, Mapping) else None) != table:
            continue
        scored = set(scores.loc[scores["scenario"] == name, "split"])
        specs = scenario.get("splits", {})
        plain = [
            s
            for s in sorted(scored)
            if s.startswith("test_")
            and not specs.get(s, {}).get("factors")
            and _source_mode(scenario, s) in (None, "broken")
        ]
        if plain:
            return Ceiling(name, plain[0])
    return None


def find_ceilings(manifests: Manifests, scores: pd.DataFrame) -> dict[str, Ceiling]:
    """Each scored scenario's ceiling (``find_ceiling``): a ``[source]`` scenario's from the same
    table, any other's from the synthetic scenarios; a ceiling is not its own."""
    out = {}
    for name in sorted(set(scores["scenario"])):
        source = _scenario(manifests.get(name)).get("source")
        ceiling = find_ceiling(manifests, scores, source.get("table") if isinstance(source, Mapping) else None)
        if ceiling is not None and ceiling.scenario != name:
            out[name] = ceiling
    return out


def _values(scores: pd.DataFrame, scenario: str, loss: str, split: str) -> pd.Series:
    cell = scores[(scores["scenario"] == scenario) & (scores["loss"] == loss) & (scores["split"] == split)]
    return cell.set_index("seed")["value"]


def ceiling_gaps(scores: pd.DataFrame, ceiling: Ceiling | Mapping[str, Ceiling] | None) -> pd.DataFrame:
    """Per scenario (but a ceiling's), loss and test split: the score, its ceiling, and the gap.

    ``ceiling`` is one ceiling for every scenario or each scenario's (``find_ceilings``).
    Columns: scenario, split, loss, readout, n, mean, low, high, ceiling_loss, ceiling_n,
    ceiling_mean, ceiling_low, ceiling_high, gap (ceiling − score), gap_low, gap_high (Welch), ceiling.
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
    if ceiling is None:
        return pd.DataFrame(columns=columns)
    if isinstance(ceiling, Ceiling):
        ceiling = {name: ceiling for name in set(scores["scenario"]) if name != ceiling.scenario}
    tests = scores[scores["split"].str.startswith("test_") & scores["scenario"].isin(list(ceiling))]
    rows = []
    for (scenario, split, loss), part in tests.groupby(["scenario", "split", "loss"], sort=True):
        top_cell = ceiling[scenario]
        at_ceiling = scores[(scores["scenario"] == top_cell.scenario) & (scores["split"] == top_cell.split)]
        ceiling_loss = loss if loss in set(at_ceiling["loss"]) else REFERENCE
        top = _values(scores, top_cell.scenario, ceiling_loss, top_cell.split)
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
                str(top_cell),
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


def paired_differences(scores: pd.DataFrame, *, reference: str = REFERENCE, alpha: float = ALPHA) -> pd.DataFrame:
    """Per (scenario, test split) and loss ≠ ``reference``: the paired difference to the reference.

    Seeds are paired by number (a seed missing on either side is left out). Holm's correction runs
    over every comparison with at least ``MIN_SEEDS`` pairs; the others get NaN adjusted p and
    corrected interval and are never significant.

    Columns: scenario, split, loss, readout, reference_readout, n, mean, low, high (the uncorrected
    95% interval), p, p_holm, holm_low, holm_high (the interval at Holm's level), significant.
    """
    test = scores[scores["split"].str.startswith("test_")]
    rows = []
    for (scenario, split), cell in test.groupby(["scenario", "split"], sort=True):
        base = cell[cell["loss"] == reference]
        if base.empty:
            continue
        for loss, part in cell[cell["loss"] != reference].groupby("loss", sort=True):
            differences = (part.set_index("seed")["value"] - base.set_index("seed")["value"]).dropna()
            result = paired_test(differences)
            rows.append((scenario, split, loss, part["readout"].iloc[0], base["readout"].iloc[0], result))
    frame = pd.DataFrame(
        [(*row[:5], r.n, r.mean, r.low, r.high, r.p) for *row, r in rows],
        columns=["scenario", "split", "loss", "readout", "reference_readout", "n", "mean", "low", "high", "p"],
    )
    tested = np.where(frame["n"] >= MIN_SEEDS, frame["p"], np.nan)
    frame["p_holm"] = holm(tested)
    bounds = [r.interval(1 - level) for (*_, r), level in zip(rows, holm_levels(tested, alpha))]
    frame["holm_low"] = [b[0] for b in bounds] if bounds else []
    frame["holm_high"] = [b[1] for b in bounds] if bounds else []
    frame["significant"] = (frame["holm_low"] > 0) | (frame["holm_high"] < 0)
    return frame


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
    """Per scenario and loss, on ``splits[scenario]``: mean flip rate of the cue vs the confound switches.

    Per seed the mean over the switches of each kind, then the mean over seeds. Columns:
    scenario, loss, readout, seeds, cue, confound.
    """
    rows = _rows_on(reliance, readouts, splits)
    rows = rows[rows["kind"].isin(["cue", "confound"])]
    per_seed = rows.groupby(["scenario", "loss", "readout", "seed", "kind"])["flip_rate"].mean().unstack("kind")
    grouped = per_seed.reindex(columns=["cue", "confound"]).groupby(level=["scenario", "loss", "readout"])
    return (
        grouped.mean()
        .assign(seeds=grouped.size())
        .reset_index()[["scenario", "loss", "readout", "seeds", "cue", "confound"]]
    )


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
