"""Hostile input found by a sweep: deep TOML, unbounded counts, a full disk inside safetensors, tampered
readouts and weights, malformed stores, a checkpoint symlink, and ``report --out`` onto another file.

Each is one line ``error: ...``, exit 2, and nothing written or changed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import save_file as save_torch
from typer.testing import CliRunner

from conftest import assert_one_line_error, file_tree
from nodulab.cli import app
from nodulab.common.choices import MAX_BATCH_SIZE, MAX_JOBS, MAX_PER_CELL, MAX_THREADS
from nodulab.results.store import STORE_FILE, Store, StoreError
from nodulab.studies.config import StudyError, load_study
from nodulab.studies.driver import _study_meta
from nodulab.training import models, readouts

SMALL = ["--n", "16", "--size", "32", "--pixel-mm", "1.4"]
FAST = ["--loss", "ce", "--epochs", "1", "--batch-size", "8", "--device", "cpu", "--threads", "1"]
TINY = """
name = "tiny"
scenarios = ["size-confound"]
losses = ["ce"]
seeds = 1
[data]
size = 32
pixel_mm = 1.4
n = { train = 16, val = 8, val_balanced = 8, test = 8 }
[train]
epochs = 1
batch_size = 8
threads = 1
"""

pytestmark = pytest.mark.usefixtures("one_thread")


def invoke(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


def listing(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("hostile") / "ds"
    assert invoke("generate", "size-confound", "--out", out, *SMALL).exit_code == 0
    return out


@pytest.fixture(scope="module")
def trained(dataset: Path) -> Path:
    out = dataset.parent / "run"
    result = invoke("train", dataset, *FAST, "--out", out)
    assert result.exit_code == 0, result.output
    assert (out / "checkpoints" / "epoch_1.safetensors").is_file()
    return out


@pytest.fixture
def run(trained: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(trained, tmp_path / "run"))


def tie(run: Path) -> None:
    """Record the readouts' sha256 in config.json again, as a tamperer who knows the format would."""
    config = json.loads((run / "config.json").read_text())
    for name in config["files_sha256"]:
        config["files_sha256"][name] = hashlib.sha256((run / name).read_bytes()).hexdigest()
    (run / "config.json").write_text(json.dumps(config, indent=2))


# ----------------------------------------------------------------------------- 1. deep nesting
DEEP = {
    "arrays": "x = " + "[" * 400_000 + "]" * 400_000,
    "inline tables": "x = " + "{a = " * 2_000 + "1" + "}" * 2_000,
    "dotted keys": ".".join(["a"] * 5_000) + " = 1",
}


@pytest.mark.parametrize("case", list(DEEP))
def test_deeply_nested_scenario_is_one_line(tmp_path: Path, case: str) -> None:
    path = tmp_path / "deep.toml"
    path.write_text('name = "deep"\n' + DEEP[case] + "\n")
    assert_one_line_error(invoke("generate", path, "--out", tmp_path / "ds", *SMALL), "nested deeper")
    assert not (tmp_path / "ds").exists()


@pytest.mark.parametrize("case", list(DEEP))
def test_deeply_nested_study_is_one_line(tmp_path: Path, case: str) -> None:
    path = tmp_path / "tiny.toml"
    path.write_text(DEEP[case] + "\n" + TINY)
    with pytest.raises(StudyError, match="nested deeper"):
        load_study(path)
    assert_one_line_error(invoke("study", path, "--out", tmp_path / "out", "--device", "cpu"), "nested deeper")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- 2. counts are bounded
HUGE = str(10**12)


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["gallery", "{ds}", "--out", "{tmp}/g.png", "--per-cell", HUGE], "--per-cell"),
        (["gallery", "{ds}", "--out", "{tmp}/g.png", "--per-cell", str(MAX_PER_CELL + 1)], "--per-cell"),
        (["validate", "{ds}", "--n-rerender", HUGE], "--n-rerender"),
        (["realism", "{ds}", "--n", HUGE, "--out", "{tmp}/r"], "--n"),
        (["train", "{ds}", *FAST[:4], "--device", "cpu", "--batch-size", str(2**63), "--out", "{tmp}/r"], "batch"),
        (
            [
                "train",
                "{ds}",
                *FAST[:4],
                "--device",
                "cpu",
                "--batch-size",
                str(MAX_BATCH_SIZE + 1),
                "--out",
                "{tmp}/r",
            ],
            "batch",
        ),
        (["train", "{ds}", *FAST[:6], "--device", "cpu", "--threads", "100000", "--out", "{tmp}/r"], "--threads"),
        (
            ["train", "{ds}", *FAST[:6], "--device", "cpu", "--threads", str(MAX_THREADS + 1), "--out", "{tmp}/r"],
            "--threads",
        ),
        (["train", "{ds}", *FAST, "--seed", str(2**64), "--out", "{tmp}/r"], "--seed"),
        (["evaluate", "{run}", "{ds}", "--device", "cpu", "--batch-size", HUGE], "--batch-size"),
        (["explain", "{run}", "{ds}", "--device", "cpu", "--batch-size", HUGE], "--batch-size"),
        (["explain", "{run}", "{ds}", "--device", "cpu", "--n", HUGE], "--n"),
        (["study", "{tmp}/tiny.toml", "--out", "{tmp}/s", "--jobs", str(MAX_JOBS + 1)], "--jobs"),
    ],
)
def test_count_flags_are_bounded(dataset: Path, run: Path, tmp_path: Path, args: list[str], fragment: str) -> None:
    (tmp_path / "tiny.toml").write_text(TINY)
    before = file_tree(run), listing(run), file_tree(dataset)
    filled = [a.format(ds=dataset, run=run, tmp=tmp_path) for a in args]
    assert_one_line_error(invoke(*filled), fragment)
    assert (file_tree(run), listing(run), file_tree(dataset)) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "tiny.toml"]


@pytest.mark.parametrize(
    "setting, fragment",
    [
        (("batch_size = 8", f"batch_size = {2**63}"), "batch_size"),
        (("batch_size = 8", f"batch_size = {MAX_BATCH_SIZE + 1}"), "batch_size"),
        (("threads = 1", "threads = 100000"), "threads"),
    ],
)
def test_study_counts_are_bounded(tmp_path: Path, setting: tuple[str, str], fragment: str) -> None:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY.replace(*setting))
    assert_one_line_error(invoke("study", path, "--out", tmp_path / "s", "--device", "cpu"), fragment)
    assert not (tmp_path / "s").exists()


def test_help_states_the_bounds() -> None:
    for command, text in [("train", "65,536"), ("train", "1..256"), ("gallery", f"1..{MAX_PER_CELL}")]:
        result = invoke(command, "--help")
        assert text in " ".join(result.output.replace("│", " ").split()), (command, text)


# ----------------------------------------------------------------------------- 3. full disk in safetensors
FULL = "Error while serializing: I/O error: No space left on device (os error 28)"


def test_safetensors_write_failure_is_one_line_and_leaves_nothing(
    dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(*args, **kwargs):
        raise SafetensorError(FULL)

    monkeypatch.setattr(models, "save_file", full)
    out = tmp_path / "r"
    result = invoke("train", dataset, *FAST, "--out", out)
    assert_one_line_error(result, "no space left on the device")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("module", [models, readouts])
def test_a_failed_safetensors_write_is_an_os_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, module) -> None:
    def full(tensors, tmp, metadata=None):
        Path(tmp).write_bytes(b"half")
        raise SafetensorError(FULL)

    monkeypatch.setattr(module, "save_file", full)
    target = tmp_path / "w.safetensors"
    with pytest.raises(OSError) as caught:
        if module is models:
            models.save_model(models.build_model(), target, {})
        else:
            ones = np.ones(4)
            readouts.Readouts(ones, 0.0, ones, ones, 1.0, np.ones((3, 4), np.float32), np.array([0, 1, 0]), 1).save(
                target
            )
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(target)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- 4. tampered readouts, weights
def rewrite(path: Path, edit) -> None:
    with safe_open(str(path), "np") as f:
        metadata, arrays = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    record = json.loads(metadata["nodulab"])
    edit(record, arrays)
    save_numpy(arrays, str(path), metadata={**metadata, "nodulab": json.dumps(record)})


def _set(key, value):
    def edit(record, arrays):
        record[key] = value

    return edit


def _array(key, value):
    def edit(record, arrays):
        if value is None:
            del arrays[key]
        else:
            arrays[key] = value(arrays[key]) if callable(value) else value

    return edit


def _narrow(record, arrays):  # every array consistent, but 7 features where the encoder gives 128
    for key in list(arrays):
        if key != "knn_labels":
            arrays[key] = np.ascontiguousarray(arrays[key][..., :7])


TAMPER = {
    "knn_k huge": (_set("knn_k", 10**12), "knn_k"),
    "knn_k negative": (_set("knn_k", -1), "knn_k"),
    "knn_k zero": (_set("knn_k", 0), "knn_k"),
    "knn_k true": (_set("knn_k", True), "knn_k"),
    "knn_k text": (_set("knn_k", "5"), "knn_k"),
    "intercept nan": (_set("probe_intercept", float("nan")), "probe_intercept"),
    "intercept text": (_set("probe_intercept", "x"), "probe_intercept"),
    "probe_coef shape": (_array("probe_coef", np.zeros((3, 7))), "probe_coef"),
    "knn_bank nan": (_array("knn_bank", lambda a: np.full_like(a, np.nan)), "knn_bank"),
    "knn_bank one dim": (_array("knn_bank", np.zeros(5, np.float32)), "knn_bank"),
    "knn_labels other": (_array("knn_labels", lambda a: a + 2), "knn_labels"),
    "knn_labels short": (_array("knn_labels", lambda a: np.ascontiguousarray(a[:-1])), "knn_labels"),
    "probe_scale zero": (_array("probe_scale", lambda a: np.zeros_like(a)), "probe_scale"),
    "probe_mean missing": (_array("probe_mean", None), "probe_mean"),
    "extra array": (_array("extra", np.zeros(3)), "extra"),
    "narrower features": (_narrow, "features"),
}


@pytest.mark.parametrize("name", ["readouts.safetensors", "readouts_init.safetensors"])
@pytest.mark.parametrize("case", list(TAMPER))
def test_tampered_readouts_are_refused_at_load(dataset: Path, run: Path, name: str, case: str) -> None:
    edit, fragment = TAMPER[case]
    rewrite(run / name, edit)
    tie(run)
    before = file_tree(run), listing(run)
    assert_one_line_error(invoke("evaluate", run, dataset, "--device", "cpu"), name, fragment)
    assert_one_line_error(invoke("explain", run, dataset, "--device", "cpu", "--n", "2"), name, fragment)
    assert (file_tree(run), listing(run)) == before


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("file", ["model.safetensors", "checkpoints/epoch_1.safetensors"])
def test_non_finite_weights_are_refused_before_anything_is_written(
    dataset: Path, run: Path, file: str, value: float
) -> None:
    path = run / file
    with safe_open(str(path), "pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    key = next(k for k, t in tensors.items() if t.is_floating_point() and k.endswith("weight"))
    tensors[key][:] = value
    save_torch(tensors, str(path), metadata=metadata)
    before = file_tree(run), listing(run)
    assert_one_line_error(invoke("evaluate", run, dataset, "--device", "cpu"), key, "NaN or infinite")
    if file == "model.safetensors":
        assert_one_line_error(invoke("explain", run, dataset, "--device", "cpu", "--n", "2"), key)
    assert (file_tree(run), listing(run)) == before


# ----------------------------------------------------------------------------- 5. malformed stores
@pytest.fixture
def store(tmp_path: Path) -> tuple[Path, dict]:
    study = _study_meta(load_study(_write(tmp_path / "tiny.toml", TINY)))
    path = tmp_path / "out" / STORE_FILE
    path.parent.mkdir()
    with Store(path, study) as opened:
        opened.add_dataset("size-confound", "", "0" * 64, {"scenario": {}}, None)
        run = {"run_id": "r1", "scenario": "size-confound", "loss": "ce", "seed": 0, "draw": 0, "status": "done"}
        opened.add_run({**run, "config": {"loss": "ce"}, "score": 0.5})
    return path, study


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "statement, fragment",
    [
        ("UPDATE meta SET value='{bad json' WHERE key='config'", "meta.config"),
        ("UPDATE meta SET value='[1, 2]' WHERE key='config'", "meta.config"),
        ("UPDATE meta SET value='" + "[" * 100_000 + "' WHERE key='config'", "meta.config"),
        ("UPDATE runs SET config='{[nope'", "runs.config"),
        ("UPDATE runs SET config='3'", "runs.config"),
        ("UPDATE datasets SET manifest='nope'", "datasets.manifest"),
    ],
)
def test_a_malformed_store_is_refused_before_anything_is_written(
    store: tuple[Path, dict], tmp_path: Path, statement: str, fragment: str
) -> None:
    path, study = store
    db = sqlite3.connect(path)
    db.execute(statement)
    db.commit()
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    before, names = path.read_bytes(), sorted(p.name for p in path.parent.iterdir())
    with pytest.raises(StoreError, match=fragment):
        Store(path, study)
    assert path.read_bytes() == before
    result = invoke("study", tmp_path / "tiny.toml", "--out", path.parent, "--device", "cpu")
    assert_one_line_error(result, fragment)
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == names  # no -wal or -shm appeared either


# ----------------------------------------------------------------------------- 6. evaluate reads before it writes
@pytest.mark.parametrize("case", ["symlink", "folder", "foreign name", "other epoch"])
def test_evaluate_checks_its_checkpoints_before_writing(dataset: Path, run: Path, case: str) -> None:
    kept = run / "checkpoints" / "epoch_1.safetensors"
    if case == "symlink":
        kept.unlink()
        kept.symlink_to("/etc/passwd")
    elif case == "folder":
        kept.unlink()
        kept.mkdir()
    elif case == "foreign name":
        (run / "checkpoints" / "notes.txt").write_text("x")
    else:
        shutil.copy(kept, run / "checkpoints" / "epoch_1000.safetensors")
    before = file_tree(run), listing(run)
    assert_one_line_error(invoke("evaluate", run, dataset, "--device", "cpu"), "checkpoints")
    assert (file_tree(run), listing(run)) == before


# ----------------------------------------------------------------------------- 7. report --out
@pytest.fixture
def study_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "study"
    folder.mkdir()
    with Store(folder / STORE_FILE, study={"name": "empty", "sha256": "0" * 64, "config": {}}):
        pass
    (folder / "runs.csv").write_text("run_id\nr1\n")
    return folder


@pytest.mark.parametrize("name", ["runs.csv", "notes.txt", "page"])
def test_report_out_must_be_html(study_dir: Path, name: str) -> None:
    target = study_dir / name
    before = file_tree(study_dir)
    for force in ([], ["--force"]):
        assert_one_line_error(invoke("report", study_dir, "--out", target, *force), "HTML")
    assert file_tree(study_dir) == before


def test_report_out_replaces_only_a_report_without_force(study_dir: Path) -> None:
    page = study_dir / "page.html"
    page.write_text("<html>my own notes</html>")
    assert_one_line_error(invoke("report", study_dir, "--out", page), "not a nodulab report", "--force")
    assert page.read_text() == "<html>my own notes</html>"
    assert invoke("report", study_dir, "--out", page, "--force").exit_code == 0
    assert "nodulab study empty" in page.read_text()
    assert invoke("report", study_dir, "--out", page).exit_code == 0  # a report is rewritten
    assert invoke("report", study_dir).exit_code == 0 and (study_dir / "report.html").is_file()
