"""``nodulab train`` and ``nodulab evaluate``: one-line errors with exit 2, and a tiny end-to-end run."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from conftest import assert_one_line_error, file_tree
from nodulab.cli import app
from nodulab.common.tables import RESULT_TABLES
from nodulab.data import dataset as data
from nodulab.training import loop as train
from nodulab.training.evaluation import METRICS

TINY = ["--n", "16", "--size", "32", "--pixel-mm", "1.4"]
FAST = ["--epochs", "1", "--batch-size", "16", "--device", "cpu"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli-train") / "ds"
    result = CliRunner().invoke(app, ["generate", "size-confound", "--out", str(out), *TINY])
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize(
    "case, extra, fragment",
    [
        ("unknown loss", ["--loss", "hinge"], "hinge"),
        ("missing data", ["--loss", "ce"], "DATA_DIR"),
        ("zero epochs", ["--loss", "ce", "--epochs", "0"], "--epochs"),
        ("too many epochs", ["--loss", "ce", "--epochs", str(2**63)], "--epochs must be 1..10,000"),
        ("unknown views", ["--loss", "ce", "--views", "paint"], "--views"),
        ("unknown option", ["--loss", "ce", "--bogus"], "--bogus"),
        ("unknown loss param", ["--loss", "supcon", "--loss-param", "margin=0.2"], "--loss-param"),
        ("bad loss param", ["--loss", "supcon", "--loss-param", "temperature=abc"], "--loss-param temperature"),
        ("no equals", ["--loss", "simclr", "--loss-param", "temperature"], "KEY=VALUE"),
        ("negative weight decay", ["--loss", "ce", "--weight-decay", "-1"], "--weight-decay"),
        ("diverging lr", ["--loss", "ce", "--lr", "1e30"], "training stopped"),
        ("checkpoint past the last epoch", ["--loss", "ce", "--checkpoints", "1,2"], "--checkpoints: epoch 2"),
        ("checkpoint zero", ["--loss", "ce", "--checkpoints", "0"], "--checkpoints"),
        ("checkpoint not a number", ["--loss", "ce", "--checkpoints", "1,last"], "--checkpoints: 'last'"),
        ("checkpoint fraction", ["--loss", "ce", "--checkpoints", "0.5"], "--checkpoints"),
    ],
)
def test_train_bad_input_is_one_line_and_writes_nothing(
    runner: CliRunner, dataset: Path, tmp_path: Path, case: str, extra: list[str], fragment: str
) -> None:
    source = tmp_path / "nowhere" if case == "missing data" else dataset
    before = file_tree(dataset)
    options = [o for o in FAST if "epochs" not in case or o not in ("--epochs", "1")]
    result = runner.invoke(app, ["train", str(source), "--out", str(tmp_path / "run"), *options, *extra])
    assert_one_line_error(result, fragment)
    assert list(tmp_path.iterdir()) == [] and file_tree(dataset) == before


def test_train_refuses_a_run_folder_of_another_format(runner: CliRunner, dataset: Path, tmp_path: Path) -> None:
    run = tmp_path / "old"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"run_format": 0}))
    before = file_tree(tmp_path)
    for force in ([], ["--force"]):
        result = runner.invoke(app, ["train", str(dataset), "--loss", "ce", "--out", str(run), *FAST, *force])
        assert_one_line_error(result, "run format")
        assert file_tree(tmp_path) == before


def test_evaluate_bad_input_is_one_line(runner: CliRunner, dataset: Path, tmp_path: Path) -> None:
    missing_run = runner.invoke(app, ["evaluate", str(tmp_path / "nowhere"), str(dataset)])
    assert_one_line_error(missing_run, "does not exist")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"run_format": train.RUN_FORMAT}))
    assert_one_line_error(runner.invoke(app, ["evaluate", str(run), str(dataset)]), "model.safetensors")
    assert [p.name for p in run.iterdir()] == ["config.json"]


def test_train_then_evaluate_end_to_end(runner: CliRunner, dataset: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", str(dataset), "--loss", "ce", "--out", str(run), *FAST])
    assert result.exit_code == 0, result.output
    assert {"config.json", "model.safetensors", "readouts.safetensors"} <= {p.name for p in run.iterdir()}
    result = runner.invoke(app, ["evaluate", str(run), str(dataset), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "bal acc" in result.stdout and "worst" in result.stdout and "metrics.csv" in result.stdout
    frame = pd.read_csv(run / "metrics.csv")
    assert tuple(frame.columns) == RESULT_TABLES["metrics"].columns  # as declared (the store reads it)
    assert {"split", "classifier", "metric", "value", "ci_low", "ci_high"} <= set(frame.columns)
    groups = pd.read_csv(run / "groups.csv")
    assert list(groups.columns) == ["split", "classifier", "label", "group", "n", "accuracy"]
    assert (groups.label == "any").sum() == len(frame) // len(METRICS)  # one worst group per split and classifier
    splits = set(data.load_manifest(dataset)["splits"]) - {"train", "val_balanced"}
    assert "val" in splits and any(s.startswith("test") for s in splits)
    classifiers = ("head", "probe", "knn", "dfr", "probe_init", "knn_init")
    expected = {(s, c, m) for s in splits for c in classifiers for m in METRICS}
    assert set(zip(frame.split, frame.classifier, frame.metric)) == expected and len(frame) == len(expected)
    # one epoch kept by default (the last): evaluate follows it in dynamics.csv
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["epoch_1.safetensors"]
    dynamics = pd.read_csv(run / "dynamics.csv")
    assert "dynamics.csv" in result.stdout and set(dynamics.epoch) == {1}
    assert {"val", "test_conflict"} == set(dynamics.split)
    # a second evaluate replaces metrics.csv with the same numbers and intervals (deterministic on CPU)
    first = {name: (run / name).read_bytes() for name in ("metrics.csv", "groups.csv", "dynamics.csv")}
    assert runner.invoke(app, ["evaluate", str(run), str(dataset), "--device", "cpu"]).exit_code == 0
    assert {name: (run / name).read_bytes() for name in first} == first
    chosen = runner.invoke(
        app,
        [
            "evaluate",
            str(run),
            str(dataset),
            "--device",
            "cpu",
            "--threshold",
            "val",
            "--out",
            str(tmp_path / "val-threshold"),
        ],
    )
    assert chosen.exit_code == 0, chosen.output
    assert "thresholds chosen on val" in " ".join(chosen.stdout.split())
    assert (tmp_path / "val-threshold" / "dynamics.csv").read_bytes() == first["dynamics.csv"]  # same --out rule
    rule = json.loads((tmp_path / "val-threshold" / "evaluation.json").read_text())["threshold"]
    assert rule["rule"] == "val" and set(rule["values"]) == set(classifiers)
    bad = runner.invoke(
        app, ["evaluate", str(run), str(dataset), "--threshold", "test_iid", "--out", str(tmp_path / "b")]
    )
    assert bad.exit_code == 2 and not (tmp_path / "b").exists()


def test_threshold_rules_of_the_cli_are_the_library_s() -> None:
    from nodulab import cli
    from nodulab.training import evaluation as metrics

    assert cli.THRESHOLD_RULES == metrics.THRESHOLD_RULES


def test_evaluate_another_dataset_needs_its_own_folder(runner: CliRunner, dataset: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert runner.invoke(app, ["train", str(dataset), "--loss", "ce", "--out", str(run), *FAST]).exit_code == 0
    other = tmp_path / "other"
    assert runner.invoke(app, ["generate", "clean", "--out", str(other), *TINY]).exit_code == 0
    before = file_tree(run)
    assert_one_line_error(runner.invoke(app, ["evaluate", str(run), str(other), "--device", "cpu"]), "--out")
    assert file_tree(run) == before  # the run's own evaluation is never overwritten
    result = runner.invoke(app, ["evaluate", str(run), str(other), "--device", "cpu", "--out", str(tmp_path / "ev")])
    assert result.exit_code == 0, result.output
    evaluation = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    assert evaluation["dataset"]["manifest_sha256"] == data.sha256_file(other / "dataset.json")
    assert evaluation["dataset"]["trained_on"] is False
    assert "dfr" in set(pd.read_csv(tmp_path / "ev" / "metrics.csv").classifier)  # fitted on the run's own data
    clean_run = tmp_path / "clean-run"  # clean has no val_balanced: dfr is absent, not faked
    assert runner.invoke(app, ["train", str(other), "--loss", "ce", "--out", str(clean_run), *FAST]).exit_code == 0
    assert runner.invoke(app, ["evaluate", str(clean_run), str(other), "--device", "cpu"]).exit_code == 0
    assert "dfr" not in set(pd.read_csv(clean_run / "metrics.csv").classifier)
    wider = tmp_path / "wider"
    assert (
        runner.invoke(
            app, ["generate", "clean", "--out", str(wider), "--n", "16", "--size", "48", "--pixel-mm", "1.4"]
        ).exit_code
        == 0
    )
    assert_one_line_error(
        runner.invoke(app, ["evaluate", str(run), str(wider), "--out", str(tmp_path / "w")]),
        "image size is 48",
        "geometry",
    )
    assert not (tmp_path / "w").exists() and file_tree(run) == before


def test_evaluate_skips_dynamics_without_checkpoints(runner: CliRunner, dataset: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    options = ["--loss", "ce", "--out", str(run), *FAST, "--checkpoints", "none"]
    assert runner.invoke(app, ["train", str(dataset), *options]).exit_code == 0
    assert not (run / "checkpoints").exists()
    result = runner.invoke(app, ["evaluate", str(run), str(dataset), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert (run / "metrics.csv").is_file() and not (run / "dynamics.csv").exists()
    assert "dynamics.csv" not in result.output
