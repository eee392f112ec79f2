"""Binary metrics, scoring a run folder, and the metrics table (nodulab.metrics)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from rich.console import Console
from sklearn.metrics import roc_auc_score

from nodulab import data, train
from nodulab.metrics import METRICS, RunError, binary_metrics, evaluate_run, metrics_table
from nodulab.models import build_model, save_model, state_sha256
from nodulab.readouts import fit_readouts, load_readouts
from nodulab.scenarios import load_scenario, resolve


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
    record = {"run_format": train.RUN_FORMAT, "threads": threads, "config": {"seed": 1},
              "init_sha256": state_sha256(init),
              "dataset": {"image": manifest["image"], "manifest_sha256": data.sha256_file(root / "dataset.json")}}
    (run_dir / "config.json").write_text(json.dumps(record))
    save_model(model, run_dir / "model.safetensors", {"loss": "test"})
    for net, name in ((model, "readouts.safetensors"), (init, "readouts_init.safetensors")):
        fit_readouts(*_features(net, root, "train"), *_features(net, root, "val"), knn_k=3).save(run_dir / name)
    return model


def _sklearn_metrics(labels: np.ndarray, p: np.ndarray) -> dict[str, float]:
    """An independent computation (confusion counts with pandas, AUC with sklearn)."""
    table = pd.crosstab(pd.Series(labels, name="y"), pd.Series(p >= 0.5, name="pred")).reindex(
        index=[0, 1], columns=[False, True], fill_value=0
    )
    tn, fp, fn, tp = table.loc[0, False], table.loc[0, True], table.loc[1, False], table.loc[1, True]
    sens, spec = tp / (tp + fn), tn / (tn + fp)
    return {"accuracy": (tp + tn) / len(labels), "sensitivity": sens, "specificity": spec,
            "balanced_accuracy": (sens + spec) / 2, "auc": roc_auc_score(labels, p)}  # fmt: skip


def test_evaluate_run_scores_every_split_but_train(dataset: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    model = _make_run(dataset, run)
    frame = evaluate_run(run, dataset, batch_size=5)
    splits = [s for s in data.load_manifest(dataset)["splits"] if s not in ("train", "val_balanced")]
    assert list(frame.columns) == ["split", "classifier", "metric", "value"]
    assert list(dict.fromkeys(frame["split"])) == ["val", *sorted(set(splits) - {"val"})]  # no train
    assert list(dict.fromkeys(frame["classifier"])) == ["head", "probe", "knn", "probe_init", "knn_init"]
    assert len(frame) == len(splits) * 5 * len(METRICS)
    on_disk = pd.read_csv(run / "metrics.csv")
    assert open(run / "metrics.csv").readline().strip() == "split,classifier,metric,value"
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
        expected = {"probe": readouts.predict_probe(features), "knn": readouts.predict_knn(features),
                    "probe_init": readouts_init.predict_probe(init_features),
                    "knn_init": readouts_init.predict_knn(init_features)}  # fmt: skip
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
def test_evaluate_run_names_a_missing_file_and_writes_nothing(
    dataset: Path, tmp_path: Path, missing: str
) -> None:
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
        ("readouts.safetensors", "garbage", "not a safetensors file"),
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
    rows = [(s, c, m, 0.5 if m != "auc" else math.nan) for s in ("val", "test_iid") for c in ("probe", "knn")
            for m in METRICS]  # fmt: skip
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
    assert {p.name for p in (run / "again").iterdir()} == {"metrics.csv", "evaluation.json"}
