"""``nodulab train`` and ``nodulab evaluate``: one-line errors with exit 2, and a tiny end-to-end run."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from nodulab import data, train
from nodulab.cli import app
from nodulab.metrics import METRICS

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


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize(
    "case, extra, fragment",
    [
        ("unknown loss", ["--loss", "hinge"], "hinge"),
        ("missing data", ["--loss", "ce"], "DATA_DIR"),
        ("zero epochs", ["--loss", "ce", "--epochs", "0"], "--epochs"),
        ("unknown views", ["--loss", "ce", "--views", "paint"], "--views"),
        ("unknown option", ["--loss", "ce", "--bogus"], "--bogus"),
    ],
)
def test_train_bad_input_is_one_line_and_writes_nothing(
    runner: CliRunner, dataset: Path, tmp_path: Path, case: str, extra: list[str], fragment: str
) -> None:
    source = tmp_path / "nowhere" if case == "missing data" else dataset
    before = _tree(dataset)
    options = [o for o in FAST if case != "zero epochs" or o not in ("--epochs", "1")]
    result = runner.invoke(app, ["train", str(source), "--out", str(tmp_path / "run"), *options, *extra])
    _one_line_error(result, fragment)
    assert list(tmp_path.iterdir()) == [] and _tree(dataset) == before


def test_train_refuses_a_run_folder_of_another_format(
    runner: CliRunner, dataset: Path, tmp_path: Path
) -> None:
    run = tmp_path / "old"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"run_format": 0}))
    before = _tree(tmp_path)
    for force in ([], ["--force"]):
        result = runner.invoke(app, ["train", str(dataset), "--loss", "ce", "--out", str(run), *FAST, *force])
        _one_line_error(result, "run format")
        assert _tree(tmp_path) == before


def test_evaluate_bad_input_is_one_line(runner: CliRunner, dataset: Path, tmp_path: Path) -> None:
    missing_run = runner.invoke(app, ["evaluate", str(tmp_path / "nowhere"), str(dataset)])
    _one_line_error(missing_run, "does not exist")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"run_format": train.RUN_FORMAT}))
    _one_line_error(runner.invoke(app, ["evaluate", str(run), str(dataset)]), "model.safetensors")
    assert [p.name for p in run.iterdir()] == ["config.json"]


def test_train_then_evaluate_end_to_end(runner: CliRunner, dataset: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", str(dataset), "--loss", "ce", "--out", str(run), *FAST])
    assert result.exit_code == 0, result.output
    assert {"config.json", "model.safetensors", "readouts.safetensors"} <= {p.name for p in run.iterdir()}
    result = runner.invoke(app, ["evaluate", str(run), str(dataset), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "bal acc" in result.stdout and "metrics.csv" in result.stdout
    frame = pd.read_csv(run / "metrics.csv")
    assert list(frame.columns) == ["split", "classifier", "metric", "value"]
    splits = set(data.load_manifest(dataset)["splits"]) - {"train", "val_balanced"}
    assert "val" in splits and any(s.startswith("test") for s in splits)
    classifiers = ("head", "probe", "knn", "dfr", "probe_init", "knn_init")
    expected = {(s, c, m) for s in splits for c in classifiers for m in METRICS}
    assert set(zip(frame.split, frame.classifier, frame.metric)) == expected and len(frame) == len(expected)
    # a second evaluate replaces metrics.csv with the same numbers (deterministic on CPU)
    first = (run / "metrics.csv").read_bytes()
    assert runner.invoke(app, ["evaluate", str(run), str(dataset), "--device", "cpu"]).exit_code == 0
    assert (run / "metrics.csv").read_bytes() == first
