"""Made-up results stores for the findings and report tests: every table a study writes, tiny.

A score is chosen per (scenario, loss, seed, split) by a function the test passes, so a test
decides where a difference is and is not. Figures are small real PNGs made with matplotlib.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from nodulab.common.tables import RESULT_TABLES
from nodulab.results.store import STORE_FILE, Store

HEADED = ("ce", "ce+supcon", "ce+triplet")
CLASSIFIERS = ("head", "probe", "knn", "dfr", "probe_init", "knn_init")
SPLITS = {"clean": ("val", "test_iid"), "size-confound": ("val", "test_iid", "test_conflict")}
Score = Callable[[str, str, int, str], float]


def manifest(scenario: str) -> dict:
    """A dataset manifest with the fields the report reads (``scenario``: confounds, splits)."""
    confounded = scenario != "clean"
    confounds = [{"factor": "diameter_mm", "malignant": {"uniform": [13, 18]}, "benign": {"uniform": [6, 10]}}]
    agreement = {"train": 0.95, "val": 0.95, "test_iid": 0.95, "test_conflict": 0.0}
    splits = {
        s: {"n": 100, "factors": {}, **({"agreement": agreement[s]} if confounded else {})}
        for s in ("train", *SPLITS[scenario])
    }
    return {
        "scenario": {"name": scenario, "confounds": confounds if confounded else [], "splits": splits},
        "image": {"dim": 2, "size": 32, "pixel_mm": 1.4},
    }


@functools.cache
def png(colour: str = "C0") -> bytes:
    """A tiny real PNG (drawn once per colour)."""
    fig = Figure(figsize=(2, 1.5))
    fig.subplots().plot([0, 1, 2], [0, 1, 0], color=colour)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=40, metadata={"Software": None})
    return buffer.getvalue()


def _metrics(loss: str, scenario: str, seed: int, score: Score, dataset: str | None = None) -> pd.DataFrame:
    """Scores of a run of ``scenario`` on ``dataset``'s splits (default its own; a ceiling's run
    scores the confounded scenario's images too, ``score(scenario, ...)`` on that split)."""
    own = "head" if loss in HEADED else "probe"
    dataset = dataset or scenario
    rows = []
    for split in SPLITS[dataset] if dataset == scenario else [s for s in SPLITS[dataset] if s.startswith("test_")]:
        value = score(scenario, loss, seed, split)
        for classifier in CLASSIFIERS:
            if classifier == "head" and loss not in HEADED:
                continue
            shift = {own: 0.0, "dfr": 0.1, "probe_init": -0.3}.get(classifier, -0.05)
            for metric in ("balanced_accuracy", "accuracy"):
                v = float(np.clip(value + shift, 0, 1))
                rows.append((dataset, split, classifier, metric, v, v - 0.02, v + 0.02))
    return pd.DataFrame(rows, columns=list(RESULT_TABLES["metrics"].columns))


def _explain(loss: str, scenario: str, flips: tuple[float, float]) -> dict[str, pd.DataFrame]:
    """Reliance, cue, sweep, probes and cam rows.

    ``flips`` = (cue, confound) flip rates of the loss's own readout; every other classifier flips 0.5.
    """
    split = "test_conflict" if scenario != "clean" else "test_iid"
    readers = [c for c in CLASSIFIERS if c != "head" or loss in HEADED]
    own = "head" if loss in HEADED else "probe"
    reliance = []
    for c in readers:
        cue, confound = flips if c == own else (0.5, 0.5)
        reliance += [  # null switches flip 0.05 of predictions
            (split, c, f, k, a, b, 50, r, r / 2, 1, 0.05, r - 0.05, r - 0.15, r + 0.05, 0)
            for f, k, a, b, r in (
                ("shape", "cue", "spiculated", "spicules_removed", cue),
                ("shape", "cue", "round", "spicules_added", cue),
                ("diameter_mm", "confound", "6..10", "13..18", confound),
                ("noise_hu", "nuisance", "<20", "30", 0.02),
                ("rotation_deg", "null", "r", "r+90", 0.05),
            )
        ]
    cue, confound = flips
    sweep = [
        (split, c, "diameter_mm", float(v), 0.2 + 0.04 * (v - 6) * confound, 20)
        for c in readers
        for v in range(6, 19, 3)
    ]
    cues = [(split, c, "diameter_mm", cue * 0.8, confound * 0.8, 0.1, 0.1) for c in readers]
    probes = [
        (f, "value", "balanced_accuracy", s, control)
        for f in ("label", "diameter_mm")
        for control, s in (("trained", 0.9), ("random_init", 0.6), ("shuffled_labels", 0.5))
    ]
    cam = [
        (split, c, region, 0.25, 0.25)
        for c in ("head", "probe")
        for region in ("background", "body", "spicules", "vessels")
    ]
    return {
        name: pd.DataFrame(rows, columns=list(RESULT_TABLES[name].columns))
        for name, rows in (("reliance", reliance), ("sweep", sweep), ("cue", cues), ("probes", probes), ("cam", cam))
    }


REAL_ROWS = 40
"""Rows of the made-up real dataset's test_lidc (half malignant); its spiculation target has the first 30."""
RealScore = Callable[[str, str, int, str], float]


def _real(loss: str, scenario: str, seed: int, real_score: RealScore) -> dict[str, pd.DataFrame]:
    """Made-up scores on a real dataset (``REAL_DATASET`` rows of metrics and predictions): per target, the
    readouts' probability of the true class is ``real_score(scenario, loss, seed, target)`` on average."""
    from nodulab.common.scoring import binary_metrics
    from nodulab.results.store import REAL_DATASET, REAL_SPLITS

    metrics, predictions = [], []
    for target, split, n in (("malignancy", REAL_SPLITS[0], REAL_ROWS), ("spiculation", REAL_SPLITS[1], 30)):
        labels = np.arange(n) % 2
        rng = np.random.default_rng([seed, len(loss), len(scenario), n])
        for classifier in CLASSIFIERS:
            if classifier == "head" and loss not in HEADED:
                continue
            truth = np.clip(real_score(scenario, loss, seed, target) + rng.normal(0, 0.15, n), 0.01, 0.99)
            p = np.where(labels == 1, truth, 1 - truth)
            for metric, value in binary_metrics(labels, p).items():
                metrics.append((REAL_DATASET, split, classifier, metric, value, value - 0.05, value + 0.05))
            predictions += [
                (REAL_DATASET, split, classifier, i, int(y), float(q), int(q >= 0.5))
                for i, (y, q) in enumerate(zip(labels, p))
            ]
    return {
        "metrics": pd.DataFrame(metrics, columns=list(RESULT_TABLES["metrics"].columns)),
        "predictions": pd.DataFrame(predictions, columns=list(RESULT_TABLES["predictions"].columns)),
    }


def _groups(metrics: pd.DataFrame) -> pd.DataFrame:
    own = metrics[(metrics["metric"] == "accuracy") & (metrics["dataset"] == metrics["dataset"].iloc[0])]
    return pd.DataFrame(
        {
            "split": own["split"],
            "classifier": own["classifier"],
            "label": "any",
            "group": "worst: malignant/diameter_mm=conflicts",
            "n": 20,
            "accuracy": own["value"] - 0.1,
        }
    )


def _history() -> pd.DataFrame:
    rows = [
        (e, name, v)
        for e in range(1, 4)
        for name, v in (("train_loss", 1 / e), ("val_knn_balanced_accuracy", 0.5 + e / 10))
    ]
    return pd.DataFrame(rows, columns=list(RESULT_TABLES["history"].columns))


def make_study(
    root: Path,
    score: Score,
    *,
    seeds: Sequence[int] = (0, 1, 2, 3, 4),
    losses: Sequence[str] = ("ce", "supcon", "simclr"),
    scenarios: Sequence[str] = ("clean", "size-confound"),
    draws: int = 1,
    explain: bool = True,
    failed: Sequence[tuple[str, str, int]] = (),
    flips: Callable[[str, int], tuple[float, float]] = lambda loss, seed: (0.1, 0.8),
    hypotheses: bool = True,
    real_score: RealScore | None = None,
) -> Path:
    """Write ``root/results.sqlite`` for the grid ``scenarios x losses x seeds x draws``.

    ``flips(loss, seed)``: the (cue, confound) flip rates of the loss's own readout in that seed.
    ``hypotheses``: the study declares its confounded scenarios' ``test_conflict`` splits as its
    primary comparisons (own readouts against ce). ``real_score``: every run is also scored on a made-up
    real dataset (``_real``), recorded as the study's ``[real]``.

    Draw ``d`` has selection score ``0.9 - 0.01 d`` (draw 0 is selected) and scores ``score(...) + 0.02 d``
    (a test-selected oracle would pick the last draw); a
    ``(scenario, loss, seed)`` in ``failed`` is recorded as a failed run of draw 0 and nothing else.
    """
    root.mkdir(parents=True, exist_ok=True)
    study = {
        "name": "made-up",
        "sha256": "ab" * 32,
        "config": {
            "budget": draws,
            "seeds": list(seeds),
            "losses": list(losses),
            "scenarios": list(scenarios),
            "ceilings": {s: "clean" for s in scenarios if s != "clean" and "clean" in scenarios},
            **(
                {"hypotheses": {"comparisons": [f"{s}/test_conflict" for s in scenarios if s != "clean"]}}
                if hypotheses
                else {}
            ),
        },
    }
    with Store(root / STORE_FILE, study=study) as store:
        for scenario in scenarios:
            store.add_dataset(scenario, f"key-{scenario}", "0" * 64, manifest(scenario), png("C2"))
        if real_score is not None:
            splits = {"train": 10, "val": 10, "test_lidc": REAL_ROWS}
            store.use_real({"dataset": "/data/lidc-32", "manifest_sha256": "1" * 64, "splits": splits})
        for scenario in scenarios:
            for loss in losses:
                for seed in seeds:
                    for draw in range(draws):
                        run = {
                            "run_id": f"{scenario}-{loss}-{seed}-{draw}",
                            "scenario": scenario,
                            "loss": loss,
                            "seed": seed,
                            "draw": draw,
                            "budget": "epochs=3",
                            "config": {"loss": loss, "draw": draw},
                            "train_s": 1.0,
                        }
                        if (scenario, loss, seed) in failed:
                            store.add_run({**run, "status": "failed", "reason": "loss became NaN at epoch 3"})
                            break
                        drawn = lambda s, lo, se, sp, d=draw: score(s, lo, se, sp) + 0.02 * d  # noqa: E731
                        metrics = _metrics(loss, scenario, seed, drawn)
                        if scenario == "clean":  # the ceiling: scored on the confounded scenarios' images too
                            others = [_metrics(loss, scenario, seed, drawn, o) for o in scenarios if o != "clean"]
                            metrics = pd.concat([metrics, *others], ignore_index=True)
                        tables = {"metrics": metrics, "groups": _groups(metrics), "history": _history()}
                        if real_score is not None:
                            real = _real(loss, scenario, seed, real_score)
                            tables["metrics"] = pd.concat([metrics, real["metrics"]], ignore_index=True)
                            tables["predictions"] = real["predictions"]
                        if explain:
                            tables |= _explain(loss, scenario, flips(loss, seed))
                        figures = {"cam": png("C1"), "embedding": png("C3")} if explain else {}
                        store.add_run({**run, "status": "done", "score": 0.9 - 0.01 * draw}, tables, figures)
    return root
