"""One run of a study (design.md "Study, store, report"): its spec, its dataset from the
content-named cache, and ``execute``: train (saving checkpoints), evaluate (a ceiling's run also on
the test splits of the scenarios it is the ceiling of), score the checkpoints (``dynamics.csv``),
explain, read the run folder's tables back. With the study's ``[real]`` dataset among its datasets
(``REAL_DATA``), a run is also scored on the real dataset right after its own evaluation, into
``RUN/real/`` (``score_real``): its ``metrics`` and ``predictions`` of ``test_lidc`` (malignancy) and
``test_lidc_spiculation`` (the synthetic cue's rating), stored with ``dataset`` = ``lidc-idri``.

A run that fails is returned as failed with its one-line reason; it does not stop the others.
Datasets are generated once into a cache named by content (the resolved scenario, the data seed,
the RNG scheme and the dataset format: ``cache_key``), shared by the scenario's runs. A lock file
makes two processes that want the same dataset produce it once: the second waits, then checks the
files against the manifest's hashes (``ensure_dataset``).
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
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from nodulab.common.errors import InputError
from nodulab.common.progress import Progress
from nodulab.common.tables import RESULT_TABLES, RUN_FIGURES
from nodulab.common.writing import DatasetError, OutExists, staged
from nodulab.data.dataset import FORMAT, MANIFEST, generate, is_complete, load_manifest, sha256_file
from nodulab.results.store import REAL_DATASET, REAL_SPLITS
from nodulab.studies.config import Study
from nodulab.synth.rng import RNG_SCHEME
from nodulab.synth.scenario import Scenario
from nodulab.synth.scenarios import scenario_to_dict
from nodulab.training.runs import CONFIG_FILE

SELECTION_SCORE = "val_knn_balanced_accuracy"
"""The selection score of a draw: kNN balanced accuracy on ``val`` at the run's selected epoch."""


class StudyRunError(InputError):
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
    for _split, entry in manifest["splits"].items():
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


def ensure_dataset(
    cache: Path,
    scenario: Scenario,
    seed: int,
    manifest_sha256: str | None = None,
    progress: Progress | None = None,
) -> Path:
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
    budget: str = ""
    """The budget cell's label (``studies.config.Cell.label``)."""
    data: str = ""
    """Its dataset's name in ``Batch.data_dirs`` (``Study.data_name``)."""


SCORED_TABLES = ("metrics", "predictions")
"""The tables ``evaluate_run`` writes per dataset scored (keyed by ``dataset``)."""
CEILING_DIR = "ceiling"
"""Where a ceiling's run keeps its scores of the confounded scenarios' images: ``RUN/ceiling/<i>/``."""
REAL_DIR = "real"
"""Where a run keeps its scores on the study's real dataset: ``RUN/real/`` (``score_real``)."""
REAL_DATA = "[real]"
"""The study's real dataset in ``Batch.data_dirs`` (no scenario's dataset name has brackets). A worker
without it (a Ray worker shares no file) leaves the run unscored there; the driver scores it."""


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


def _read_table(path: Path, name: str) -> pd.DataFrame:
    """One result table; a declared text column is read as text (``007`` stays ``007``); ``nan`` is
    the only missing value."""
    table = RESULT_TABLES[name]
    dtype = None if table.wide else dict.fromkeys(table.text, str)
    return pd.read_csv(path, keep_default_na=False, na_values=["nan"], dtype=dtype)


def _read_back(run_dir: Path) -> tuple[dict[str, pd.DataFrame], dict[str, bytes], float | None]:
    """The run folder's tables (``RESULT_TABLES``; wide ones in long form; the metrics and predictions
    of its ``ceiling/`` scores added), figures, and selection score."""
    tables = {
        name: _read_table(run_dir / table.file, name)
        for name, table in RESULT_TABLES.items()
        if (run_dir / table.file).is_file()
    }
    for name in SCORED_TABLES:  # a ceiling's scores of the confounded scenarios' images
        extra = sorted((run_dir / CEILING_DIR).glob(f"*/{RESULT_TABLES[name].file}"))
        if extra and name in tables:
            tables[name] = pd.concat([tables[name], *(_read_table(p, name) for p in extra)])
    for name, frame in read_real(run_dir).items():
        if name in tables:
            tables[name] = pd.concat([tables[name], frame], ignore_index=True)
    score = _selection_score(run_dir, tables["history"])
    tables = {name: RESULT_TABLES[name].long(frame) for name, frame in tables.items()}
    figures = {name: (run_dir / rel).read_bytes() for name, rel in RUN_FIGURES.items() if (run_dir / rel).is_file()}
    return tables, figures, score


def read_real(run_dir: Path) -> dict[str, pd.DataFrame]:
    """The run's scores on the real dataset (``RUN/real/``), as the store keeps them: ``metrics`` and
    ``predictions`` of ``REAL_SPLITS`` with ``dataset`` = ``REAL_DATASET``; ``{}`` when it was not scored."""
    found = {}
    for name in SCORED_TABLES:
        path = run_dir / REAL_DIR / RESULT_TABLES[name].file
        if path.is_file():
            frame = _read_table(path, name)
            frame = frame[frame["split"].isin(REAL_SPLITS)].assign(dataset=REAL_DATASET)
            found[name] = frame.reset_index(drop=True)
    return found if "metrics" in found else {}


def score_real(run_dir: Path, real_dir: Path, *, threshold: str, device: str = "cpu") -> dict[str, pd.DataFrame]:
    """Score a trained run on the real dataset ``real_dir`` into ``RUN/real/`` (replaced atomically; the
    run's ``threshold`` rule, its threads) and return what the store keeps of it (``read_real``)."""
    from nodulab.training.evaluation import evaluate_run

    evaluate_run(run_dir, real_dir, device=device, threshold=threshold, out=run_dir / REAL_DIR, force=True)
    return read_real(run_dir)


def execute(
    spec: RunSpec,
    data_dirs: dict[str, Path],
    run_dir: Path,
    device: str = "cpu",
    progress: Progress | None = None,
) -> RunResult:
    """Train, evaluate, score the checkpoints and explain one run into ``run_dir`` (replaced); never
    raises for a bad run. ``data_dirs`` holds its dataset (``spec.data``) and, for a ceiling's run,
    those of the scenarios it is the ceiling of (``config["ceiling_of"]``)."""
    from nodulab.explanation.counterfactual import SWEEP_ROWS
    from nodulab.explanation.dynamics import dynamics_run
    from nodulab.explanation.run import EXTRA_WRITERS, explain_run
    from nodulab.training.evaluation import evaluate_run
    from nodulab.training.loop import train

    c = spec.config
    data_dir = data_dirs[spec.data]
    timings: dict[str, float] = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            start = time.perf_counter()
            train(
                data_dir,
                run_dir,
                loss=spec.loss,
                encoder=c["encoder"],
                epochs=c["epochs"],
                batch_size=c["batch_size"],
                lr=c["lr"],
                weight_decay=c["weight_decay"],
                loss_params=c["loss_params"],
                seed=spec.seed,
                views=c["views"],
                device=device,
                selection=c["selection"],
                threads=c["threads"],
                checkpoints=c["checkpoints"],
                force=True,
                progress=progress,
            )
            timings["train_s"] = time.perf_counter() - start
            start = time.perf_counter()
            evaluate_run(run_dir, data_dir, device=device, threshold=c["threshold"], force=True)
            for i, other in enumerate(c["ceiling_of"]):  # the same images as the confounded runs
                evaluate_run(
                    run_dir,
                    data_dirs[other["data"]],
                    device=device,
                    threshold=c["threshold"],
                    out=run_dir / CEILING_DIR / str(i),
                    force=True,
                )
            real = data_dirs.get(REAL_DATA)
            if real is not None and Path(real).is_dir():  # else (a Ray worker) the driver scores it
                try:
                    score_real(run_dir, Path(real), threshold=c["threshold"], device=device)
                except Exception as error:  # noqa: BLE001 - the run's own results stand; the driver retries
                    warnings.warn(f"not scored on the real dataset: {_one_line(error)}", stacklevel=1)
            timings["evaluate_s"] = time.perf_counter() - start
            if c["checkpoints"]:
                start = time.perf_counter()
                dynamics_run(run_dir, data_dir, n=c["dynamics_n"], device=device, force=True)
                timings["dynamics_s"] = time.perf_counter() - start
            if c["explain"]["splits"]:
                start = time.perf_counter()
                n = c["explain"]["n"]
                explain_run(
                    run_dir,
                    data_dir,
                    splits=c["explain"]["splits"],
                    n=n,
                    device=device,
                    force=True,
                    sweep_rows=min(n or SWEEP_ROWS, SWEEP_ROWS),
                    writers=EXTRA_WRITERS,
                    progress=progress,
                )
                timings["explain_s"] = time.perf_counter() - start
            tables, figures, score = _read_back(run_dir)
        except Exception as error:  # noqa: BLE001 - a failed run is recorded, the study goes on
            return RunResult(
                spec, "failed", _one_line(error), timings=timings, warnings=_lines(caught), pid=os.getpid()
            )
    return RunResult(spec, "done", "", score, timings, tables, figures, _lines(caught), os.getpid())


def unpack_folder(data: bytes, out: Path) -> None:
    """Write a packed run folder to ``out`` (replaced atomically); only plain files inside ``out``."""
    with staged(out, force=True, owner=CONFIG_FILE) as tmp, tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
        for member in tar.getmembers():
            target = (tmp / member.name).resolve()
            if not member.isfile() or not target.is_relative_to(tmp.resolve()):
                raise DatasetError(f"run archive: refusing entry {member.name!r}")
            target.parent.mkdir(parents=True, exist_ok=True)
            source = tar.extractfile(member)
            assert source is not None
            target.write_bytes(source.read())


@dataclass(frozen=True)
class Batch:
    """What an executor needs besides the runs: the study, its datasets, where run folders go, how to run."""

    study: Study
    data_dirs: dict[str, Path]
    """Every dataset by ``Study.data_name``."""
    manifests: dict[str, str]
    """Their manifest sha256, by ``Study.data_name``."""
    scenarios: dict[str, Scenario]
    """Their resolved scenarios, by ``Study.data_name`` (what a worker without the files regenerates)."""
    runs_dir: Path
    device: str
    jobs: int = 1
    progress: Progress | None = None


Done = Callable[[RunResult], None]
"""Called by an executor with each finished run, in this (the driver's) process."""
