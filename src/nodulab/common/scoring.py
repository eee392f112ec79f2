"""Scoring predictions (design.md "Evaluation and explanation"), decoupled from loading data or
runs (MedMNIST's evaluator habit).

``binary_metrics`` scores one predictor: accuracy, sensitivity, specificity, balanced accuracy,
ROC AUC; malignant (label 1) is the positive class and ``p >= threshold`` calls it. The
bootstrap gives every metric a **sample-level** 95% percentile interval: ``resample_counts``
draws ordinary bootstrap resamples as per-sample counts, ``weighted_metrics`` scores all of them
at once (a weighted confusion matrix; AUC from one sort and weighted cumulative sums, ties
counted half), ``bootstrap_intervals`` does it for every classifier of a split on the same
resamples. The interval leaves out the variance between training seeds.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping

import numpy as np

METRICS = ("accuracy", "sensitivity", "specificity", "balanced_accuracy", "auc")
THRESHOLD = 0.5
BOOTSTRAP_DRAWS = 2000
"""Bootstrap resamples per split (the same resamples for every classifier of a split)."""
CONFIDENCE = 0.95
BOOTSTRAP_CHUNK = 1 << 22
"""Most resample weights held at once (draws × samples); bounds memory on large splits."""


def _ratio(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator else math.nan


def binary_metrics(labels: np.ndarray, p_malignant: np.ndarray, threshold: float = THRESHOLD) -> dict[str, float]:
    """Accuracy, sensitivity, specificity, balanced accuracy and ROC AUC of one predictor.

    Args:
        labels: ``(N,)`` 0 (benign) / 1 (malignant).
        p_malignant: ``(N,)`` P(malignant); the prediction is ``p >= threshold``.
        threshold: decision threshold.

    Returns:
        ``{metric: value}`` for ``METRICS``. Sensitivity TP/(TP+FN), specificity TN/(TN+FP),
        balanced accuracy their mean; any of them NaN when its denominator is 0, AUC
        (``sklearn.metrics.roc_auc_score``) NaN unless both classes are present.
    """
    from sklearn.metrics import roc_auc_score

    y = np.asarray(labels)
    p = np.asarray(p_malignant, dtype=np.float64)
    if y.ndim != 1 or p.shape != y.shape:
        raise ValueError(f"binary_metrics: labels and p_malignant must be (N,), got {y.shape} and {p.shape}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("binary_metrics: labels must be 0 (benign) or 1 (malignant)")
    if not np.isfinite(p).all():
        raise ValueError("binary_metrics: p_malignant contains non-finite values")
    positive, predicted = y == 1, p >= threshold
    tp, fn = int((positive & predicted).sum()), int((positive & ~predicted).sum())
    tn, fp = int((~positive & ~predicted).sum()), int((~positive & predicted).sum())
    sensitivity, specificity = _ratio(tp, tp + fn), _ratio(tn, tn + fp)
    both = 0 < positive.sum() < len(y)
    return {
        "accuracy": _ratio(tp + tn, len(y)),
        "sensitivity": sensitivity,
        "specificity": specificity,
        "balanced_accuracy": (sensitivity + specificity) / 2.0,  # NaN if either is
        "auc": float(roc_auc_score(y, p)) if both else math.nan,
    }


# ----------------------------------------------------------------------------- bootstrap
def bootstrap_seed(split: str) -> int:
    """The bootstrap seed of a split: a hash of its name, so every rerun draws the same resamples."""
    return int.from_bytes(
        hashlib.sha256(f"nodulab.training.evaluation.bootstrap/{split}".encode()).digest()[:8], "little"
    )


def resample_counts(n: int, draws: int, rng: np.random.Generator) -> np.ndarray:
    """How often each sample is drawn in ``draws`` ordinary bootstrap resamples of ``n`` samples.

    Args:
        n: samples in the split.
        draws: resamples.
        rng: the generator (advanced by ``draws × n`` integers).

    Returns:
        ``(n, draws)`` float64 counts, one column per resample (samples on the first axis keep
        the per-classifier sort and cumulative sums contiguous); each column sums to ``n``.
    """
    drawn = rng.integers(0, n, size=(draws, n), dtype=np.int64 if n > 2**31 - 1 else np.int32)
    flat = drawn.astype(np.int64) * draws + np.arange(draws)[:, None]  # row-major (sample, resample)
    return np.bincount(flat.ravel(), minlength=n * draws).reshape(n, draws).astype(np.float64)


def _weighted_auc(positive: np.ndarray, p: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Mann-Whitney AUC of every resample (ties count half): one sort, then cumulative sums.

    Args:
        positive: ``(N,)`` bool; p: ``(N,)`` scores; counts: ``(N, B)`` weights.

    Returns:
        ``(B,)`` AUC, NaN where a resample lacks a class.
    """
    order = np.argsort(p, kind="stable")
    ranked, is_positive = p[order], positive[order][:, None]
    negatives = counts[order]
    positives = negatives * is_positive
    negatives -= positives  # in place: these arrays are (N, B), the cost of the whole bootstrap
    starts = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]])  # first row of each run of tied scores
    if len(starts) < len(p):
        positives, negatives = np.add.reduceat(positives, starts, axis=0), np.add.reduceat(negatives, starts, axis=0)
    below = np.cumsum(negatives, axis=0)
    pairs = positives.sum(axis=0) * below[-1]
    negatives *= 0.5
    below -= negatives  # negatives scored lower than each run, plus half of those tied with it
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pairs > 0, np.einsum("gb,gb->b", positives, below) / pairs, math.nan)


def weighted_metrics(
    labels: np.ndarray, p_malignant: np.ndarray, counts: np.ndarray, threshold: float = THRESHOLD
) -> dict[str, np.ndarray]:
    """``binary_metrics`` of many resamples at once, each given as per-sample counts.

    Resample ``b`` gives the ``binary_metrics`` of the samples repeated ``counts[:, b]`` times
    (tested): a weighted confusion matrix (one matrix product) and a weighted Mann-Whitney AUC.

    Args:
        labels: ``(N,)`` 0 / 1.
        p_malignant: ``(N,)`` P(malignant).
        counts: ``(N, B)`` non-negative weights, one column per resample (``resample_counts``).
        threshold: decision threshold (``p >= threshold`` is malignant).

    Returns:
        ``{metric: (B,) values}`` for ``METRICS``; NaN where a metric is undefined in a resample.
    """
    positive = np.asarray(labels) == 1
    p = np.asarray(p_malignant, dtype=np.float64)
    predicted = p >= threshold
    cells = np.stack([positive & predicted, positive & ~predicted, ~positive & ~predicted, ~positive & predicted])
    tp, fn, tn, fp = (counts.T @ cells.T.astype(counts.dtype)).T  # (B, N) @ (N, 4): the fast order
    with np.errstate(invalid="ignore", divide="ignore"):
        sensitivity = np.where(tp + fn > 0, tp / (tp + fn), math.nan)
        specificity = np.where(tn + fp > 0, tn / (tn + fp), math.nan)
        accuracy = np.where(tp + fn + tn + fp > 0, (tp + tn) / (tp + fn + tn + fp), math.nan)
    return {
        "accuracy": accuracy,
        "sensitivity": sensitivity,
        "specificity": specificity,
        "balanced_accuracy": (sensitivity + specificity) / 2.0,
        "auc": _weighted_auc(positive, p, counts),
    }


def percentile_interval(values: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Percentile interval of bootstrap values, over the resamples where the metric is defined.

    Returns:
        ``(low, high)``; NaN, NaN when no resample has a defined value.
    """
    defined = values[np.isfinite(values)]
    if not len(defined):
        return math.nan, math.nan
    low, high = np.quantile(defined, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(low), float(high)


def bootstrap_intervals(
    labels: np.ndarray,
    scores: Mapping[str, np.ndarray],
    thresholds: Mapping[str, float],
    *,
    seed: int,
    draws: int = BOOTSTRAP_DRAWS,
    confidence: float = CONFIDENCE,
) -> dict[str, dict[str, tuple[float, float]]]:
    """Sample-level bootstrap percentile intervals of every metric of every classifier of a split.

    The split's samples are resampled with replacement ``draws`` times, the same resamples for
    every classifier (so their intervals are paired), the model and threshold fixed. The
    interval is sample-level: it leaves out the variance between training seeds, which a study
    adds. A resample in which a metric is undefined (no positive drawn, say) is left out of that
    metric's interval.

    Args:
        labels: ``(N,)`` 0 / 1.
        scores: ``{classifier: (N,) P(malignant)}``.
        thresholds: ``{classifier: threshold}``.
        seed: seed of the resamples (``bootstrap_seed(split)``).
        draws: resamples (at least 1,000 for a 95% interval).
        confidence: coverage of the interval.

    Returns:
        ``{classifier: {metric: (low, high)}}``; NaN bounds when no resample defines the metric.
    """
    labels = np.asarray(labels)
    n = len(labels)
    rng = np.random.default_rng(seed)
    values: dict[str, dict[str, list[np.ndarray]]] = {c: {m: [] for m in METRICS} for c in scores}
    chunk = max(1, min(draws, BOOTSTRAP_CHUNK // max(n, 1)))
    for start in range(0, draws if n else 0, chunk):
        counts = resample_counts(n, min(chunk, draws - start), rng)
        for classifier, p in scores.items():
            for metric, v in weighted_metrics(labels, p, counts, thresholds[classifier]).items():
                values[classifier][metric].append(v)
    return {
        c: {m: percentile_interval(np.concatenate(v) if v else np.zeros(0), confidence) for m, v in per_metric.items()}
        for c, per_metric in values.items()
    }
