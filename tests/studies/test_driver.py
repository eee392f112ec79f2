"""Running a study: the dataset cache, resuming after SIGKILL, failed runs, selection, Ray vs local."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from tests.conftest import assert_modes, assert_one_line_error
from typer.testing import CliRunner

from nodulab.cli import EXECUTORS, app
from nodulab.common.tables import RESULT_TABLES
from nodulab.results.store import STORE_FILE, Store
from nodulab.studies import driver as studying
from nodulab.studies import executors
from nodulab.studies import runner as run_one
from nodulab.studies.config import load_study, study_from_dict
from test_result_tables import assert_runs_hold_their_declarations

SRC = str(Path(__file__).parents[2] / "src")
TINY = """
name = "tiny"
scenarios = ["size-confound"]
losses = ["ce", "simclr"]
seeds = 2
[data]
size = 32
pixel_mm = 1.4
n = { train = 96, val = 48, val_balanced = 48, test = 32 }
[train]
epochs = 1
batch_size = 32
threads = 1
"""
runner = CliRunner()


def _tiny(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY + extra)
    return path


def _results(out: Path) -> dict[str, pd.DataFrame]:
    """Everything a study's numbers are: the runs and every result table, without the timings."""
    with Store(out / STORE_FILE) as store:
        runs = store.runs().drop(columns=["train_s", "evaluate_s", "dynamics_s", "explain_s", "finished", "config"])
        tables = {name: store.table(name) for name in RESULT_TABLES}
    history = tables["history"]
    tables["history"] = history[history["name"] != "seconds"].reset_index(drop=True)  # wall time per epoch
    return {"runs": runs, **tables}


def test_executors_match_the_cli() -> None:
    assert EXECUTORS == tuple(executors.EXECUTORS)


def test_dataset_cache_is_produced_once_by_two_processes(tmp_path: Path) -> None:
    """Two processes want the same dataset at once: one renders it, the other waits and checks hashes."""
    script = f"""
import sys
sys.path.insert(0, {SRC!r})
from pathlib import Path
from nodulab.data import dataset as data
from nodulab.studies import runner as study
from nodulab.synth.scenarios import load_scenario
original = data.generate
def counting(*args, **kwargs):
    with open({str(tmp_path / "log")!r}, 'a') as log:
        log.write('generated\\n')
    return original(*args, **kwargs)
study.generate = counting
scenario = load_scenario('clean', n=400, size=32, pixel_mm=1.4)
print(study.ensure_dataset(Path({str(tmp_path / "cache")!r}), scenario, 0))
"""
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outs[0] == outs[1] and Path(outs[0]).is_dir()
    assert (tmp_path / "log").read_text().count("generated") == 1
    folders = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    assert folders == [Path(outs[0])]


def test_cache_key_names_the_content_and_hashes_are_checked(tmp_path: Path) -> None:
    from nodulab.data.dataset import DatasetError
    from nodulab.synth.scenarios import load_scenario

    a = load_scenario("clean", n=64, size=32, pixel_mm=1.4)
    other_n = load_scenario("clean", n=65, size=32, pixel_mm=1.4)
    other_scenario = load_scenario("size-confound", n=64, size=32, pixel_mm=1.4)
    keys = {
        run_one.cache_key(a, 0),
        run_one.cache_key(a, 1),
        run_one.cache_key(other_n, 0),
        run_one.cache_key(other_scenario, 0),
    }
    assert len(keys) == 4
    folder = run_one.ensure_dataset(tmp_path, a, 0)
    assert folder.name == run_one.cache_key(a, 0)
    assert run_one.ensure_dataset(tmp_path, a, 0) == folder  # reused
    images = folder / "train" / "images.npy"
    raw = bytearray(images.read_bytes())
    raw[-1] ^= 1
    images.write_bytes(bytes(raw))
    with pytest.raises(DatasetError, match="does not match its sha256"):
        run_one.ensure_dataset(tmp_path, a, 0)


def test_failed_run_is_recorded_and_others_go_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    study = load_study(_tiny(tmp_path))
    real = run_one.execute

    def flaky(spec, data_dir, run_dir, device="cpu", progress=None):  # noqa: ANN001, ANN202
        if spec.loss == "simclr" and spec.seed == 1:
            spec.config["lr"] = float("nan")  # an invalid config: train refuses it with one line
        return real(spec, data_dir, run_dir, device, progress)

    monkeypatch.setattr(executors, "execute", flaky)
    summary = studying.run_study(study, tmp_path / "out", report=False)
    assert (summary.done, summary.failed) == (3, 1)
    with Store(tmp_path / "out" / STORE_FILE) as store:
        runs = store.runs()
    failed = runs[runs["status"] == "failed"]
    assert list(failed["loss"]) == ["simclr"] and "\n" not in failed["reason"].iloc[0]
    assert "--lr" in failed["reason"].iloc[0]
    # a failed run is not redone on resume; --retry-failed runs it again
    monkeypatch.setattr(executors, "execute", real)
    again = studying.run_study(study, tmp_path / "out", report=False)
    assert (again.skipped, again.done) == (4, 0)
    retried = studying.run_study(study, tmp_path / "out", report=False, retry_failed=True)
    assert (retried.skipped, retried.done, retried.failed) == (3, 1, 0)


def test_out_holding_another_study_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "out"
    path = _tiny(tmp_path)
    result = runner.invoke(app, ["study", str(path), "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    before = (out / STORE_FILE).read_bytes()
    names = sorted(p.name for p in out.iterdir())
    other = tmp_path / "other.toml"
    other.write_text(TINY.replace('name = "tiny"', 'name = "other"').replace("seeds = 2", "seeds = 1"))
    assert_one_line_error(runner.invoke(app, ["study", str(other), "--out", str(out)]), "holds study 'tiny'")
    assert (out / STORE_FILE).read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == names  # no -wal, -shm or lock file appeared
    assert_one_line_error(runner.invoke(app, ["study", str(path), "--out", str(out / STORE_FILE)]), "is a file")
    assert_one_line_error(
        runner.invoke(app, ["study", str(path), "--out", str(out), "--cache", str(out / "runs" / "x")]), "lies inside"
    )
    # the same study resumes: nothing to do
    result = runner.invoke(app, ["study", str(path), "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 0 and "4 already recorded" in result.output, result.output


def test_more_seeds_run_only_the_new_seeds_and_give_the_numbers_of_one_study(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """2 seeds, then 3 (by ``run_study`` and by ``--seeds 3``): only seed 2's runs run, and the store
    equals the study run with 3 seeds at once. A study that differs in anything else is refused."""
    import shutil

    path = _tiny(tmp_path)
    two, three = load_study(path), load_study(path, seeds=3)
    studying.run_study(three, tmp_path / "reference", report=False)
    expected = _results(tmp_path / "reference")
    assert sorted(set(expected["runs"]["seed"])) == [0, 1, 2] and len(expected["runs"]) == 6

    out = tmp_path / "out"
    assert studying.run_study(two, out, report=False).done == 4
    shutil.copytree(out, tmp_path / "cli")
    real, ran = executors.execute, []

    def counting(spec, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        ran.append(spec.seed)
        return real(spec, *args, **kwargs)

    monkeypatch.setattr(executors, "execute", counting)
    summary = studying.run_study(three, out, report=False)
    assert (summary.planned, summary.skipped, summary.done, summary.failed) == (6, 4, 2, 0)
    assert ran == [2, 2]
    result = runner.invoke(app, ["study", str(path), "--out", str(tmp_path / "cli"), "--device", "cpu", "--seeds", "3"])
    assert result.exit_code == 0 and "4 already recorded, 2 done" in result.output, result.output
    assert ran == [2, 2, 2, 2]
    for folder in (out, tmp_path / "cli"):
        found = _results(folder)
        for name, frame in expected.items():
            pd.testing.assert_frame_equal(found[name], frame, check_exact=True, obj=name)
        with Store(folder / STORE_FILE) as store:
            meta = store.meta()
            config = store.study_config()
        assert (meta["identity"], meta["sha256"]) == (two.identity, three.sha256)  # the study now run
        assert config["study"]["seeds"] == 3 and config["planned_runs"] == 6
    assert (tmp_path / "cli" / "report.html").is_file()

    # anything else differs: refused on that --out, with or without --seeds, and nothing is written
    before = (out / STORE_FILE).read_bytes()
    other = tmp_path / "other.toml"
    other.write_text(TINY.replace("epochs = 1", "epochs = 2"))
    for extra in ([], ["--seeds", "3"]):
        result = runner.invoke(app, ["study", str(other), "--out", str(out), "--device", "cpu", *extra])
        assert_one_line_error(result, "holds study 'tiny'")
    assert (out / STORE_FILE).read_bytes() == before and ran == [2, 2, 2, 2]
    # fewer seeds: nothing runs, nothing recorded is lost; the meta records the study now run
    fewer = studying.run_study(load_study(path, seeds=1), out, report=False)
    assert (fewer.planned, fewer.skipped, fewer.done) == (2, 2, 0) and ran == [2, 2, 2, 2]
    assert len(_results(out)["runs"]) == 6
    with Store(out / STORE_FILE) as store:
        assert store.study_config()["study"]["seeds"] == 1


def test_seeds_on_the_command_line_is_checked_like_the_file(tmp_path: Path) -> None:
    out = tmp_path / "out"
    for bad, fragment in (("0", "greater than or equal to 1"), ("101", "less than or equal to 100"), ("x", "")):
        result = runner.invoke(app, ["study", str(_tiny(tmp_path)), "--out", str(out), "--seeds", bad])
        assert_one_line_error(result, "--seeds", fragment)
        assert not out.exists()


def test_a_store_from_before_identities_resumes_then_takes_more_seeds(tmp_path: Path) -> None:
    """A store whose meta has no ``identity`` (written before it existed) is owned by its exact
    ``sha256``; its first resume records the identity, and then another seed count is the same study."""
    import sqlite3

    from nodulab.results.store import StoreError, check_owner

    path = _tiny(tmp_path)
    two, three = (studying._study_meta(load_study(path, seeds=n)) for n in (2, 3))
    (tmp_path / "other.toml").write_text(TINY + "[tuning]\nbudget = 2\n")
    other = studying._study_meta(load_study(tmp_path / "other.toml"))
    store = tmp_path / STORE_FILE
    with Store(store, two):
        pass
    db = sqlite3.connect(store)
    with db:
        db.execute("DELETE FROM meta WHERE key = 'identity'")
    db.close()
    for study in (three, other):
        with pytest.raises(StoreError, match="holds study 'tiny'"):
            check_owner(store, study)
    with Store(store, two) as opened:
        assert opened.meta()["identity"] == two["identity"]
    check_owner(store, three)
    with Store(store, three) as opened:
        assert opened.meta()["sha256"] == three["sha256"] and opened.study_config() == three["config"]
    with pytest.raises(StoreError, match="holds study 'tiny'"):
        Store(store, other)


def test_selection_uses_the_val_score_never_a_test_split(tmp_path: Path) -> None:
    """The selected draw is the best val kNN score even when a test split would pick another."""
    config = {"name": "s", "sha256": "x", "config": {}}
    with Store(tmp_path / STORE_FILE, config) as store:
        for draw, (score, test) in enumerate([(0.7, 0.9), (0.9, 0.5), (0.8, 0.99)]):
            metrics = pd.DataFrame(
                {
                    "dataset": ["a"],
                    "split": ["test_conflict"],
                    "classifier": ["head"],
                    "metric": ["balanced_accuracy"],
                    "value": [test],
                    "ci_low": [test],
                    "ci_high": [test],
                }
            )
            store.add_run(
                {
                    "run_id": f"r{draw}",
                    "scenario": "a",
                    "loss": "ce",
                    "seed": 0,
                    "draw": draw,
                    "config": {},
                    "status": "done",
                    "score": score,
                },
                {"metrics": metrics},
            )
        runs = store.runs()
    assert list(runs["selected"]) == [0, 1, 0]


def _study_script(tmp_path: Path, out: Path, kill: str) -> list[str]:
    """A Python command running the tiny study; ``kill`` makes it SIGKILL itself inside a write."""
    hooks = {
        "none": "",
        # inside the store transaction: every row of the run inserted, nothing committed
        "store": "from nodulab.results import store\n"
        "old = store.Store._select\n"
        "def select(self, *a):\n    old(self, *a)\n    os.kill(os.getpid(), signal.SIGKILL)\n"
        "store.Store._select = select\n",
        # while writing a run folder's evaluation tables
        "folder": "from nodulab.training import evaluation as metrics\n"
        "old = metrics._write_csv_atomic\n"
        "def write(frame, path):\n    open(str(path) + '.partial', 'w').write('x')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "metrics._write_csv_atomic = write\n",
    }
    code = (
        f"import os, signal, sys\nsys.path.insert(0, {SRC!r})\n{hooks[kill]}"
        "from nodulab.studies import config as studies, driver as study\n"
        f"study.run_study(studies.load_study({str(_tiny(tmp_path))!r}), {str(out)!r}, report=False)\n"
    )
    return [sys.executable, "-c", code]


def test_resume_after_sigkill_gives_every_cell_once_and_the_same_numbers(tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    subprocess.run(_study_script(tmp_path, reference, "none"), check=True, timeout=300)
    expected = _results(reference)
    assert len(expected["runs"]) == 4

    out = tmp_path / "killed"
    for kill in ("store", "folder"):  # SIGKILL inside a store transaction, then inside a file write
        assert subprocess.run(_study_script(tmp_path, out, kill), timeout=300).returncode == -signal.SIGKILL
    rng = random.Random(0)
    for _ in range(3):  # and at random moments
        proc = subprocess.Popen(_study_script(tmp_path, out, "none"))
        time.sleep(rng.uniform(1.0, 6.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    subprocess.run(_study_script(tmp_path, out, "none"), check=True, timeout=300)
    found = _results(out)
    for name, frame in expected.items():
        pd.testing.assert_frame_equal(found[name], frame, check_exact=True, obj=name)
    assert found["runs"]["run_id"].is_unique
    for name in ("metrics", "groups"):
        keys = ["run_id", *RESULT_TABLES[name].key]
        assert not found[name].duplicated(keys).any()
    assert sorted(os.listdir(out / "runs")) == sorted(found["runs"]["run_id"])


def test_ray_jobs_and_local_give_the_same_numbers_in_worker_processes(tmp_path: Path) -> None:
    if not os.environ.get("CI"):  # CI installs the dev extras: there a missing Ray fails
        pytest.importorskip("ray")
    path = _tiny(tmp_path, '[explain]\nsplits = ["test_conflict"]\nn = 16\n')
    path.write_text(path.read_text().replace("seeds = 2", "seeds = 1"))
    study = load_study(path)
    old = os.umask(0o022)  # weights follow the umask on every executor (the driver unpacks Ray's)
    try:
        local = studying.run_study(study, tmp_path / "local", report=False)
        remote = studying.run_study(study, tmp_path / "ray", report=False, executor="ray")
        jobs = studying.run_study(study, tmp_path / "jobs", report=False, jobs=2)  # spawned local workers
    finally:
        os.umask(old)
    for folder in ("local", "ray", "jobs"):
        assert_modes(tmp_path / folder / "runs", 0o022)
    assert local.done == remote.done == jobs.done == 2
    assert {r.pid for r in local.results} == {os.getpid()}
    assert os.getpid() not in {r.pid for r in remote.results} and all(r.pid > 0 for r in remote.results)
    assert os.getpid() not in {r.pid for r in jobs.results}
    a, b, c = _results(tmp_path / "local"), _results(tmp_path / "ray"), _results(tmp_path / "jobs")
    assert len(a["reliance"]) and len(a["probes"]) and len(a["cam"])
    for name in a:
        pd.testing.assert_frame_equal(a[name], b[name], check_exact=True, obj=name)
        pd.testing.assert_frame_equal(a[name], c[name], check_exact=True, obj=name)
    assert (tmp_path / "ray" / "runs" / a["runs"]["run_id"][0] / "model.safetensors").is_file()


def test_study_dict_round_trip_keeps_the_grid() -> None:
    study = study_from_dict({"name": "x", "scenarios": ["clean"], "losses": ["ce"], "seeds": 1})
    assert study.record()["study"]["losses"] == ["ce"]


def test_quick_preset_at_smaller_n_reports_ce_gap_to_the_ceiling(tmp_path: Path) -> None:
    """The quick study's exact config (smaller n): the report states ce's gap to the clean ceiling."""
    import re
    import tomllib

    from nodulab.studies.config import _presets, preset_names

    assert "quick" in preset_names()
    d = tomllib.loads((_presets() / "quick.toml").read_text())
    d["data"]["n"] = {"train": 160, "val": 64, "val_balanced": 64, "test": 64}
    d["explain"]["n"] = 16
    d["explain"]["dynamics_n"] = 16
    summary = studying.run_study(study_from_dict(d), tmp_path / "quick")
    assert (summary.done, summary.failed) == (12, 0)
    assert assert_runs_hold_their_declarations(tmp_path / "quick") == set(RESULT_TABLES)  # every writer, declared
    page = (tmp_path / "quick" / "report.html").read_text()
    number = r"-?\d\.\d\d"
    interval = r"\(95% CI with the test set(&#x27;|')s noise -?\d\.\d\d to -?\d\.\d\d\)"  # from the predictions
    gap = (
        rf"On size-confound/test_conflict, ce \(head\) reaches balanced accuracy {number}.*?"
        rf"matched ceiling {number}.*?\(clean(&#x27;|')s ce on the same images\): a gap of {number} {interval}"
    )
    assert re.search(gap, page), re.findall(r"On size-confound/test_conflict[^<]*", page)
    # the declared comparison, read with the test set's noise from the stored predictions
    assert "Declared hypotheses: each loss&#x27;s own readout against ce on size-confound/test_conflict" in page
    assert "95% CI with the test set&#x27;s noise" in page and "(seeds only)" not in page
    from tests.results.test_report import assert_findings_numbers_in_tables

    assert_findings_numbers_in_tables(page)


def test_a_run_archive_cannot_write_outside_its_folder(tmp_path: Path) -> None:
    """The driver unpacks what a Ray worker returns: links and paths that climb out are refused."""
    import io
    import tarfile

    from nodulab.data.dataset import DatasetError
    from nodulab.studies.ray_executor import pack_folder

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "explain").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")
    (tmp_path / "run" / "explain" / "cue.csv").write_text("a\n")
    run_one.unpack_folder(pack_folder(tmp_path / "run"), tmp_path / "copy")
    assert (tmp_path / "copy" / "explain" / "cue.csv").read_text() == "a\n"
    for name, kind in (("../evil", tarfile.REGTYPE), ("/tmp/evil", tarfile.REGTYPE), ("link", tarfile.SYMTYPE)):
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            info = tarfile.TarInfo(name)
            info.type, info.size, info.linkname = kind, 0, "/etc/passwd"
            tar.addfile(info, io.BytesIO(b""))
        with pytest.raises(DatasetError, match="refusing entry"):
            run_one.unpack_folder(buffer.getvalue(), tmp_path / "hostile")
        assert not (tmp_path / "hostile").exists() and not (tmp_path / "evil").exists()


def test_a_store_killed_before_its_first_commit_is_taken_over(tmp_path: Path) -> None:
    """An empty results.sqlite (the study died creating it) is resumed; a foreign SQLite file is refused."""
    import sqlite3

    from nodulab.results.store import StoreError

    meta = {"name": "s", "sha256": "x", "config": {}}
    (tmp_path / "empty.sqlite").write_bytes(b"")
    with Store(tmp_path / "empty.sqlite", meta) as store:
        assert store.finished() == set()
    foreign = sqlite3.connect(tmp_path / "foreign.sqlite")
    foreign.execute("CREATE TABLE mine (x)")
    foreign.commit()
    foreign.close()
    before = (tmp_path / "foreign.sqlite").read_bytes()
    with pytest.raises(StoreError, match="store format None"):
        Store(tmp_path / "foreign.sqlite", meta)
    assert (tmp_path / "foreign.sqlite").read_bytes() == before


CELLS = """
name = "cells"
scenarios = ["clean", "size-confound"]
losses = ["ce"]
seeds = 1
[data]
size = 32
pixel_mm = 1.4
n = { train = [64, 32], val = 48, val_balanced = 48, test = 32 }
[train]
epochs = [1, 2]
batch_size = 32
threads = 1
checkpoints = [1]
[explain]
dynamics_n = 8
"""


def test_budget_cells_and_the_matched_ceiling_on_the_same_images(tmp_path: Path) -> None:
    """n.train x epochs lists make one cell each (a steps-matched pair among them: 64 rows x 1 epoch
    and 32 rows x 2 epochs, 2 steps each); the ceiling's runs score size-confound's own test images,
    stored under that dataset, and the gap is read on them; every run has its dynamics."""
    path = tmp_path / "cells.toml"
    path.write_text(CELLS)
    study = load_study(path)
    assert [c.label for c in study.cells()] == [
        "n=64,epochs=1",
        "n=64,epochs=2",
        "n=32,epochs=1",
        "n=32,epochs=2",
    ]
    assert study.ceilings == {"size-confound": "clean"}  # implied: the only confound-free scenario
    summary = studying.run_study(study, tmp_path / "out", report=True)
    assert (summary.done, summary.failed) == (8, 0)
    with Store(tmp_path / "out" / STORE_FILE) as store:
        runs, metrics, dynamics = store.runs(), store.table("metrics"), store.table("dynamics")
        history = store.table("history")
    assert sorted(runs.groupby("budget")["seed"].apply(list).items()) == [
        (c, [0, 0]) for c in sorted(c.label for c in study.cells())
    ]  # each cell its own seed 0, both scenarios
    steps = {}
    for r in runs.itertuples():
        n = int(r.budget.split(",")[0].removeprefix("n="))
        steps[r.budget] = -(-n // 32) * r.config["epochs"]
        assert len(history[(history["run_id"] == r.run_id) & (history["name"] == "train_loss")]) == r.config["epochs"]
    assert steps["n=64,epochs=1"] == steps["n=32,epochs=2"] == 2
    clean = metrics[metrics["scenario"] == "clean"]
    assert set(clean["dataset"]) == {"clean", "size-confound"}  # its own images and the confounded ones
    on_confounded = clean[clean["dataset"] == "size-confound"]
    assert {"test_conflict", "test_iid"} <= set(on_confounded["split"])
    assert not metrics.duplicated(["run_id", "dataset", "split", "classifier", "metric"]).any()
    from nodulab.results.seed_tables import ceiling_gaps, matched_scores, own_scores

    scores, matched = own_scores(metrics), matched_scores(metrics, study.ceilings)
    gaps = ceiling_gaps(scores, matched)
    row = gaps[(gaps["split"] == "test_conflict") & (gaps["loss"] == "ce")].iloc[0]
    expected = on_confounded[
        (on_confounded["split"] == "test_conflict")
        & (on_confounded["classifier"] == "head")
        & (on_confounded["metric"] == "balanced_accuracy")
    ]["value"]
    assert row["ceiling_mean"] == pytest.approx(expected.mean())  # every cell's clean run on those images
    assert set(dynamics["epoch"]) == {1, 2} and set(dynamics["run_id"]) == set(runs["run_id"])
    page = (tmp_path / "out" / "report.html").read_text()
    assert "Budget cells" in page and "n=32,epochs=2" in page


def test_a_ceiling_that_differs_in_another_factor_is_refused(tmp_path: Path) -> None:
    from nodulab.studies.config import StudyError

    base = {"name": "x", "losses": ["ce"], "seeds": 1}
    with pytest.raises(
        StudyError, match=r"ceilings.size-confound: 'scanner-shift' differs from 'size-confound' in noise_hu"
    ):
        study_from_dict(
            {**base, "scenarios": ["scanner-shift", "size-confound"], "ceilings": {"size-confound": "scanner-shift"}}
        )
    with pytest.raises(StudyError, match="name its ceiling"):
        study_from_dict({**base, "scenarios": ["clean", "scanner-shift", "size-confound"]})
    with pytest.raises(StudyError, match="has confounds itself"):
        study_from_dict(
            {
                **base,
                "scenarios": ["attenuation-confound", "size-confound"],
                "ceilings": {"size-confound": "attenuation-confound"},
            }
        )
    study = study_from_dict(
        {**base, "scenarios": ["clean", "scanner-shift", "size-confound"], "ceilings": {"size-confound": "clean"}}
    )
    assert study.ceilings == {"size-confound": "clean"}


def test_a_second_live_study_on_one_out_is_refused_and_touches_nothing(tmp_path: Path) -> None:
    """The lock is an OS lock (flock) on OUT/.study.lock: held by a live study, released by the kernel."""
    import fcntl

    from nodulab.studies.driver import LOCK_FILE

    out = tmp_path / "out"
    out.mkdir()
    with open(out / LOCK_FILE, "a") as held:  # a live study holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = runner.invoke(app, ["study", str(_tiny(tmp_path)), "--out", str(out), "--device", "cpu"])
        assert_one_line_error(result, "in use by another running study")
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE] and (out / LOCK_FILE).read_bytes() == b""
    # released (as the kernel does when the holder dies): the study runs there
    assert studying.run_study(load_study(_tiny(tmp_path)), out, report=False).failed == 0


def test_a_refused_study_leaves_out_absent(tmp_path: Path) -> None:
    """A study refused after --out was made (a cached dataset that fails its hashes) removes it again."""
    study = load_study(_tiny(tmp_path))
    cache = tmp_path / "cache"
    folder = run_one.ensure_dataset(cache, study.scenarios["size-confound"], study.model.data.seed)
    images = next(folder.glob("*/images.npy"))
    images.write_bytes(images.read_bytes()[:-8] + b"\x00" * 8)  # a corrupted cache entry
    with pytest.raises(Exception, match="does not match its sha256"):
        studying.run_study(study, tmp_path / "out", cache=cache)
    assert not (tmp_path / "out").exists()
