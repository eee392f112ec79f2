"""The study (DESIGN §7): generate, train every loss over seeds and tuning draws, evaluate, explain, store.

``run_study`` is ``nodulab study``. Its pieces, in the order a study uses them:

- **Datasets**: one per scenario, generated once into a cache named by content (the resolved
  scenario, the data seed, the RNG scheme and the dataset format: ``cache_key``), shared by the
  scenario's runs. A lock file makes two processes that want the same dataset produce it once:
  the second waits, then checks the files against the manifest's hashes (``ensure_dataset``).
- **The grid** (``plan``): per seed, scenario, loss and tuning draw one ``RunSpec``. Draw 0 is the
  registry's defaults; draw k > 0 takes every parameter from its tuning range with its own seed
  (``losses.draw_params``), the same budget for every loss. A run's key ``run_id`` is the hash of
  its resolved config, which holds the dataset's manifest hash.
- **A run** (``execute``): train, evaluate, explain, read the run folder's tables back. A run
  that fails is returned as failed with its one-line reason; it does not stop the others.
- **Executors**: ``local`` (in this process, or ``--jobs N`` worker processes) or ``ray``
  (``study_ray.py``). Only this process writes the store; each run goes in with one transaction,
  so a study killed at any moment resumes where it stopped and never redoes a recorded run.
- **Selection** (``store.Store``): per (scenario, loss, seed) the draw with the best kNN balanced
  accuracy on ``val`` at the run's last epoch, the same score for every loss; no test split is
  read to select.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import tarfile
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import pandas as pd

from nodulab import losses
from nodulab.data import FORMAT, MANIFEST, generate, is_complete, load_manifest, sha256_file
from nodulab.gallery import gallery_png
from nodulab.rng import RNG_SCHEME
from nodulab.scenarios import Scenario, scenario_to_dict
from nodulab.store import STORE_FILE, Store, export_csvs
from nodulab.studies import Study
from nodulab.writing import DatasetError, OutExists, check_out, is_inside, staged

EXECUTORS = ("local", "ray")
RUNS_DIR = "runs"
DATASETS_DIR = "datasets"
SELECTION_SCORE = "val_knn_balanced_accuracy"
"""The selection score of a draw: kNN balanced accuracy on ``val`` at the run's selected epoch."""
RUN_TABLES = {  # store table: file in the run folder
    "metrics": "metrics.csv", "groups": "groups.csv", "history": "history.csv",
    "reliance": "explain/reliance.csv", "sweep": "explain/sweep.csv", "cue": "explain/cue.csv",
    "probes": "explain/probes.csv", "cam": "explain/cam.csv",
}  # fmt: skip
RUN_FIGURES = {"history": "history.png", "cam": "explain/cam.png", "embedding": "explain/embedding.png"}
"""Figures the report shows as they are (it draws the sweep and the heatmaps from the tables)."""

Progress = Callable[[str, int, int], None]


class StudyRunError(ValueError):
    """Bad input to a study (``--out``, executor, jobs): a one-line error."""


# ----------------------------------------------------------------------------- datasets
def cache_key(scenario: Scenario, seed: int) -> str:
    """Content name of a scenario's dataset: hash of the resolved scenario, seed, RNG scheme, format."""
    content = {"scenario": scenario_to_dict(scenario), "seed": int(seed), "rng": RNG_SCHEME, "format": FORMAT}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:20]


def check_hashes(folder: Path, manifest_sha256: str | None = None) -> None:
    """Refuse a dataset whose files differ from its manifest's hashes (or whose manifest differs)."""
    if manifest_sha256 is not None and sha256_file(folder / MANIFEST) != manifest_sha256:
        raise DatasetError(f"{folder}: dataset.json differs from the study's (another nodulab version?)")
    manifest = load_manifest(folder)
    for split, entry in manifest["splits"].items():
        for key in ("images", "masks", "factors"):
            if sha256_file(folder / entry[key]["file"]) != entry[key]["sha256"]:
                raise DatasetError(f"{folder}: {entry[key]['file']} does not match its sha256 in dataset.json")


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_dataset(cache: Path, scenario: Scenario, seed: int, manifest_sha256: str | None = None,
                   progress: Callable[[int], None] | None = None) -> Path:  # fmt: skip
    """The cached dataset of ``scenario`` and ``seed``: generated once, hashes checked when reused.

    The folder is named by ``cache_key`` only (a scenario's name never steers a path).
    """
    cache.mkdir(parents=True, exist_ok=True)
    folder = cache / cache_key(scenario, seed)
    with _locked(cache / f"{folder.name}.lock"):
        if not is_complete(folder, dataset=True):
            try:
                generate(scenario, folder, seed=seed, force=folder.exists(), progress=progress)
            except OutExists:  # another process without the lock (an older nodulab) won the race
                pass
        check_hashes(folder, manifest_sha256)
    return folder


# ----------------------------------------------------------------------------- the grid
@dataclass(frozen=True)
class RunSpec:
    """One cell of the grid, resolved: what ``execute`` needs and what ``run_id`` hashes."""

    scenario: str
    loss: str
    seed: int
    draw: int
    config: dict[str, Any] = field(hash=False)
    run_id: str = ""


def plan(study: Study, manifests: dict[str, str]) -> list[RunSpec]:
    """Every run of the study in grid order: seed, scenario, loss, draw (seed 0 of everything first).

    ``manifests`` maps each scenario to its dataset's manifest sha256 (part of every run's key).
    The device is not part of the key (bf16 on CUDA changes numbers, not what the run is).
    """
    m = study.model
    specs = []
    for seed in range(m.seeds):
        for scenario in study.scenarios:
            for loss in study.losses(scenario):
                for draw in range(m.tuning.budget):
                    params = losses.draw_params(loss, draw, seed)
                    loss_keys = set(losses.params(loss))
                    config = {
                        "scenario": scenario, "manifest_sha256": manifests[scenario], "loss": loss,
                        "seed": seed, "draw": draw, "encoder": m.train.encoder, "epochs": m.train.epochs,
                        "batch_size": m.train.batch_size, "views": m.train.views, "threads": m.train.threads,
                        "lr": params["lr"], "weight_decay": params["weight_decay"],
                        "loss_params": {k: v for k, v in params.items() if k in loss_keys},
                        "selection": "last", "threshold": "fixed",
                        "explain": {"splits": study.explain_splits(scenario), "n": m.explain.n},
                    }  # fmt: skip
                    run_id = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
                    specs.append(RunSpec(scenario, loss, seed, draw, config, run_id))
    return specs


# ----------------------------------------------------------------------------- one run
@dataclass
class RunResult:
    """What a run gives back to the driver (picklable: it crosses process and Ray boundaries)."""

    spec: RunSpec
    status: str
    reason: str = ""
    score: float | None = None
    timings: dict[str, float] = field(default_factory=dict)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    figures: dict[str, bytes] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    pid: int = 0
    folder: bytes | None = None


def _one_line(error: BaseException) -> str:
    return " ".join(f"{type(error).__name__}: {error}".split())


def _lines(caught: list[warnings.WarningMessage]) -> list[str]:
    return [" ".join(str(w.message).split()) for w in caught]


def _selection_score(run_dir: Path, history: pd.DataFrame) -> float | None:
    """``SELECTION_SCORE`` at the run's selected epoch (``config.json``), read from its history."""
    config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    row = history[history["epoch"] == int(config["selected_epoch"])]
    return float(row[SELECTION_SCORE].iloc[0]) if len(row) and SELECTION_SCORE in row else None


def _read_back(run_dir: Path) -> tuple[dict[str, pd.DataFrame], dict[str, bytes], float | None]:
    """The run folder's tables (history in long form), its figures, and its selection score."""
    tables = {name: pd.read_csv(run_dir / rel, keep_default_na=False, na_values=["nan"])
              for name, rel in RUN_TABLES.items() if (run_dir / rel).is_file()}  # fmt: skip
    score = _selection_score(run_dir, tables["history"])
    tables["history"] = tables["history"].melt(id_vars="epoch", var_name="name", value_name="value")
    figures = {name: (run_dir / rel).read_bytes() for name, rel in RUN_FIGURES.items() if (run_dir / rel).is_file()}
    return tables, figures, score


def execute(spec: RunSpec, data_dir: Path, run_dir: Path, device: str = "cpu",
            progress: Progress | None = None) -> RunResult:  # fmt: skip
    """Train, evaluate and explain one run into ``run_dir`` (replaced); never raises for a bad run."""
    from nodulab.explanation import EXTRA_WRITERS, SWEEP_ROWS, explain_run
    from nodulab.metrics import evaluate_run
    from nodulab.training import train

    c = spec.config
    timings: dict[str, float] = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            start = time.perf_counter()
            train(data_dir, run_dir, loss=spec.loss, encoder=c["encoder"], epochs=c["epochs"],
                  batch_size=c["batch_size"], lr=c["lr"], weight_decay=c["weight_decay"],
                  loss_params=c["loss_params"], seed=spec.seed, views=c["views"], device=device,
                  selection=c["selection"], threads=c["threads"], force=True, progress=progress)  # fmt: skip
            timings["train_s"] = time.perf_counter() - start
            start = time.perf_counter()
            evaluate_run(run_dir, data_dir, device=device, threshold=c["threshold"], force=True)
            timings["evaluate_s"] = time.perf_counter() - start
            if c["explain"]["splits"]:
                start = time.perf_counter()
                n = c["explain"]["n"]
                explain_run(run_dir, data_dir, splits=c["explain"]["splits"], n=n, device=device, force=True,
                            sweep_rows=min(n or SWEEP_ROWS, SWEEP_ROWS), writers=EXTRA_WRITERS, progress=progress)
                timings["explain_s"] = time.perf_counter() - start
            tables, figures, score = _read_back(run_dir)
        except Exception as error:  # noqa: BLE001 - a failed run is recorded, the study goes on
            return RunResult(spec, "failed", _one_line(error), timings=timings, warnings=_lines(caught),
                             pid=os.getpid())  # fmt: skip
    return RunResult(spec, "done", "", score, timings, tables, figures, _lines(caught), os.getpid())


def unpack_folder(data: bytes, out: Path) -> None:
    """Write a packed run folder to ``out`` (replaced atomically); only plain files inside ``out``."""
    with staged(out, force=True) as tmp, tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
        for member in tar.getmembers():
            target = (tmp / member.name).resolve()
            if not member.isfile() or not target.is_relative_to(tmp.resolve()):
                raise DatasetError(f"run archive: refusing entry {member.name!r}")
            target.parent.mkdir(parents=True, exist_ok=True)
            source = tar.extractfile(member)
            assert source is not None
            target.write_bytes(source.read())


# ----------------------------------------------------------------------------- executors
def _execute_in_worker(spec: RunSpec, data_dir: str, run_dir: str, device: str) -> RunResult:
    return execute(spec, Path(data_dir), Path(run_dir), device)


def run_local(specs: list[RunSpec], data_dirs: dict[str, Path], runs_dir: Path, device: str, jobs: int,
              progress: Progress | None, done: Callable[[RunResult], None]) -> None:  # fmt: skip
    """Run ``specs`` here (``jobs`` 1) or in ``jobs`` spawned worker processes; ``done`` per result."""
    if jobs == 1:
        for spec in specs:
            done(execute(spec, data_dirs[spec.scenario], runs_dir / spec.run_id, device, progress))
        return
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
        pending: set[Future[RunResult]] = {
            pool.submit(_execute_in_worker, s, str(data_dirs[s.scenario]), str(runs_dir / s.run_id), device)
            for s in specs
        }
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                done(future.result())


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


def _run_row(result: RunResult) -> dict[str, Any]:
    s = result.spec
    return {"run_id": s.run_id, "scenario": s.scenario, "loss": s.loss, "seed": s.seed, "draw": s.draw,
            "config": s.config, "status": result.status, "reason": result.reason, "score": result.score,
            "warnings": "; ".join(result.warnings), "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
            **{k: result.timings.get(k) for k in ("train_s", "evaluate_s", "explain_s")}}  # fmt: skip


def check_study_out(out: Path, study: Study) -> None:
    """Refuse an ``--out`` that is, holds or lies inside a file the study was read from, that is a
    file, or that is a non-empty folder without a store (``Store`` refuses another study's store)."""
    check_out(out, study.sources)
    if out.exists() and not out.is_dir():
        raise StudyRunError(f"--out {out} is a file, not a study folder")
    if not (out / STORE_FILE).is_file() and out.is_dir() and any(out.iterdir()):
        raise StudyRunError(f"--out {out} is a non-empty folder without {STORE_FILE}; use a new folder")


def _study_meta(study: Study) -> dict[str, Any]:
    return {"name": study.name, "sha256": study.sha256, "config": study.record()}


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
    if jobs < 1:
        raise StudyRunError(f"--jobs must be >= 1, got {jobs}")
    check_study_out(out, study)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(cache) if cache is not None else out / DATASETS_DIR
    if is_inside(out / RUNS_DIR, cache):
        raise StudyRunError(f"--cache {cache} lies inside {out / RUNS_DIR}, whose run folders a study replaces")
    summary = StudySummary()
    with Store(out / STORE_FILE, _study_meta(study)) as store:
        if retry_failed:
            store.forget_failed()
        data_dirs, manifests = {}, {}
        gen_start = time.perf_counter()
        recorded = set(store.manifests())
        for name, scenario in study.scenarios.items():
            report_rows = (lambda k, n=name: on_dataset(n, k)) if on_dataset else None
            data_dirs[name] = ensure_dataset(cache, scenario, study.model.data.seed, progress=report_rows)
            manifests[name] = sha256_file(data_dirs[name] / MANIFEST)
            if name not in recorded:
                store.add_dataset(name, data_dirs[name].name, manifests[name], load_manifest(data_dirs[name]),
                                  gallery_png(data_dirs[name]))  # fmt: skip
        summary.generate_seconds = time.perf_counter() - gen_start
        specs = plan(study, manifests)
        finished = store.finished()
        todo = [s for s in specs if s.run_id not in finished]
        summary.planned, summary.skipped = len(specs), len(specs) - len(todo)
        if on_plan:
            on_plan(summary.planned, summary.skipped)
        runs_dir = out / RUNS_DIR
        runs_dir.mkdir(exist_ok=True)

        def record(result: RunResult) -> None:
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

        if executor == "ray":
            from nodulab.study_ray import run_ray

            run_ray(todo, study, manifests, device, record)
        else:
            run_local(todo, data_dirs, runs_dir, device, jobs, progress, record)
        export_csvs(store, out)
    if report:
        from nodulab.report import write_report

        write_report(out)
    summary.wall_seconds = time.perf_counter() - started
    return summary
