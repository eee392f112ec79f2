"""Linear decodability of factors (nodulab.explanation.probes): controls, random-init diameter, the table."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import make_rows
from nodulab.common.tables import RESULT_TABLES
from nodulab.data import dataset as data
from nodulab.explanation.probes import (
    decodability,
    embedding_figure,
    factor_probes,
    probe_split,
    probe_targets,
)
from nodulab.synth.renderer import render
from nodulab.synth.scenarios import load_scenario, resolve
from nodulab.training.models import build_model
from nodulab.training.readouts import extract
from nodulab.training.runs import LoadedRun

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def rendered() -> tuple[dict[str, np.ndarray], object]:
    """120 rendered solid nodules without vessels (32 px at 1.4 mm); the label is 'large', so it
    is decodable and the shuffled control has something to destroy."""
    rows = make_rows(120, seed=11, pixel_mm=1.4, vessels=0, attenuation="solid")
    rows["label"] = (rows["diameter_mm"] > 12).astype(int)
    images, _ = render(rows, size=32, dim=2)
    features = {
        name: extract(build_model("small-cnn", 2, seed=seed), images)["features"]
        for name, seed in (("trained", 0), ("random_init", 1))  # both untrained: the controls' floor
    }
    return features, rows


def _scores(frame, factor: str) -> dict[str, float]:
    return frame[frame["factor"] == factor].set_index("control")["score"].to_dict()


def test_shuffled_labels_score_at_chance_and_diameter_decodes_from_random_init(rendered) -> None:
    features, rows = rendered
    frame = decodability(features, rows[["label", "shape", "diameter_mm", "noise_hu"]], seed=0)
    label, diameter = _scores(frame, "label"), _scores(frame, "diameter_mm")
    assert label["trained"] > 0.8  # decodable, so chance below is the control's doing
    assert abs(label["shuffled_labels"] - 0.5) < 0.1, label
    assert diameter["random_init"] > 0.5, diameter  # size is visible through random convolutions
    assert diameter["shuffled_labels"] <= 0.05, diameter
    assert tuple(frame.columns) == RESULT_TABLES["probes"].columns
    assert set(frame["control"]) == {"trained", "random_init", "shuffled_labels"}
    metrics = frame.groupby("factor")["metric"].first()
    assert metrics["label"] == metrics["shape"] == "balanced_accuracy" and metrics["diameter_mm"] == "r2"


def test_targets_vary_and_act_where_the_renderer_uses_them() -> None:
    rows = make_rows(40, seed=3, pixel_mm=1.4, vessels=0)
    targets = {factor: (target, r) for factor, target, r, _ in probe_targets(rows)}
    assert "vessels" not in targets and "pixel_mm" not in targets and "rotation_deg" not in targets
    target, spiculated = targets["n_spicules"]
    assert target == "value among spiculated"
    assert (rows["shape"].to_numpy()[spiculated] == "spiculated").all()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    scenario = resolve(load_scenario("size-confound"), n=16, size=32, pixel_mm=1.4, dim=2)
    return data.generate(scenario, tmp_path_factory.mktemp("ds") / "ds", seed=0)


def _run() -> LoadedRun:
    model, init = (build_model("small-cnn", 2, embedding_dim=16, seed=s).eval() for s in (0, 1))
    return LoadedRun(Path("."), {"threads": 1, "config": {"seed": 1, "loss": "ce"}}, model, init, None, None, "cpu")


def test_factor_probes_reads_val_balanced_and_falls_back_to_val(dataset: Path, tmp_path: Path) -> None:
    run = _run()
    frame = factor_probes(run, dataset, n=16)
    assert tuple(frame.columns) == RESULT_TABLES["probes"].columns and frame.attrs["split"] == "val_balanced"
    assert {"label", "diameter_mm", "agrees_diameter_mm"} <= set(frame["factor"])
    assert len(frame) == 3 * frame["factor"].nunique()
    without = tmp_path / "ds"
    shutil.copytree(dataset, without, ignore=shutil.ignore_patterns("val_balanced"))  # a dataset without it
    manifest = data.load_manifest(dataset)
    del manifest["splits"]["val_balanced"]
    (without / "dataset.json").write_text(data.dump_json(manifest), encoding="utf-8")
    assert probe_split(without) == "val" and probe_split(without, "test_iid") == "test_iid"
    assert probe_split(dataset) == "val_balanced"


def test_decodability_is_seeded(rendered) -> None:
    features, rows = rendered
    columns = rows[["label", "diameter_mm"]]
    assert decodability(features, columns, seed=3).equals(decodability(features, columns, seed=3))


def test_embedding_figure_has_a_panel_per_varying_factor(dataset: Path) -> None:
    fig = embedding_figure(_run(), dataset, split="test_balanced", n=16)
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible() and ax.get_title()]
    assert titles[0] == "PCA · label" and "PCA · diameter" in titles
    assert not any("pixel" in t for t in titles)  # fixed per dataset: no panel
