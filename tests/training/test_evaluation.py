"""Binary metrics, scoring a run folder, and the metrics table (nodulab.training.evaluation)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from rich.console import Console
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from nodulab.common.tables import RESULT_TABLES
from nodulab.data import dataset as data
from nodulab.synth.scenarios import load_scenario, resolve
from nodulab.training import evaluation as metrics
from nodulab.training import loop as train
from nodulab.training.evaluation import (
    BOOTSTRAP_DRAWS,
    METRICS,
    RunError,
    binary_metrics,
    bootstrap_intervals,
    bootstrap_seed,
    choose_threshold,
    evaluate_run,
    group_rows,
    metrics_table,
    resample_counts,
    weighted_metrics,
)
from nodulab.training.models import build_model, save_model, state_sha256
from nodulab.training.readouts import fit_readouts, load_readouts
from nodulab.training.runs import TIED_FILES

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- binary_metrics
LABELS = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
P = np.array([0.9, 0.8, 0.4, 0.6, 0.1, 0.2, 0.7, 0.3, 0.5, 0.05])


def test_binary_metrics_on_a_hand_computed_confusion_matrix() -> None:
    # p >= 0.5 calls 0.9, 0.8, 0.6 (malignant) and 0.7, 0.5 (benign) malignant:
    # TP 3, FN 1, FP 2, TN 4. AUC: of 4 x 6 pairs the malignant score is higher in 6+6+5+4 = 21.
    m = binary_metrics(LABELS, P)
    assert set(m) == set(METRICS)
    assert m["accuracy"] == pytest.approx(7 / 10)
    assert m["sensitivity"] == pytest.approx(3 / 4)
    assert m["specificity"] == pytest.approx(4 / 6)
    assert m["balanced_accuracy"] == pytest.approx((3 / 4 + 4 / 6) / 2)
    assert m["auc"] == pytest.approx(21 / 24)


def test_threshold_is_inclusive_and_configurable() -> None:
    strict = binary_metrics(LABELS, P, threshold=0.55)  # 0.5 is now benign: TN 5, FP 1
    assert strict["specificity"] == pytest.approx(5 / 6) and strict["sensitivity"] == pytest.approx(3 / 4)
    assert strict["auc"] == binary_metrics(LABELS, P)["auc"]  # AUC does not depend on it


@pytest.mark.parametrize("seed", range(5))
def test_auc_equals_sklearn_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 50)
    labels[:2] = (0, 1)
    p = rng.integers(0, 6, 50) / 5.0  # many tied scores
    assert binary_metrics(labels, p)["auc"] == roc_auc_score(labels, p)


def test_undefined_metrics_are_nan() -> None:
    only_malignant = binary_metrics(np.ones(4, int), np.array([0.9, 0.2, 0.7, 0.6]))
    assert only_malignant["sensitivity"] == 0.75 and only_malignant["accuracy"] == 0.75
    for key in ("specificity", "balanced_accuracy", "auc"):
        assert math.isnan(only_malignant[key]), key
    only_benign = binary_metrics(np.zeros(3, int), np.array([0.1, 0.6, 0.2]))
    assert only_benign["specificity"] == pytest.approx(2 / 3) and math.isnan(only_benign["sensitivity"])
    assert all(math.isnan(v) for v in binary_metrics(np.zeros(0, int), np.zeros(0)).values())


def test_binary_metrics_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="0 .benign. or 1"):
        binary_metrics(np.array([0, 2]), np.array([0.1, 0.2]))
    with pytest.raises(ValueError, match=r"\(N,\)"):
        binary_metrics(np.array([0, 1]), np.array([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match="non-finite"):
        binary_metrics(np.array([0, 1]), np.array([0.1, np.nan]))


# ----------------------------------------------------------------------------- evaluate_run
@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    scenario = resolve(load_scenario("size-confound"), n=8, size=32, pixel_mm=1.4)
    return data.generate(scenario, tmp_path_factory.mktemp("metrics") / "ds", seed=0)


def _hu_input(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(images, dtype=np.float32))[:, None] / 1000.0


def _features(model: torch.nn.Module, root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    images, _, factors = data.load_split(root, split)
    with torch.no_grad():
        features = model.eval().features(_hu_input(images)).numpy()
    return features, factors["label"].to_numpy()


def _make_run(root: Path, run_dir: Path, *, head: bool = True, threads: int = 1) -> torch.nn.Module:
    """A network whose head always says P(malignant) = sigmoid(2) and whose encoder differs from its
    seed's initial weights, plus readouts of both encoders, in a run folder of this run format."""
    init = build_model("small-cnn", 2, embedding_dim=8, projection_dim=4, head=head, seed=1)
    model = build_model("small-cnn", 2, embedding_dim=8, projection_dim=4, head=head, seed=2)
    if head:
        with torch.no_grad():
            model.head.weight.zero_()
            model.head.bias.copy_(torch.tensor([0.0, 2.0]))
    run_dir.mkdir()
    manifest = data.load_manifest(root)
    record = {
        "run_format": train.RUN_FORMAT,
        "threads": threads,
        "config": {"seed": 1},
        "init_sha256": state_sha256(init),
        "dataset": {"image": manifest["image"], "manifest_sha256": data.sha256_file(root / "dataset.json")},
    }
    (run_dir / "config.json").write_text(json.dumps(record))
    save_model(model, run_dir / "model.safetensors", {"loss": "test"})
    for net, name in ((model, "readouts.safetensors"), (init, "readouts_init.safetensors")):
        fit_readouts(*_features(net, root, "train"), *_features(net, root, "val"), knn_k=3).save(run_dir / name)
    record["files_sha256"] = {name: data.sha256_file(run_dir / name) for name in TIED_FILES}  # this run's
    (run_dir / "config.json").write_text(json.dumps(record))
    return model


def _sklearn_metrics(labels: np.ndarray, p: np.ndarray) -> dict[str, float]:
    """An independent computation (confusion counts with pandas, AUC with sklearn)."""
    table = pd.crosstab(pd.Series(labels, name="y"), pd.Series(p >= 0.5, name="pred")).reindex(
        index=[0, 1], columns=[False, True], fill_value=0
    )
    tn, fp, fn, tp = table.loc[0, False], table.loc[0, True], table.loc[1, False], table.loc[1, True]
    sens, spec = tp / (tp + fn), tn / (tn + fp)
    return {
        "accuracy": (tp + tn) / len(labels),
        "sensitivity": sens,
        "specificity": spec,
        "balanced_accuracy": (sens + spec) / 2,
        "auc": roc_auc_score(labels, p),
    }


def test_evaluate_run_scores_every_split_but_train(dataset: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    model = _make_run(dataset, run)
    frame = evaluate_run(run, dataset, batch_size=5)
    splits = [s for s in data.load_manifest(dataset)["splits"] if s not in ("train", "val_balanced")]
    assert list(frame.columns) == ["dataset", "split", "classifier", "metric", "value", "ci_low", "ci_high"]
    assert set(frame["dataset"]) == {"size-confound"}  # the scored dataset's scenario
    assert list(dict.fromkeys(frame["split"])) == ["val", *sorted(set(splits) - {"val"})]  # no train
    assert list(dict.fromkeys(frame["classifier"])) == ["head", "probe", "knn", "probe_init", "knn_init"]
    assert len(frame) == len(splits) * 5 * len(METRICS)
    on_disk = pd.read_csv(run / "metrics.csv")
    assert open(run / "metrics.csv").readline().strip() == "dataset,split,classifier,metric,value,ci_low,ci_high"
    pd.testing.assert_frame_equal(on_disk, frame)
    readouts = load_readouts(run / "readouts.safetensors")
    readouts_init = load_readouts(run / "readouts_init.safetensors")
    init = build_model("small-cnn", 2, embedding_dim=8, projection_dim=4, seed=1)
    value = {(r.split, r.classifier, r.metric): r.value for r in frame.itertuples()}
    for split in splits:
        features, labels = _features(model, dataset, split)
        init_features, _ = _features(init, dataset, split)
        malignant = labels.mean()
        # the constant head calls every sample malignant: accuracy = malignant share, AUC 0.5
        assert value[(split, "head", "accuracy")] == pytest.approx(malignant)
        assert value[(split, "head", "sensitivity")] == 1.0 and value[(split, "head", "specificity")] == 0.0
        assert value[(split, "head", "auc")] == 0.5
        expected = {
            "probe": readouts.predict_probe(features),
            "knn": readouts.predict_knn(features),
            "probe_init": readouts_init.predict_probe(init_features),
            "knn_init": readouts_init.predict_knn(init_features),
        }
        for classifier, p in expected.items():
            for metric, v in _sklearn_metrics(labels, p).items():
                key = (split, classifier, metric)
                assert value[key] == pytest.approx(v, abs=1e-12), key


def test_evaluate_run_without_head_has_no_head_rows(dataset: Path, tmp_path: Path) -> None:
    _make_run(dataset, tmp_path / "run", head=False)
    frame = evaluate_run(tmp_path / "run", dataset)
    assert set(frame["classifier"]) == {"probe", "knn", "probe_init", "knn_init"}


RUN_FILES = {"config.json", "model.safetensors", "readouts.safetensors", "readouts_init.safetensors"}


@pytest.mark.parametrize("missing", sorted(RUN_FILES))
def test_evaluate_run_names_a_missing_file_and_writes_nothing(dataset: Path, tmp_path: Path, missing: str) -> None:
    run = tmp_path / "run"
    _make_run(dataset, run)
    (run / missing).unlink()
    with pytest.raises(RunError, match=missing):
        evaluate_run(run, dataset)
    assert {p.name for p in run.iterdir()} == RUN_FILES - {missing}


@pytest.mark.parametrize(
    "file, content, message",
    [
        ("config.json", json.dumps({"run_format": 0}), "run format 0"),
        ("config.json", "{not json", "not a run config"),
        ("readouts.safetensors", "garbage", "does not belong to this run"),
        ("model.safetensors", "garbage", "not a safetensors file"),
    ],
)
def test_evaluate_run_refuses_foreign_run_files(
    dataset: Path, tmp_path: Path, file: str, content: str, message: str
) -> None:
    run = tmp_path / "run"
    _make_run(dataset, run)
    (run / file).write_text(content)
    with pytest.raises(RunError, match=message):
        evaluate_run(run, dataset)
    assert {p.name for p in run.iterdir()} == RUN_FILES


def test_evaluate_run_missing_dataset_or_run(dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        evaluate_run(tmp_path / "nowhere", dataset)
    _make_run(dataset, tmp_path / "run")
    with pytest.raises(data.DatasetError):
        evaluate_run(tmp_path / "run", tmp_path / "no-data")
    assert not (tmp_path / "run" / "metrics.csv").exists()


# ----------------------------------------------------------------------------- metrics_table
def test_metrics_table_rows_are_split_by_classifier() -> None:
    rows = [
        (s, c, m, 0.5 if m != "auc" else math.nan)
        for s in ("val", "test_iid")
        for c in ("probe", "knn")
        for m in METRICS
    ]
    table = metrics_table(pd.DataFrame(rows, columns=["split", "classifier", "metric", "value"]))
    assert table.row_count == 4
    headers = ["split", "classifier", "acc", "sens", "spec", "bal acc", "AUC"]
    assert [c.header for c in table.columns] == headers
    console = Console(width=200, record=True)
    console.print(table)
    text = console.export_text()
    assert "0.500" in text and "–" in text and "test_iid" in text


def test_evaluate_run_refuses_another_geometry_and_guards_its_own_tables(dataset: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    _make_run(dataset, run)
    record = json.loads((run / "config.json").read_text())
    record["dataset"]["image"]["dim"] = 3  # a 3D run evaluated on 2D data
    (run / "config.json").write_text(json.dumps(record))
    with pytest.raises(RunError, match="image dim is 2, the run was trained on 3"):
        evaluate_run(run, dataset)
    with pytest.raises(RunError, match="image dim"):
        evaluate_run(run, dataset, out=tmp_path / "elsewhere")
    assert not (run / "metrics.csv").exists() and not (tmp_path / "elsewhere").exists()
    record["dataset"]["image"]["dim"] = 2
    (run / "config.json").write_text(json.dumps(record))
    for out in (run, tmp_path):  # the run folder itself, or a folder that holds it
        with pytest.raises(RunError, match="would replace the run folder"):
            evaluate_run(run, dataset, out=out, force=True)
    assert {p.name for p in run.iterdir()} == RUN_FILES
    evaluate_run(run, dataset, out=run / "again")  # a folder inside the run folder is where evaluations go
    assert {p.name for p in (run / "again").iterdir()} == {
        "metrics.csv",
        "groups.csv",
        "predictions.csv",
        "evaluation.json",
    }


# ----------------------------------------------------------------------------- bootstrap
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("threshold", [0.5, 0.35])
def test_weighted_metrics_equal_binary_metrics_on_explicit_resamples(ties: bool, threshold: float) -> None:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 60)
    p = rng.integers(0, 6, 60) / 5.0 if ties else rng.random(60)
    counts = resample_counts(60, 40, np.random.default_rng(4))
    assert counts.shape == (60, 40) and (counts.sum(axis=0) == 60).all()
    counts[:, 0] = np.where(labels == 1, counts[:, 0], 0)  # a resample without benign samples
    fast = weighted_metrics(labels, p, counts, threshold)
    for b in range(counts.shape[1]):
        drawn = np.repeat(np.arange(60), counts[:, b].astype(int))  # the resample, written out
        slow = binary_metrics(labels[drawn], p[drawn], threshold)
        for metric in METRICS:
            if math.isnan(slow[metric]):
                assert math.isnan(fast[metric][b]), (b, metric)
            else:
                assert fast[metric][b] == pytest.approx(slow[metric], abs=1e-12), (b, metric)
    assert math.isnan(fast["auc"][0]) and math.isnan(fast["specificity"][0])


def test_resample_counts_are_seeded_ordinary_bootstrap_counts() -> None:
    first = resample_counts(500, 300, np.random.default_rng(7))
    assert np.array_equal(first, resample_counts(500, 300, np.random.default_rng(7)))
    assert (first.sum(axis=0) == 500).all()
    # multinomial(n, 1/n): each count ~ Binomial(n, 1/n), mean 1, variance 1 - 1/n
    assert first.mean() == pytest.approx(1.0) and first.var() == pytest.approx(1 - 1 / 500, abs=0.02)
    assert bootstrap_seed("val") == bootstrap_seed("val") != bootstrap_seed("test_iid")


def test_bootstrap_intervals_cover_the_true_value_at_the_nominal_rate() -> None:
    """400 simulated splits of a known predictor: each 95% interval covers the truth 92-98% of the time.

    Scores are N(1, 1) for malignant and N(0, 1) for benign samples, called malignant above 0.5:
    sensitivity = specificity = accuracy = balanced accuracy = Phi(0.5), AUC = Phi(1 / sqrt 2).
    """
    truth = dict.fromkeys(("accuracy", "sensitivity", "specificity", "balanced_accuracy"), norm.cdf(0.5))
    truth["auc"] = norm.cdf(1 / math.sqrt(2))
    rng = np.random.default_rng(2024)
    covered = dict.fromkeys(METRICS, 0)
    simulations = 400
    for s in range(simulations):
        labels = rng.integers(0, 2, 200)
        p = norm.cdf(rng.normal(labels.astype(float), 1.0) - 0.5)  # p >= 0.5 iff the score >= 0.5
        intervals = bootstrap_intervals(labels, {"model": p}, {"model": 0.5}, seed=s, draws=1000)["model"]
        for metric, (low, high) in intervals.items():
            covered[metric] += low <= truth[metric] <= high
    for metric in METRICS:
        assert covered[metric] / simulations == pytest.approx(0.95, abs=0.03), (metric, covered[metric])


def test_bootstrap_intervals_are_deterministic_paired_and_nan_when_undefined() -> None:
    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(50, int), 1]  # one malignant sample: often not drawn at all
    scores = {"a": rng.random(51), "b": rng.random(51)}
    thresholds = {"a": 0.5, "b": 0.5}
    first = bootstrap_intervals(labels, scores, thresholds, seed=1)
    assert first == bootstrap_intervals(labels, scores, thresholds, seed=1)
    assert first != bootstrap_intervals(labels, scores, thresholds, seed=2)
    # "a" alone draws the same resamples as "a" beside "b" (every classifier of a split is paired)
    assert bootstrap_intervals(labels, {"a": scores["a"]}, thresholds, seed=1)["a"] == first["a"]
    benign_only = bootstrap_intervals(np.zeros(20, int), {"a": rng.random(20)}, thresholds, seed=1)["a"]
    for metric in ("sensitivity", "balanced_accuracy", "auc"):
        assert all(math.isnan(v) for v in benign_only[metric]), metric
    low, high = benign_only["specificity"]
    assert 0 <= low <= high <= 1


def test_bootstrap_draw_count_is_enough_for_a_95_percent_interval() -> None:
    assert BOOTSTRAP_DRAWS >= 1000


# ----------------------------------------------------------------------------- threshold
def test_choose_threshold_maximises_balanced_accuracy_with_ties_nearest_half() -> None:
    # separable at any t in (0.2, 0.3]: candidates 0.3 (a score) and nothing nearer 0.5 does as well
    assert choose_threshold(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.3, 0.4])) == 0.3
    # separable at any t in (0.2, 0.9]: 0.5 itself is a candidate and wins
    assert choose_threshold(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.9, 0.95])) == 0.5
    # a tie: t in (0.1, 0.3] and t in (0.6, 0.8] both give balanced accuracy 3/4; 0.3 is nearer 0.5
    labels, p = np.array([0, 1, 0, 1]), np.array([0.1, 0.3, 0.6, 0.8])
    bal = {t: binary_metrics(labels, p, t)["balanced_accuracy"] for t in (0.1, 0.3, 0.5, 0.6, 0.8, 0.9)}
    assert bal == {0.1: 0.5, 0.3: 0.75, 0.5: 0.5, 0.6: 0.5, 0.8: 0.75, 0.9: 0.5}
    assert choose_threshold(labels, p) == 0.3
    assert choose_threshold(np.array([1, 1]), np.array([0.1, 0.2])) == 0.5  # one class: undefined, kept


@pytest.mark.parametrize("seed", range(5))
def test_choose_threshold_is_as_good_as_any_threshold(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 40)
    p = rng.integers(0, 11, 40) / 10.0
    chosen = choose_threshold(labels, p)
    best = max(binary_metrics(labels, p, t)["balanced_accuracy"] for t in np.linspace(0, 1.05, 211))
    assert binary_metrics(labels, p, chosen)["balanced_accuracy"] == pytest.approx(best)


# ----------------------------------------------------------------------------- groups
def test_group_rows_match_a_hand_count_and_name_the_worst_group() -> None:
    factors = pd.DataFrame(
        {
            "label": [0, 0, 0, 0, 1, 1, 1, 1, 1],
            "agrees_diameter_mm": [1, 1, 0, 1, 1, 1, 0, 0, 1],
            "agrees_attenuation": [1, 1, 1, 0, 1, 0, 0, 0, 1],
        }
    )
    predicted = np.array([0, 1, 1, 0, 1, 1, 0, 1, 1], dtype=bool)
    rows = group_rows(factors, predicted)
    table = {(label, group): (n, acc) for label, group, n, acc in rows}
    # benign, both agree: rows 0, 1 -> 1 of 2 right; benign, diameter conflicts: row 2, wrong
    assert table[("benign", "diameter_mm=agrees,attenuation=agrees")] == (2, 0.5)
    assert table[("benign", "diameter_mm=conflicts,attenuation=agrees")] == (1, 0.0)
    assert table[("benign", "diameter_mm=agrees,attenuation=conflicts")] == (1, 1.0)
    n, acc = table[("benign", "diameter_mm=conflicts,attenuation=conflicts")]
    assert n == 0 and math.isnan(acc)  # empty cells are listed, never the worst
    assert table[("malignant", "diameter_mm=agrees,attenuation=agrees")] == (2, 1.0)
    assert table[("malignant", "diameter_mm=agrees,attenuation=conflicts")] == (1, 1.0)
    assert table[("malignant", "diameter_mm=conflicts,attenuation=conflicts")] == (2, 0.5)
    assert len(rows) == 2 * 4 + 1
    assert rows[-1] == ("any", "worst: benign/diameter_mm=conflicts,attenuation=agrees", 1, 0.0)


def test_group_rows_without_a_confound_and_with_one() -> None:
    plain = group_rows(pd.DataFrame({"label": [0, 1, 1]}), np.array([False, False, True]))
    assert plain == [("benign", "all", 1, 1.0), ("malignant", "all", 2, 0.5), ("any", "worst: malignant/all", 2, 0.5)]
    one = group_rows(pd.DataFrame({"label": [0, 1], "agrees_diameter_mm": [1, 1]}), np.array([False, True]))
    assert [r[1] for r in one[:2]] == ["diameter_mm=agrees", "diameter_mm=conflicts"]
    assert one[-1] == ("any", "worst: benign/diameter_mm=agrees", 1, 1.0)  # a tie: the first in table order


# ------------------------------------------------------------- evaluate_run: intervals, groups, thresholds
def test_evaluate_run_writes_intervals_groups_and_the_same_bytes_twice(dataset: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    _make_run(dataset, run)
    frame = evaluate_run(run, dataset)
    assert (run / "groups.csv").read_text().splitlines()[0] == "split,classifier,label,group,n,accuracy"
    undefined = frame["value"].isna()
    assert frame.loc[undefined, ["ci_low", "ci_high"]].isna().all(axis=None)
    defined = frame[~undefined]
    assert (defined["ci_low"] <= defined["ci_high"]).all()
    head_auc = frame[(frame.classifier == "head") & (frame.metric == "auc")]
    assert (head_auc[["ci_low", "ci_high"]] == 0.5).all(axis=None)  # a constant predictor: AUC 0.5 in every resample
    groups = pd.read_csv(run / "groups.csv")
    for split in dict.fromkeys(frame.split):
        _, _, factors = data.load_split(dataset, split)
        for classifier in dict.fromkeys(frame.classifier):
            rows = groups[(groups.split == split) & (groups.classifier == classifier)]
            cells = rows[rows.label != "any"]
            assert len(cells) == 2 * 2 and cells.n.sum() == len(factors)  # size-confound: one confound
            accuracy = frame[(frame.split == split) & (frame.classifier == classifier) & (frame.metric == "accuracy")]
            # the overall accuracy is the n-weighted mean of the cells'
            assert (cells.n * cells.accuracy.fillna(0)).sum() / cells.n.sum() == pytest.approx(accuracy.value.item())
            worst = rows[rows.label == "any"]
            assert len(worst) == 1 and worst.accuracy.item() == cells[cells.n > 0].accuracy.min()
            assert worst.group.item().startswith("worst: ")
    evaluation = json.loads((run / "evaluation.json").read_text())
    assert evaluation["bootstrap"]["level"] == "sample" and "between training seeds" in evaluation["bootstrap"]["note"]
    assert evaluation["bootstrap"]["draws"] == BOOTSTRAP_DRAWS
    assert evaluation["threshold"] == {"rule": "fixed", "value": 0.5}
    first = {name: (run / name).read_bytes() for name in ("metrics.csv", "groups.csv", "evaluation.json")}
    evaluate_run(run, dataset)
    assert {name: (run / name).read_bytes() for name in first} == first


def test_val_threshold_is_chosen_on_val_before_any_test_split_is_read(
    dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    _make_run(dataset, run)
    loaded: list[str] = []
    seen_at_choice: list[list[str]] = []
    load_split, choose_thresholds = metrics.load_split, metrics.choose_thresholds
    monkeypatch.setattr(metrics, "load_split", lambda root, split: (loaded.append(split), load_split(root, split))[1])

    def spy(labels: np.ndarray, scores: dict[str, np.ndarray]) -> dict[str, float]:
        seen_at_choice.append(list(loaded))
        return choose_thresholds(labels, scores)

    monkeypatch.setattr(metrics, "choose_thresholds", spy)
    frame = evaluate_run(run, dataset, threshold="val", out=tmp_path / "ev")
    assert seen_at_choice == [["val"]]  # chosen once, when val (and nothing else) had been read
    assert any(s.startswith("test") for s in loaded)  # test splits are scored afterwards
    evaluation = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    images, _, factors = load_split(dataset, "val")
    from nodulab.training.runs import load_run

    expected = choose_thresholds(factors["label"].to_numpy(), load_run(run).predict(images))
    assert evaluation["threshold"]["rule"] == "val" and evaluation["threshold"]["values"] == expected
    value = {(r.split, r.classifier, r.metric): r.value for r in frame.itertuples()}
    auc = evaluate_run(run, dataset, out=tmp_path / "fixed")
    for r in auc[auc.metric == "auc"].itertuples():  # AUC does not depend on the threshold
        assert value[(r.split, r.classifier, "auc")] == r.value or math.isnan(r.value)
    with pytest.raises(RunError, match="threshold rule"):
        evaluate_run(run, dataset, threshold="test_iid", out=tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_metrics_table_shows_the_worst_group() -> None:
    rows = [("d", "val", "probe", m, 0.9, 0.8, 1.0) for m in METRICS]
    groups = pd.DataFrame(
        [("val", "probe", "benign", "all", 3, 1.0), ("val", "probe", "any", "worst: benign/all", 3, 0.25)],
        columns=list(RESULT_TABLES["groups"].columns),
    )
    table = metrics_table(pd.DataFrame(rows, columns=list(RESULT_TABLES["metrics"].columns)), groups=groups)
    assert [c.header for c in table.columns][-1] == "worst"
    console = Console(width=200, record=True)
    console.print(table)
    assert "0.250" in console.export_text()


def test_predictions_give_back_every_metric(dataset: Path, tmp_path: Path) -> None:
    """``predictions.csv``: every test sample's label and call per classifier; balanced accuracy
    recomputed from them equals ``metrics.csv``'s."""
    run = tmp_path / "run"
    _make_run(dataset, run)
    metrics = evaluate_run(run, dataset)
    predictions = pd.read_csv(run / "predictions.csv", keep_default_na=False)
    assert set(predictions["split"]) == {s for s in metrics["split"] if s.startswith("test_")}
    for (split, classifier), part in predictions.groupby(["split", "classifier"]):
        assert list(part["row"]) == list(range(len(part)))
        recall = [(part.loc[part["label"] == c, "predicted"] == c).mean() for c in (0, 1)]
        stored = metrics[
            (metrics["split"] == split)
            & (metrics["classifier"] == classifier)
            & (metrics["metric"] == "balanced_accuracy")
        ]["value"].iloc[0]
        assert np.mean(recall) == pytest.approx(stored, abs=1e-12)
        assert ((part["p"] >= 0.5).astype(int) == part["predicted"]).all()  # fixed threshold
