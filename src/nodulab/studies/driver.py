"""The study (design.md "Study, store, report"): generate, train every loss over seeds and tuning
draws, evaluate, explain, store.

``run_study`` is ``nodulab study``. Its pieces, in the order a study uses them:

- **Datasets**: one per scenario, generated once into a cache named by content (the resolved
  scenario, the data seed, the RNG scheme and the dataset format: ``cache_key``), shared by the
  scenario's runs. A lock file makes two processes that want the same dataset produce it once:
  the second waits, then checks the files against the manifest's hashes (``ensure_dataset``).
- **The grid** (``plan``): per budget cell, seed, scenario, loss and tuning draw one ``RunSpec``.
  A budget cell (``n.train`` x ``epochs``, ``studies.config.Cell``) has its own seeds, datasets
  (a scenario's training split resized) and ceiling. A ceiling's runs carry ``ceiling_of``: the
  confounded scenarios (of the same cell) whose test splits they also score. Draw 0 is the
  registry's defaults; draw k > 0 takes every parameter from its tuning range with its own seed
  (``losses.draw_params``), the same budget for every loss. A run's key ``run_id`` is the hash of
  its resolved config, which holds the dataset's manifest hash.
- **A run** (``execute``): train, evaluate, explain, read the run folder's tables back. A run
  that fails is returned as failed with its one-line reason; it does not stop the others.
- **Executors**: ``local`` (in this process, or ``--jobs N`` worker processes) or ``ray``
  (``study_ray.py``). Only this process writes the store; each run goes in with one transaction,
  so a study killed at any moment resumes where it stopped and never redoes a recorded run.
- **More seeds** (``Study.identity``): the store is named by the study without its seed count,
  and a run's key holds its seed, never the seed count; so the same study resumed with more seeds
  (``--seeds N``) runs only the new seeds' runs, and the store's meta then records the study as
  now run (with fewer seeds, the runs of the dropped seeds stay recorded).
- **Ownership** (``study_lock``): ``OUT/.study.lock`` is held (``flock``) for the study's life; a
  second live study on ``OUT`` is refused. Every check runs before the store is created.
- **Real nodules** (``[real]``, ``Study.real``): its files are checked against their hashes with
  the other checks, and the store records which real dataset is scored (``Store.use_real``; another
  one than before drops the old scores, to score every run again). Each run is scored on it right
  after its own evaluation (``runner.score_real``); after the grid, every run recorded done without
  those scores (recorded before ``[real]`` was added, or run by a worker without the files) is
  scored here, one run at a time, each one's rows stored in one transaction with signals deferred
  (``score_recorded``). The dataset is outside the study's hashes: adding it reruns nothing.
- **Selection** (``store.Store``): per (scenario, loss, seed) the draw with the best kNN balanced
  accuracy on ``val`` at the run's last epoch, the same score for every loss; no test split is
  read to select.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
import signal
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nodulab.common.choices import MAX_JOBS
from nodulab.common.progress import Progress
from nodulab.common.writing import check_out, is_inside
from nodulab.data.dataset import MANIFEST, bytes_needed, check_free_space, is_complete, load_manifest, sha256_file
from nodulab.data.gallery import gallery_png
from nodulab.results.store import REAL_DATASET, STORE_FILE, Store, check_owner, export_csvs
from nodulab.studies.config import Cell, Study
from nodulab.studies.executors import EXECUTORS
from nodulab.studies.runner import (
    REAL_DATA,
    Batch,
    RunResult,
    RunSpec,
    StudyRunError,
    cache_key,
    check_hashes,
    ensure_dataset,
    score_real,
    unpack_folder,
)
from nodulab.synth.scenario import Scenario
from nodulab.training import losses

RUNS_DIR = "runs"
DATASETS_DIR = "datasets"


def plan(study: Study, manifests: dict[str, str]) -> list[RunSpec]:
    """Every run of the study in grid order: budget cell, seed, scenario, loss, draw (seed 0 of
    everything first within a cell).

    ``manifests`` maps each dataset (``Study.data_name``) to its manifest sha256 (part of every run's key).
    The device is not part of the key (bf16 on CUDA changes numbers, not what the run is), nor is
    the seed count (a run holds its own seed): a study given more seeds keeps every run it has.
    """
    m = study.model
    specs = []
    for cell, seed in ((cell, seed) for cell in study.cells() for seed in range(m.seeds)):
        for scenario in study.scenarios:
            data = study.data_name(scenario, cell.n_train)
            ceiling_of = [
                {"scenario": other, "data": study.data_name(other, cell.n_train)}
                for other in study.ceiling_of(scenario)
            ]
            for loss in study.losses(scenario):
                for draw in range(m.tuning.budget):
                    params = losses.draw_params(loss, draw, seed)
                    loss_keys = set(losses.params(loss))
                    config = {
                        "scenario": scenario,
                        "manifest_sha256": manifests[data],
                        "loss": loss,
                        "seed": seed,
                        "draw": draw,
                        "encoder": m.train.encoder,
                        "n_train": cell.n_train,
                        "epochs": cell.epochs,
                        "checkpoints": study.model.train.checkpoints_for(cell.epochs),
                        "batch_size": m.train.batch_size,
                        "views": m.train.views,
                        "threads": m.train.threads,
                        "lr": params["lr"],
                        "weight_decay": params["weight_decay"],
                        "loss_params": {k: v for k, v in params.items() if k in loss_keys},
                        "selection": "last",
                        "threshold": "fixed",
                        "explain": {"splits": study.explain_splits(scenario), "n": m.explain.n},
                        "dynamics_n": m.explain.dynamics_n,
                        "ceiling_of": [{**o, "manifest_sha256": manifests[o["data"]]} for o in ceiling_of],
                    }
                    run_id = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
                    specs.append(RunSpec(scenario, loss, seed, draw, config, run_id, cell.label, data))
    return specs


# ----------------------------------------------------------------------------- the study
@dataclass
class StudySummary:
    """What ``run_study`` did: counts and the summed times (for the overhead benchmark)."""

    planned: int = 0
    skipped: int = 0
    done: int = 0
    failed: int = 0
    run_seconds: float = 0.0
    generate_seconds: float = 0.0
    wall_seconds: float = 0.0
    results: list[RunResult] = field(default_factory=list)
    real_scored: int = 0
    """Runs recorded before and scored on the real dataset now (``score_recorded``)."""
    real_unscored: list[str] = field(default_factory=list)
    """One line per done run left without real scores (no run folder, or its scoring failed)."""


def _run_row(result: RunResult) -> dict[str, Any]:
    s = result.spec
    return {
        "run_id": s.run_id,
        "budget": s.budget,
        "scenario": s.scenario,
        "loss": s.loss,
        "seed": s.seed,
        "draw": s.draw,
        "config": s.config,
        "status": result.status,
        "reason": result.reason,
        "score": result.score,
        "warnings": "; ".join(result.warnings),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        **{k: result.timings.get(k) for k in ("train_s", "evaluate_s", "dynamics_s", "explain_s")},
    }


def _rows_rendered(name: str, on_dataset: Callable[[str, int], None]) -> Progress:
    """A ``Progress`` for one dataset that calls ``on_dataset(name, samples just rendered)``."""
    last = 0

    def report(stage: str, done: int, total: int) -> None:
        nonlocal last
        on_dataset(name, done - last)
        last = done

    return report


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
"""What stops a study: queued runs are dropped, running ones stopped, finished ones recorded."""
LOCK_FILE = ".study.lock"
"""``OUT/.study.lock``: held (``flock``) by the study running in ``OUT`` for its whole life; the kernel
releases it when that process dies, so a resume after ``kill -9`` is never refused."""
BEFORE_STORE = (LOCK_FILE, DATASETS_DIR)
"""What a study puts in a new ``--out`` before its store: a folder holding only these is its own."""


def check_study_out(out: Path, study: Study) -> None:
    """Refuse an ``--out`` that is, holds or lies inside a file the study was read from, that is a
    file, that is a non-empty folder without a store (but for what a study writes before its
    store), or whose store holds another study. Reads only: a refused ``--out`` gains no file."""
    check_out(out, study.sources)
    if out.exists() and not out.is_dir():
        raise StudyRunError(f"--out {out} is a file, not a study folder")
    if (out / STORE_FILE).is_file():
        check_owner(out / STORE_FILE, _study_meta(study))
    elif out.is_dir() and any(p.name not in BEFORE_STORE for p in out.iterdir()):
        raise StudyRunError(f"--out {out} is a non-empty folder without {STORE_FILE}; use a new folder")


@contextmanager
def study_lock(out: Path, inputs: Iterable[Path] = ()) -> Iterator[None]:
    """Hold ``OUT/.study.lock`` while the study runs; a second live study on ``out`` is refused
    (one line) without touching anything. If ``out`` did not exist and the study is refused before
    its store exists, ``out`` is removed again: a refused study leaves it absent. ``out`` is checked
    against ``inputs``, ``.`` and ``..`` first (``check_out``), so what may be removed is only a
    folder this study created outside everything it reads."""
    check_out(out, inputs)
    created = not out.exists() and not out.is_symlink()
    out.mkdir(parents=True, exist_ok=True)
    handle = open(out / LOCK_FILE, "a")  # noqa: SIM115 - held for the study's life
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise StudyRunError(
            f"--out {out} is in use by another running study; wait for it or choose another folder"
        ) from None
    try:
        yield
    except Exception:  # a refusal (not an interrupt: a resume reuses the datasets made so far)
        if created and not (out / STORE_FILE).exists():
            shutil.rmtree(out, ignore_errors=True)  # only what this study made: out did not exist
        raise
    finally:
        handle.close()


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block is done, then act on the first one that came (in the
    main thread only; elsewhere signals are left alone)."""
    came: list[int] = []
    try:
        previous = {s: signal.signal(s, lambda signum, frame: came.append(signum)) for s in STOP_SIGNALS}
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        if came:
            signal.raise_signal(came[0])


RUN_EXTRA_BYTES = 4 * 2**20
"""Generous size of a run's tables and figures, in its folder and in the store, for the free-space check."""


def bytes_to_come(study: Study, out: Path, cache: Path) -> int:
    """Bytes the study still has to write: datasets missing from ``cache`` and the runs beyond the
    run folders ``out`` holds (per run its weights, checkpoints, readouts, tables, figures; generous)."""
    import torch

    from nodulab.training.models import build_model

    needed = 0
    for n_train in dict.fromkeys(cell.n_train for cell in study.cells()):
        for name in study.scenarios:
            scenario = study.scenario(name, Cell(n_train, 0))
            if not is_complete(cache / cache_key(scenario, study.model.data.seed), dataset=True):
                needed += bytes_needed(scenario)
    dims = {int(study.scenario(name, cell).image.dim) for cell in study.cells() for name in study.scenarios}
    with torch.device("meta"):
        weights = max(
            sum(t.numel() * 4 for t in build_model(study.model.train.encoder, d).state_dict().values()) for d in dims
        )
    specs = plan(study, defaultdict(str))
    runs_dir = out / RUNS_DIR
    held = sum(1 for _ in runs_dir.iterdir()) if runs_dir.is_dir() else 0
    per_run = sorted((len(s.config["checkpoints"]) + 2) * weights + RUN_EXTRA_BYTES for s in specs)
    return needed + sum(per_run[: max(0, len(per_run) - held)])


def _study_meta(study: Study) -> dict[str, Any]:
    """What the store records of the study (``Store``); ``identity`` names the store."""
    return {"name": study.name, "identity": study.identity, "sha256": study.sha256, "config": study.record()}


def run_study(
    study: Study,
    out: Path | str,
    *,
    executor: str = "local",
    jobs: int = 1,
    device: str = "cpu",
    cache: Path | str | None = None,
    retry_failed: bool = False,
    report: bool = True,
    on_dataset: Callable[[str, int], None] | None = None,
    on_plan: Callable[[int, int], None] | None = None,
    on_result: Callable[[RunResult, int, int], None] | None = None,
    progress: Progress | None = None,
) -> StudySummary:
    """Run (or resume) a study into ``out``: datasets, every run of the grid, CSVs, the report.

    Args:
        study: a validated study (``studies.load_study``).
        out: the study folder (``results.sqlite``, ``runs/``, CSVs, ``report.html``).
        executor: ``local`` or ``ray``.
        jobs: local worker processes (each run keeps the study's thread count).
        device: ``cpu`` or ``cuda`` (resolved by the caller).
        cache: dataset cache folder (default ``out/datasets``); may be shared by studies.
        retry_failed: run again the runs recorded as failed.
        report: write ``report.html`` at the end.
        on_dataset: called with (scenario, samples just rendered) while generating.
        on_plan: called once with (runs in the grid, runs already recorded) before any run starts.
        on_result: called after each run is stored, with the result, the grid's runs recorded so far
            and the grid's size.
        progress: the current run's ``(stage, done, total)`` (local, ``jobs`` 1).
    """
    started = time.perf_counter()
    out = Path(out)
    if executor not in EXECUTORS:
        raise StudyRunError(f"--executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
    if not 1 <= jobs <= MAX_JOBS:
        raise StudyRunError(f"--jobs must be 1..{MAX_JOBS}, got {jobs}")
    check_study_out(out, study)
    cache = Path(cache) if cache is not None else out / DATASETS_DIR
    if is_inside(out / RUNS_DIR, cache):
        raise StudyRunError(f"--cache {cache} lies inside {out / RUNS_DIR}, whose run folders a study replaces")
    check_out(cache, study.sources, flag="--cache")
    check_free_space(out, bytes_to_come(study, out, cache), "the study")
    real = _real_record(study.real) if study.real is not None else None
    summary = StudySummary()
    with study_lock(out, study.sources):
        gen_start = time.perf_counter()
        data_dirs, manifests, scenarios, names = _datasets(study, cache, on_dataset)
        summary.generate_seconds = time.perf_counter() - gen_start
        with Store(out / STORE_FILE, _study_meta(study)) as store:  # every check passed: the store may exist now
            if retry_failed:
                store.forget_failed()
            if real is not None:
                store.use_real(real)
            recorded = store.recorded_datasets()
            for data, folder in data_dirs.items():
                if (names[data], folder.name) not in recorded:
                    manifest = load_manifest(folder)
                    store.add_dataset(names[data], folder.name, manifests[data], manifest, gallery_png(folder))
            specs = plan(study, manifests)
            finished = store.finished()
            todo = [s for s in specs if s.run_id not in finished]
            summary.planned, summary.skipped = len(specs), len(specs) - len(todo)
            if on_plan:
                on_plan(summary.planned, summary.skipped)
            runs_dir = out / RUNS_DIR
            runs_dir.mkdir(exist_ok=True)

            def record(result: RunResult) -> None:
                with signals_deferred():  # a finished run is stored whole before an interrupt acts
                    if result.folder is not None:
                        unpack_folder(result.folder, runs_dir / result.spec.run_id)
                        result.folder = None
                    store.add_run(_run_row(result), result.tables, result.figures)
                result.tables, result.figures = {}, {}  # in the store now; a long grid keeps only the summary
                summary.done += result.status == "done"
                summary.failed += result.status == "failed"
                summary.run_seconds += sum(result.timings.values())
                summary.results.append(result)
                if on_result:
                    on_result(result, summary.skipped + summary.done + summary.failed, summary.planned)

            dirs = {**data_dirs, REAL_DATA: study.real} if study.real is not None else data_dirs
            batch = Batch(study, dirs, manifests, scenarios, runs_dir, device, jobs, progress)
            EXECUTORS[executor](todo, batch, record)
            if study.real is not None:
                summary.real_scored, summary.real_unscored = score_recorded(store, runs_dir, study.real, device)
            export_csvs(store, out)
        if report:
            from nodulab.results.report import write_report

            write_report(out)
        summary.wall_seconds = time.perf_counter() - started
        return summary


def _real_record(folder: Path) -> dict[str, Any]:
    """What the store records of the ``[real]`` dataset (``Store.use_real``), its files checked against
    their hashes first (a refusal before the store exists)."""
    check_hashes(folder)
    manifest = load_manifest(folder)
    return {
        "dataset": str(folder),
        "manifest_sha256": sha256_file(folder / MANIFEST),
        "image": manifest["image"],
        "splits": {name: entry["n"] for name, entry in manifest["splits"].items()},
        "source": manifest.get("real", {}).get("source"),
        "readers": manifest.get("real", {}).get("readers"),
        "label": manifest.get("real", {}).get("label"),
    }


def score_recorded(store: Store, runs_dir: Path, real: Path, device: str = "cpu") -> tuple[int, list[str]]:
    """Score on the real dataset every run the store holds as done without real scores (recorded before
    the study had ``[real]``, or by a worker without its files), in this process, one run at a time.

    Each run's scores are written into ``RUN/real/`` atomically, then stored in one transaction with
    signals deferred, so an interrupt leaves every run either scored and stored or not (scored again
    next time). Returns the count scored and one line per run left unscored (no run folder, or its
    scoring failed: the study goes on)."""
    runs = store.runs()
    scored = store.scored_on(REAL_DATASET)
    todo = runs[(runs["status"] == "done") & ~runs["run_id"].isin(scored)]
    done, unscored = 0, []
    for run in todo.itertuples():
        run_dir = runs_dir / run.run_id
        if not (run_dir / "config.json").is_file():
            unscored.append(f"{run.run_id}: no run folder in {runs_dir}")
            continue
        try:
            tables = score_real(run_dir, real, threshold=str(run.config.get("threshold", "fixed")), device=device)
        except Exception as error:  # noqa: BLE001 - one run left unscored, said in one line; the others go on
            unscored.append(f"{run.run_id}: " + " ".join(f"{type(error).__name__}: {error}".split()))
            continue
        if not tables:
            unscored.append(f"{run.run_id}: its evaluation wrote no metrics")
            continue
        with signals_deferred():
            store.add_rows(run.run_id, tables)
        done += 1
    return done, unscored


def _datasets(
    study: Study, cache: Path, on_dataset: Callable[[str, int], None] | None
) -> tuple[dict[str, Path], dict[str, str], dict[str, Scenario], dict[str, str]]:
    """Every dataset of the study (per scenario and ``n.train``), generated once into ``cache`` or
    checked against its hashes: folders, manifest sha256, resolved scenarios and scenario names, by
    ``Study.data_name``."""
    data_dirs, manifests, scenarios, names = {}, {}, {}, {}
    for n_train in dict.fromkeys(cell.n_train for cell in study.cells()):
        for name in study.scenarios:
            data = study.data_name(name, n_train)
            scenarios[data], names[data] = study.scenario(name, Cell(n_train, 0)), name
            report_rows = _rows_rendered(data, on_dataset) if on_dataset else None
            data_dirs[data] = ensure_dataset(cache, scenarios[data], study.model.data.seed, progress=report_rows)
            manifests[data] = sha256_file(data_dirs[data] / MANIFEST)
    return data_dirs, manifests, scenarios, names
