"""Seed-level statistics and the findings sentences, on made-up stores where the truth is known."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from fake_study import make_study, manifest
from nodulab.common.seedstats import holm_levels, paired_test, welch_difference
from nodulab.results.comparisons import comparisons, hypotheses_of
from nodulab.results.findings import findings, holm, reliance_sentences, seed_summary
from nodulab.results.seed_tables import (
    ceiling_gaps,
    conflict_splits,
    confounds_of,
    implied_ceilings,
    matched_scores,
    own_scores,
    readout_map,
    reliance_summary,
)
from nodulab.results.store import STORE_FILE, Store

T_975_DF2 = 4.302652729911275  # Student t quantile 0.975 with 2 degrees of freedom


def noise(scenario: str, loss: str, seed: int, split: str) -> float:
    """A fixed pseudo-random number per cell, SD about 0.02."""
    return 0.02 * np.random.default_rng([seed, sum(map(ord, scenario + loss + split))]).standard_normal()


def scored(lead: float, spread: float = 1.0):
    """ce 0.6 on the conflict split; supcon ``lead`` above it; everything else near 0.95."""

    def score(scenario: str, loss: str, seed: int, split: str) -> float:
        base = 0.6 if split == "test_conflict" and scenario != "clean" else 0.95
        return (
            base
            + (lead if loss == "supcon" and split == "test_conflict" else 0.0)
            + spread * noise(scenario, loss, seed, split)
        )

    return score


def sentences_of(root: Path) -> list[str]:
    with Store(root / STORE_FILE) as store:
        return findings(
            store.table("metrics"),
            store.manifests(),
            store.table("reliance"),
            predictions=store.table("predictions"),
            hypotheses=hypotheses_of(store.study_config()),
        )


def test_seed_summary_is_a_t_interval_over_seeds() -> None:
    s = seed_summary([1.0, 2.0, 3.0, float("nan")])
    assert (s.n, s.mean, s.sd) == (3, 2.0, 1.0)
    half = T_975_DF2 / math.sqrt(3)
    assert s.low == pytest.approx(2 - half) and s.high == pytest.approx(2 + half)
    one = seed_summary([0.7])
    assert one.n == 1 and one.mean == 0.7 and math.isnan(one.sd) and math.isnan(one.low) and math.isnan(one.high)
    assert seed_summary([]).n == 0 and math.isnan(seed_summary([]).mean)


def naive_holm(p: list[float]) -> list[float]:
    """Holm by its definition: the k-th smallest gets the largest (m - j + 1) p_(j) over j <= k, capped at 1."""
    finite = [i for i, x in enumerate(p) if not math.isnan(x)]
    ranked = sorted(finite, key=lambda i: (p[i], i))
    m, out = len(ranked), [float("nan")] * len(p)
    for k, i in enumerate(ranked):
        out[i] = min(1.0, max((m - j) * p[ranked[j]] for j in range(k + 1)))
    return out


def holm_rejects(p: list[float], alpha: float) -> set[int]:
    """Holm's step-down procedure run literally: reject in order while p_(k) <= alpha / (m - k + 1)."""
    ranked = sorted((i for i, x in enumerate(p) if not math.isnan(x)), key=lambda i: (p[i], i))
    rejected: set[int] = set()
    for k, i in enumerate(ranked):
        if p[i] > alpha / (len(ranked) - k):
            break
        rejected.add(i)
    return rejected


@pytest.mark.parametrize("seed", range(6))
def test_holm_matches_a_naive_loop_and_the_procedure(seed: int) -> None:
    rng = np.random.default_rng(seed)
    p = list(rng.uniform(0, 0.1, 12) ** rng.uniform(0.5, 2))
    p[3] = p[7]  # a tie
    p[5] = float("nan")  # not tested
    adjusted = holm(p)
    np.testing.assert_allclose(adjusted, naive_holm(p), equal_nan=True)
    finite = [i for i in range(12) if i != 5]
    assert all(adjusted[i] <= 1 and adjusted[i] >= p[i] for i in finite)
    by_raw = sorted(finite, key=lambda i: p[i])
    assert all(np.diff(adjusted[by_raw]) >= 0)  # monotone in the raw p-values
    near = [a * (1 + e) for a in adjusted[finite] for e in (-1e-9, 1e-9)]  # either side of each step
    for alpha in (0.01, 0.05, 0.1, *near):
        assert holm_rejects(p, alpha) == {i for i in finite if adjusted[i] <= alpha}


def test_holm_caps_at_one_and_keeps_nan() -> None:
    assert list(holm([0.5, 0.9])) == [1.0, 1.0]
    assert math.isnan(holm([float("nan"), 0.01])[0]) and holm([float("nan"), 0.01])[1] == 0.01
    assert holm([]).shape == (0,)


@pytest.mark.parametrize("seed", range(8))
def test_holm_levels_make_the_corrected_interval_agree_with_the_adjusted_p(seed: int) -> None:
    rng = np.random.default_rng(seed)
    tests = [paired_test(rng.normal(rng.uniform(-0.05, 0.05), 0.03, int(rng.integers(3, 7)))) for _ in range(10)]
    p = [t.p for t in tests]
    for t, level, adjusted in zip(tests, holm_levels(p), holm(p)):
        low, high = t.interval(1 - level)
        assert (low > 0 or high < 0) == (adjusted < 0.05)


def test_holm_levels_hold_after_the_first_kept_comparison() -> None:
    assert list(holm_levels([0.01, 0.04])) == [0.025, 0.05]  # both rejected
    # 0.03 is kept at 0.025, so 0.04 is held to 0.025 too (at 0.05 its own interval would exclude 0)
    assert list(holm_levels([0.04, 0.03])) == [0.025, 0.025]
    assert math.isnan(holm_levels([float("nan"), 0.01])[0])


def test_paired_and_welch_intervals_match_scipy() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.normal(0.7, 0.03, 5), rng.normal(0.6, 0.05, 5)
    mine, theirs = paired_test(a - b), stats.ttest_rel(a, b)
    assert mine.p == pytest.approx(theirs.pvalue)
    assert (mine.low, mine.high) == pytest.approx(tuple(theirs.confidence_interval(0.95)))
    c = rng.normal(0.5, 0.1, 4)
    welch = stats.ttest_ind(a, c, equal_var=False).confidence_interval(0.95)
    assert welch_difference(a, c) == pytest.approx((a.mean() - c.mean(), welch.low, welch.high))
    assert paired_test([0.25, 0.25, 0.25]).p == 0.0 and paired_test([0.0, 0.0, 0.0]).p == 1.0
    assert all(math.isnan(x) for x in welch_difference([0.5], c)[1:])


@pytest.fixture(scope="module")
def clear_lead(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_study(
        tmp_path_factory.mktemp("lead"),
        scored(0.2),
        losses=("ce", "supcon"),
        flips=lambda loss, seed: (0.1, 0.8) if loss == "ce" else (0.7, 0.2),
    )


def test_ce_gap_to_the_matched_ceiling_on_the_same_images_with_its_welch_interval(clear_lead: Path) -> None:
    score = scored(0.2)
    ce = np.array([score("size-confound", "ce", s, "test_conflict") for s in range(5)])
    top = np.array([score("clean", "ce", s, "test_conflict") for s in range(5)])  # clean's runs, the same images
    gap = stats.ttest_ind(top, ce, equal_var=False).confidence_interval(0.95)
    half_ce, half_top = (stats.t.ppf(0.975, 4) * x.std(ddof=1) / math.sqrt(5) for x in (ce, top))
    expected = (
        f"On size-confound/test_conflict, ce (head) reaches balanced accuracy {ce.mean():.2f} "
        f"[{ce.mean() - half_ce:.2f}, {ce.mean() + half_ce:.2f}] against its matched ceiling {top.mean():.2f} "
        f"[{top.mean() - half_top:.2f}, {top.mean() + half_top:.2f}] (clean's ce on the same images): a gap of "
        f"{top.mean() - ce.mean():.2f} (95% CI {gap.low:.2f} to {gap.high:.2f})."
    )
    assert expected in sentences_of(clear_lead)


def test_a_clear_lead_is_claimed_and_reliance_is_named(clear_lead: Path) -> None:
    text = " ".join(sentences_of(clear_lead))
    assert "supcon (probe) keeps the most" in text
    assert "significant after Holm correction over the declared family" in text
    assert "ce (head; excess flip rate confound 0.75 vs cue 0.05 over null 0.05" in text
    assert "relies on the confound" in text
    assert "supcon (probe; excess flip rate confound 0.15 vs cue 0.65 over null 0.05" in text
    assert "relies on the label cue" in text
    assert "cannot tell" not in text and "Declared hypotheses" in text


def test_a_lead_within_noise_is_not_resolved_and_says_what_could_be_detected(tmp_path: Path) -> None:
    text = " ".join(sentences_of(make_study(tmp_path, scored(0.005, spread=2.0), losses=("ce", "supcon"))))
    assert "keeps the most" in text and "not resolved: detectable ≥" in text and "with 5 seeds" in text
    assert "significant after Holm correction" not in text and "within noise" not in text


def test_without_declared_hypotheses_nothing_is_significant(tmp_path: Path) -> None:
    text = " ".join(sentences_of(make_study(tmp_path, scored(0.3), losses=("ce", "supcon"), hypotheses=False)))
    assert "declares no hypotheses" in text and "exploratory" in text
    assert "significant after" not in text


def test_fewer_than_three_seeds_cannot_tell(tmp_path: Path) -> None:
    root = make_study(tmp_path, scored(0.3), seeds=(0, 1), losses=("ce", "supcon"), explain=False)
    found = sentences_of(root)
    text = " ".join(found)
    assert "with 2 seeds the study cannot tell" in text and "None has 3 paired seeds yet" in text
    assert "significant after" not in text
    assert "not measured" in text  # no explain tables
    with Store(root / STORE_FILE) as store:
        metrics, config = store.table("metrics"), store.study_config()
    compared = comparisons(metrics, None, readout_map(metrics), hypotheses_of(config))
    assert not compared["significant"].any() and compared["p_holm"].isna().all()


def test_the_ranking_and_its_test_use_the_same_seeds(tmp_path: Path) -> None:
    """supcon's seed 4 failed: its mean, ce's and the difference are all over seeds 0-3 (the ranking
    could otherwise rest on 5 seeds of ce and 4 of supcon while the test used 4 pairs)."""
    root = make_study(
        tmp_path, scored(0.2), losses=("ce", "supcon"), failed=[("size-confound", "supcon", 4)], explain=False
    )
    score = scored(0.2)
    ce = [score("size-confound", "ce", s, "test_conflict") for s in range(4)]
    supcon = [score("size-confound", "supcon", s, "test_conflict") for s in range(4)]
    text = " ".join(sentences_of(root))
    assert (
        f"supcon (probe) keeps the most: balanced accuracy {np.mean(supcon):.2f} against {np.mean(ce):.2f} "
        "for ce (head) over the same 4 seeds, a difference of "
        f"{np.mean(supcon) - np.mean(ce):+.2f}"
    ) in text
    with Store(root / STORE_FILE) as store:
        metrics, config = store.table("metrics"), store.study_config()
    assert readout_map(metrics) == {"ce": "head", "supcon": "probe"}
    compared = comparisons(metrics, None, readout_map(metrics), hypotheses_of(config))
    row = compared[(compared["readout_mode"] == "own") & (compared["split"] == "test_conflict")]
    row = row[row["scenario"] == "size-confound"].iloc[0]
    assert row["n"] == 4 and row["mean"] == pytest.approx(np.mean(supcon) - np.mean(ce)) and row["significant"]
    assert (row["readout"], row["reference_readout"]) == ("probe", "head")


def test_without_a_clean_scenario_ce_is_read_against_the_iid_split(tmp_path: Path) -> None:
    root = make_study(tmp_path, scored(0.2), scenarios=("size-confound",), losses=("ce", "supcon"), explain=False)
    text = " ".join(sentences_of(root))
    assert "no clean scenario" in text and "against" in text and "on test_iid: an OOD gap of" in text


def test_conflict_splits_come_from_the_manifests() -> None:
    splits = ["val", "test_iid", "test_conflict", "test_scanner"]
    assert conflict_splits(manifest("size-confound"), splits) == ["test_conflict"]
    assert conflict_splits(None, splits) == ["test_conflict"]
    assert conflict_splits(None, ["val", "test_a", "test_b"]) == ["test_a", "test_b"]


def test_source_scenarios_read_their_broken_splits_and_imply_the_same_tables_ceiling() -> None:
    from nodulab.synth.scenarios import load_scenario, scenario_to_dict

    lidc = {"scenario": scenario_to_dict(load_scenario("lidc"))}
    balanced = {"scenario": scenario_to_dict(load_scenario("lidc-balanced"))}
    assert confounds_of(lidc) == ["lidc ratings"] and confounds_of(balanced) == []
    assert conflict_splits(lidc, ["val", "test_iid", "test_balanced"]) == ["test_balanced"]
    manifests = {
        "lidc": lidc,
        "lidc-balanced": balanced,
        "clean": manifest("clean"),
        "size-confound": manifest("size-confound"),
    }
    assert implied_ceilings(manifests) == {"lidc": "lidc-balanced", "size-confound": "clean"}
    shifted = {"scenario": {"confounds": [], "splits": {}}}
    assert implied_ceilings({**manifests, "shift": shifted}) == {"lidc": "lidc-balanced"}  # two candidates: none


def test_the_ceiling_of_a_scenario_is_read_on_its_own_images_not_on_the_ceilings_test_split(tmp_path: Path) -> None:
    """A ceiling that does well on its own test_iid but badly on the confounded images gives a small gap."""

    def score(scenario: str, loss: str, seed: int, split: str) -> float:
        if scenario == "clean":
            return (0.99 if split in ("val", "test_iid") else 0.62) + noise(scenario, loss, seed, split)
        return (0.6 if split == "test_conflict" else 0.95) + noise(scenario, loss, seed, split)

    root = make_study(tmp_path, score, losses=("ce",), explain=False)
    with Store(root / STORE_FILE) as store:
        metrics = store.table("metrics")
    scores, matched = own_scores(metrics), matched_scores(metrics, {"size-confound": "clean"})
    assert set(scores["scenario"] + "/" + scores["split"]) >= {"clean/test_iid", "size-confound/test_conflict"}
    assert "clean/test_conflict" not in set(scores["scenario"] + "/" + scores["split"])  # not its own split
    gaps = ceiling_gaps(scores, matched)
    row = gaps[(gaps["split"] == "test_conflict") & (gaps["loss"] == "ce")].iloc[0]
    assert row["ceiling_mean"] == pytest.approx(0.62, abs=0.03) and abs(row["gap"]) < 0.06


def test_reliance_summary_reads_own_readouts_on_the_given_splits(clear_lead: Path) -> None:
    with Store(clear_lead / STORE_FILE) as store:
        reliance, metrics = store.table("reliance"), store.table("metrics")
    summary = reliance_summary(reliance, readout_map(metrics), {"size-confound": ["test_conflict"]})
    ce = summary[summary["loss"] == "ce"].iloc[0]
    assert (ce["readout"], ce["seeds"]) == ("head", 5)
    assert (ce["cue"], ce["confound"], ce["null"]) == (pytest.approx(0.05), pytest.approx(0.75), pytest.approx(0.05))
    assert ce["degenerate"] == 0
    assert set(summary["scenario"]) == {"size-confound"}


def test_a_degenerate_readout_is_never_read_as_relying_on_anything(clear_lead: Path) -> None:
    with Store(clear_lead / STORE_FILE) as store:
        reliance, metrics = store.table("reliance"), store.table("metrics")
    reliance.loc[reliance["loss"] == "ce", "degenerate"] = 1  # ce's head predicts one class
    summary = reliance_summary(reliance, readout_map(metrics), {"size-confound": ["test_conflict"]})
    text = " ".join(reliance_sentences(summary))
    assert "ce (head) is degenerate" in text
    assert "ce (head; excess" not in text and "supcon (probe; excess" in text


@pytest.mark.parametrize("case", ["one seed", "two seeds", "interval includes 0"])
def test_reliance_is_not_claimed_without_three_seeds_or_an_interval_clear_of_0(tmp_path: Path, case: str) -> None:
    seeds = {"one seed": (0,), "two seeds": (0, 1)}.get(case, (0, 1, 2, 3, 4))

    def flips(loss: str, seed: int) -> tuple[float, float]:  # confound − cue: +0.3 or −0.3 by seed, mean 0.06
        return (0.2, 0.5) if seed % 2 == 0 else (0.5, 0.2)

    root = make_study(tmp_path, scored(0.2), seeds=seeds, losses=("ce", "supcon"), flips=flips)
    text = " ".join(sentences_of(root))
    assert "relies on" not in text and "rely on" not in text
    if case == "interval includes 0":
        assert "are not resolved (the interval includes 0)" in text
    else:
        assert f"with fewer than 3 seeds the study cannot tell for ce (head, {len(seeds)} seed" in text


def test_convergence_reads_the_last_fifth_of_the_training_curve() -> None:
    from nodulab.results.findings import convergence_sentences
    from nodulab.results.seed_tables import convergence

    def curve(loss: str, seed: int, name: str, values: list[float]) -> list[tuple]:
        return [("s", loss, seed, 1, e + 1, name, v) for e, v in enumerate(values)]

    flat = [1.0, 0.5, 0.3, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.201]  # 0.001 over the last 2 epochs, of 0.8
    falling = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]
    rows = curve("ce", 0, "train_loss", flat) + curve("ce", 1, "train_loss", flat)
    rows += curve("simclr", 0, "train_loss", flat) + curve("simclr", 1, "train_loss", falling)
    rows += curve("triplet", 0, "train_loss", [0.2] * 10) + curve("triplet", 0, "mined_triplets", falling)
    history = pd.DataFrame(rows, columns=["scenario", "loss", "seed", "selected", "epoch", "name", "value"])
    found = convergence(history).set_index(["loss", "seed"])
    assert found.loc[("ce", 0), "converged"] and not found.loc[("simclr", 1), "converged"]
    assert found.loc[("triplet", 0), "curve"] == "mined_triplets" and not found.loc[("triplet", 0), "converged"]
    assert found.loc[("simclr", 1), "change"] == pytest.approx(0.2)  # the last 20% of 10 epochs: 2 epochs
    text = convergence_sentences(history)[0]
    assert "on s, ce 2/2, simclr 1/2, triplet 0/1." in text


def test_the_findings_open_with_the_budget_regime(clear_lead: Path, tmp_path: Path) -> None:
    first = sentences_of(clear_lead)[0]  # the ceiling scores 0.95 on the conflict images, no checkpoints
    assert first.startswith("At this budget the cue is learnt, but training had not been shown to plateau")

    def weak(scenario: str, loss: str, seed: int, split: str) -> float:
        return (0.8 if scenario == "clean" else 0.6) + noise(scenario, loss, seed, split)

    first = sentences_of(make_study(tmp_path, weak, losses=("ce",), explain=False))[0]
    assert first.startswith("At this budget the cue is not yet learnt: matched ceiling 0.8")
    assert "(clean's ce on size-confound/test_conflict)" in first


def test_a_flat_val_curve_of_the_ceiling_reads_as_plateaued() -> None:
    from nodulab.results.findings import regime_sentences

    matched = pd.DataFrame(
        [("size-confound", "clean", "ce", s, 0, "test_conflict", "head", v) for s, v in enumerate([0.96, 0.97, 0.98])],
        columns=["scenario", "ceiling", "loss", "seed", "draw", "split", "readout", "value"],
    )

    def dynamics(last: float) -> pd.DataFrame:
        rows = [
            ("clean", "ce", s, 1, e, "val", "head", "balanced_accuracy", v)
            for s in range(3)
            for e, v in ((1, 0.7), (4, 0.99), (6, last))
        ]
        columns = ["scenario", "loss", "seed", "selected", "epoch", "split", "classifier", "measure", "value"]
        return pd.DataFrame(rows, columns=columns)

    cells = [("size-confound", "test_conflict")]
    flat = regime_sentences(matched, dynamics(0.995), {"ce": "head"}, cells)[0]
    assert flat.startswith("At this budget the cue is learnt and the ceiling had plateaued: matched ceiling 0.97")
    assert "0.99 → 0.99 from epoch 4 to 6" in flat  # 0.995 prints as 0.99
    rising = regime_sentences(matched, dynamics(1.0), {"ce": "head"}, cells)[0]
    assert "had not been shown to plateau" in rising
