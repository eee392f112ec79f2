"""``evaluate`` and ``explain`` of a synthetic-trained run on a real dataset (``nodulab import-lidc``'s kind)."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from conftest import assert_one_line_error, file_tree
from nodulab.cli import app
from nodulab.data import dataset as data
from nodulab.explanation.run import NO_SWITCHES, explain_run
from nodulab.synth.scenarios import load_scenario, resolve
from nodulab.training import evaluation as metrics
from nodulab.training import loop as train
from real_dataset import make_real_dataset

pytestmark = pytest.mark.usefixtures("one_thread")
PIXEL_MM = 1.4


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-epoch ``ce`` run (with its last checkpoint) on a tiny 32 px 2D synthetic dataset."""
    root = tmp_path_factory.mktemp("real-eval")
    scenario = resolve(load_scenario("size-confound"), n=24, size=32, pixel_mm=PIXEL_MM)
    dataset = data.generate(scenario, root / "synthetic", seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return train.train(dataset, root / "run", loss="ce", epochs=1, batch_size=12, device="cpu")


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_real_dataset(tmp_path_factory.mktemp("real") / "lidc", size=32, pixel_mm=PIXEL_MM)


@pytest.fixture(scope="module")
def evaluated(run: Path, real: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("evaluated") / "eval"
    before = file_tree(run)
    result = CliRunner().invoke(app, ["evaluate", str(run), str(real), "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert file_tree(run) == before  # nothing written into the run folder (no dynamics on real data)
    return out, result.output


# ----------------------------------------------------------------------------- targets and groups
def test_spiculation_target_keeps_4_and_up_against_1() -> None:
    factors = pd.DataFrame({"lidc_spiculation": [1.0, 1.5, 2.0, 3.0, 3.5, 4.0, 4.5, 5.0, 1.0]})
    rows, labels = metrics.spiculation_target(factors)
    assert rows.tolist() == [0, 5, 6, 7, 8] and labels.tolist() == [0, 1, 1, 1, 0]


def test_real_groups_are_cells_of_diameter_and_rating() -> None:
    factors = pd.DataFrame(
        {"diameter_mm": [12.0, 8.0, 10.0, 6.0], "lidc_spiculation": [5.0, 1.0, 3.0, 4.0], "label": [1, 1, 0, 0]}
    )
    labels = np.array([1, 1, 0, 0])
    rows = metrics.real_group_rows(factors, labels, np.array([True, False, False, True]))
    found = {(label, group): (n, acc) for label, group, n, acc in rows}
    assert found[("malignant", "diameter_mm>=10,lidc_spiculation>=4")] == (1, 1.0)
    assert found[("malignant", "diameter_mm<10,lidc_spiculation<4")] == (1, 0.0)
    assert found[("benign", "diameter_mm>=10,lidc_spiculation<4")] == (1, 1.0)
    assert found[("benign", "diameter_mm<10,lidc_spiculation>=4")] == (1, 0.0)
    assert len(rows) == 2 * 4 + 1 and sum(n for _, _, n, _ in rows[:-1]) == 4
    assert rows[-1][:2] == ("any", "worst: benign/diameter_mm<10,lidc_spiculation>=4")  # first of the ties
    spiculation = metrics.real_group_rows(factors, np.array([1, 0, 0, 1]), np.ones(4, bool), "spiculation")
    assert {g for _, g, _, _ in spiculation[:-1]} == {
        f"diameter_mm{d}10,malignancy={m}" for d in (">=", "<") for m in ("malignant", "benign")
    }
    assert {label for label, *_ in spiculation[:-1]} == {"spiculated", "unspiculated"}


# ----------------------------------------------------------------------------- evaluate
def _balanced_accuracy(frame: pd.DataFrame) -> float:
    """By hand, from the stored labels and calls."""
    sensitivity = (frame.loc[frame.label == 1, "predicted"] == 1).mean()
    specificity = (frame.loc[frame.label == 0, "predicted"] == 0).mean()
    return (sensitivity + specificity) / 2


def test_evaluate_scores_malignancy_and_spiculation_on_real_rows(evaluated: tuple[Path, str], real: Path) -> None:
    out, output = evaluated
    assert "real dataset" in output and "spiculation" in output
    frame = pd.read_csv(out / "metrics.csv")
    assert set(frame["dataset"]) == {"lidc-idri"}
    assert list(dict.fromkeys(frame["split"])) == ["val", "val_spiculation", "test_lidc", "test_lidc_spiculation"]
    predictions = pd.read_csv(out / "predictions.csv")
    assert set(predictions["dataset"]) == {"lidc-idri"}
    assert set(predictions["split"]) == {"test_lidc", "test_lidc_spiculation"}
    _, _, factors = data.load_split(real, "test_lidc")
    spiculated = factors["lidc_spiculation"].to_numpy()
    value = {(r.split, r.classifier, r.metric): r.value for r in frame.itertuples()}
    for (split, classifier), rows in predictions.groupby(["split", "classifier"]):
        if split == "test_lidc":
            assert rows["row"].tolist() == list(range(len(factors)))
            assert rows["label"].tolist() == factors["label"].tolist()
        else:
            keep = (spiculated >= 4) | (spiculated == 1)
            assert rows["row"].tolist() == np.flatnonzero(keep).tolist()
            assert rows["label"].tolist() == (spiculated[keep] >= 4).astype(int).tolist()
        assert (rows["predicted"] == (rows["p"] >= 0.5)).all()
        assert value[(split, classifier, "balanced_accuracy")] == pytest.approx(_balanced_accuracy(rows), abs=1e-12)
        assert value[(split, classifier, "accuracy")] == pytest.approx((rows.label == rows.predicted).mean())
    groups = pd.read_csv(out / "groups.csv")
    cells = groups[(groups.split == "test_lidc") & (groups.classifier == "probe")]
    assert set(cells.group[cells.label != "any"]) == {
        f"diameter_mm{d}10,lidc_spiculation{s}4" for d in (">=", "<") for s in (">=", "<")
    }
    assert cells.n[cells.label != "any"].sum() == len(factors)
    assert cells.group.iloc[-1].startswith("worst: ")
    record = json.loads((out / "evaluation.json").read_text())
    assert record["dataset"]["kind"] == "real" and record["dataset"]["name"] == "lidc-idri"
    assert record["dataset"]["manifest_sha256"] == data.sha256_file(real / "dataset.json")
    assert record["unscored"] == ["train"] and "spiculation" in record["targets"]
    assert not (out / "dynamics.csv").exists()


def test_threshold_val_is_chosen_on_real_val_malignancy(run: Path, real: Path, tmp_path: Path) -> None:
    frame = metrics.evaluate_run(run, real, out=tmp_path / "e", threshold="val", draws=1000)
    record = json.loads((tmp_path / "e" / "evaluation.json").read_text())
    chosen = record["threshold"]["values"]
    predictions = pd.read_csv(tmp_path / "e" / "predictions.csv")
    for classifier, rows in predictions.groupby("classifier"):
        assert (rows["predicted"] == (rows["p"] >= np.float32(chosen[classifier]))).all()
    _, _, val = data.load_split(real, "val")
    assert math.isfinite(frame.loc[frame.split == "val", "value"].iloc[0]) and len(val)


@pytest.mark.parametrize("size, pixel_mm", [(48, PIXEL_MM), (32, 0.7)])
def test_evaluate_refuses_another_geometry(run: Path, tmp_path: Path, size: int, pixel_mm: float) -> None:
    other = make_real_dataset(tmp_path / "other", n=4, size=size, pixel_mm=pixel_mm)
    result = CliRunner().invoke(
        app, ["evaluate", str(run), str(other), "--out", str(tmp_path / "e"), "--device", "cpu"]
    )
    assert_one_line_error(result, "geometry must match")
    assert not (tmp_path / "e").exists()


def test_evaluate_of_a_real_dataset_needs_out(run: Path, real: Path) -> None:
    before = file_tree(run)
    result = CliRunner().invoke(app, ["evaluate", str(run), str(real), "--device", "cpu"])
    assert_one_line_error(result, "real dataset", "--out")
    assert file_tree(run) == before


# ----------------------------------------------------------------------------- explain
def test_explain_probes_the_ratings_and_reads_grad_cam_against_the_outline(
    run: Path, real: Path, tmp_path: Path
) -> None:
    out = tmp_path / "explained"
    result = CliRunner().invoke(app, ["explain", str(run), str(real), "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert " ".join(NO_SWITCHES.split()) in " ".join(result.output.split())
    assert not (run / "explain").exists()
    assert {p.name for p in out.iterdir()} == {"probes.csv", "embedding.png", "cam.csv", "cam.png", "explain.json"}
    probes = pd.read_csv(out / "probes.csv")
    for factor in ("label", "diameter_mm", "lidc_malignancy", "lidc_spiculation", "lidc_subtlety"):
        assert set(probes.control[probes.factor == factor]) == {"trained", "random_init", "shuffled_labels"}, factor
    assert set(probes.metric[probes.factor == "lidc_spiculation"]) == {"r2"}
    assert set(probes.metric[probes.factor == "label"]) == {"balanced_accuracy"}
    assert "lidc_texture" not in set(probes.factor)  # constant in this dataset: nothing to decode
    cam = pd.read_csv(out / "cam.csv")
    assert set(cam.split) == {"test_lidc"} and set(cam.classifier) == {"head", "probe", "dfr"}
    assert list(cam.region[cam.classifier == "probe"]) == ["background", "body", "sanity_rank_corr"]
    _, masks, _ = data.load_split(real, "test_lidc")
    body = cam[(cam.classifier == "head") & (cam.region == "body")].iloc[0]
    assert body.area_share == pytest.approx(np.asarray(masks).mean())
    shares = cam[cam.region != "sanity_rank_corr"].groupby("classifier")["mass"].sum()
    assert np.allclose(shares, 1.0)
    record = json.loads((out / "explain.json").read_text())
    assert record["switches"] == NO_SWITCHES and record["dataset"]["kind"] == "real"
    assert record["probes"]["split"] == "test_lidc"


def test_explain_of_a_real_dataset_needs_out_and_the_geometry(run: Path, real: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["explain", str(run), str(real), "--device", "cpu"])
    assert_one_line_error(result, "real dataset", "--out")
    other = make_real_dataset(tmp_path / "other", n=4, size=48, pixel_mm=PIXEL_MM)
    result = CliRunner().invoke(app, ["explain", str(run), str(other), "--out", str(tmp_path / "x"), "--device", "cpu"])
    assert_one_line_error(result, "geometry must match")
    assert not (tmp_path / "x").exists() and not (run / "explain").exists()


def test_a_run_trains_on_real_nodules_with_geometric_views_only(real: Path, tmp_path: Path) -> None:
    """A real dataset's train/val splits train a run (views: flips, rotations, shifts; nothing can be
    rendered again), and the run is scored on its own dataset in its own folder."""
    refused = CliRunner().invoke(app, ["train", str(real), "--out", str(tmp_path / "no"), "--loss", "ce"])
    assert refused.exit_code == 2 and "use --views augment" in refused.output
    assert not (tmp_path / "no").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = train.train(real, tmp_path / "run", loss="ce", epochs=1, batch_size=12, device="cpu", views="augment")
    assert json.loads((run / "config.json").read_text())["dataset"]["scenario"] == metrics.REAL_DATASET
    frame = metrics.evaluate_run(run, real, device="cpu", draws=50)
    assert {"val", "test_lidc", "test_lidc_spiculation"} <= set(frame["split"])
    assert json.loads((run / metrics.EVALUATION_FILE).read_text())["dataset"]["trained_on"] is True
    tables = explain_run(run, real, n=8, device="cpu")
    assert "probes" in tables and (run / "explain" / "explain.json").is_file()
