"""The training protocol: determinism, the same views for every loss, no test split read."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from nodulab.data import dataset as data
from nodulab.synth.scenarios import load_scenario, resolve
from nodulab.training import hparams, losses
from nodulab.training import loop as train


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    scenario = resolve(load_scenario("size-confound"), n=24, size=32, pixel_mm=1.4)
    return data.generate(scenario, tmp_path_factory.mktemp("data") / "sc", seed=0)


pytestmark = pytest.mark.usefixtures("one_thread")


def _run(tiny: Path, out: Path, **kw) -> Path:
    options = {"loss": "ce", "epochs": 1, "batch_size": 12, "device": "cpu"} | kw
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return train.train(tiny, out, **options)


@pytest.mark.parametrize("loss", hparams.names())
def test_every_loss_writes_a_complete_run(tiny: Path, tmp_path: Path, loss: str) -> None:
    run = _run(tiny, tmp_path / loss, loss=loss)
    assert {p.name for p in run.iterdir()} == {
        "config.json",
        "model.safetensors",
        "readouts.safetensors",
        "readouts_init.safetensors",
        "history.csv",
        "history.png",
        "checkpoints",  # the last epoch's weights, kept by default (default_checkpoints)
    }
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["epoch_1.safetensors"]
    config = json.loads((run / "config.json").read_text())
    assert config["run_format"] == train.RUN_FORMAT and config["config"]["loss"] == loss
    assert config["config"]["loss_params"] == {k: p.default for k, p in losses.params(loss).items()}
    assert config["config"]["views"] == "both" and config["config"]["optimiser"] == "adamw"
    history = pd.read_csv(run / "history.csv")
    assert list(history.epoch) == [1] and np.isfinite(history.train_loss).all()
    assert ("val_head_auc" in history.columns) == losses.build(loss).uses_head
    # what tells a failed run from a good one
    assert np.isfinite(history.feature_spread).all() and np.isfinite(history.lr).all()
    assert ("mined_triplets" in history.columns) == ("triplet" in loss)
    assert ("positives_per_anchor" in history.columns) == (loss in ("supcon", "ce+supcon", "simclr"))


def test_same_seed_same_weights_and_history_on_cpu(tiny: Path, tmp_path: Path) -> None:
    a = _run(tiny, tmp_path / "a", loss="supcon", seed=3)
    b = _run(tiny, tmp_path / "b", loss="supcon", seed=3)
    c = _run(tiny, tmp_path / "c", loss="supcon", seed=4)
    wa, wb, wc = (load_file(r / "model.safetensors") for r in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)
    drop = ["seconds"]
    pd.testing.assert_frame_equal(
        pd.read_csv(a / "history.csv").drop(columns=drop), pd.read_csv(b / "history.csv").drop(columns=drop)
    )


def test_every_loss_sees_the_same_views(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, list[torch.Tensor]] = {}
    original = train._step_loss

    def spy(model, objective, views, labels, index, device):
        seen.setdefault(loss, []).append(views.clone())
        return original(model, objective, views, labels, index, device)

    monkeypatch.setattr(train, "_step_loss", spy)
    split = train._Split.load(tiny, "train")
    config = train.TrainConfig(str(tiny), "ce", batch_size=12)
    for loss in hparams.names():
        model = train.build_model("small-cnn", 2, head=True, projector=True, seed=1)
        objective = losses.build(loss)
        optimiser = torch.optim.AdamW(model.parameters())
        scheduler = train._schedule(optimiser, 10, 0.1)
        train.train_epoch(
            model,
            objective,
            optimiser,
            scheduler,
            split,
            config,
            {"size": 32, "dim": 2},
            0,
            torch.Generator().manual_seed(1),
            "cpu",
        )
    views = list(seen.values())
    assert list(seen) == hparams.names()
    for other in views[1:]:
        assert all(torch.equal(x, y) for x, y in zip(views[0], other))


def test_test_splits_are_never_read(tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    read: list[str] = []
    original = data.load_split

    def spy(root, split):
        read.append(split)
        return original(root, split)

    dfr_labels: list[np.ndarray] = []
    original_dfr = train.fit_dfr

    def dfr_spy(features, labels, **kw):
        dfr_labels.append(np.asarray(labels))
        return original_dfr(features, labels, **kw)

    fitted_on: list[int] = []
    original_fit = train.fit_readouts

    def fit_spy(train_features, train_labels, val_features, val_labels, **kw):
        fitted_on.extend([len(train_labels), len(val_labels)])
        return original_fit(train_features, train_labels, val_features, val_labels, **kw)

    monkeypatch.setattr(train, "load_split", spy)
    monkeypatch.setattr(train, "fit_dfr", dfr_spy)
    monkeypatch.setattr(train, "fit_readouts", fit_spy)
    _run(tiny, tmp_path / "run")
    # val_balanced is read once, for dfr only; test splits never
    assert sorted(read) == ["train", "val", "val_balanced"]
    balanced = data.load_split(tiny, "val_balanced")[2]["label"].to_numpy()
    assert len(dfr_labels) == 1 and np.array_equal(dfr_labels[0], balanced)
    assert fitted_on == [24, 24, 24, 24]  # trained and untrained readouts: train and val only


def test_nan_loss_stops_with_epoch_and_step(tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    original = train._step_loss

    def poisoned(*args):
        loss, embeddings = original(*args)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 2 else loss), embeddings

    monkeypatch.setattr(train, "_step_loss", poisoned)
    with pytest.raises(train.TrainingDiverged, match="epoch 1, step 2"):
        _run(tiny, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_rerender_views_train(tiny: Path, tmp_path: Path) -> None:
    run = _run(tiny, tmp_path / "run", loss="simclr", views="rerender")
    assert (run / "model.safetensors").is_file()


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"loss": "focal"}, "--loss"),
        ({"epochs": 0}, "--epochs"),
        ({"views": "mixup"}, "--views"),
        ({"batch_size": 1}, "--batch-size"),
        ({"device": "tpu"}, "--device"),
    ],
)
def test_bad_options_are_one_line_errors(tiny: Path, tmp_path: Path, kw: dict, match: str) -> None:
    with pytest.raises(train.TrainError, match=match) as info:
        _run(tiny, tmp_path / "run", **kw)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "run").exists()


def test_missing_data_and_foreign_run_dir(tiny: Path, tmp_path: Path) -> None:
    with pytest.raises(train.TrainError, match="DATA_DIR"):
        _run(tmp_path / "nowhere", tmp_path / "run")
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text(json.dumps({"run_format": 0}))
    with pytest.raises(train.TrainError, match="run format"):
        _run(tiny, old, force=True)
    with pytest.raises(train.TrainError, match="already exists"):
        _run(tiny, _run(tiny, tmp_path / "done"))


def test_resnet18_trains_end_to_end(tiny: Path, tmp_path: Path) -> None:
    run = _run(tiny, tmp_path / "r18", loss="ce+supcon", encoder="resnet18")
    config = json.loads((run / "config.json").read_text())
    assert config["config"]["encoder"] == "resnet18"
    assert np.isfinite(pd.read_csv(run / "history.csv").train_loss).all()


# ----------------------------------------------------------------------------- protocol validity
def test_loss_param_reaches_the_loss_by_its_formula(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[float, float, torch.Tensor, torch.Tensor]] = []
    original = train._step_loss

    def spy(model, objective, views, labels, index, device):
        loss, out = original(model, objective, views, labels, index, device)
        seen.append((objective.temperature, float(loss), out["projection"].detach(), labels.repeat(2)))
        return loss, out

    monkeypatch.setattr(train, "_step_loss", spy)
    run = _run(tiny, tmp_path / "run", loss="supcon", loss_params={"temperature": 0.25})
    assert json.loads((run / "config.json").read_text())["config"]["loss_params"] == {"temperature": 0.25}
    temperature, value, embeddings, labels = seen[0]
    assert temperature == 0.25
    # the value is SupCon's formula at tau = 0.25 (an independent loop), not at the default 0.1
    z = torch.nn.functional.normalize(embeddings.double(), dim=1)

    def naive(tau: float) -> float:
        terms = []
        for i in range(len(z)):
            others = [a for a in range(len(z)) if a != i]
            log_denominator = torch.logsumexp(torch.stack([z[i] @ z[a] / tau for a in others]), 0)
            positives = [p for p in others if labels[p] == labels[i]]
            terms.append(-sum(float(z[i] @ z[p] / tau - log_denominator) for p in positives) / len(positives))
        return sum(terms) / len(terms)

    assert value == pytest.approx(naive(0.25), rel=1e-4)
    assert value != pytest.approx(naive(0.1), rel=1e-2)


@pytest.mark.parametrize(
    "params, match", [({"margin": 0.3}, "takes no parameter 'margin'"), ({"temperature": -1.0}, "positive finite")]
)
def test_bad_loss_params_are_refused(tiny: Path, tmp_path: Path, params: dict, match: str) -> None:
    with pytest.raises(train.TrainError, match=f"--loss-param.*{match}"):
        _run(tiny, tmp_path / "run", loss="supcon", loss_params=params)
    assert not (tmp_path / "run").exists()


class _Constant(torch.nn.Module):
    """A projector that maps every sample to the same point: a collapsed embedding."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :4] * 0.0 + 1.0


def test_triplet_warning_fires_on_a_collapsed_embedding(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = train.build_model

    def collapsed(*args, **kw):
        model = original(*args, **kw)
        model.projector = _Constant()
        return model

    monkeypatch.setattr(train, "build_model", collapsed)
    with pytest.warns(UserWarning, match="triplet loss stuck: 0.00 semi-hard triplets mined"):
        run = train.train(tiny, tmp_path / "run", loss="triplet", epochs=1, batch_size=12, device="cpu")
    history = pd.read_csv(run / "history.csv")
    assert history.mined_triplets.tolist() == [0.0] and history.train_loss.tolist() == [0.0]
    assert history.embedding_distance.tolist() == [0.0]  # the collapse warning's own number


def test_threads_are_recorded_and_restored_by_evaluate(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nodulab.training import evaluation as metrics
    from nodulab.training import runs

    run = _run(tiny, tmp_path / "run", threads=2)
    assert json.loads((run / "config.json").read_text())["threads"] == 2
    assert torch.get_num_threads() == 1  # train restores the caller's count (one_thread fixture)
    seen: list[int] = []
    original = runs.extract  # LoadedRun.predict (runs.py) extracts the features evaluate scores
    monkeypatch.setattr(runs, "extract", lambda *a, **kw: (seen.append(torch.get_num_threads()), original(*a, **kw))[1])
    metrics.evaluate_run(run, tiny)
    assert set(seen) == {2} and torch.get_num_threads() == 1
    evaluation = json.loads((run / "evaluation.json").read_text())
    assert evaluation["threads"] == 2 and evaluation["threshold"] == {"rule": "fixed", "value": 0.5}


def test_geometric_views_are_refused_for_a_geometric_confound(tmp_path: Path) -> None:
    scenario = resolve(load_scenario("clean"), n=12, size=32, pixel_mm=1.4)
    d = scenario.model_dump(mode="json", exclude_none=True)
    d["factors"].pop("offset_x_mm", None)
    d["confounds"] = [{"factor": "offset_x_mm", "malignant": {"uniform": [1, 3]}, "benign": {"uniform": [-3, -1]}}]
    d["splits"] = {"train": {"n": 12, "agreement": 0.9}, "val": {"n": 12, "agreement": 0.9}}
    from nodulab.synth.scenarios import load_scenario_dict

    root = data.generate(load_scenario_dict(d), tmp_path / "offset", seed=0)
    for views in ("both", "augment"):
        with pytest.raises(train.TrainError, match=f"--views {views}: .* offset_x_mm"):
            _run(root, tmp_path / views, views=views)
        assert not (tmp_path / views).exists()
    assert (_run(root, tmp_path / "ok", views="rerender") / "model.safetensors").is_file()


def test_best_val_selects_on_knn_for_every_loss(tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # kNN is best at epoch 1, the head at epoch 2: a CE run must still follow the kNN
    scores = iter(
        [
            {"val_knn_balanced_accuracy": 0.9, "val_head_balanced_accuracy": 0.5},
            {"val_knn_balanced_accuracy": 0.6, "val_head_balanced_accuracy": 0.99},
        ]
    )
    monkeypatch.setattr(train, "_validate", lambda *a: next(scores))
    run = _run(tiny, tmp_path / "run", loss="ce", epochs=2, selection="best-val")
    config = json.loads((run / "config.json").read_text())
    assert config["selected_epoch"] == 1 and config["selection_score"] == "val_knn_balanced_accuracy"


def test_schedule_warms_up_then_decays_to_zero() -> None:
    optimiser = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = train._schedule(optimiser, 100, 0.05)
    rates = []
    for _ in range(100):
        rates.append(optimiser.param_groups[0]["lr"])
        optimiser.step()
        scheduler.step()
    assert rates[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert all(a >= b for a, b in zip(rates[4:], rates[5:])) and rates[-1] < 1e-3


@pytest.mark.parametrize("split", ["val_balanced", "test_conflict"])
def test_held_out_splits_are_refused_for_training_or_selection(tiny: Path, split: str) -> None:
    with pytest.raises(train.TrainError, match=f"{split}.*never used for training or model selection"):
        train.training_split(tiny, split)
    assert len(train.training_split(tiny, "train").labels) == 24


def test_rerendered_views_depend_on_the_run_seed(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    split = train._Split.load(tiny, "train")
    index = torch.arange(6)
    image = {"size": 32, "dim": 2}

    def views(seed: int) -> torch.Tensor:
        config = train.TrainConfig(str(tiny), "simclr", views="rerender", seed=seed)
        return train._views(split, index, config, image, 0, torch.Generator().manual_seed(0), "cpu")

    assert torch.equal(views(0), views(0)) and not torch.equal(views(0), views(1))


def test_a_hostile_manifest_scenario_is_a_one_line_error(tiny: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny, copy)
    manifest = json.loads((copy / "dataset.json").read_text())
    manifest["scenario"]["label"] = "shape"  # not a table
    (copy / "dataset.json").write_text(json.dumps(manifest))
    with pytest.raises(train.TrainError, match="dataset.json scenario: label") as info:
        _run(copy, tmp_path / "run")
    assert "\n" not in str(info.value) and not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize(
    "epochs, expected",
    [(1, (1,)), (2, (1, 2)), (3, (1, 2, 3)), (6, (1, 2, 4, 6)), (8, (1, 2, 4, 8)), (30, (1, 2, 4, 8, 16, 30))],
)
def test_default_checkpoints_are_log_spaced_and_end_at_the_last_epoch(epochs: int, expected: tuple) -> None:
    assert train.default_checkpoints(epochs) == expected


def test_checkpoints_save_the_weights_and_change_no_other_file(tiny: Path, tmp_path: Path) -> None:
    from conftest import file_tree
    from nodulab.training.models import read_checkpoint_config

    kept = _run(tiny, tmp_path / "kept", loss="supcon", epochs=3, seed=2)
    plain = _run(tiny, tmp_path / "plain", loss="supcon", epochs=3, seed=2, checkpoints="none")
    assert sorted(p.name for p in (kept / "checkpoints").iterdir()) == [f"epoch_{k}.safetensors" for k in (1, 2, 3)]
    assert not (plain / "checkpoints").exists()
    a, b = file_tree(kept), file_tree(plain)
    a = {name: data for name, data in a.items() if not name.startswith("checkpoints/")}
    assert set(a) == set(b)
    for name in a.keys() - {"history.csv"}:  # config.json, model and readouts files, history.png
        assert a[name] == b[name], name
    drop = ["seconds"]  # the only column that is a wall-clock measurement
    pd.testing.assert_frame_equal(
        pd.read_csv(kept / "history.csv").drop(columns=drop), pd.read_csv(plain / "history.csv").drop(columns=drop)
    )
    final, first = (load_file(kept / "checkpoints" / f"epoch_{k}.safetensors") for k in (3, 1))
    weights = load_file(kept / "model.safetensors")
    assert all(torch.equal(final[k], weights[k]) for k in weights)  # the last epoch is the run's model
    assert not all(torch.equal(first[k], weights[k]) for k in weights)
    stored = read_checkpoint_config(kept / "checkpoints" / "epoch_1.safetensors")
    assert (
        stored["checkpoint_epoch"] == 1
        and stored["init_sha256"] == json.loads((kept / "config.json").read_text())["init_sha256"]
    )
    assert "checkpoints" not in json.loads((kept / "config.json").read_text())["config"]


def test_chosen_checkpoints_are_kept_as_given(tiny: Path, tmp_path: Path) -> None:
    run = _run(tiny, tmp_path / "run", epochs=3, checkpoints=[2, 1, 2])
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch_1.safetensors", "epoch_2.safetensors"]
    assert train.check_checkpoints("3, 1", 3) == (1, 3) and train.check_checkpoints((), 3) == ()


@pytest.mark.parametrize("checkpoints", ["0", "4", "1,x", "1.5", "", [1.5], [True], "1,,2", 2.0])
def test_bad_checkpoints_are_one_line_errors(tiny: Path, tmp_path: Path, checkpoints: object) -> None:
    with pytest.raises(train.TrainError, match="^--checkpoints: ") as info:
        _run(tiny, tmp_path / "run", epochs=3, checkpoints=checkpoints)
    assert "\n" not in str(info.value) and not (tmp_path / "run").exists()


def test_training_and_best_val_never_touch_dynamics_or_a_test_split(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    from nodulab.explanation import dynamics

    read: list[str] = []
    original = data.load_split
    monkeypatch.setattr(train, "load_split", lambda root, split: (read.append(split), original(root, split))[1])

    def forbidden(*args, **kw):
        raise AssertionError("training called nodulab.explanation.dynamics")

    for name, value in vars(dynamics).items():
        if callable(value) and getattr(value, "__module__", None) == dynamics.__name__:
            monkeypatch.setattr(dynamics, name, forbidden)
    called: list[str] = []  # and no code of that module runs, however it is reached

    def profile(frame, event, arg):
        if event == "call" and frame.f_code.co_filename == dynamics.__file__:
            called.append(frame.f_code.co_name)

    sys.setprofile(profile)
    try:
        run = _run(tiny, tmp_path / "run", epochs=2, selection="best-val", checkpoints=[1, 2])
    finally:
        sys.setprofile(None)
    assert called == []
    assert sorted(read) == ["train", "val", "val_balanced"]  # val_balanced for dfr only; no test split
    assert (run / "checkpoints" / "epoch_2.safetensors").is_file()


def test_readouts_are_tied_to_their_run(tiny: Path, tmp_path: Path) -> None:
    """config.json records the readouts files' sha256 (run format 3): one copied from another run is
    refused with one line; a format-2 run (no hashes) still loads."""
    import shutil

    from nodulab.training.runs import READOUTS_FILE, RunError, load_run

    a, b = _run(tiny, tmp_path / "a", seed=0), _run(tiny, tmp_path / "b", seed=1)
    assert load_run(a).classifiers
    config = json.loads((a / "config.json").read_text())
    assert set(config["files_sha256"]) == {"readouts.safetensors", "readouts_init.safetensors"}
    shutil.copy(b / READOUTS_FILE, a / READOUTS_FILE)
    with pytest.raises(RunError, match="readouts.safetensors does not belong to this run") as error:
        load_run(a)
    assert "\n" not in str(error.value)
    older = {k: v for k, v in config.items() if k != "files_sha256"} | {"run_format": 2}
    (b / "config.json").write_text(json.dumps(older))  # b's own readouts, as a format-2 run wrote them
    assert load_run(b).classifiers
