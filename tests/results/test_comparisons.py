"""Comparisons from per-sample predictions: one set of seeds per comparison, Holm over the declared
family only, like-for-like readouts, and the seed-level fallback for stores without predictions."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from nodulab.common.seedstats import balanced_accuracy_by_seed
from nodulab.results.comparisons import Hypotheses, comparisons, gaps_with_test_noise, hypotheses_of

ROWS = 200
LOSSES = {"ce": ("head", 0.70), "supcon": ("probe", 0.80), "simclr": ("probe", 0.70)}


def _tables(seeds: dict[str, list[int]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """metrics and predictions of selected runs: per loss its readout right on a share of the samples
    (plus the probe and dfr of every loss), on size-confound's test_conflict and test_iid."""
    rng = np.random.default_rng(0)
    x = rng.uniform(size=ROWS)
    labels = np.arange(ROWS) % 2
    metrics, predictions = [], []
    for loss, (own, accuracy) in LOSSES.items():
        for seed in seeds[loss]:
            for split in ("test_conflict", "test_iid"):
                for classifier in dict.fromkeys((own, "probe", "dfr")):
                    right = x + rng.normal(0, 0.05, ROWS) < accuracy + rng.normal(0, 0.01)
                    predicted = np.where(right, labels, 1 - labels)
                    keys = {"scenario": "size-confound", "loss": loss, "seed": seed, "draw": 0, "selected": 1}
                    keys |= {"dataset": "size-confound", "split": split, "classifier": classifier}
                    recall = [float((predicted[labels == c] == c).mean()) for c in (0, 1)]
                    metrics.append({**keys, "metric": "balanced_accuracy", "value": float(np.mean(recall))})
                    predictions.append(
                        pd.DataFrame({**keys, "row": np.arange(ROWS), "label": labels, "predicted": predicted})
                    )
    return pd.DataFrame(metrics), pd.concat(predictions, ignore_index=True)


READOUTS = {loss: own for loss, (own, _) in LOSSES.items()}
DECLARED = Hypotheses(("size-confound/test_conflict",))


def test_the_means_and_the_test_use_the_same_seeds() -> None:
    """A loss whose seed 3 failed is compared with ce over seeds 0-2 only: its mean, ce's and the difference."""
    metrics, predictions = _tables({"ce": [0, 1, 2, 3], "supcon": [0, 1, 2], "simclr": [0, 1, 2, 3]})
    found = comparisons(metrics, predictions, READOUTS, DECLARED)
    row = found[(found["readout_mode"] == "own") & (found["loss"] == "supcon") & (found["split"] == "test_conflict")]
    row = row.iloc[0]
    ce = metrics[(metrics["loss"] == "ce") & (metrics["classifier"] == "head") & (metrics["split"] == "test_conflict")]
    assert row["n"] == 3
    assert row["reference_mean"] == ce[ce["seed"] < 3]["value"].mean() != ce["value"].mean()
    assert row["mean"] == row["loss_mean"] - row["reference_mean"]
    assert row["test_noise"] and row["smallest"] == pytest.approx(1 / ROWS)  # one sample in a class of ROWS / 2


def test_holm_counts_only_the_declared_family_and_nothing_else_is_significant() -> None:
    metrics, predictions = _tables({loss: [0, 1, 2, 3, 4] for loss in LOSSES})
    found = comparisons(metrics, predictions, READOUTS, DECLARED)
    primary = found[found["primary"]]
    assert set(primary["readout_mode"]) == {"own"} and set(primary["split"]) == {"test_conflict"}
    assert len(primary) == 2 and primary["p_holm"].notna().all()
    assert found.loc[~found["primary"], "p_holm"].isna().all()
    assert not found.loc[~found["primary"], "significant"].any()
    supcon = primary[primary["loss"] == "supcon"].iloc[0]
    assert supcon["significant"] and supcon["holm_low"] > 0
    assert supcon["p_holm"] == pytest.approx(min(1.0, 2 * supcon["p"]))  # the smaller of 2 p-values: m = 2
    assert supcon["detectable"] > 0 and supcon["seeds_needed"] <= 5
    undeclared = comparisons(metrics, predictions, READOUTS, Hypotheses())
    assert not undeclared["significant"].any() and not undeclared["primary"].any()


def test_probe_and_dfr_compare_every_loss_like_for_like() -> None:
    metrics, predictions = _tables({loss: [0, 1, 2] for loss in LOSSES})
    found = comparisons(metrics, predictions, READOUTS, DECLARED)
    for mode in ("probe", "dfr"):
        part = found[found["readout_mode"] == mode]
        assert set(part["readout"]) == {mode} and set(part["reference_readout"]) == {mode}
        assert set(part["loss"]) == {"supcon", "simclr"}
    own = found[found["readout_mode"] == "own"]
    assert set(own["reference_readout"]) == {"head"} and set(own["readout"]) == {"probe"}


def test_without_predictions_the_seed_level_interval_is_used_and_said() -> None:
    metrics, _ = _tables({loss: [0, 1, 2] for loss in LOSSES})
    found = comparisons(metrics, None, READOUTS, DECLARED)
    assert len(found) and not found["test_noise"].any()
    assert np.allclose(found["low"], found["seeds_low"]) and np.allclose(found["high"], found["seeds_high"])


def test_hypotheses_are_read_from_the_study_record() -> None:
    record = {"hypotheses": {"comparisons": ["a/test_x"], "reference": "ce", "readout": "probe"}}
    assert hypotheses_of(record) == Hypotheses(("a/test_x",), "ce", "probe")
    assert not hypotheses_of({}).declared


def test_three_seeds_one_test_sample_apart_are_not_significant() -> None:
    """supcon gets exactly one more test sample right than ce in each of 3 seeds (the same sample):
    the seed-level differences are identical (zero variance), yet nothing is claimed."""
    metrics, predictions = _tables({"ce": [0, 1, 2], "supcon": [0, 1, 2], "simclr": [0, 1, 2]})
    ce = predictions[(predictions["loss"] == "ce") & (predictions["classifier"] == "head")]
    for seed in (0, 1, 2):
        for split in ("test_conflict", "test_iid"):
            mine = ce[(ce["seed"] == seed) & (ce["split"] == split)].copy()
            wrong = mine.index[mine["predicted"] != mine["label"]][0]
            mine.loc[wrong, "predicted"] = mine.loc[wrong, "label"]
            keep = (predictions["loss"] == "supcon") & (predictions["seed"] == seed) & (predictions["split"] == split)
            keep &= predictions["classifier"] == "probe"
            predictions.loc[keep, "predicted"] = mine["predicted"].to_numpy()
    found = comparisons(metrics, predictions, READOUTS, DECLARED)
    row = found[(found["readout_mode"] == "own") & (found["loss"] == "supcon") & (found["split"] == "test_conflict")]
    row = row.iloc[0]
    assert row["primary"] and row["n"] == 3 and row["mean"] == pytest.approx(1 / ROWS)  # one sample of 100 in a class
    assert row["seeds_low"] == pytest.approx(row["seeds_high"])  # the plain interval is a point away from 0
    assert not row["significant"]


def test_a_ceiling_gap_carries_the_test_sets_noise() -> None:
    """The ceiling's runs (clean) scored on size-confound's images: unpaired runs, shared samples."""
    _, predictions = _tables({"ce": [0, 1, 2], "supcon": [0, 1, 2], "simclr": [0, 1, 2]})
    own = predictions[(predictions["loss"] == "ce") & (predictions["classifier"] == "head")]
    own = own[own["split"] == "test_conflict"]
    top = own.assign(scenario="clean", seed=own["seed"] + 10)  # other runs, the same images
    top.loc[top["row"] < 30, "predicted"] = top.loc[top["row"] < 30, "label"]  # the ceiling gets more right
    gaps = pd.DataFrame(
        [{"scenario": "size-confound", "split": "test_conflict", "loss": "ce", "readout": "head"}]
    ).assign(ceiling_loss="ce", ceiling="clean", gap=np.nan, gap_low=np.nan, gap_high=np.nan)
    found = gaps_with_test_noise(gaps, pd.concat([own, top]), READOUTS).iloc[0]
    labels = own[own["seed"] == 0]["label"].to_numpy()
    matrix = lambda f: f.pivot(index="seed", columns="row", values="predicted").to_numpy() == labels  # noqa: E731
    expected = (
        balanced_accuracy_by_seed(matrix(top), labels).mean() - balanced_accuracy_by_seed(matrix(own), labels).mean()
    )
    assert found["gap_test_noise"] and found["gap"] == pytest.approx(expected) and expected > 0
    assert found["gap_low"] < found["gap"] < found["gap_high"]
    without = gaps_with_test_noise(gaps, None, READOUTS).iloc[0]
    assert not without["gap_test_noise"] and np.isnan(without["gap_low"])  # left as ceiling_gaps gave it
