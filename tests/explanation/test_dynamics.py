"""The dynamics stage (nodulab.explanation.dynamics): every kept epoch scored, cheaply, selecting nothing."""

from __future__ import annotations

import math
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import file_tree
from nodulab.common.tables import RESULT_TABLES
from nodulab.data import dataset as data
from nodulab.explanation import dynamics
from nodulab.explanation.switches import Switch
from nodulab.synth.scenarios import load_scenario, load_scenario_dict, resolve
from nodulab.training import loop as train
from nodulab.training.evaluation import evaluate_run
from nodulab.training.runs import RunError, load_run

pytestmark = pytest.mark.usefixtures("one_thread")
EPOCHS = 3
N = 10
FLIPS = {f"{kind}_flip_rate" for kind in dynamics.KINDS}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    scenario = resolve(load_scenario("size-confound"), n=24, size=32, pixel_mm=1.4)
    return data.generate(scenario, tmp_path_factory.mktemp("dyn-data") / "sc", seed=0)


def _train(tiny: Path, out: Path, **kw) -> Path:
    options = {"loss": "ce", "epochs": EPOCHS, "batch_size": 12, "device": "cpu"} | kw
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return train.train(tiny, out, **options)


@pytest.fixture(scope="module")
def run(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train(tiny, tmp_path_factory.mktemp("dyn-run") / "run")  # checkpoints 1, 2, 3 by default


@pytest.fixture(scope="module")
def frame(run: Path, tiny: Path) -> pd.DataFrame:
    return dynamics.dynamics_run(run, tiny, n=N)


def test_rows_for_every_epoch_readout_and_split(frame: pd.DataFrame, run: Path, tiny: Path) -> None:
    assert tuple(frame.columns) == RESULT_TABLES["dynamics"].columns
    assert pd.read_csv(run / "dynamics.csv").shape == frame.shape
    assert list(dict.fromkeys(frame.epoch)) == [1, 2, 3]
    scenario = load_scenario_dict(data.load_manifest(tiny)["scenario"])
    conflicts = dynamics.conflict_splits(scenario, list(data.load_manifest(tiny)["splits"]))
    assert conflicts == ["test_conflict"]
    found = set(zip(frame.epoch, frame.split, frame.classifier, frame.measure))
    for epoch in (1, 2, 3):
        classifiers = ("head", "knn", "probe") if epoch == EPOCHS else ("head", "knn")
        for classifier in classifiers:
            for split in ("val", *conflicts):
                assert {(epoch, split, classifier, m) for m in ("balanced_accuracy", "auc")} <= found
            assert {(epoch, "test_conflict", classifier, m) for m in FLIPS} <= found, (epoch, classifier)
    assert set(frame.loc[frame.classifier == "probe", "epoch"]) == {EPOCHS}  # the run's own probe only
    assert not (frame.measure.isin(FLIPS) & (frame.split == "val")).any()
    assert set(frame.split) == {"val", "test_conflict"}  # test_iid, test_balanced, test_scanner: no conflict
    assert len(found) == len(frame)  # the table's key is unique
    flips = frame[frame.measure.isin(FLIPS)].value
    assert ((flips >= 0) & (flips <= 1)).all()


def test_intervals_only_at_the_final_epoch(frame: pd.DataFrame) -> None:
    early = frame[frame.epoch < EPOCHS]
    assert early.ci_low.isna().all() and early.ci_high.isna().all()
    final = frame[(frame.epoch == EPOCHS) & frame.value.notna()]
    assert final.ci_low.notna().all() and final.ci_high.notna().all()
    assert (final.ci_low <= final.ci_high).all()
    assert final.measure.isin(FLIPS).any()  # flip rates get theirs too (rows resampled)


def test_final_epoch_rows_are_the_run_s_own_evaluation(frame: pd.DataFrame, run: Path, tiny: Path, tmp_path) -> None:
    metrics = evaluate_run(run, tiny, out=tmp_path / "ev")
    final = frame[(frame.epoch == EPOCHS) & frame.measure.isin(("balanced_accuracy", "auc"))]
    merged = final.merge(
        metrics, left_on=["split", "classifier", "measure"], right_on=["split", "classifier", "metric"], how="left"
    )
    assert len(merged) == len(final) and merged.value_y.notna().all()
    for column in ("value", "ci_low", "ci_high"):  # the same model, readouts and bootstrap resamples
        np.testing.assert_array_equal(merged[f"{column}_x"], merged[f"{column}_y"])


def test_the_knn_is_refitted_as_the_readouts_fit_it(run: Path, tiny: Path) -> None:
    loaded = load_run(run)
    path = dynamics.run_checkpoints(run, EPOCHS)[EPOCHS]
    model = dynamics.load_checkpoint(loaded, path, EPOCHS)
    images, _, factors = data.load_split(tiny, "train")
    bank, labels, k = dynamics._bank(loaded, model, images, factors["label"].to_numpy(), 256)
    # the last checkpoint refitted gives exactly the run's own kNN
    np.testing.assert_array_equal(bank, loaded.readouts.knn_bank)
    np.testing.assert_array_equal(labels, loaded.readouts.knn_labels)
    assert k == loaded.readouts.knn_k
    early = dynamics.load_checkpoint(loaded, dynamics.run_checkpoints(run, EPOCHS)[1], 1)
    assert not np.array_equal(dynamics._bank(loaded, early, images, factors["label"].to_numpy(), 256)[0], bank)


def test_reruns_give_the_same_bytes_and_touch_nothing_else(run: Path, tiny: Path, frame: pd.DataFrame) -> None:
    first = (run / "dynamics.csv").read_bytes()
    before = {k: v for k, v in file_tree(run).items() if k != "dynamics.csv"}
    dynamics.dynamics_run(run, tiny, n=N)
    assert (run / "dynamics.csv").read_bytes() == first
    after = {k: v for k, v in file_tree(run).items() if k != "dynamics.csv"}
    assert after == before  # config.json, model, readouts and checkpoints unchanged, nothing added


def test_switched_rows_are_rendered_once_for_every_epoch(
    run: Path, tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rendered: list[int] = []
    original = dynamics.render
    monkeypatch.setattr(
        dynamics, "render", lambda rows, *a, **kw: (rendered.append(len(rows)), original(rows, *a, **kw))[1]
    )
    dynamics.dynamics_run(run, tiny, n=N, out=tmp_path / "out")
    manifest = data.load_manifest(tiny)
    _, _, factors = data.load_split(tiny, "test_conflict")
    rows = factors.iloc[dynamics.dynamics_rows(len(factors), N, manifest["seed"], "test_conflict")].reset_index(
        drop=True
    )
    scenario = load_scenario_dict(manifest["scenario"])
    switches = dynamics.followed(
        dynamics.build_switches(scenario, "test_conflict", manifest["seed"], len(factors), rows)
    )
    kinds = {dynamics.switch_kind(s) for s in switches}
    assert kinds == set(dynamics.KINDS)
    applied = [len(s.change(rows)[0]) for s in switches]
    assert len(rendered) == sum(1 for a in applied if a) and sum(rendered) <= sum(applied)  # not once per epoch


def test_flip_rates_are_pooled_over_row_switch_pairs(run: Path, tiny: Path) -> None:
    loaded = load_run(run)
    manifest = data.load_manifest(tiny)
    scenario = load_scenario_dict(manifest["scenario"])
    plan = dynamics._plan("test_conflict", tiny, scenario, manifest["seed"], N, 32, 2, "cpu", None)
    score = dynamics._Scorer(loaded, loaded.model, None, final=True)
    counts = dynamics._flip_counts(plan, score, 256)
    base = score(plan.images, 256)
    for kind in dynamics.KINDS:
        flipped = total = 0
        for k, where, images in plan.switched:
            if k == kind:
                p = score(images, 256)["head"]
                flipped += int(((p >= 0.5) != (base["head"][where] >= 0.5)).sum())
                total += len(where)
        flips, pairs = counts["head"][kind]
        assert (flips.sum(), pairs.sum()) == (flipped, total)
    frame = pd.read_csv(run / "dynamics.csv")
    row = frame[(frame.epoch == EPOCHS) & (frame.classifier == "head") & (frame.measure == "cue_flip_rate")]
    flips, pairs = counts["head"]["cue"]
    assert row.value.item() == flips.sum() / pairs.sum()


def test_flip_interval_resamples_rows() -> None:
    flips, pairs = np.array([0, 1, 2, 0]), np.array([2, 2, 2, 2])
    low, high = dynamics.flip_interval(flips, pairs, seed=1, draws=2000)
    assert 0 <= low < 3 / 8 < high <= 1
    assert dynamics.flip_interval(flips, pairs, seed=1, draws=2000) == (low, high)
    assert dynamics.flip_interval(np.zeros(3), np.ones(3), seed=2, draws=200) == (0.0, 0.0)
    assert all(math.isnan(v) for v in dynamics.flip_interval(np.zeros(2), np.zeros(2), seed=3, draws=50))


def test_followed_rows_depend_on_the_dataset_and_split_only() -> None:
    a = dynamics.dynamics_rows(400, 200, 0, "test_conflict")
    assert np.array_equal(a, dynamics.dynamics_rows(400, 200, 0, "test_conflict"))
    assert len(np.unique(a)) == 200 and np.all(np.diff(a) > 0) and a.max() < 400
    assert not np.array_equal(a, dynamics.dynamics_rows(400, 200, 1, "test_conflict"))
    assert not np.array_equal(a, dynamics.dynamics_rows(400, 200, 0, "test_other_conflict"))
    assert np.array_equal(dynamics.dynamics_rows(30, 200, 0, "test_conflict"), np.arange(30))


def test_rotation_and_offset_nuisance_switches_count_as_null() -> None:
    def switch(factor: str, kind: str) -> Switch:
        return Switch(factor, kind, "a", "b", (factor,), lambda rows: (np.zeros(0, int), rows.iloc[:0]))

    assert dynamics.switch_kind(switch("rotation_deg", "nuisance")) == "null"
    assert dynamics.switch_kind(switch("offset_x_mm", "nuisance")) == "null"
    assert dynamics.switch_kind(switch("noise_hu", "nuisance")) == "nuisance"
    assert dynamics.switch_kind(switch("rotation_deg", "robustness")) == "robustness"
    assert dynamics.switch_kind(switch("rerender", "null")) == "null"
    kept = dynamics.followed([switch("noise_hu", "nuisance"), switch("shape", "cue"), switch("x", "null")])
    assert [s.factor for s in kept] == ["shape", "x"]


def test_a_clean_dataset_has_no_conflict_split() -> None:
    clean = load_scenario("clean")
    assert dynamics.conflict_splits(clean, list(clean.splits)) == []
    confounded = load_scenario("size-confound")
    assert dynamics.conflict_splits(confounded, list(confounded.splits)) == ["test_conflict"]


def test_best_val_puts_probe_and_intervals_at_the_selected_epoch(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scores = iter([{"val_knn_balanced_accuracy": 0.9}, {"val_knn_balanced_accuracy": 0.6}])
    monkeypatch.setattr(train, "_validate", lambda *a: next(scores))
    run = _train(tiny, tmp_path / "run", epochs=2, selection="best-val", checkpoints=[2])
    frame = dynamics.dynamics_run(run, tiny, n=4, draws=200)
    assert list(dict.fromkeys(frame.epoch)) == [1, 2]  # the selected epoch, from model.safetensors
    assert set(frame.loc[frame.classifier == "probe", "epoch"]) == {1}
    assert frame.loc[frame.epoch == 2, "ci_low"].isna().all() and frame.loc[frame.epoch == 1, "ci_low"].notna().any()


def test_no_checkpoints_is_one_line(tiny: Path, tmp_path: Path) -> None:
    run = _train(tiny, tmp_path / "run", epochs=1, checkpoints="none")
    with pytest.raises(dynamics.NoCheckpoints, match="no checkpoints") as info:
        dynamics.dynamics_run(run, tiny)
    assert isinstance(info.value, RunError) and "\n" not in str(info.value)
    assert not (run / "dynamics.csv").exists()


@pytest.mark.parametrize(
    "case, match",
    [
        ("stray file", "not a checkpoint"),
        ("leading zero", "not a checkpoint"),
        ("past the last epoch", "outside the run's epochs 1..3"),
        ("renamed epoch", "holds epoch 2, its name says 1"),
        ("symlink", "not a checkpoint"),
        ("another run", "another run"),
    ],
)
def test_an_untrusted_checkpoint_folder_is_refused(
    run: Path, tiny: Path, tmp_path: Path, case: str, match: str
) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    folder = copy / "checkpoints"
    if case == "stray file":
        (folder / "notes.txt").write_text("hi")
    elif case == "leading zero":
        (folder / "epoch_1.safetensors").rename(folder / "epoch_01.safetensors")
    elif case == "past the last epoch":
        shutil.copy(folder / "epoch_1.safetensors", folder / "epoch_9.safetensors")
    elif case == "renamed epoch":
        shutil.copy(folder / "epoch_2.safetensors", folder / "epoch_1.safetensors")
    elif case == "symlink":
        (folder / "epoch_1.safetensors").unlink()
        (folder / "epoch_1.safetensors").symlink_to(run / "checkpoints" / "epoch_1.safetensors")
    else:
        other = _train(tiny, tmp_path / "other", epochs=1, seed=5)
        shutil.copy(other / "checkpoints" / "epoch_1.safetensors", folder / "epoch_1.safetensors")
    before = file_tree(copy)
    with pytest.raises(RunError, match=match) as info:
        dynamics.dynamics_run(copy, tiny, n=4)
    assert "\n" not in str(info.value) and file_tree(copy) == before


def test_out_follows_evaluate_s_rule(run: Path, tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "ev"
    dynamics.dynamics_run(run, tiny, n=N, out=out)  # a new folder, created with the table
    assert [p.name for p in out.iterdir()] == ["dynamics.csv"]
    assert (out / "dynamics.csv").read_bytes() == (run / "dynamics.csv").read_bytes()
    with pytest.raises(RunError, match="already exists"):
        dynamics.dynamics_run(run, tiny, n=N, out=out)
    dynamics.dynamics_run(run, tiny, n=N, out=out, force=True)
    with pytest.raises(RunError, match="would replace the run folder"):
        dynamics.dynamics_run(run, tiny, n=N, out=run)
    other = data.generate(resolve(load_scenario("size-confound"), n=12, size=32, pixel_mm=1.4), tmp_path / "o", seed=1)
    with pytest.raises(RunError, match="not the dataset this run was trained on"):
        dynamics.dynamics_run(run, other, out=tmp_path / "other-ev")
    assert not (tmp_path / "other-ev").exists()
