"""Scoring a run (DESIGN §6): binary metrics per split and readout, ``metrics.csv``.

Malignant (label 1) is the positive class; a sample is called malignant when
P(malignant) >= 0.5. A run folder (``nodulab.train``) holds ``config.json`` (with its ``run_format``),
``model.safetensors`` (``models.save_model``), ``readouts.safetensors`` and
``readouts_init.safetensors`` (``readouts.Readouts.save``). ``evaluate_run`` scores every split
of a dataset except ``train`` and ``val_balanced`` with every classifier the run has:

- ``head``: the model's own head (losses that have one);
- ``probe``, ``knn``: the frozen encoder's readouts fitted on ``train``;
- ``dfr``: a probe fitted on ``val_balanced`` (a feature-quality oracle: it sees the confound
  groups balanced), when the dataset had that split;
- ``probe_init``, ``knn_init``: the same readouts on the untrained encoder of the same seed,
  the control for what the input alone gives away.

It writes the long table ``metrics.csv`` (split, classifier, metric, value) and
``evaluation.json`` (the dataset scored, by manifest hash; the threshold rule; the thread count).
The run's own folder holds the evaluation of the dataset it was trained on; another dataset of
the same image geometry is scored into a folder of its own (``out``).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from rich.table import Table

from nodulab import __version__
from nodulab.data import (
    check_out, dump_json, float_text, load_manifest, load_split, sha256_file, staged, write_atomically,
)
from nodulab.runs import RUN_FORMAT, RunError, load_run, run_threads
from nodulab.scenarios import BALANCED_SPLIT

METRICS = ("accuracy", "sensitivity", "specificity", "balanced_accuracy", "auc")
COLUMNS = ("split", "classifier", "metric", "value")
METRICS_FILE = "metrics.csv"
EVALUATION_FILE = "evaluation.json"
THRESHOLD = 0.5
UNSCORED_SPLITS = ("train", BALANCED_SPLIT)
"""Never scored: ``train`` fits the readouts, ``val_balanced`` fits ``dfr``."""
HEADERS = {"accuracy": "acc", "sensitivity": "sens", "specificity": "spec", "balanced_accuracy": "bal acc",
           "auc": "AUC"}  # fmt: skip
"""Short column headers of ``metrics_table`` (the table fits 80 columns)."""


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


def _write_csv_atomic(frame: pd.DataFrame, path: Path) -> None:
    """Write next to ``path`` and rename into place: a reader never sees half a table."""
    write_atomically(path, lambda tmp: frame.to_csv(tmp, index=False, lineterminator="\n", na_rep="nan",
                                                    float_format=float_text))  # fmt: skip


def evaluate_run(
    run_dir: Path,
    data_dir: Path,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    out: Path | None = None,
    force: bool = False,
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
        out: where ``metrics.csv`` and ``evaluation.json`` go. Default: the run folder, allowed
            only for the dataset the run was trained on (same manifest hash); another dataset
            needs a folder of its own, created atomically.
        force: replace an existing ``out`` folder.

    Returns:
        Long frame with columns ``split, classifier, metric, value``; splits ``val`` first, then
        the others by name; classifiers in ``CLASSIFIERS`` order, those the run has; metrics
        ``METRICS``.

    Raises:
        RunError: a run file is missing, unreadable or of another run format, the dataset's
            geometry differs, or another dataset would overwrite the run's own evaluation
            (a ``ValueError``; ``DatasetError`` for the dataset).
    """
    run_dir, data_dir = Path(run_dir), Path(data_dir)
    run = load_run(run_dir, device=device)
    manifest = load_manifest(data_dir)
    own = run.check_dataset(manifest, data_dir)
    if out is None and not own:
        raise RunError(f"DATA_DIR {data_dir} is not the dataset this run was trained on: pass --out FOLDER "
                       "(the run folder keeps the evaluation of its own dataset)")  # fmt: skip
    if out is not None:
        target = check_out(out, [data_dir])  # a folder inside the run folder is fine: evaluations go there
        if target == run_dir.resolve() or target in run_dir.resolve().parents:
            raise RunError(f"--out {out}: would replace the run folder {run_dir}; choose a new folder")
        if Path(out).exists() and not force:
            raise RunError(f"--out {out} already exists (use --force to replace it)")
    rows = []
    splits = sorted((s for s in manifest["splits"] if s not in UNSCORED_SPLITS), key=lambda s: (s != "val", s))
    with run_threads(run.threads):
        for split in splits:
            images, _, factors = load_split(data_dir, split)
            labels = factors["label"].to_numpy(dtype=np.int64)
            for classifier, p in run.predict(images, batch_size=batch_size).items():
                for metric, value in binary_metrics(labels, p).items():
                    rows.append((split, classifier, metric, float(value)))
    frame = pd.DataFrame(rows, columns=list(COLUMNS))
    evaluation = {
        "nodulab_version": __version__,
        "run_format": RUN_FORMAT,
        "dataset": {"manifest_sha256": sha256_file(data_dir / "dataset.json"), "trained_on": own,
                    "scenario": manifest.get("scenario", {}).get("name"), "seed": manifest.get("seed"),
                    "image": manifest.get("image")},  # fmt: skip
        "splits": splits,
        "classifiers": list(dict.fromkeys(frame["classifier"])),
        "threshold": {"rule": "fixed", "value": THRESHOLD},
        "threads": run.threads,
        "device": str(device),
    }
    if out is None:
        _write_csv_atomic(frame, run_dir / METRICS_FILE)
        write_atomically(run_dir / EVALUATION_FILE, lambda tmp: Path(tmp).write_text(dump_json(evaluation)))
    else:
        with staged(Path(out), force=force) as tmp:
            _write_csv_atomic(frame, tmp / METRICS_FILE)
            (tmp / EVALUATION_FILE).write_text(dump_json(evaluation))
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
