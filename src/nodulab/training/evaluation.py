"""Scoring a run (design.md "Evaluation and explanation"): binary metrics per split and readout, ``metrics.csv``.

Malignant (label 1) is the positive class; a sample is called malignant when
P(malignant) >= 0.5. A run folder (``nodulab.training.loop``) holds ``config.json`` (with its ``run_format``),
``model.safetensors`` (``models.save_model``), ``readouts.safetensors`` and
``readouts_init.safetensors`` (``readouts.Readouts.save``). ``evaluate_run`` scores every split
of a dataset except ``train`` and ``val_balanced`` with every classifier the run has:

- ``head``: the model's own head (losses that have one);
- ``probe``, ``knn``: the frozen encoder's readouts fitted on ``train``;
- ``dfr``: a probe fitted on ``val_balanced`` (a feature-quality oracle: it sees the confound
  groups balanced), when the dataset had that split;
- ``probe_init``, ``knn_init``: the same readouts on the untrained encoder of the same seed,
  the control for what the input alone gives away.

It writes, atomically (each file renamed into place):

- ``metrics.csv`` (``dataset, split, classifier, metric, value, ci_low, ci_high``; ``dataset`` is
  the scored dataset's scenario name): each metric with a
  **sample-level** bootstrap 95% percentile interval (``scoring.bootstrap_intervals``: the split's samples
  resampled with replacement, the model fixed). It leaves out the variance between training
  seeds, which a study adds; read it as "how much this one model's score depends on which test
  samples were drawn", not as the uncertainty of the loss.
- ``groups.csv`` (``split, classifier, label, group, n, accuracy``): accuracy in every
  (label × ``agrees_<confound>``) cell of each split, then one worst-group row per split and
  classifier (``group_rows``).
- ``predictions.csv`` (``dataset, split, classifier, row, label, p, predicted``): every test
  sample's label, probability (float32) and call, per classifier; a study resamples them so that
  its intervals carry the test set's noise (``common.seedstats.shared_sample_difference``).
- ``evaluation.json``: the dataset scored (by manifest hash), the threshold rule and the chosen
  thresholds, the bootstrap settings and seeds, the thread count.

Threshold: 0.5 (``fixed``), or per classifier the one that maximises balanced accuracy on ``val``
(``choose_threshold``); no test split is read before the thresholds are fixed. AUC does not
depend on it. The run's own folder holds the evaluation of the dataset it was trained on; another
dataset of the same image geometry is scored into a folder of its own (``out``).

**A real dataset** (``nodulab import-lidc``; ``dataset.is_real``) is always scored into ``out`` and
only at the run's image geometry (dim, size, pixel_mm). Scored splits: every split but ``train``
(``val``, then ``test_lidc``; the real ``train`` split is kept for training on real nodules, and
``test_lidc`` stays the declared test split). The readouts apply unchanged: ``probe`` and ``knn``
were fitted on the run's synthetic ``train``, ``dfr`` on its ``val_balanced``; nothing is refitted
on real rows. Each split is scored against two targets:

- malignancy: the dataset's ``label`` (the readers' malignancy, ``dataset.json``'s ``real.label``
  rule), under the split's own name (``test_lidc``);
- spiculation, the synthetic worlds' cue: ``lidc_spiculation >= 4`` is 1, ``== 1`` is 0, the
  ratings between are left out, under ``<split>_spiculation`` (``test_lidc_spiculation``).

The ``dataset`` column is ``lidc-idri``. ``groups.csv`` has cells by rating instead of agrees
patterns (``real_group_rows``): diameter (``>= 10`` mm or not) x spiculation (rating ``>= 4`` or
not) for malignancy, diameter x malignancy for spiculation, then the worst group as above.
``predictions.csv`` holds both targets of every ``test_*`` split (``row`` is the row of the split).
With ``--threshold val`` each classifier's threshold is chosen on the real ``val`` split's
malignancy (the readers' labels, never a test split) and applies to both targets. Learning
dynamics (checkpoints) never apply to a real dataset.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from rich.table import Table

from nodulab import __version__
from nodulab.common.scoring import (  # noqa: F401 - scoring's names are part of this module's API
    BOOTSTRAP_CHUNK,
    BOOTSTRAP_DRAWS,
    CONFIDENCE,
    METRICS,
    THRESHOLD,
    binary_metrics,
    bootstrap_intervals,
    bootstrap_seed,
    percentile_interval,
    resample_counts,
    weighted_metrics,
)
from nodulab.common.tables import REAL_DATASET, RESULT_TABLES, SPICULATION_SUFFIX, write_table
from nodulab.data.dataset import (
    cell_columns,
    check_out,
    dump_json,
    is_real,
    load_manifest,
    load_split,
    sha256_file,
    staged,
    write_atomically,
)
from nodulab.synth.scenario import BALANCED_SPLIT
from nodulab.training.runs import RUN_FORMAT, LoadedRun, RunError, load_run, run_threads

METRICS_FILE = RESULT_TABLES["metrics"].file
GROUPS_FILE = RESULT_TABLES["groups"].file
PREDICTIONS_FILE = RESULT_TABLES["predictions"].file
EVALUATION_FILE = "evaluation.json"
THRESHOLD_RULES = ("fixed", "val")
"""``fixed``: 0.5 for every classifier; ``val``: per classifier, chosen on ``val`` (``choose_threshold``)."""
THRESHOLD_SPLIT = "val"
LABEL_NAMES = ("benign", "malignant")
NO_CONFOUND_GROUP = "all"
WORST_LABEL = "any"
WORST_PREFIX = "worst: "
"""A worst-group row has label ``any`` and group ``worst: <label>/<group>`` (the cell it names)."""
UNSCORED_SPLITS = ("train", BALANCED_SPLIT)
"""Never scored: ``train`` fits the readouts, ``val_balanced`` fits ``dfr``."""
REAL_UNSCORED_SPLITS = ("train",)
"""Never scored on a real dataset: its ``train`` split is for training on real nodules."""
SPICULATED_FROM = 4.0
"""Spiculation target: a rating ``>= 4`` is 1 (spiculated)."""
UNSPICULATED_AT = 1.0
"""Spiculation target: a rating ``== 1`` is 0 (no spiculation); the ratings between are left out."""
LARGE_FROM_MM = 10.0
"""Real groups: a nodule of ``diameter_mm >= 10`` is large."""
TARGET_LABEL_NAMES = {"malignancy": LABEL_NAMES, "spiculation": ("unspiculated", "spiculated")}
"""The ``label`` column of a real dataset's ``groups.csv``, per target."""
HEADERS = {
    "accuracy": "acc",
    "sensitivity": "sens",
    "specificity": "spec",
    "balanced_accuracy": "bal acc",
    "auc": "AUC",
}
"""Short column headers of ``metrics_table`` (the table fits 80 columns)."""


# ----------------------------------------------------------------------------- threshold
def choose_threshold(labels: np.ndarray, p_malignant: np.ndarray) -> float:
    """The threshold that maximises balanced accuracy on one split (meant for ``val``).

    Candidates are 0.5 and every score of the split (a sample is malignant when ``p >= t``);
    among equally good candidates (compared exactly, in integer counts) the one nearest 0.5 wins,
    then the lower. With one class only, balanced accuracy is undefined and 0.5 is kept.

    Args:
        labels: ``(N,)`` 0 / 1.
        p_malignant: ``(N,)`` P(malignant).

    Returns:
        The threshold.
    """
    labels, p = np.asarray(labels), np.asarray(p_malignant, dtype=np.float64)
    positives, negatives = np.sort(p[labels == 1]), np.sort(p[labels == 0])
    if not len(positives) or not len(negatives):
        return THRESHOLD
    candidates = np.unique(np.r_[p, THRESHOLD])
    true_positives = len(positives) - np.searchsorted(positives, candidates, side="left")
    true_negatives = np.searchsorted(negatives, candidates, side="left")
    # balanced accuracy × 2 × positives × negatives, an exact integer
    score = true_positives * len(negatives) + true_negatives * len(positives)
    best = candidates[score == score.max()]
    return float(best[np.lexsort((best, np.abs(best - THRESHOLD)))[0]])


# ----------------------------------------------------------------------------- groups
def group_names(factors: pd.DataFrame) -> list[str]:
    """The groups of a split, e.g. ``diameter_mm=agrees,attenuation=conflicts``; ``all`` without a confound."""
    confounds = [c.removeprefix("agrees_") for c in cell_columns(factors)]
    if not confounds:
        return [NO_CONFOUND_GROUP]
    return [
        ",".join(f"{c}={'agrees' if a else 'conflicts'}" for c, a in zip(confounds, pattern))
        for pattern in itertools.product((1, 0), repeat=len(confounds))
    ]


def group_rows(factors: pd.DataFrame, predicted: np.ndarray) -> list[tuple[str, str, int, float]]:
    """Accuracy in every (label × agrees pattern) cell of a split, then the worst non-empty cell.

    Args:
        factors: the split's factor table (``label`` and its ``agrees_<confound>`` columns).
        predicted: ``(N,)`` bool, the classifier's call (malignant).

    Returns:
        ``(label, group, n, accuracy)`` rows: benign then malignant, agreeing patterns first
        (``group_names``); empty cells have ``n`` 0 and accuracy NaN. The last row is the worst
        group (WILDS style): label ``any``, group ``worst: <label>/<group>``, the lowest
        accuracy among non-empty cells (the first in table order on a tie); ``worst: none``
        with NaN when every cell is empty.
    """
    labels = factors["label"].to_numpy()
    agrees = factors[cell_columns(factors)].to_numpy()
    return _cell_rows(labels, agrees, group_names(factors), predicted)


def _cell_rows(
    labels: np.ndarray,
    cells: np.ndarray,
    names: list[str],
    predicted: np.ndarray,
    label_names: tuple[str, str] = LABEL_NAMES,
) -> list[tuple[str, str, int, float]]:
    """``group_rows`` of 0/1 cell columns ``cells`` ``(N, k)``; ``names`` follow ``product((1, 0), repeat=k)``."""
    correct = np.asarray(predicted) == (labels == 1)
    patterns = list(itertools.product((1, 0), repeat=cells.shape[1]))
    rows = []
    for label, name in enumerate(label_names):
        for pattern, group in zip(patterns, names):
            hit = (labels == label) & (cells == pattern).all(axis=1)
            n = int(hit.sum())
            rows.append((name, group, n, float(correct[hit].mean()) if n else math.nan))
    filled = [r for r in rows if r[2]]
    worst = min(filled, key=lambda r: r[3]) if filled else None
    if worst is None:
        return [*rows, (WORST_LABEL, WORST_PREFIX + "none", 0, math.nan)]
    return [*rows, (WORST_LABEL, f"{WORST_PREFIX}{worst[0]}/{worst[1]}", worst[2], worst[3])]


def spiculation_target(factors: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """The spiculation target of a real split: the rows it keeps and their labels.

    Returns:
        ``(rows, labels)``: int row indices where ``lidc_spiculation >= 4`` (label 1) or ``== 1``
        (label 0); the ratings between (a consensus median of 1.5 included) are left out.
    """
    rating = factors["lidc_spiculation"].to_numpy(dtype=np.float64)
    rows = np.flatnonzero((rating >= SPICULATED_FROM) | (rating == UNSPICULATED_AT))
    return rows, (rating[rows] >= SPICULATED_FROM).astype(np.int64)


def real_group_rows(
    factors: pd.DataFrame, labels: np.ndarray, predicted: np.ndarray, target: str = "malignancy"
) -> list[tuple[str, str, int, float]]:
    """``group_rows`` of a real split, with cells by rating instead of agrees patterns.

    Cells: diameter (``diameter_mm>=10`` / ``diameter_mm<10``) x, for the malignancy target,
    spiculation (``lidc_spiculation>=4`` / ``lidc_spiculation<4``), or for the spiculation target,
    malignancy (``malignancy=malignant`` / ``malignancy=benign``, the dataset's ``label``). Labels are
    named ``benign``/``malignant`` or ``unspiculated``/``spiculated``; the last row is the worst group.

    Args:
        factors: the scored rows' factor table (``REAL_COLUMNS``).
        labels: ``(N,)`` 0 / 1 of the target.
        predicted: ``(N,)`` bool, the classifier's call.
        target: ``malignancy`` or ``spiculation``.
    """
    large = factors["diameter_mm"].to_numpy(dtype=np.float64) >= LARGE_FROM_MM
    size = (f"diameter_mm>={LARGE_FROM_MM:g}", f"diameter_mm<{LARGE_FROM_MM:g}")
    if target == "malignancy":
        other = factors["lidc_spiculation"].to_numpy(dtype=np.float64) >= SPICULATED_FROM
        names = (f"lidc_spiculation>={SPICULATED_FROM:g}", f"lidc_spiculation<{SPICULATED_FROM:g}")
    else:
        other = factors["label"].to_numpy() == 1
        names = ("malignancy=malignant", "malignancy=benign")
    cells = np.stack([large, other], axis=1).astype(np.int64)
    groups = [f"{a},{b}" for a in size for b in names]
    return _cell_rows(np.asarray(labels), cells, groups, predicted, TARGET_LABEL_NAMES[target])


def _write_csv_atomic(frame: pd.DataFrame, path: Path) -> None:
    """Write next to ``path`` and rename into place: a reader never sees half a table."""
    write_atomically(path, lambda tmp: write_table(frame, tmp))


def evaluate_run(
    run_dir: Path,
    data_dir: Path,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    out: Path | None = None,
    force: bool = False,
    threshold: str = "fixed",
    draws: int = BOOTSTRAP_DRAWS,
) -> pd.DataFrame:
    """Score a trained run on every split of a dataset except ``train`` and ``val_balanced``.

    The thread count is set to the run's (``config.json``) while scoring, so CPU numbers are
    bit-identical to those of any other evaluation of the same run.

    Args:
        run_dir: holds ``config.json`` (this run format), ``model.safetensors``,
            ``readouts.safetensors`` and ``readouts_init.safetensors``.
        data_dir: dataset folder, of the same image geometry as the run's.
        device: where the network runs.
        batch_size: images per forward pass.
        out: where ``metrics.csv``, ``groups.csv`` and ``evaluation.json`` go. Default: the run
            folder, allowed only for the dataset the run was trained on (same manifest hash);
            another dataset needs a folder of its own, created atomically; a real dataset always
            does (scored against malignancy and spiculation, module docstring).
        force: replace an existing ``out`` folder.
        threshold: ``fixed`` (0.5) or ``val`` (per classifier, ``choose_threshold`` on the
            dataset's ``val`` split, fixed before any other split is read; ``val``'s own scores
            are then in-sample).
        draws: bootstrap resamples per split (``BOOTSTRAP_DRAWS``).

    Returns:
        Long frame with the columns of ``RESULT_TABLES["metrics"]`` (``dataset, split, classifier,
        metric, value, ci_low, ci_high``; the interval sample-level, ``bootstrap_intervals``); splits
        ``val`` first, then the others by name; classifiers in ``CLASSIFIERS`` order, those the run has;
        metrics ``METRICS``. ``groups.csv`` holds ``group_rows`` of every split and classifier.

    Raises:
        RunError: a run file is missing, unreadable or of another run format, the dataset's
            geometry differs, ``threshold`` is unknown or ``val`` is missing for it, another
            dataset would overwrite the run's own evaluation, or a real dataset comes without
            ``out`` (a ``ValueError``; ``DatasetError`` for the dataset).
    """
    run_dir, data_dir = Path(run_dir), Path(data_dir)
    if threshold not in THRESHOLD_RULES:
        raise RunError(f"threshold rule {threshold!r}: choose one of {', '.join(THRESHOLD_RULES)}")
    run = load_run(run_dir, device=device)
    manifest = load_manifest(data_dir)
    own = run.check_dataset(manifest, data_dir)
    real = is_real(manifest)
    if real and out is None and not own:
        raise RunError(
            f"DATA_DIR {data_dir} is a real dataset: pass --out FOLDER (the run folder keeps the evaluation "
            "of its own dataset)"
        )
    if out is None and not own:
        raise RunError(
            f"DATA_DIR {data_dir} is not the dataset this run was trained on: pass --out FOLDER "
            "(the run folder keeps the evaluation of its own dataset)"
        )
    if out is not None:
        target = check_out(out, [data_dir])  # a folder inside the run folder is fine: evaluations go there
        if target == run_dir.resolve() or target in run_dir.resolve().parents:
            raise RunError(f"--out {out}: would replace the run folder {run_dir}; choose a new folder")
        if Path(out).exists() and not force:
            raise RunError(f"--out {out} already exists (use --force to replace it)")
    unscored = REAL_UNSCORED_SPLITS if real else UNSCORED_SPLITS
    splits = sorted((s for s in manifest["splits"] if s not in unscored), key=lambda s: (s != "val", s))
    if threshold == "val" and THRESHOLD_SPLIT not in splits:
        raise RunError(f"--threshold val: DATA_DIR {data_dir} has no {THRESHOLD_SPLIT} split to choose it on")
    if real:
        tables = _score_real(run, manifest, data_dir, splits, own, threshold, batch_size, draws, str(device))
        _write_evaluation(run_dir, out, force, *tables)
        return tables[0]
    thresholds = dict.fromkeys(run.classifiers, THRESHOLD)
    dataset = str(manifest.get("scenario", {}).get("name", ""))
    rows, groups, predictions = [], [], []
    with run_threads(run.threads):
        for split in splits:  # val first: its thresholds are fixed before a test split is read
            images, _, factors = load_split(data_dir, split)
            labels = factors["label"].to_numpy(dtype=np.int64)
            scores = run.predict(images, batch_size=batch_size)
            if threshold == "val" and split == THRESHOLD_SPLIT:
                thresholds = choose_thresholds(labels, scores)
            intervals = bootstrap_intervals(labels, scores, thresholds, seed=bootstrap_seed(split), draws=draws)
            for classifier, p in scores.items():
                for metric, value in binary_metrics(labels, p, thresholds[classifier]).items():
                    low, high = intervals[classifier][metric] if not math.isnan(value) else (math.nan, math.nan)
                    rows.append((dataset, split, classifier, metric, float(value), low, high))
                for row in group_rows(factors, p >= thresholds[classifier]):
                    groups.append((split, classifier, *row))
                if split.startswith("test_"):
                    predictions.append(_predictions(dataset, split, classifier, labels, p, thresholds[classifier]))
    frame = pd.DataFrame(rows, columns=list(RESULT_TABLES["metrics"].columns))
    predicted = pd.concat(predictions, ignore_index=True) if predictions else _predictions("", "", "", [], [], 0.5)
    group_frame = pd.DataFrame(groups, columns=list(RESULT_TABLES["groups"].columns))
    evaluation = {
        "nodulab_version": __version__,
        "run_format": RUN_FORMAT,
        "dataset": {
            "manifest_sha256": sha256_file(data_dir / "dataset.json"),
            "trained_on": own,
            "scenario": manifest.get("scenario", {}).get("name"),
            "seed": manifest.get("seed"),
            "image": manifest.get("image"),
        },
        "splits": splits,
        "classifiers": list(dict.fromkeys(frame["classifier"])),
        "threshold": _threshold_record(threshold, thresholds),
        "bootstrap": {
            "level": "sample",
            "method": "percentile",
            "draws": draws,
            "confidence": CONFIDENCE,
            "seeds": {s: bootstrap_seed(s) for s in splits},
            "note": "ci_low, ci_high resample the split's samples with the model fixed; they leave out "
            "the variance between training seeds, which a study adds",
        },
        "groups": {
            "cells": "label x agrees_<confound> pattern; 'all' without a confound",
            "worst": f"label {WORST_LABEL!r}, group '{WORST_PREFIX}<label>/<group>': the non-empty cell "
            "of lowest accuracy",
        },
        "threads": run.threads,
        "device": str(device),
    }
    _write_evaluation(run_dir, out, force, frame, group_frame, predicted, evaluation)
    return frame


def _write_evaluation(
    run_dir: Path,
    out: Path | None,
    force: bool,
    frame: pd.DataFrame,
    group_frame: pd.DataFrame,
    predicted: pd.DataFrame,
    evaluation: dict,
) -> None:
    """Write the four files into the run folder (``out`` None) or a new folder ``out``, atomically."""
    if out is None:
        _write_csv_atomic(frame, run_dir / METRICS_FILE)
        _write_csv_atomic(group_frame, run_dir / GROUPS_FILE)
        _write_csv_atomic(predicted, run_dir / PREDICTIONS_FILE)
        write_atomically(run_dir / EVALUATION_FILE, lambda tmp: Path(tmp).write_text(dump_json(evaluation)))
    else:
        with staged(Path(out), force=force, owner=EVALUATION_FILE) as tmp:
            _write_csv_atomic(frame, tmp / METRICS_FILE)
            _write_csv_atomic(group_frame, tmp / GROUPS_FILE)
            _write_csv_atomic(predicted, tmp / PREDICTIONS_FILE)
            (tmp / EVALUATION_FILE).write_text(dump_json(evaluation))


def _score_real(
    run: LoadedRun,
    manifest: dict,
    data_dir: Path,
    splits: list[str],
    own: bool,
    threshold: str,
    batch_size: int,
    draws: int,
    device: str,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, dict]:
    """Score a real dataset against malignancy and spiculation (module docstring): the four tables' contents."""
    thresholds = dict.fromkeys(run.classifiers, THRESHOLD)
    rows, groups, predictions, scored, counts = [], [], [], [], {}
    with run_threads(run.threads):
        for split in splits:  # val first: its thresholds are fixed before a test split is read
            images, _, factors = load_split(data_dir, split)
            scores = run.predict(images, batch_size=batch_size)
            labels = factors["label"].to_numpy(dtype=np.int64)
            if threshold == "val" and split == THRESHOLD_SPLIT:
                thresholds = choose_thresholds(labels, scores)  # on the readers' malignancy, both targets
            spiculated, spiculation_labels = spiculation_target(factors)
            targets = (
                ("malignancy", split, np.arange(len(labels)), labels),
                ("spiculation", split + SPICULATION_SUFFIX, spiculated, spiculation_labels),
            )
            for target, name, keep, target_labels in targets:
                kept = {c: p[keep] for c, p in scores.items()}
                rated = factors.iloc[keep].reset_index(drop=True)
                intervals = bootstrap_intervals(target_labels, kept, thresholds, seed=bootstrap_seed(name), draws=draws)
                for classifier, p in kept.items():
                    for metric, value in binary_metrics(target_labels, p, thresholds[classifier]).items():
                        low, high = intervals[classifier][metric] if not math.isnan(value) else (math.nan, math.nan)
                        rows.append((REAL_DATASET, name, classifier, metric, float(value), low, high))
                    called = p >= thresholds[classifier]
                    for row in real_group_rows(rated, target_labels, called, target):
                        groups.append((name, classifier, *row))
                    if split.startswith("test_"):
                        predictions.append(
                            _predictions(REAL_DATASET, name, classifier, target_labels, p, thresholds[classifier], keep)
                        )
                scored.append(name)
                counts[name] = len(keep)
    frame = pd.DataFrame(rows, columns=list(RESULT_TABLES["metrics"].columns))
    predicted = pd.concat(predictions, ignore_index=True) if predictions else _predictions("", "", "", [], [], 0.5)
    group_frame = pd.DataFrame(groups, columns=list(RESULT_TABLES["groups"].columns))
    real = manifest.get("real", {})
    record = _threshold_record(threshold, thresholds)
    if threshold == "val":
        record["targets"] = "chosen on val's malignancy label; applied to both targets"
    evaluation = {
        "nodulab_version": __version__,
        "run_format": RUN_FORMAT,
        "dataset": {
            "manifest_sha256": sha256_file(data_dir / "dataset.json"),
            "trained_on": own,
            "kind": "real",
            "name": REAL_DATASET,
            "scenario": None,
            "seed": None,
            "image": manifest.get("image"),
            "source": real.get("source"),
            "tables": real.get("tables"),
            "readers": real.get("readers"),
            "label": real.get("label"),
        },
        "splits": scored,
        "rows": counts,
        "unscored": [s for s in manifest["splits"] if s in REAL_UNSCORED_SPLITS],
        "targets": {
            "malignancy": "the dataset's label (the readers' malignancy; dataset.label's rule); split <split>",
            "spiculation": f"lidc_spiculation >= {SPICULATED_FROM:g} -> 1, == {UNSPICULATED_AT:g} -> 0, "
            f"ratings between left out; split <split>{SPICULATION_SUFFIX}",
        },
        "readouts": "applied unchanged: probe, knn (and the _init controls) fitted on the run's synthetic train "
        "split, dfr on its val_balanced; nothing refitted on real rows",
        "classifiers": list(dict.fromkeys(frame["classifier"])),
        "threshold": record,
        "bootstrap": {
            "level": "sample",
            "method": "percentile",
            "draws": draws,
            "confidence": CONFIDENCE,
            "seeds": {s: bootstrap_seed(s) for s in scored},
            "note": "ci_low, ci_high resample the split's samples with the model fixed; they leave out "
            "the variance between training seeds, which a study adds",
        },
        "groups": {
            "cells": f"label x diameter_mm >= {LARGE_FROM_MM:g} x (malignancy target) lidc_spiculation >= "
            f"{SPICULATED_FROM:g} / (spiculation target) the malignancy label",
            "worst": f"label {WORST_LABEL!r}, group '{WORST_PREFIX}<label>/<group>': the non-empty cell "
            "of lowest accuracy",
        },
        "dynamics": "not applicable to a real dataset",
        "threads": run.threads,
        "device": device,
    }
    return frame, group_frame, predicted, evaluation


def _predictions(
    dataset: str,
    split: str,
    classifier: str,
    labels: np.ndarray,
    p: np.ndarray,
    threshold: float,
    rows: np.ndarray | None = None,
) -> pd.DataFrame:
    """One split's ``predictions.csv`` rows for a classifier: every sample's label, p (as float32) and call.

    ``rows``: each sample's row in its split (default ``0..N-1``; a target that leaves rows out passes them).
    """
    p32 = np.asarray(p, dtype=np.float32)
    return pd.DataFrame(
        {
            "dataset": dataset,
            "split": split,
            "classifier": classifier,
            "row": np.arange(len(p32), dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64),
            "label": np.asarray(labels, dtype=np.int64),
            "p": p32.astype(np.float64),
            "predicted": (np.asarray(p) >= threshold).astype(np.int64),
        },
        columns=list(RESULT_TABLES["predictions"].columns),
    )


def choose_thresholds(labels: np.ndarray, scores: Mapping[str, np.ndarray]) -> dict[str, float]:
    """``choose_threshold`` of every classifier on one split (``val``; never a test split)."""
    return {classifier: choose_threshold(labels, p) for classifier, p in scores.items()}


def _threshold_record(rule: str, thresholds: Mapping[str, float]) -> dict[str, object]:
    """The threshold entry of ``evaluation.json``."""
    if rule == "fixed":
        return {"rule": "fixed", "value": THRESHOLD}
    return {
        "rule": "val",
        "split": THRESHOLD_SPLIT,
        "values": dict(thresholds),
        "criterion": "maximum balanced accuracy on val; candidates 0.5 and every val score (p >= t is "
        "malignant); ties: nearest 0.5, then the lower; 0.5 if val has one class; AUC does "
        "not use it; val's own scores are in-sample",
    }


def worst_groups(groups: pd.DataFrame) -> dict[tuple[str, str], float]:
    """Worst-group accuracy of every (split, classifier) of a ``groups.csv`` frame."""
    worst = groups[groups["label"] == WORST_LABEL]
    return {(r.split, r.classifier): float(r.accuracy) for r in worst.itertuples(index=False)}


def metrics_table(frame: pd.DataFrame, title: str | None = None, groups: pd.DataFrame | None = None) -> Table:
    """A rich table of a ``metrics.csv`` frame: one row per split × classifier, one column per metric.

    Args:
        frame: columns ``split, classifier, metric, value`` (the intervals are not shown).
        title: optional table title.
        groups: optional ``groups.csv`` frame; adds a ``worst`` column (worst-group accuracy).

    Returns:
        The table (NaN shown as ``–``), rows in the frame's order, headers ``HEADERS``.
    """
    table = Table(title=title)
    table.add_column("split", no_wrap=True)
    table.add_column("classifier", no_wrap=True)
    for metric in METRICS:
        table.add_column(HEADERS[metric], justify="right")
    worst = worst_groups(groups) if groups is not None else None
    if worst is not None:
        table.add_column("worst", justify="right")
    values = {(r.split, r.classifier, r.metric): r.value for r in frame.itertuples(index=False)}
    pairs = dict.fromkeys((r.split, r.classifier) for r in frame.itertuples(index=False))
    for split, classifier in pairs:
        cells = [values.get((split, classifier, m), math.nan) for m in METRICS]
        if worst is not None:
            cells.append(worst.get((split, classifier), math.nan))
        table.add_row(split, classifier, *("–" if math.isnan(v) else f"{v:.3f}" for v in cells))
    return table
