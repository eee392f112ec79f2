"""Intervals that carry both sources of noise (``seedstats.shared_sample_difference``): coverage on
simulated studies, the plain seed-level interval under-covering when seeds agree, one test sample
never significant, power and seeds needed."""

from __future__ import annotations

import math

import numpy as np
import pytest

from nodulab.common.seedstats import balanced_accuracy_by_seed, shared_sample_difference

TRUE_A, TRUE_B = 0.75, 0.70
"""Population accuracies of the two simulated losses: the true difference is 0.05."""


def _study(rng: np.random.Generator, seeds: int, sigma: float, samples: int = 400, jitter: float = 0.02):
    """One simulated study: a fresh test set (latent difficulty ``x``, balanced labels), and per loss
    and seed the samples it gets right: ``x + jitter noise < accuracy + seed effect (SD sigma)``. The
    population balanced accuracy of a loss is its accuracy on average over seeds."""
    x = rng.uniform(size=samples)
    labels = np.arange(samples) % 2

    def runs(accuracy: float) -> np.ndarray:
        effect = rng.normal(0, sigma, size=(seeds, 1))
        return (x + rng.normal(0, jitter, size=(seeds, samples)) < accuracy + effect).astype(float)

    return runs(TRUE_A), runs(TRUE_B), labels


@pytest.mark.parametrize("seeds", [3, 5])
@pytest.mark.parametrize("sigma", [0.002, 0.04], ids=["seeds-agree", "seeds-vary"])
def test_the_interval_covers_in_every_regime_and_the_plain_one_does_not_when_seeds_agree(
    seeds: int, sigma: float
) -> None:
    rng = np.random.default_rng(seeds * 1000 + int(sigma * 1000))
    reps, new, plain = 1500, 0, 0
    for _ in range(reps):
        tested = shared_sample_difference(*_study(rng, seeds, sigma))
        low, high = tested.interval()
        new += low <= TRUE_A - TRUE_B <= high
        plain += tested.seeds_low <= TRUE_A - TRUE_B <= tested.seeds_high
    assert abs(new / reps - 0.95) <= 0.04, new / reps
    if sigma < 0.01:  # the test set's noise is shared by every seed: the seed-level interval misses it
        assert plain / reps < 0.85, plain / reps


def test_one_test_sample_is_never_significant() -> None:
    """Three seeds whose paired differences are all the same single sample: zero seed variance."""
    labels = np.arange(400) % 2
    reference = np.zeros((3, 400))
    reference[:, :300] = 1
    better = reference.copy()
    better[:, 350] = 1  # one more sample right, the same one in every seed
    tested = shared_sample_difference(better, reference, labels)
    assert tested.se_seeds == 0 and tested.mean == pytest.approx(1 / 400)  # one sample of 200 in one class
    assert tested.seeds_low == tested.seeds_high  # the plain interval is a point: p would be 0
    assert not tested.claimed() and tested.p > 0.05
    many = reference.copy()
    many[:, 300:] = 1  # 100 more samples right: claimed
    assert shared_sample_difference(many, reference, labels).claimed()


def test_matches_a_naive_loop() -> None:
    rng = np.random.default_rng(0)
    a, b = ((rng.random((4, 60)) < p).astype(float) for p in (0.8, 0.6))
    labels = np.r_[np.zeros(20), np.ones(40)]
    tested = shared_sample_difference(a, b, labels)
    seeds = [
        np.mean([a[s, labels == c].mean() for c in (0, 1)]) - np.mean([b[s, labels == c].mean() for c in (0, 1)])
        for s in range(4)
    ]
    assert tested.mean == pytest.approx(np.mean(seeds))
    assert tested.se_seeds == pytest.approx(np.std(seeds, ddof=1) / 2)
    d = a - b
    variance = 0.0
    for c in (0, 1):
        part = d[:, labels == c]
        k, m = part.shape
        rows = part.mean(axis=0)
        residual = [[part[s, i] - rows[i] - part[s].mean() + part.mean() for i in range(m)] for s in range(k)]
        interaction = sum(r * r for row in residual for r in row) / ((k - 1) * (m - 1))
        variance += max(0.0, np.var(rows, ddof=1) - interaction / k) / m
    assert tested.se_test == pytest.approx(math.sqrt(variance) / 2)
    assert balanced_accuracy_by_seed(a, labels) == pytest.approx(
        [np.mean([a[s, labels == c].mean() for c in (0, 1)]) for s in range(4)]
    )


def test_power_and_seeds_needed() -> None:
    rng = np.random.default_rng(3)
    tested = shared_sample_difference(*_study(rng, 3, 0.04))
    assert tested.detectable() > tested.half_width()  # 80% power needs more than the interval's reach
    effect = 1.2 * tested.detectable()
    needed = tested.seeds_needed(effect)
    assert needed is not None and needed <= 3
    more = tested.seeds_needed(effect / 3)
    assert more is not None and more > 3
    tiny = tested.se_test  # below the test set's own noise: no number of seeds resolves it
    assert tested.seeds_needed(tiny) is None


def test_unpaired_runs_on_the_same_samples() -> None:
    rng = np.random.default_rng(1)
    a, b, labels = _study(rng, 5, 0.02)
    tested = shared_sample_difference(a, b[:3], labels, paired=False)
    assert tested.n == 3 and math.isfinite(tested.half_width())
    with pytest.raises(ValueError, match="same seeds"):
        shared_sample_difference(a, b[:3], labels)
