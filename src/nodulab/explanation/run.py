"""``explain_run``: every table of ``RUN/explain/`` for one run (design.md "Evaluation and
explanation"): counterfactual reliance, sweeps and the cue index (``counterfactual``), then the
writers of further tables: probes and the embedding map (``probes``), Grad-CAM (``cam``).

A real dataset (``nodulab import-lidc``) is explained into a folder of its own (``out``), at the
run's image geometry, where the stages apply: the probes decode the readers' ratings from the
frozen embedding, Grad-CAM is read against the readers' outline, each with its control as on
synthetic data. A real nodule cannot be re-rendered with one factor switched, so there are no
counterfactual switches (``NO_SWITCHES``; no reliance, sweep or cue table). Nothing there uses
the training ranges, which stay those of the run's own dataset.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from nodulab import __version__
from nodulab.common.progress import Progress
from nodulab.common.tables import REAL_DATASET, RESULT_TABLES, write_table
from nodulab.common.writing import check_out
from nodulab.data.dataset import dump_json, is_real, load_manifest, load_split, sha256_file, staged
from nodulab.explanation.cam import write_cam
from nodulab.explanation.context import ExplainContext, Writer
from nodulab.explanation.counterfactual import EXPLAIN_DIR, SWEEP_ROWS, THRESHOLD, explain_split, sweep_figure
from nodulab.explanation.probes import write_probes
from nodulab.explanation.switches import build_switches
from nodulab.synth.scenarios import load_scenario_dict
from nodulab.training.runs import LoadedRun, RunError, load_run, run_threads

EXPLAIN_RECORD = "explain.json"
EXTRA_WRITERS: list[Writer] = [write_probes, write_cam]
"""Writers of further tables, called in order inside the temporary folder: ``probes.csv`` and
``embedding.png`` (``nodulab.explanation.probes``), ``cam.csv`` and ``cam.png`` (``nodulab.explanation.cam``)."""
NO_SWITCHES = (
    "no counterfactual switches on a real dataset: a real nodule cannot be re-rendered with one factor "
    "changed (no reliance, sweep or cue table); probes of the ratings and Grad-CAM against the readers' "
    "outline only"
)
"""The one line ``explain`` prints, and ``explain.json`` records, for a real dataset."""


def _default_splits(manifest: dict[str, Any]) -> list[str]:
    tests = sorted(s for s in manifest["splits"] if s.startswith("test_"))
    if is_real(manifest):  # a real split may be empty
        tests = [s for s in tests if manifest["splits"][s]["n"]]
    return tests or ["val"]


def _check_inputs(
    run_dir: Path,
    data_dir: Path,
    splits: Sequence[str] | None,
    n: int | None,
    force: bool,
    device: str,
    out: Path | None = None,
) -> tuple[LoadedRun, dict[str, Any], list[str]]:
    """Every refusal before any work (a one-line ``RunError``/``DatasetError``; nothing written)."""
    if n is not None and n < 1:
        raise RunError(f"--n must be at least 1 (got {n})")
    if out is None and (run_dir / EXPLAIN_DIR).exists() and not force:
        raise RunError(f"{run_dir / EXPLAIN_DIR} already exists (use --force to replace it)")
    run = load_run(run_dir, device=device)
    manifest = load_manifest(data_dir)
    own = run.check_dataset(manifest, data_dir)  # the geometry must match in every case
    if is_real(manifest):
        if out is None and not own:
            raise RunError(
                f"DATA_DIR {data_dir} is a real dataset: pass --out FOLDER ({run_dir / EXPLAIN_DIR} holds the "
                "explanation of the run's own dataset)"
            )
    elif not own:
        raise RunError(
            f"DATA_DIR {data_dir} is not the dataset this run was trained on (explain reads the "
            "training ranges, which decide nuisance vs robustness, from the run's own dataset)"
        )
    if out is not None:
        target = check_out(out, [data_dir])
        if target == run_dir.resolve() or target in run_dir.resolve().parents:
            raise RunError(f"--out {out}: would replace the run folder {run_dir}; choose a new folder")
        if Path(out).exists() and not force:
            raise RunError(f"--out {out} already exists (use --force to replace it)")
    chosen = list(dict.fromkeys(splits)) if splits else _default_splits(manifest)
    unknown = [s for s in chosen if s not in manifest["splits"]]
    if unknown:
        raise RunError(f"--splits: no split {unknown[0]!r} in {data_dir} (have {', '.join(manifest['splits'])})")
    empty = [s for s in chosen if not manifest["splits"][s]["n"]]
    if is_real(manifest) and empty:
        raise RunError(f"--splits: split {empty[0]!r} of {data_dir} has no rows; nothing to explain there")
    return run, manifest, chosen


def explain_run(
    run_dir: Path | str,
    data_dir: Path | str,
    *,
    splits: Sequence[str] | None = None,
    n: int | None = None,
    device: str = "cpu",
    batch_size: int = 256,
    sweep_rows: int = SWEEP_ROWS,
    force: bool = False,
    writers: Sequence[Writer] = EXTRA_WRITERS,
    progress: Progress | None = None,
    out: Path | str | None = None,
) -> dict[str, pd.DataFrame]:
    """Write ``RUN/explain/``: reliance, sweep and cue tables (module docstring), then ``writers``.

    Runs at the run's thread count, so the same inputs give the same bytes on CPU.

    Args:
        run_dir: a run folder of ``nodulab train``.
        data_dir: the dataset it was trained on, or a real dataset of the same image geometry
            (``out`` needed; only ``writers`` apply, no switches: ``NO_SWITCHES``).
        splits: splits to explain (default: every ``test_*``, a real one when not empty; ``val`` if none).
        n: explain the first ``n`` rows of each split (default all).
        device: where renders and networks run.
        batch_size: images per forward pass.
        sweep_rows: rows per split in the sweep.
        force: replace an existing ``explain/``.
        writers: further table writers, called with the context and the temporary folder
            (default ``EXTRA_WRITERS``, as the CLI and the study; ``()`` for the three tables alone).
        progress: ``(stage, done, total)`` callback.
        out: a new folder for the tables instead of ``RUN/explain/`` (``force`` replaces one);
            required for a real dataset.

    Returns:
        ``{"reliance", "sweep", "cue"}`` frames (plus what writers put in ``context.tables``);
        for a real dataset only what the writers put there (``probes``, ``cam``).

    Raises:
        RunError: no such run or model, another geometry, another dataset, an unknown split,
            an empty split of a real dataset, ``n < 1``, a real dataset without ``out``, or an
            existing ``explain/`` (or ``out``) without ``force``. ``DatasetError``: a bad dataset or ``out``.
    """
    run_dir, data_dir = Path(run_dir), Path(data_dir)
    run, manifest, chosen = _check_inputs(
        run_dir, data_dir, splits, n, force, device, None if out is None else Path(out)
    )
    target = run_dir / EXPLAIN_DIR if out is None else Path(out)
    if is_real(manifest):
        return _explain_real(run, data_dir, manifest, chosen, n, device, batch_size, force, writers, target)
    scenario = load_scenario_dict(manifest["scenario"])
    size, dim = int(manifest["image"]["size"]), int(manifest["image"]["dim"])

    def predict(images: np.ndarray) -> dict[str, np.ndarray]:
        return run.predict(images, batch_size=batch_size)

    context = ExplainContext(run, data_dir, manifest, scenario, chosen, n, predict, device)
    tables: dict[str, list[pd.DataFrame]] = {"reliance": [], "cue": [], "sweep": []}
    skipped: dict[str, dict[str, int]] = {}
    with run_threads(run.threads):
        for split in chosen:
            images, _, factors = load_split(data_dir, split)
            rows = factors.iloc[: n or len(factors)].reset_index(drop=True)
            switches = build_switches(scenario, split, int(manifest["seed"]), len(factors), rows)
            per_split, results = explain_split(
                split,
                rows,
                images[: len(rows)],
                predict,
                switches,
                size,
                dim,
                device=device,
                sweep_rows=sweep_rows,
                progress=progress,
            )
            for key, frame in per_split.items():
                tables[key].append(frame)
            skipped[split] = {
                f"{r.switch.factor} {r.switch.value_from}->{r.switch.value_to}": r.skipped for r in results if r.skipped
            }
        context.tables = {key: pd.concat(frames, ignore_index=True) for key, frames in tables.items()}
        context.record = {
            "nodulab_version": __version__,
            "dataset": {
                "manifest_sha256": sha256_file(data_dir / "dataset.json"),
                "scenario": scenario.name,
                "seed": manifest["seed"],
                "image": manifest["image"],
            },
            "splits": {s: min(n or manifest["splits"][s]["n"], manifest["splits"][s]["n"]) for s in chosen},
            "sweep_rows": sweep_rows,
            "threshold": THRESHOLD,
            "classifiers": run.classifiers,
            "threads": run.threads,
            "device": str(device),
            "skipped_not_fitting": skipped,
        }
        with staged(target, force=force, inputs=[data_dir], owner=EXPLAIN_RECORD) as tmp:
            _write_tables(context.tables, tmp)
            for write in writers:
                write(context, tmp)
            (tmp / EXPLAIN_RECORD).write_text(dump_json(context.record), encoding="utf-8")
    return context.tables


def _explain_real(
    run: LoadedRun,
    data_dir: Path,
    manifest: dict[str, Any],
    chosen: list[str],
    n: int | None,
    device: str,
    batch_size: int,
    force: bool,
    writers: Sequence[Writer],
    target: Path,
) -> dict[str, pd.DataFrame]:
    """``explain_run`` on a real dataset: the writers (probes, Grad-CAM) and ``explain.json``, no switches."""

    def predict(images: np.ndarray) -> dict[str, np.ndarray]:
        return run.predict(images, batch_size=batch_size)

    context = ExplainContext(run, data_dir, manifest, None, chosen, n, predict, device)
    real = manifest.get("real", {})
    context.record = {
        "nodulab_version": __version__,
        "dataset": {
            "manifest_sha256": sha256_file(data_dir / "dataset.json"),
            "kind": "real",
            "name": REAL_DATASET,
            "source": real.get("source"),
            "tables": real.get("tables"),
            "readers": real.get("readers"),
            "label": real.get("label"),
            "image": manifest["image"],
        },
        "run_dataset": {"manifest_sha256": run.record["dataset"]["manifest_sha256"]},
        "splits": {s: min(n or manifest["splits"][s]["n"], manifest["splits"][s]["n"]) for s in chosen},
        "switches": NO_SWITCHES,
        "training_ranges": "the run's own dataset's (run_dataset); no stage here reads them",
        "classifiers": run.classifiers,
        "threads": run.threads,
        "device": str(device),
    }
    with run_threads(run.threads):
        with staged(target, force=force, inputs=[data_dir], owner=EXPLAIN_RECORD) as tmp:
            for write in writers:
                write(context, tmp)
            (tmp / EXPLAIN_RECORD).write_text(dump_json(context.record), encoding="utf-8")
    return context.tables


def _write_tables(tables: dict[str, pd.DataFrame], folder: Path) -> None:
    for key in ("reliance", "sweep", "cue"):
        write_table(tables[key], folder / RESULT_TABLES[key].file_name)
    sweep_figure(tables["sweep"]).savefig(folder / "sweep.png", dpi=100, metadata={"Software": None})
