"""Sim-to-real (design.md "Study, store, report"): does the loss ranking on synthetic conflict splits
predict the ranking on real nodules?

A study with ``[real]`` scores every run on the real dataset's ``test_lidc`` rows (``store.REAL_DATASET``
rows of ``metrics`` and ``predictions``) against two targets: malignancy (split ``test_lidc``) and the
spiculation rating, >= 4 vs 1 (``test_lidc_spiculation``: the synthetic studies' cue). Per training
scenario and loss, read like the declared comparisons (``[hypotheses] readout``; ``own``: the head
where the loss has one, else the probe), selected draws, one value per seed:

- **Levels** (``real_levels``): balanced accuracy and AUC, mean over seeds with a 95% interval that
  carries the seeds' and the fixed test set's noise (``level``): the seeds' t half-width (n − 1 degrees
  of freedom) and the test set's (delta method over the samples, averaged over seeds, less the
  seed-by-sample interaction the seeds' part holds: per class of the per-sample correctness for
  balanced accuracy, as ``seedstats.shared_sample_difference``; DeLong's structural components for
  AUC), added in quadrature. Without per-sample predictions: the seeds' t-interval alone.
- **Rankings**: losses by mean balanced accuracy, best first: on the scenario's synthetic conflict
  split(s) (the declared ``[hypotheses]`` comparisons of that scenario, else its conflict splits;
  a seed's value is its mean over them) and on each real target, over the seeds both sides have.
- **Rank correlation** (``rank_correlation``, only with >= ``MIN_LOSSES`` losses): Spearman's rho
  between the synthetic and the real ranking, with a percentile bootstrap 95% interval (``RHO_DRAWS``
  draws): each draw resamples each loss's seeds (a seed keeps its synthetic and real score together)
  and the real test rows (within each class, the same rows for every loss), and ranks both sides
  again. Draws in which one side ties every loss have no rho and are left out (counted).

Numpy, scipy and pandas only (no torch).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from nodulab.common.seedstats import LEVEL, seed_summary
from nodulab.results.comparisons import Hypotheses
from nodulab.results.seed_tables import METRIC, conflict_splits, confounds_of
from nodulab.results.store import REAL_DATASET, REAL_SPLITS

TARGETS = dict(zip(("malignancy", "spiculation"), REAL_SPLITS))
"""Each real target and the split its rows are stored under."""
REAL_METRICS = (METRIC, "auc")
MIN_LOSSES = 4
"""Fewest losses for which a rank correlation is computed."""
RHO_DRAWS = 2_000
"""Bootstrap draws of the rank correlation's interval."""
LEVEL_COLUMNS = ["scenario", "loss", "readout", "target", "metric", "n", "mean", "low", "high", "test_noise", "samples"]


def classifier_of(mode: str, loss: str, readouts: Mapping[str, str]) -> str:
    """The classifier a loss is read by: its own readout (``own``), else ``probe`` or ``dfr`` for every loss."""
    return readouts.get(loss, "probe") if mode == "own" else mode


# ----------------------------------------------------------------------------- levels
@dataclass(frozen=True)
class Level:
    """A mean over seeds with its 95% interval (``test_noise``: the test set's noise is in it)."""

    n: int
    mean: float
    low: float
    high: float
    test_noise: bool


def _interaction(x: np.ndarray) -> float:
    """The seed-by-sample interaction mean square of a ``(seeds, samples)`` array (two-way, no replicates)."""
    seeds, samples = x.shape
    if seeds < 2 or samples < 2:
        return 0.0
    residual = x - x.mean(axis=0, keepdims=True) - x.mean(axis=1, keepdims=True) + x.mean()
    return float((residual**2).sum() / ((seeds - 1) * (samples - 1)))


def _t(df: float, level: float) -> float:
    return float(stats.t.ppf(0.5 + level / 2, df))


def level(
    per_seed: np.ndarray, components: Sequence[np.ndarray], weights: Sequence[float], *, confidence: float = LEVEL
) -> Level:
    """The mean of ``per_seed`` (one value per seed) with an interval carrying the seeds' and the test set's noise.

    ``components``: ``(seeds, samples)`` arrays (one per class, or DeLong's per positive and per
    negative) whose per-class means, weighted by ``weights``, make the metric (balanced accuracy:
    each class's correctness, weights 1 / classes; AUC: the positives' and the negatives' structural
    components, weights 1). The test set's variance is, per component, the variance over its samples
    of the seed-averaged value less the interaction mean square / seeds, over its sample count; its
    t half-width (samples − components degrees of freedom) and the seeds' (n − 1) add in quadrature. The
    bounds are clipped to [0, 1], the range of both metrics.
    """
    x = np.asarray(per_seed, dtype=float)
    n = len(x)
    if n == 0:
        return Level(0, math.nan, math.nan, math.nan, bool(components))
    mean = float(x.mean())
    if n < 2:
        return Level(1, mean, math.nan, math.nan, bool(components))
    seeds = _t(n - 1, confidence) * float(x.std(ddof=1)) / math.sqrt(n)
    variance, samples = 0.0, 0
    for part, weight in zip(components, weights):
        part = np.asarray(part, dtype=float)
        samples += part.shape[1]
        if part.shape[1] < 2:
            continue
        spread = float(part.mean(axis=0).var(ddof=1)) - _interaction(part) / n
        variance += weight**2 * max(0.0, spread) / part.shape[1]
    test = _t(max(1, samples - len(components)), confidence) * math.sqrt(variance) if components else 0.0
    half = math.hypot(seeds, test)
    return Level(n, mean, max(0.0, mean - half), min(1.0, mean + half), bool(components))


def balanced_accuracy_parts(
    correct: np.ndarray, labels: np.ndarray
) -> tuple[np.ndarray, list[np.ndarray], list[float]]:
    """Per seed balanced accuracy of a ``(seeds, samples)`` 0/1 ``correct`` array, and its parts for ``level``."""
    classes = np.unique(labels)
    parts = [np.asarray(correct, dtype=float)[:, labels == c] for c in classes]
    per_seed = np.mean([p.mean(axis=1) for p in parts], axis=0)
    return per_seed, parts, [1.0 / len(classes)] * len(classes)


def auc_parts(p: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, list[np.ndarray], list[float]]:
    """Per seed AUC (ties count one half) of a ``(seeds, samples)`` array of P(positive), and DeLong's
    structural components (per positive: the share of negatives it outranks; per negative: the share of
    positives that outrank it) for ``level``."""
    p = np.asarray(p, dtype=float)
    positives, negatives = p[:, labels == 1], p[:, labels == 0]
    v10 = np.empty_like(positives)
    v01 = np.empty_like(negatives)
    for s in range(len(p)):  # one seed at a time: positives x negatives at most
        psi = (positives[s][:, None] > negatives[s][None, :]) + 0.5 * (positives[s][:, None] == negatives[s][None, :])
        v10[s], v01[s] = psi.mean(axis=1), psi.mean(axis=0)
    return v10.mean(axis=1), [v10, v01], [1.0, 1.0]


# ----------------------------------------------------------------------------- the runs' values
def synthetic_splits(
    scenario: str, hypotheses: Hypotheses, manifests: Mapping[str, Mapping], splits: Sequence[str]
) -> list[str]:
    """The synthetic split(s) a scenario's losses are ranked on: its declared comparisons, else its
    conflict splits (none for a scenario without confounds)."""
    declared = [e.split("/", 1)[1] for e in hypotheses.comparisons if e.split("/", 1)[0] == scenario]
    if declared:
        return declared
    manifest = manifests.get(scenario)
    if manifest is not None and not confounds_of(manifest):
        return []
    found = conflict_splits(manifest, list(splits))
    return [s for s in found if manifest is not None or "conflict" in s]


def synthetic_values(
    metrics: pd.DataFrame, scenario: str, loss: str, classifier: str, splits: Sequence[str]
) -> pd.Series:
    """Per seed (index), the selected run's balanced accuracy on its own images, mean over ``splits``."""
    keep = (
        (metrics["scenario"] == scenario)
        & (metrics["dataset"] == scenario)
        & (metrics["loss"] == loss)
        & (metrics["classifier"] == classifier)
        & (metrics["metric"] == METRIC)
        & (metrics["selected"] == 1)
        & metrics["split"].isin(list(splits))
    )
    return metrics[keep].groupby("seed")["value"].mean()


@dataclass(frozen=True)
class RealScores:
    """One loss's selected runs on one real target: per seed, from per-sample predictions when stored."""

    seeds: np.ndarray
    labels: np.ndarray | None
    """The test rows' labels (None: no per-sample predictions, only ``values``)."""
    correct: np.ndarray | None
    """``(seeds, rows)`` 1 where the call was right."""
    p: np.ndarray | None
    """``(seeds, rows)`` P(positive)."""
    values: dict[str, np.ndarray]
    """Per metric, one value per seed (from the predictions when stored, else the ``metrics`` table)."""


def real_scores(
    metrics: pd.DataFrame, predictions: pd.DataFrame | None, scenario: str, loss: str, classifier: str, split: str
) -> RealScores | None:
    """A loss's selected runs (trained on ``scenario``) scored on a real target's ``split``; None when none is."""
    keys = ["scenario", "loss", "classifier", "split", "dataset", "selected"]
    wanted = (scenario, loss, classifier, split, REAL_DATASET, 1)
    if predictions is not None and len(predictions):
        rows = predictions[np.logical_and.reduce([predictions[k] == v for k, v in zip(keys, wanted)])]
        if len(rows):
            correct = rows.assign(correct=(rows["predicted"] == rows["label"]).astype(float))
            wide = correct.pivot_table(index="seed", columns="row", values="correct", aggfunc="first")
            p = correct.pivot_table(index="seed", columns="row", values="p", aggfunc="first").reindex_like(wide)
            labels = correct.drop_duplicates("row").set_index("row")["label"].reindex(wide.columns)
            if not (wide.isna().to_numpy().any() or p.isna().to_numpy().any() or labels.isna().any()):
                labels = labels.to_numpy(dtype=int)
                if set(np.unique(labels)) == {0, 1}:
                    values = {
                        METRIC: balanced_accuracy_parts(wide.to_numpy(), labels)[0],
                        "auc": auc_parts(p.to_numpy(), labels)[0],
                    }
                else:  # one class only: neither metric is defined
                    values = {m: np.full(len(wide), math.nan) for m in REAL_METRICS}
                seeds = wide.index.to_numpy()
                return RealScores(seeds, labels, wide.to_numpy(dtype=float), p.to_numpy(dtype=float), values)
    rows = metrics[np.logical_and.reduce([metrics[k] == v for k, v in zip(keys, wanted)])]
    if rows.empty:
        return None
    wide = rows.pivot_table(index="seed", columns="metric", values="value", aggfunc="first")
    values = {m: wide[m].to_numpy(dtype=float) if m in wide else np.full(len(wide), math.nan) for m in REAL_METRICS}
    return RealScores(wide.index.to_numpy(), None, None, None, values)


def real_level(scores: RealScores, metric: str) -> Level:
    """``level`` of one metric of a loss on a real target (the test set's noise in it when predictions are stored)."""
    values = scores.values[metric]
    if not np.isfinite(values).all():
        return Level(len(values), math.nan, math.nan, math.nan, False)
    if scores.labels is None:
        summary = seed_summary(values)
        low, high = (max(0.0, summary.low), min(1.0, summary.high)) if summary.n > 1 else (math.nan, math.nan)
        return Level(summary.n, summary.mean, low, high, False)
    if metric == METRIC:
        per_seed, parts, weights = balanced_accuracy_parts(scores.correct, scores.labels)
    else:
        per_seed, parts, weights = auc_parts(scores.p, scores.labels)
    return level(per_seed, parts, weights)


# ----------------------------------------------------------------------------- rank correlation
@dataclass(frozen=True)
class RankCorrelation:
    """Spearman's rho over losses with its percentile bootstrap 95% interval."""

    losses: int
    rho: float
    low: float
    high: float
    draws: int
    defined: int
    """Draws with a rho (one side tying every loss has none)."""
    rows: bool
    """Whether the real test rows were resampled too (per-sample predictions stored)."""


def _ranks_corr(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Row-wise Spearman correlation of two ``(draws, losses)`` arrays: average ranks for ties, NaN where a
    row ties every loss."""
    rx, ry = stats.rankdata(x, axis=1), stats.rankdata(y, axis=1)
    rx, ry = rx - rx.mean(axis=1, keepdims=True), ry - ry.mean(axis=1, keepdims=True)
    denominator = np.sqrt((rx**2).sum(axis=1) * (ry**2).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (rx * ry).sum(axis=1) / np.where(denominator > 0, denominator, 1), np.nan)


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rho of two sequences (NaN when one side ties everything)."""
    return float(_ranks_corr(np.asarray([x], dtype=float), np.asarray([y], dtype=float))[0])


def bootstrap_seed(key: str) -> int:
    """A fixed seed for ``key`` (the scenario and target): the same interval on every rerun."""
    return int.from_bytes(hashlib.blake2b(f"nodulab/sim-to-real/{key}".encode(), digest_size=8).digest(), "little")


def rank_correlation(
    synthetic: Mapping[str, np.ndarray],
    real: Mapping[str, np.ndarray],
    labels: np.ndarray | None = None,
    *,
    draws: int = RHO_DRAWS,
    seed: int = 0,
    confidence: float = LEVEL,
) -> RankCorrelation:
    """Spearman's rho between the losses' mean synthetic and mean real balanced accuracy, with a bootstrap interval.

    Args:
        synthetic: per loss, one synthetic score per seed.
        real: per loss, the same seeds in the same order: a ``(seeds, rows)`` 0/1 array of correct calls
            on the real test rows (with ``labels``, the same rows for every loss), or one balanced
            accuracy per seed (``labels`` None: the rows are not resampled).
        labels: the real test rows' classes.
        draws: bootstrap draws; each resamples every loss's seeds (with replacement, a seed's synthetic
            and real values together) and, with ``labels``, the rows within each class.
        seed: the bootstrap's generator seed.
        confidence: the interval's level (percentile interval).
    """
    losses = [loss for loss in synthetic if loss in real]
    rng = np.random.default_rng(seed)
    syn = [np.asarray(synthetic[loss], dtype=float) for loss in losses]
    counts = None
    if labels is not None:
        labels = np.asarray(labels)
        classes = [np.flatnonzero(labels == c) for c in np.unique(labels)]
        counts = [rng.multinomial(len(idx), np.full(len(idx), 1 / len(idx)), size=draws) for idx in classes]
    point_real, boot_syn, boot_real = [], np.empty((draws, len(losses))), np.empty((draws, len(losses)))
    for j, loss in enumerate(losses):
        values = np.asarray(real[loss], dtype=float)
        if counts is not None:
            per_seed = np.mean([values[:, idx].mean(axis=1) for idx in classes], axis=0)
            # (seeds, draws): each draw's balanced accuracy of each seed on the resampled rows
            drawn = np.mean([values[:, idx] @ c.T / len(idx) for idx, c in zip(classes, counts)], axis=0)
        else:
            per_seed, drawn = values, np.repeat(values[:, None], draws, axis=1)
        point_real.append(per_seed.mean())
        picks = rng.integers(0, len(per_seed), (draws, len(per_seed)))
        boot_syn[:, j] = syn[j][picks].mean(axis=1)
        boot_real[:, j] = np.take_along_axis(drawn.T, picks, axis=1).mean(axis=1)
    rho = spearman([s.mean() for s in syn], point_real)
    found = _ranks_corr(boot_syn, boot_real)
    found = found[np.isfinite(found)]
    if len(found):
        low, high = np.quantile(found, [0.5 - confidence / 2, 0.5 + confidence / 2])
    else:
        low = high = math.nan
    return RankCorrelation(len(losses), rho, float(low), float(high), draws, len(found), counts is not None)


# ----------------------------------------------------------------------------- one scenario
@dataclass
class SimToReal:
    """A scenario's sim-to-real table: per loss its synthetic score and real levels, the rankings, rho."""

    scenario: str
    splits: list[str]
    """The synthetic split(s) ranked on (empty: no conflict split, no synthetic ranking)."""
    rows: list[dict]
    """Per loss: ``loss``, ``readout``, ``seeds`` (scored on real rows), ``synthetic`` (``seed_summary`` over
    those seeds, or None) and per ``(target, metric)`` a ``Level`` (or None)."""
    rankings: dict[str, dict[str, int]]
    """``synthetic`` and each target's: each loss's rank by mean balanced accuracy (``_ranked``)."""
    correlations: dict[str, RankCorrelation]
    """Per target, with >= ``MIN_LOSSES`` losses ranked on both sides."""


def _paired(found: Mapping[str, tuple[pd.Series, RealScores]]) -> tuple[dict, dict, np.ndarray | None]:
    """Per loss the seeds both sides have: synthetic values and real correctness (rows, when every loss has
    predictions on the same rows) or real balanced accuracy per seed (``labels`` None)."""
    labels = [scores.labels for _, scores in found.values()]
    rows = all(lab is not None for lab in labels) and all(np.array_equal(labels[0], lab) for lab in labels)
    synthetic, real = {}, {}
    for loss, (values, scores) in found.items():
        keep = np.isin(scores.seeds, values.index.to_numpy())
        if not keep.any():
            continue
        synthetic[loss] = values.reindex(scores.seeds[keep]).to_numpy(dtype=float)
        real[loss] = scores.correct[keep] if rows else scores.values[METRIC][keep]
    return synthetic, real, labels[0] if rows and labels else None


def sim_to_real(
    metrics: pd.DataFrame,
    predictions: pd.DataFrame | None,
    readouts: Mapping[str, str],
    hypotheses: Hypotheses,
    manifests: Mapping[str, Mapping],
    scenario: str,
    losses: Sequence[str],
    *,
    draws: int = RHO_DRAWS,
) -> SimToReal | None:
    """The sim-to-real comparison of one training scenario (None when none of its runs has real scores)."""
    if "dataset" not in metrics:
        return None
    own = metrics[(metrics["scenario"] == scenario) & (metrics["dataset"] == scenario)]
    splits = synthetic_splits(scenario, hypotheses, manifests, sorted(set(own["split"])))
    rows: list[dict] = []
    ranked: dict[str, dict[str, tuple[pd.Series, RealScores]]] = {target: {} for target in TARGETS}
    for loss in losses:
        classifier = classifier_of(hypotheses.readout, loss, readouts)
        found = {t: real_scores(metrics, predictions, scenario, loss, classifier, s) for t, s in TARGETS.items()}
        if all(f is None for f in found.values()):
            continue
        seeds = sorted({int(s) for f in found.values() if f is not None for s in f.seeds})
        synthetic = synthetic_values(metrics, scenario, loss, classifier, splits) if splits else pd.Series(dtype=float)
        synthetic = synthetic[synthetic.index.isin(seeds)]
        row: dict = {
            "loss": loss,
            "readout": classifier,
            "seeds": len(seeds),
            "synthetic": seed_summary(synthetic) if len(synthetic) else None,
        }
        for target, scores in found.items():
            for metric in REAL_METRICS:
                row[(target, metric)] = real_level(scores, metric) if scores is not None else None
            if scores is not None and len(synthetic) and np.isfinite(scores.values[METRIC]).all():
                ranked[target][loss] = (synthetic, scores)
        rows.append(row)
    if not rows:
        return None
    rankings: dict[str, dict[str, int]] = {}
    means = {r["loss"]: r["synthetic"].mean for r in rows if r["synthetic"] is not None}
    if means:
        rankings["synthetic"] = _ranked(means)
    correlations = {}
    for target, found in ranked.items():
        synthetic, real, labels = _paired(found)
        if not synthetic:
            continue
        per_seed = {k: balanced_accuracy_parts(v, labels)[0] if labels is not None else v for k, v in real.items()}
        rankings[target] = _ranked({k: float(v.mean()) for k, v in per_seed.items()})
        if len(synthetic) >= MIN_LOSSES:
            seed = bootstrap_seed(f"{scenario}/{target}")
            correlations[target] = rank_correlation(synthetic, real, labels, draws=draws, seed=seed)
    return SimToReal(scenario, splits, rows, rankings, correlations)


def _ranked(means: Mapping[str, float]) -> dict[str, int]:
    """Each loss's rank by ``means``, best first (1 = best; equal means share the better rank), ordered by rank
    then name."""
    order = sorted(means, key=lambda loss: (-means[loss], loss))
    return {loss: 1 + sum(means[other] > means[loss] for other in means) for loss in order}


def ranking_text(ranks: Mapping[str, int]) -> str:
    """``supcon > simclr = triplet > ce``: a ranking best first, ``=`` between equal means."""
    losses = list(ranks)
    text = losses[0] if losses else ""
    for before, loss in zip(losses, losses[1:]):
        text += f" {'=' if ranks[loss] == ranks[before] else '>'} {loss}"
    return text
