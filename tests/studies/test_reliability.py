"""Long work that stops when told and owns its folder: signals to a ``--jobs 2`` study (exit code,
one line, time to exit, no orphan, every finished run stored, a resume equal to an uninterrupted
study), two studies started together on one ``--out``, hostile scenario names through study,
gallery and report, the free-space check, and weights that follow the umask on every executor."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from tests.conftest import as_from_a_terminal, assert_modes, assert_one_line_error
from tests.studies.test_driver import TINY, _results
from typer.testing import CliRunner

from nodulab.cli import app
from nodulab.results.store import STORE_FILE, Store
from nodulab.studies import driver as studying
from nodulab.studies.config import load_study

SRC = str(Path(__file__).parents[2] / "src")
runner = CliRunner()


def _study_file(tmp_path: Path, seeds: int) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY.replace("seeds = 2", f"seeds = {seeds}"))
    return path


def _cli(study: Path, out: Path, log: Path, *extra: str) -> subprocess.Popen[bytes]:
    """``nodulab study`` in its own session (its process group is its pid); stdout to ``log``."""
    env = {**os.environ, "PYTHONPATH": SRC, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "nodulab", "study", str(study), "--out", str(out), "--device", "cpu", *extra]
    with open(log, "wb") as stdout:
        return subprocess.Popen(
            command,
            stdout=stdout,
            stderr=subprocess.PIPE,
            env=env,
            start_new_session=True,
            preexec_fn=as_from_a_terminal,  # Ctrl-C as a terminal delivers it, whatever CI's shell ignores
        )


def _finished(log: Path) -> int:
    """Runs the study printed as recorded (it prints each after storing it)."""
    return log.read_text(encoding="utf-8", errors="replace").count("✓")


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for a parent to reap it is not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX"
    except (FileNotFoundError, IndexError):
        return False


def _stored(out: Path) -> int:
    with Store(out / STORE_FILE) as store:
        return len(store.runs())


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads child processes from /proc")
def test_a_jobs_2_study_stops_when_told_and_resumes_to_the_same_numbers(tmp_path: Path) -> None:
    study = _study_file(tmp_path, seeds=6)  # 12 runs: each stop leaves runs to do (else the study just ends)
    out = tmp_path / "out"
    for name, sig, code in (("term", signal.SIGTERM, 143), ("int", signal.SIGINT, 130), ("kill", signal.SIGKILL, -9)):
        log = tmp_path / f"{name}.log"
        proc = _cli(study, out, log, "--jobs", "2")
        deadline = time.monotonic() + 180
        while _finished(log) < 1 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert proc.poll() is None, f"{name}: the study ended before it was stopped"
        assert _stored(out) <= 12 - 3, f"{name}: too few runs left to stop"
        workers = _children(proc.pid)
        assert workers, name
        started = time.monotonic()
        if sig == signal.SIGINT:
            os.killpg(proc.pid, sig)  # Ctrl-C reaches the whole process group
        else:
            proc.send_signal(sig)
        proc.wait(timeout=15)
        waited = time.monotonic() - started
        assert proc.returncode == code, name
        limit = time.monotonic() + 5
        while any(_alive(w) for w in workers) and time.monotonic() < limit:
            time.sleep(0.1)
        assert not any(_alive(w) for w in workers), f"{name}: orphaned workers"
        stderr = proc.stderr.read().decode()
        assert "Traceback" not in stderr, stderr
        if sig == signal.SIGKILL:  # the driver's workers stop by themselves and write nothing more
            folders = sorted(os.listdir(out / "runs"))
            time.sleep(2)
            assert sorted(os.listdir(out / "runs")) == folders
            assert _stored(out) >= _finished(log)
        else:
            assert waited < 15, f"{name}: {waited:.1f} s to exit"
            lines = stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: ") and "run the same command again" in lines[0]
            assert _stored(out) == int(lines[0].split(" of ")[0].split()[-1])  # every finished run stored
    done = subprocess.run(
        [sys.executable, "-m", "nodulab", "study", str(study), "--out", str(out), "--device", "cpu", "--jobs", "2"],
        env={**os.environ, "PYTHONPATH": SRC},
        capture_output=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr.decode()
    reference = tmp_path / "reference"
    studying.run_study(load_study(study), reference, report=False)
    expected, found = _results(reference), _results(out)
    for table, frame in expected.items():
        pd.testing.assert_frame_equal(found[table], frame, check_exact=True, obj=table)
    assert sorted(os.listdir(out / "runs")) == sorted(found["runs"]["run_id"])  # no stopped run's folder


def test_two_studies_started_together_on_one_out(tmp_path: Path) -> None:
    study = _study_file(tmp_path, seeds=1)
    out = tmp_path / "out"
    procs = [_cli(study, out, tmp_path / f"{i}.log") for i in range(2)]
    for proc in procs:
        proc.wait(timeout=300)
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, 2], codes
    loser = procs[codes.index(2)].stderr.read().decode().strip().splitlines()
    assert len(loser) == 1 and "in use by another running study" in loser[0]
    with Store(out / STORE_FILE) as store:
        runs = store.runs()
    assert len(runs) == 2 and runs["run_id"].is_unique


HOSTILE = "a$\\x$ {b} <script>c</script> \\"


def test_a_hostile_scenario_name_runs_through_study_gallery_and_report(tmp_path: Path) -> None:
    """``$...$`` would be mathtext, ``<script>`` markup, ``\\`` and ``{}`` escapes: all are plain text."""
    preset = (Path(SRC) / "nodulab/presets/size-confound.toml").read_text()
    (tmp_path / "hostile.toml").write_text(preset.replace('name = "size-confound"', f"name = '{HOSTILE}'"))
    study = tmp_path / "study.toml"
    study.write_text(
        TINY.replace('["size-confound"]', '["hostile.toml"]')
        .replace('["ce", "simclr"]', '["ce"]')
        .replace("seeds = 2", "seeds = 1")
        + '[explain]\nsplits = ["test_conflict"]\nn = 16\n'
    )
    out = tmp_path / "out"
    result = runner.invoke(app, ["study", str(study), "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "<script>c</script>" not in page and "&lt;script&gt;c&lt;/script&gt;" in page
    (out / "report.html").unlink()
    assert runner.invoke(app, ["report", str(out)]).exit_code == 0
    assert (out / "report.html").is_file()
    dataset = next(p for p in (out / "datasets").iterdir() if p.is_dir())
    result = runner.invoke(app, ["gallery", str(dataset), "--out", str(tmp_path / "gallery.png")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "gallery.png").read_bytes().startswith(b"\x89PNG")


def test_a_study_without_the_disk_it_needs_is_refused_before_anything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nodulab.data import dataset as data

    study = load_study(_study_file(tmp_path, seeds=2))
    needed = studying.bytes_to_come(study, tmp_path / "out", tmp_path / "out" / "datasets")
    assert needed > 4 * studying.RUN_EXTRA_BYTES  # four runs and a dataset
    free = needed - 1
    monkeypatch.setattr(data.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 * free, 9 * free, free))
    result = runner.invoke(app, ["study", str(_study_file(tmp_path, 2)), "--out", str(tmp_path / "out")])
    assert_one_line_error(result, "the study needs")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("jobs", [1, 2])
def test_weights_follow_the_umask_on_local_executors(tmp_path: Path, jobs: int) -> None:
    old = os.umask(0o022)
    try:
        studying.run_study(load_study(_study_file(tmp_path, seeds=1)), tmp_path / "out", report=False, jobs=jobs)
    finally:
        os.umask(old)
    assert_modes(tmp_path / "out" / "runs", 0o022)


def test_the_lock_never_removes_an_input_the_working_folder_or_a_folder_it_did_not_create(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``study_lock`` removes ``out`` after a refusal only when it created it outside every input."""
    from nodulab.common.writing import DatasetError

    study = _study_file(tmp_path, seeds=1)
    monkeypatch.chdir(tmp_path)
    for out in (tmp_path, Path("."), Path(".."), study, study.parent):
        with pytest.raises(DatasetError), studying.study_lock(out, [study]):
            pass
        assert study.is_file()
    kept = tmp_path / "kept"
    kept.mkdir()
    with pytest.raises(RuntimeError), studying.study_lock(kept, [study]):
        raise RuntimeError("a refusal")
    assert kept.is_dir()  # not created by the study: kept
    with pytest.raises(RuntimeError), studying.study_lock(tmp_path / "new", [study]):
        raise RuntimeError("a refusal")
    assert not (tmp_path / "new").exists()  # created by it: removed
