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
from scipy import optimize, stats

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


# ----------------------------------------------------------------------------- seeds and the test set
POWER = 0.80
"""Power at which the smallest detectable difference is stated."""
MAX_SEEDS = 1_000
"""Most seeds ``SharedSampleDifference.seeds_needed`` looks for."""


def balanced_accuracy_by_seed(correct: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per seed (rows of ``correct``, shape ``(seeds, samples)``, 1 = right), the mean over classes of
    the share right in each class of ``labels``."""
    classes = np.unique(labels)
    return np.mean([correct[:, labels == c].mean(axis=1) for c in classes], axis=0)


@dataclass(frozen=True)
class SharedSampleDifference:
    """A difference of balanced accuracy between two sets of runs scored on the same test samples,
    with an interval that carries both sources of noise.

    Every seed is scored on one fixed test set, so the test set's sampling noise does not average
    out over seeds: the standard error is ``sqrt(se_seeds² + se_test²)``, where ``se_seeds`` is the
    between-seed part (the paired differences' SD / sqrt(n), or Welch's for unpaired runs) and
    ``se_test`` the test set's (delta method over samples: per class, the variance over its samples
    of the per-sample difference averaged over seeds, the same samples for both sides, less the
    seed-by-sample interaction the seeds' part already holds). The interval adds each part's
    t half-width in quadrature (``half_width``); the plain seed-level t-interval (``seeds_low``,
    ``seeds_high``) is kept beside it. ``df`` is the seeds' part's degrees of freedom (``n - 1``,
    Welch's when unpaired), ``df_test`` the test set's.
    """

    n: int
    mean: float
    se_seeds: float
    se_test: float
    df: float
    samples: int
    seeds_low: float
    seeds_high: float
    sd_seeds: float = math.nan
    df_test: float = math.nan
    one_sample: float = math.nan
    """The most one test sample moves balanced accuracy: ``1 / (classes × smallest class)``."""

    @property
    def se(self) -> float:
        """The total standard error (both parts)."""
        return math.hypot(self.se_seeds, self.se_test) if math.isfinite(self.se_seeds) else math.nan

    def half_width(self, level: float = LEVEL) -> float:
        """Half-width at ``level``: each part's t half-width (the seeds' with ``n - 1`` degrees of
        freedom, Welch's when unpaired; the test set's with its samples'), added in quadrature. It is
        the seed-level t-interval when the test set adds nothing and the test set's when the seeds
        agree, and never narrower than either."""
        if not (math.isfinite(self.se_seeds) and math.isfinite(level)):
            return math.nan
        return math.hypot(
            _t_half_width(self.se_seeds, self.df, level), _t_half_width(self.se_test, self.df_test, level)
        )

    @property
    def p(self) -> float:
        """Two-sided p of ``mean == 0``: one minus the level whose interval just reaches 0 (1 when there
        is no noise and no difference, 0 when there is a difference and no noise)."""
        if not math.isfinite(self.se):
            return math.nan
        if self.se == 0:
            return 1.0 if self.mean == 0 else 0.0
        if self.mean == 0:
            return 1.0
        if self.half_width(1 - 1e-15) <= abs(self.mean):
            return 0.0
        return 1 - float(optimize.brentq(lambda level: self.half_width(level) - abs(self.mean), 0.0, 1 - 1e-15))

    @property
    def smallest(self) -> float:
        """The smallest effect of interest: one test sample (``one_sample``, else ``1 / samples``); a
        difference no larger (up to rounding) is never called significant."""
        if math.isfinite(self.one_sample):
            return self.one_sample * (1 + 1e-9)
        return 1.0 / self.samples * (1 + 1e-9) if self.samples else math.nan

    def interval(self, level: float = LEVEL) -> tuple[float, float]:
        half = self.half_width(level)
        return self.mean - half, self.mean + half

    def claimed(self, level: float = LEVEL) -> bool:
        """The ``level`` interval excludes 0 and the difference exceeds one test sample."""
        low, high = self.interval(level)
        return (low > 0 or high < 0) and abs(self.mean) > self.smallest

    def detectable(self, level: float = LEVEL, power: float = POWER) -> float:
        """The smallest difference this design detects with ``power`` at two-sided ``level``."""
        return _detectable(self.se_seeds, self.df, self.se_test, self.df_test, level, power)

    def seeds_needed(self, effect: float, level: float = LEVEL, power: float = POWER) -> int | None:
        """About how many seeds would detect ``effect`` with ``power`` (the measured between-seed SD and
        the same test set); None when the test set's noise alone prevents it or nothing is measured."""
        if not (math.isfinite(self.sd_seeds) and math.isfinite(effect)) or effect == 0:
            return None

        def reaches(n: int) -> bool:
            detectable = _detectable(self.sd_seeds / math.sqrt(n), n - 1, self.se_test, self.df_test, level, power)
            return detectable <= abs(effect)

        if not reaches(MAX_SEEDS):
            return None
        low, high = 1, MAX_SEEDS  # reaches(high); the detectable difference falls with n: bisect
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (low, middle) if reaches(middle) else (middle, high)
        return max(2, high)


def _detectable(se_seeds: float, df_seeds: float, se_test: float, df_test: float, level: float, power: float) -> float:
    """(t at ``level`` + t at ``power``) times each part's standard error, added in quadrature."""
    if not (math.isfinite(se_seeds) and df_seeds > 0):
        return math.nan
    seeds = float(stats.t.ppf(0.5 + level / 2, df_seeds) + stats.t.ppf(power, df_seeds)) * se_seeds
    test = float(stats.t.ppf(0.5 + level / 2, df_test) + stats.t.ppf(power, df_test)) * se_test
    return math.hypot(seeds, test)


def _satterthwaite(se_a: float, df_a: float, se_b: float, df_b: float) -> float:
    """Welch–Satterthwaite degrees of freedom of ``sqrt(se_a² + se_b²)``."""
    total = se_a**2 + se_b**2
    if total == 0:
        return max(df_a, df_b)
    parts = (se_a**4 / df_a if df_a > 0 else 0.0) + (se_b**4 / df_b if df_b > 0 else 0.0)
    return total**2 / parts if parts > 0 else max(df_a, df_b)


def _interaction(x: np.ndarray) -> float:
    """The seed-by-sample interaction mean square of a ``(seeds, samples)`` array (two-way, no replicates)."""
    seeds, samples = x.shape
    if seeds < 2 or samples < 2:
        return 0.0
    residual = x - x.mean(axis=0, keepdims=True) - x.mean(axis=1, keepdims=True) + x.mean()
    return float((residual**2).sum() / ((seeds - 1) * (samples - 1)))


def shared_sample_difference(
    correct_a: np.ndarray, correct_b: np.ndarray, labels: np.ndarray, *, paired: bool = True, level: float = LEVEL
) -> SharedSampleDifference:
    """Balanced accuracy of ``a`` minus ``b``, over seeds and the shared test samples.

    Args:
        correct_a, correct_b: ``(seeds, samples)`` arrays, 1 where a run got a sample right; the
            same samples (columns) on both sides. ``paired``: row ``s`` of each side is seed ``s``
            (the same number of rows); else the two sides are independent runs (Welch).
        labels: the samples' classes.
        level: the level of the plain seed-level interval kept beside.
    """
    a, b = np.asarray(correct_a, dtype=float), np.asarray(correct_b, dtype=float)
    labels = np.asarray(labels)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or a.shape[1] != len(labels):
        raise ValueError("shared_sample_difference: both sides need (seeds, samples) arrays over the same samples")
    if paired and a.shape[0] != b.shape[0]:
        raise ValueError("shared_sample_difference: paired sides need the same seeds")
    ba_a, ba_b = balanced_accuracy_by_seed(a, labels), balanced_accuracy_by_seed(b, labels)
    mean = float(ba_a.mean() - ba_b.mean())
    classes = np.unique(labels)
    sizes = np.array([(labels == c).sum() for c in classes])
    sides = [a - b] if paired else [a, b]
    variance = 0.0
    for c, size in zip(classes, sizes):
        if size < 2:
            continue
        per_sample = sum(sign * side[:, labels == c].mean(axis=0) for sign, side in zip((1, -1), sides))
        # the samples' share only: each side's seed-by-sample interaction (already in the seeds' part) taken out
        interaction = sum(_interaction(side[:, labels == c]) / len(side) for side in sides)
        variance += max(0.0, per_sample.var(ddof=1) - interaction) / size
    se_test = math.sqrt(variance) / len(classes)
    df_test = float(max(1, int(sizes.sum()) - len(classes)))
    if paired:
        n = len(ba_a)
        plain = paired_test(ba_a - ba_b, level)
        sd = float((ba_a - ba_b).std(ddof=1)) if n > 1 else math.nan
        se_seeds, df_seeds, low, high = plain.se, n - 1, plain.low, plain.high
    else:
        n = min(len(ba_a), len(ba_b))
        _, low, high = welch_difference(ba_a, ba_b, level)
        if len(ba_a) > 1 and len(ba_b) > 1:
            va, vb = ba_a.var(ddof=1) / len(ba_a), ba_b.var(ddof=1) / len(ba_b)
            se_seeds = math.sqrt(va + vb)
            df_seeds = _satterthwaite(math.sqrt(va), len(ba_a) - 1, math.sqrt(vb), len(ba_b) - 1)
            sd = se_seeds * math.sqrt(n)
        else:
            se_seeds, df_seeds, sd = math.nan, 0, math.nan
    one_sample = 1.0 / (len(classes) * int(sizes.min()))
    return SharedSampleDifference(
        n, mean, se_seeds, se_test, float(df_seeds), len(labels), low, high, sd, df_test, one_sample
    )
