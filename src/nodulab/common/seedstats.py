"""Statistics over training seeds: summaries, paired and Welch t-intervals, Holm's correction.

A study trains every (scenario, loss) with several seeds; a seed is the unit of replication, so
every interval here is over seeds (a run's own bootstrap interval, over test samples, leaves the
seed-to-seed variance out). Intervals are Student t; with fewer than two values they are NaN.
Numpy and scipy only (no torch), so ``nodulab report`` stays light.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from scipy import stats

LEVEL = 0.95
"""Confidence level of every seed-level interval."""


@dataclass(frozen=True)
class SeedSummary:
    """Mean over seeds with its sample SD and two-sided t-interval (NaN when ``n < 2``)."""

    n: int
    mean: float
    sd: float
    low: float
    high: float


def _finite(values: Iterable[float]) -> np.ndarray:
    x = np.asarray(list(values), dtype=float)
    return x[np.isfinite(x)]


def _t_half_width(se: float, df: float, level: float) -> float:
    """Half-width of a two-sided t-interval; 0 when the standard error is 0."""
    return 0.0 if se == 0 else float(stats.t.ppf(0.5 + level / 2, df)) * se


def seed_summary(values: Iterable[float], level: float = LEVEL) -> SeedSummary:
    """n, mean, SD and the ``level`` t-interval of the mean over seeds (NaN values are left out).

    Args:
        values: one number per seed.
        level: confidence level of the interval.
    """
    x = _finite(values)
    n = len(x)
    if n == 0:
        return SeedSummary(0, math.nan, math.nan, math.nan, math.nan)
    mean = float(x.mean())
    if n < 2:
        return SeedSummary(1, mean, math.nan, math.nan, math.nan)
    sd = float(x.std(ddof=1))
    half = _t_half_width(sd / math.sqrt(n), n - 1, level)
    return SeedSummary(n, mean, sd, mean - half, mean + half)


@dataclass(frozen=True)
class PairedTest:
    """A one-sample t-test of paired differences (per seed: a loss minus the reference)."""

    n: int
    mean: float
    se: float
    low: float
    high: float
    p: float

    def interval(self, level: float) -> tuple[float, float]:
        """The t-interval of the mean difference at ``level`` (NaN with fewer than two pairs)."""
        if self.n < 2 or not math.isfinite(level):
            return math.nan, math.nan
        half = _t_half_width(self.se, self.n - 1, level)
        return self.mean - half, self.mean + half


def paired_test(differences: Iterable[float], level: float = LEVEL) -> PairedTest:
    """Mean of per-seed differences, its t-interval and the two-sided p of ``mean == 0``.

    Identical differences have standard error 0: the interval is the point, and p is 0 (or 1
    when every difference is 0), which keeps "interval excludes 0" and "p < level" the same.
    """
    d = _finite(differences)
    n = len(d)
    if n < 2:
        mean = float(d.mean()) if n else math.nan
        return PairedTest(n, mean, math.nan, math.nan, math.nan, math.nan)
    mean, se = float(d.mean()), float(d.std(ddof=1)) / math.sqrt(n)
    if se == 0:
        p = 1.0 if mean == 0 else 0.0
    else:
        p = float(2 * stats.t.sf(abs(mean / se), n - 1))
    test = PairedTest(n, mean, se, math.nan, math.nan, p)
    low, high = test.interval(level)
    return PairedTest(n, mean, se, low, high, p)


def welch_difference(a: Iterable[float], b: Iterable[float], level: float = LEVEL) -> tuple[float, float, float]:
    """mean(a) − mean(b) and its Welch t-interval (independent samples, unequal variances).

    Returns ``(difference, low, high)``; the bounds are NaN unless both samples have two values.
    """
    x, y = _finite(a), _finite(b)
    if len(x) == 0 or len(y) == 0:
        return math.nan, math.nan, math.nan
    difference = float(x.mean() - y.mean())
    if len(x) < 2 or len(y) < 2:
        return difference, math.nan, math.nan
    vx, vy = x.var(ddof=1) / len(x), y.var(ddof=1) / len(y)
    se = math.sqrt(vx + vy)
    if se == 0:
        return difference, difference, difference
    df = (vx + vy) ** 2 / (vx**2 / (len(x) - 1) + vy**2 / (len(y) - 1))
    half = _t_half_width(se, df, level)
    return difference, difference - half, difference + half


def _holm_order(pvalues: Iterable[float]) -> tuple[np.ndarray, np.ndarray]:
    """The p-values as an array, and the indices of the finite ones in ascending order (stable)."""
    p = np.asarray(list(pvalues), dtype=float)
    finite = np.flatnonzero(np.isfinite(p))
    return p, finite[np.argsort(p[finite], kind="stable")]


def holm(pvalues: Iterable[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values: monotone in the raw ones, capped at 1.

    The k-th smallest of m p-values becomes ``max over j <= k of min(1, (m - j + 1) p_(j))``.
    NaN p-values (comparisons not tested) stay NaN and do not count in m.
    """
    p, order = _holm_order(pvalues)
    adjusted = np.full(p.shape, np.nan)
    m = len(order)
    scaled = (m - np.arange(m)) * p[order]
    adjusted[order] = np.minimum(1.0, np.maximum.accumulate(scaled))
    return adjusted


def holm_levels(pvalues: Iterable[float], alpha: float = 0.05) -> np.ndarray:
    """Per comparison, the significance level Holm's procedure held it to.

    The k-th smallest p is tested at ``alpha / (m - k + 1)`` while every smaller one was rejected;
    from the first comparison Holm keeps onwards, every later one gets that comparison's level. A
    t-interval at ``1 - level`` then excludes 0 exactly when the Holm-adjusted p is below
    ``alpha``, so a corrected interval and an adjusted p never disagree. NaN for NaN p-values.
    """
    p, order = _holm_order(pvalues)
    levels = np.full(p.shape, np.nan)
    m = len(order)
    steps = alpha / (m - np.arange(m))
    kept = np.flatnonzero(p[order] >= steps)
    if len(kept):
        steps[kept[0] :] = steps[kept[0]]
    levels[order] = steps
    return levels
