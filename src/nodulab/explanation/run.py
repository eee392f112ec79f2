"""``explain_run``: every table of ``RUN/explain/`` for one run (design.md "Evaluation and
explanation"): counterfactual reliance, sweeps and the cue index (``counterfactual``), then the
writers of further tables: probes and the embedding map (``probes``), Grad-CAM (``cam``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from nodulab import __version__
from nodulab.common.progress import Progress
from nodulab.common.tables import RESULT_TABLES, write_table
from nodulab.data.dataset import dump_json, load_manifest, load_split, sha256_file, staged
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


def _default_splits(manifest: dict[str, Any]) -> list[str]:
    tests = sorted(s for s in manifest["splits"] if s.startswith("test_"))
    return tests or ["val"]


def _check_inputs(
    run_dir: Path, data_dir: Path, splits: Sequence[str] | None, n: int | None, force: bool, device: str
) -> tuple[LoadedRun, dict[str, Any], list[str]]:
    """Every refusal before any work (a one-line ``RunError``/``DatasetError``; nothing written)."""
    if n is not None and n < 1:
        raise RunError(f"--n must be at least 1 (got {n})")
    if (run_dir / EXPLAIN_DIR).exists() and not force:
        raise RunError(f"{run_dir / EXPLAIN_DIR} already exists (use --force to replace it)")
    run = load_run(run_dir, device=device)
    manifest = load_manifest(data_dir)
    if not run.check_dataset(manifest, data_dir):
        raise RunError(
            f"DATA_DIR {data_dir} is not the dataset this run was trained on (explain reads the "
            "training ranges, which decide nuisance vs robustness, from the run's own dataset)"
        )
    chosen = list(dict.fromkeys(splits)) if splits else _default_splits(manifest)
    unknown = [s for s in chosen if s not in manifest["splits"]]
    if unknown:
        raise RunError(f"--splits: no split {unknown[0]!r} in {data_dir} (have {', '.join(manifest['splits'])})")
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
) -> dict[str, pd.DataFrame]:
    """Write ``RUN/explain/``: reliance, sweep and cue tables (module docstring), then ``writers``.

    Runs at the run's thread count, so the same inputs give the same bytes on CPU.

    Args:
        run_dir: a run folder of ``nodulab train``.
        data_dir: the dataset it was trained on.
        splits: splits to explain (default: every ``test_*``; ``val`` if none).
        n: explain the first ``n`` rows of each split (default all).
        device: where renders and networks run.
        batch_size: images per forward pass.
        sweep_rows: rows per split in the sweep.
        force: replace an existing ``explain/``.
        writers: further table writers, called with the context and the temporary folder
            (default ``EXTRA_WRITERS``, as the CLI and the study; ``()`` for the three tables alone).
        progress: ``(stage, done, total)`` callback.

    Returns:
        ``{"reliance", "sweep", "cue"}`` frames (plus what writers put in ``context.tables``).

    Raises:
        RunError: no such run or model, another geometry, another dataset, an unknown split,
            ``n < 1``, or an existing ``explain/`` without ``force``. ``DatasetError``: a bad dataset.
    """
    run_dir, data_dir = Path(run_dir), Path(data_dir)
    run, manifest, chosen = _check_inputs(run_dir, data_dir, splits, n, force, device)
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
        with staged(run_dir / EXPLAIN_DIR, force=force, inputs=[data_dir], owner=EXPLAIN_RECORD) as tmp:
            _write_tables(context.tables, tmp)
            for write in writers:
                write(context, tmp)
            (tmp / EXPLAIN_RECORD).write_text(dump_json(context.record), encoding="utf-8")
    return context.tables


def _write_tables(tables: dict[str, pd.DataFrame], folder: Path) -> None:
    for key in ("reliance", "sweep", "cue"):
        write_table(tables[key], folder / RESULT_TABLES[key].file_name)
    sweep_figure(tables["sweep"]).savefig(folder / "sweep.png", dpi=100, metadata={"Software": None})
