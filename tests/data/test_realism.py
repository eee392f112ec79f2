"""nodulab realism: trace synthetic nodules as a reader would and compare them with LIDC-IDRI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from conftest import assert_one_line_error, file_tree
from nodulab.cli import app
from nodulab.data import realism


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("realism") / "ds"
    result = CliRunner().invoke(app, ["generate", "clean", "--out", str(out), "--n", "24"])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def twins(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same dataset with the columns rows drawn from the LIDC table carry (as the lidc preset writes)."""
    import shutil

    out = tmp_path_factory.mktemp("twins") / "ds"
    shutil.copytree(dataset, out)
    for split in ("train", "val"):
        path = out / split / "factors.csv"
        frame = pd.read_csv(path)
        spic = np.where(frame["shape"] == "round", 1, np.where(frame.index % 2, 5, 3))
        frame["lidc_annotation_id"] = 100 + frame["index"]
        frame["lidc_spiculation"] = spic
        frame["lidc_malignancy"] = np.where(frame["label"] == 1, 5, 1)
        frame.to_csv(path, index=False)
    return out


def test_traced_diameter_matches_rendered_clean_nodules(dataset: Path) -> None:
    result = realism.compare(dataset, splits=["train"])
    m = result.measures
    assert len(m) == 24 and m["solidity"].notna().all()
    ratio = (m["diameter_mm"] / m["set_diameter_mm"]).median()
    assert ratio == pytest.approx(1.0, abs=0.10)
    # a round nodule is traced as round; a spiculated one is less solid
    by = m.groupby("group")["solidity"].median()
    assert by["round"] > 0.9 > by["spiculated"]
    assert result.summary["grouping"] == "shape"
    assert result.summary["counterparts"] == {"round": "1", "spiculated": ">=4"}
    assert "goals" not in result.summary


def test_threshold_is_midway_and_centre_follows_offsets() -> None:
    assert realism.threshold_hu("solid") == pytest.approx(-415.0)
    assert realism.threshold_hu("ground_glass") == pytest.approx(-755.0)
    image = np.full((32, 32), -860.0)
    image[3:8, 24:29] = 30.0  # the nodule, at row 5, col 26
    image[14:18, 14:18] = 30.0  # a vessel-like blob at the patch centre
    row = pd.Series(
        {"pixel_mm": 1.0, "offset_x_mm": 10.5, "offset_y_mm": -10.5, "offset_z_mm": 0.0, "attenuation": "solid"}
    )
    assert realism.trace_row(image, row)["area_mm2"] == pytest.approx(25.0)


def test_cli_writes_outputs(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "r"
    result = CliRunner().invoke(app, ["realism", str(dataset), "--split", "val", "--n", "10", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "round" in result.output and "separability" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["measures.csv", "realism.csv", "realism.png", "summary.json"]
    long = pd.read_csv(out / "realism.csv")
    assert list(long.columns) == ["source", "group", "measure", "n", "median", "q25", "q75", "ks"]
    assert set(long["source"]) == {"real", "synthetic"}
    assert long.loc[long["source"] == "synthetic", "ks"].between(0, 1).all()
    measures = pd.read_csv(out / "measures.csv")
    assert len(measures) == 10 and set(measures["split"]) == {"val"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["splits"] == ["val"] and "midway" in summary["settings"]["threshold_rule"]
    assert 0 <= summary["aucs"]["solidity"]["synthetic"] <= 1
    assert summary["aucs"]["malignancy_by_diameter"]["real"] == pytest.approx(0.86, abs=0.04)
    assert "10.1118/1.3528204" in summary["lidc"]["citation"]
    assert (out / "realism.png").read_bytes()[:4] == b"\x89PNG"


def test_twins_group_by_lidc_spiculation_and_check_goals(twins: Path, tmp_path: Path) -> None:
    out = tmp_path / "r"
    result = CliRunner().invoke(app, ["realism", str(twins), "--split", "train", "--split", "val", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "goals" in result.output and ("pass" in result.output or "fail" in result.output)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["grouping"] == "lidc_spiculation"
    goals = summary["goals"]
    assert len(goals) == 9 + 1 + 3 + 1 and all(isinstance(g["pass"], bool) for g in goals)
    measures = pd.read_csv(out / "measures.csv")
    assert {"lidc_annotation_id", "lidc_spiculation"} <= set(measures.columns)
    assert set(measures["group"]) <= {1, 3, 5}


def test_refusals_one_line_nothing_written(dataset: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    before = file_tree(dataset)
    assert_one_line_error(runner.invoke(app, ["realism", str(tmp_path / "nope")]), "nope")
    (tmp_path / "notds").mkdir()
    assert_one_line_error(runner.invoke(app, ["realism", str(tmp_path / "notds")]), "notds")
    assert_one_line_error(runner.invoke(app, ["realism", str(dataset), "--split", "test_nope"]), "test_nope")
    assert_one_line_error(runner.invoke(app, ["realism", str(dataset), "--n", "0"]), "--n")
    assert_one_line_error(runner.invoke(app, ["realism", str(dataset), "--out", str(dataset / "r")]), "inside")
    assert_one_line_error(runner.invoke(app, ["realism", str(dataset), "--out", str(dataset)]), "input")
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("keep")
    assert_one_line_error(runner.invoke(app, ["realism", str(dataset), "--out", str(full)]), "already exists")
    assert (full / "x").read_text() == "keep" and len(list(full.iterdir())) == 1
    assert file_tree(dataset) == before
    assert not any(p.name.startswith(".tmp") for p in tmp_path.iterdir())
    empty = tmp_path / "empty"
    empty.mkdir()
    result = runner.invoke(app, ["realism", str(dataset), "--split", "val", "--n", "4", "--out", str(empty)])
    assert result.exit_code == 0, result.output
    assert (empty / "summary.json").is_file()
