"""Scoring a run (DESIGN §6): binary metrics per split and readout, ``metrics.csv``.

Malignant (label 1) is the positive class; a sample is called malignant when
P(malignant) >= 0.5. A run folder (``nodulab.train``) holds ``config.json`` (with its ``run_format``),
``model.safetensors`` (``models.save_model``) and ``readouts.safetensors``
(``readouts.Readouts.save``); ``evaluate_run`` scores every split of a
dataset except ``train`` with the model's own head (if any), the linear probe and the kNN
readout, and writes the long table ``metrics.csv`` (split, classifier, metric, value).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from rich.table import Table

from nodulab.data import float_text, load_manifest, load_split, write_atomically
from nodulab.models import load_model
from nodulab.readouts import extract, load_readouts

METRICS = ("accuracy", "sensitivity", "specificity", "balanced_accuracy", "auc")
CLASSIFIERS = ("head", "probe", "knn")
COLUMNS = ("split", "classifier", "metric", "value")
CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
READOUTS_FILE = "readouts.safetensors"
METRICS_FILE = "metrics.csv"
THRESHOLD = 0.5
HEADERS = {"accuracy": "acc", "sensitivity": "sens", "specificity": "spec", "balanced_accuracy": "bal acc",
           "auc": "AUC"}  # fmt: skip
"""Short column headers of ``metrics_table`` (the table fits 80 columns)."""


RUN_FORMAT = 1
"""Version of a run folder's layout (written by ``train``); ``evaluate`` refuses another."""


class RunError(ValueError):
    """A run folder is missing, incomplete, unreadable or of another run format."""


def _ratio(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator else math.nan


def binary_metrics(
    labels: np.ndarray, p_malignant: np.ndarray, threshold: float = THRESHOLD
) -> dict[str, float]:
    """Accuracy, sensitivity, specificity, balanced accuracy and ROC AUC of one predictor.

    Args:
        labels: ``(N,)`` 0 (benign) / 1 (malignant).
        p_malignant: ``(N,)`` P(malignant); the prediction is ``p >= threshold``.
        threshold: decision threshold.

    Returns:
        ``{metric: value}`` for ``METRICS``. Sensitivity TP/(TP+FN), specificity TN/(TN+FP),
        balanced accuracy their mean; any of them NaN when its denominator is 0, AUC
        (``sklearn.metrics.roc_auc_score``) NaN unless both classes are present.
    """
    from sklearn.metrics import roc_auc_score

    y = np.asarray(labels)
    p = np.asarray(p_malignant, dtype=np.float64)
    if y.ndim != 1 or p.shape != y.shape:
        raise ValueError(f"binary_metrics: labels and p_malignant must be (N,), got {y.shape} and {p.shape}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("binary_metrics: labels must be 0 (benign) or 1 (malignant)")
    if not np.isfinite(p).all():
        raise ValueError("binary_metrics: p_malignant contains non-finite values")
    positive, predicted = y == 1, p >= threshold
    tp, fn = int((positive & predicted).sum()), int((positive & ~predicted).sum())
    tn, fp = int((~positive & ~predicted).sum()), int((~positive & predicted).sum())
    sensitivity, specificity = _ratio(tp, tp + fn), _ratio(tn, tn + fp)
    both = 0 < positive.sum() < len(y)
    return {
        "accuracy": _ratio(tp + tn, len(y)),
        "sensitivity": sensitivity,
        "specificity": specificity,
        "balanced_accuracy": (sensitivity + specificity) / 2.0,  # NaN if either is
        "auc": float(roc_auc_score(y, p)) if both else math.nan,
    }


def _require(path: Path) -> Path:
    if not path.is_file():
        raise RunError(f"run folder {path.parent}: {path.name} is missing")
    return path


def read_run_format(path: Path) -> object:
    """The ``run_format`` recorded in a run's ``config.json``; ``None`` if it cannot be read."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8")).get("run_format")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return None


def _check_run_format(path: Path) -> None:
    found = read_run_format(path)
    if found is None:
        raise RunError(f"{path}: not a run config (unreadable JSON)")
    if found != RUN_FORMAT:
        raise RunError(f"{path}: run format {found!r}, this nodulab reads {RUN_FORMAT}")


def _write_csv_atomic(frame: pd.DataFrame, path: Path) -> None:
    """Write next to ``path`` and rename into place: a reader never sees half a table."""
    write_atomically(path, lambda tmp: frame.to_csv(tmp, index=False, lineterminator="\n", na_rep="nan",
                                                    float_format=float_text))  # fmt: skip


def evaluate_run(
    run_dir: Path, data_dir: Path, *, device: torch.device | str = "cpu", batch_size: int = 256
) -> pd.DataFrame:
    """Score a trained run on every split of a dataset except ``train``.

    Args:
        run_dir: holds ``config.json`` (this run format), ``model.safetensors`` and
            ``readouts.safetensors``; ``metrics.csv`` is written (replaced) there, atomically.
        data_dir: dataset folder.
        device: where the network runs.
        batch_size: images per forward pass.

    Returns:
        Long frame with columns ``split, classifier, metric, value``; splits ``val`` first, then
        the others by name; classifiers ``head`` (only if the model has one), ``probe``, ``knn``;
        metrics ``METRICS``.

    Raises:
        RunError: a run file is missing, unreadable or of another run format (a
            ``ValueError``; ``DatasetError`` for the dataset).
    """
    run_dir, data_dir = Path(run_dir), Path(data_dir)
    if not run_dir.is_dir():
        raise RunError(f"run folder {run_dir} does not exist")
    paths = [_require(run_dir / name) for name in (CONFIG_FILE, MODEL_FILE, READOUTS_FILE)]
    _check_run_format(paths[0])
    manifest = load_manifest(data_dir)
    try:
        model, _ = load_model(paths[1], device=device)
        readouts = load_readouts(paths[2])
    except ValueError as error:  # not safetensors, not ours, another checkpoint format
        raise RunError(str(error)) from None
    rows = []
    splits = sorted((name for name in manifest["splits"] if name != "train"), key=lambda s: (s != "val", s))
    for split in splits:
        images, _, factors = load_split(data_dir, split)
        labels = factors["label"].to_numpy(dtype=np.int64)
        out = extract(model, images, batch_size=batch_size, device=device)
        scores = {"head": out["head"]} if "head" in out else {}
        scores.update(readouts.predict(out["features"]))
        for classifier in CLASSIFIERS:
            if classifier in scores:
                for metric, value in binary_metrics(labels, scores[classifier]).items():
                    rows.append((split, classifier, metric, float(value)))
    frame = pd.DataFrame(rows, columns=list(COLUMNS))
    _write_csv_atomic(frame, run_dir / METRICS_FILE)
    return frame


def metrics_table(frame: pd.DataFrame, title: str | None = None) -> Table:
    """A rich table of a ``metrics.csv`` frame: one row per split × classifier, one column per metric.

    Args:
        frame: columns ``split, classifier, metric, value``.
        title: optional table title.

    Returns:
        The table (NaN shown as ``–``), rows in the frame's order, headers ``HEADERS``.
    """
    table = Table(title=title)
    table.add_column("split", no_wrap=True)
    table.add_column("classifier", no_wrap=True)
    for metric in METRICS:
        table.add_column(HEADERS[metric], justify="right")
    values = {(r.split, r.classifier, r.metric): r.value for r in frame.itertuples(index=False)}
    pairs = dict.fromkeys((r.split, r.classifier) for r in frame.itertuples(index=False))
    for split, classifier in pairs:
        cells = [values.get((split, classifier, m), math.nan) for m in METRICS]
        table.add_row(split, classifier, *("–" if math.isnan(v) else f"{v:.3f}" for v in cells))
    return table
