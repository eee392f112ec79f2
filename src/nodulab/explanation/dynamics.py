"""Learning dynamics (design.md "Evaluation and explanation"): what a run relied on at each epoch it kept.

``train`` saves the weights at the end of some epochs (``RUN/checkpoints/epoch_<k>.safetensors``,
``nodulab.training.loop.default_checkpoints``: 1, 2, 4, ... and the last); it never reads them.
``dynamics_run`` scores them, afterwards, with the cheap readouts and writes ``dynamics.csv``
(``epoch,split,classifier,measure,value,ci_low,ci_high``, ``RESULT_TABLES["dynamics"]``):

- **epochs**: every checkpoint, in ascending order, and the run's final epoch (its
  ``selected_epoch``: the last one unless ``--select best-val``), scored from ``model.safetensors``
  with the run's own readouts (a checkpoint kept at that epoch must hold the same weights).
- **classifiers**: ``head`` where the loss has one; ``knn``, refitted at each checkpoint on that
  checkpoint's ``train`` features exactly as ``training.readouts.fit_readouts`` fits it (cosine,
  the run's ``knn_k``, made odd; ``train`` is read only to build the bank); ``probe`` at the final
  epoch only (a probe per checkpoint would cost a fit per C). At the final epoch ``knn`` and
  ``probe`` are the run's own (``readouts.safetensors``), so those rows equal ``metrics.csv``'s.
- **splits**: ``val`` and the dataset's conflict splits (``conflict_splits``: the test splits
  where some confound's agreement is below 0.5; none without confounds).
- **measures**: ``balanced_accuracy`` and ``auc`` (threshold 0.5) on every split; on each
  conflict split also ``cue_flip_rate``, ``confound_flip_rate`` and ``null_flip_rate``: on a
  fixed seeded subset of ``n`` rows (``dynamics_rows``: seeded by the dataset's seed and the split
  name, the same rows for every checkpoint and every run of the dataset) the counterfactual
  switches of ``nodulab.explanation.switches`` of that kind (``switch_kind``, ``followed``: the
  label cue, each confound to its other branch, and the null switches that should change
  nothing, a fresh nuisance re-render, rotation +90° and the mirrored offset, where they stay in
  the training support) are rendered once (at the switch's render ``view``) and predicted by
  every checkpoint; the flip rate is pooled over all (row, switch) pairs of the
  kind, a flip being a change of ``p >= 0.5`` against the same checkpoint's prediction of the
  stored, unswitched row. A switched lesion that would not fit the patch is left out (as in
  ``explain``); a kind no pair of which applied has no row.
- **where**: the run folder (replaced, like ``metrics.csv``), or ``out`` (``evaluate --out``'s
  folder; created when missing); only for the run's own dataset (the kNN banks are its ``train``).
- **intervals**: ``ci_low``, ``ci_high`` at the final epoch only (NaN elsewhere): for balanced
  accuracy and AUC the sample-level bootstrap of ``evaluate`` (``scoring.bootstrap_intervals``,
  the same resamples, so the final rows equal ``metrics.csv``'s), for flip rates a percentile
  bootstrap over the subset's rows (``flip_interval``), both 95%, 2,000 resamples, seeded.

The numbers describe a finished run and select nothing: training, ``--select best-val`` and the
thresholds never read them (tested), and nothing in the run folder changes but ``dynamics.csv``.
"""

from __future__ import annotations

import copy
import hashlib
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from nodulab.common.progress import Progress, counter
from nodulab.common.scoring import (
    BOOTSTRAP_DRAWS,
    CONFIDENCE,
    THRESHOLD,
    binary_metrics,
    bootstrap_intervals,
    bootstrap_seed,
    percentile_interval,
    resample_counts,
)
from nodulab.common.tables import RESULT_TABLES, write_table
from nodulab.common.writing import DatasetError, check_out, staged, write_atomically
from nodulab.data.dataset import is_real, load_manifest, load_split
from nodulab.explanation.counterfactual import CHUNK
from nodulab.explanation.switches import Switch, build_switches, fits
from nodulab.synth.renderer import render
from nodulab.synth.scenario import Scenario, ScenarioError
from nodulab.synth.scenarios import load_scenario_dict
from nodulab.training.models import ModelError, NoduleNet, read_checkpoint_config, read_weights
from nodulab.training.readouts import extract, knn_neighbours, l2_normalise, odd_k
from nodulab.training.runs import CHECKPOINTS_DIR, CLASSIFIERS, LoadedRun, RunError, load_run, run_threads

DYNAMICS_FILE = RESULT_TABLES["dynamics"].file
DYNAMICS_N = 200
"""Rows of each conflict split re-rendered under each switch, by default."""
KINDS = ("cue", "confound", "null")
"""The switch kinds whose flip rates are followed, in table order (``<kind>_flip_rate``)."""
NULL_FACTORS = ("rotation_deg", "offset_x_mm", "offset_y_mm", "offset_z_mm")
"""Fixed switches that change nothing a label could depend on (rotation +90°, mirrored offsets)."""
SCORES = ("balanced_accuracy", "auc")
FINAL_ONLY = ("probe",)
"""Classifiers scored at the final epoch only (the run's own readouts)."""
CHECKPOINT_NAME = re.compile(r"epoch_([1-9][0-9]{0,8})\.safetensors")
"""The only names ``RUN/checkpoints/`` may hold (``runs.CHECKPOINT_FILE``)."""


class NoCheckpoints(RunError):
    """The run kept no checkpoints (``--checkpoints none``, or trained before they existed)."""


# ----------------------------------------------------------------------------- what is read
def switch_kind(switch: Switch) -> str:
    """The kind a switch counts as here: its own (``switches``: ``cue``, ``confound``, ``null``,
    ...), except that fixed rotation and offset switches of kind ``nuisance`` (``NULL_FACTORS``;
    a ``switches`` without ``null`` switches made them so) count as ``null``."""
    if switch.kind == "nuisance" and switch.factor in NULL_FACTORS:
        return "null"
    return switch.kind


def followed(switches: Sequence[Switch]) -> list[Switch]:
    """The switches whose flips are followed: kinds ``KINDS`` (``switch_kind``), and a ``null``
    switch only where its output stays in the training support (as ``counterfactual``'s null rate)."""
    return [
        s for s in switches if switch_kind(s) in KINDS and (switch_kind(s) != "null" or getattr(s, "in_support", True))
    ]


def conflict_splits(scenario: Scenario, splits: Sequence[str]) -> list[str]:
    """The test splits of ``splits`` where some confound's agreement is below 0.5, by name.

    Read from the resolved scenario (``dataset.json``); a scenario without confounds, or a split
    without an agreement (``[source]`` scenarios), has none.
    """
    confounds = [c.factor for c in scenario.confounds]
    found = []
    for name in sorted(s for s in splits if s.startswith("test_")):
        spec = scenario.splits.get(name)
        if spec is None or spec.agreement is None or not confounds:
            continue
        table = spec.agreement if isinstance(spec.agreement, dict) else dict.fromkeys(confounds, spec.agreement)
        if any(float(table.get(c, 1.0)) < 0.5 for c in confounds):
            found.append(name)
    return found


def _seed(*parts: object) -> int:
    text = "/".join(str(p) for p in ("nodulab.explanation.dynamics", *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def dynamics_rows(split_n: int, n: int, dataset_seed: int, split: str) -> np.ndarray:
    """Positions of the rows of a split whose switches are followed: ``n`` of them (all if fewer),
    ascending, drawn without replacement by a generator seeded by the dataset's seed and the split
    name only, so every checkpoint and every run of the dataset sees the same rows."""
    if n >= split_n:
        return np.arange(split_n)
    return np.sort(np.random.default_rng(_seed("rows", dataset_seed, split)).choice(split_n, n, replace=False))


def run_checkpoints(run_dir: Path | str, epochs: int) -> dict[int, Path]:
    """The checkpoints of a run folder, ``{epoch: path}`` in ascending order (``{}``: none kept).

    The folder is untrusted: it may hold only regular files named ``epoch_<k>.safetensors``
    with ``k`` in ``1..epochs`` (the run's, from ``config.json``).

    Raises:
        RunError: anything else in it (named), or ``checkpoints`` not being a folder.
    """
    folder = Path(run_dir) / CHECKPOINTS_DIR
    if not folder.exists() and not folder.is_symlink():
        return {}
    if folder.is_symlink() or not folder.is_dir():
        raise RunError(f"{folder}: not a folder (only checkpoints/epoch_<k>.safetensors belong there)")
    found = {}
    for entry in sorted(folder.iterdir()):
        match = CHECKPOINT_NAME.fullmatch(entry.name)
        if match is None or entry.is_symlink() or not entry.is_file():
            raise RunError(f"{entry}: not a checkpoint (the folder holds only regular files epoch_<k>.safetensors)")
        epoch = int(match.group(1))
        if not 1 <= epoch <= epochs:
            raise RunError(f"{entry}: epoch {epoch} is outside the run's epochs 1..{epochs}")
        found[epoch] = entry
    return dict(sorted(found.items()))


def load_checkpoint(run: LoadedRun, path: Path, epoch: int) -> NoduleNet:
    """The run's network with the weights of one checkpoint (its own file and record checked).

    Raises:
        RunError: not a model file, another epoch or run (architecture, untrained weights) than
            its name and folder say, or weights that do not fit the network.
    """
    try:
        stored = read_checkpoint_config(path)
    except (ValueError, KeyError, TypeError) as error:
        raise RunError(str(error)) from None
    if stored.get("checkpoint_epoch") != epoch:
        raise RunError(f"{path}: holds epoch {stored.get('checkpoint_epoch')!r}, its name says {epoch}")
    if stored.get("architecture") != run.model.architecture or stored.get("init_sha256") != run.record.get(
        "init_sha256"
    ):
        raise RunError(f"{path}: a checkpoint of another run (architecture or untrained weights differ)")
    model = copy.deepcopy(run.model)
    try:
        model.load_state_dict(read_weights(path), strict=True)
    except ModelError as error:
        raise RunError(str(error)) from None
    except RuntimeError as error:
        raise RunError(f"{path}: weights do not fit the run's network ({' '.join(str(error).split())[:200]})") from None
    return model.eval()


# ----------------------------------------------------------------------------- measures
def flip_interval(
    flips: np.ndarray, pairs: np.ndarray, *, seed: int, draws: int = BOOTSTRAP_DRAWS, confidence: float = CONFIDENCE
) -> tuple[float, float]:
    """Percentile bootstrap interval of a pooled flip rate, resampling rows.

    Args:
        flips: ``(R,)`` flipped (row, switch) pairs per row.
        pairs: ``(R,)`` (row, switch) pairs per row (switches that applied to it).
        seed: the resamples' seed (the same for every classifier and epoch of a split and kind).

    Returns:
        ``(low, high)`` of ``sum(w * flips) / sum(w * pairs)`` over ``draws`` ordinary bootstrap
        resamples ``w`` of the rows; NaN, NaN when no resample has a pair.
    """
    counts = resample_counts(len(flips), draws, np.random.default_rng(seed))
    total = np.asarray(pairs, dtype=np.float64) @ counts
    with np.errstate(invalid="ignore", divide="ignore"):
        rates = np.where(total > 0, (np.asarray(flips, dtype=np.float64) @ counts) / total, math.nan)
    return percentile_interval(rates, confidence)


class _Scorer:
    """One epoch's classifiers: the network's head, a kNN on a bank of train features, the probe."""

    def __init__(self, run: LoadedRun, model: NoduleNet, bank: tuple[np.ndarray, np.ndarray, int] | None, final: bool):
        self.run, self.model, self.bank, self.final = run, model, bank, final

    def __call__(self, images: np.ndarray, batch_size: int) -> dict[str, np.ndarray]:
        out = extract(self.model, images, batch_size=batch_size, device=self.run.device)
        scores = {"head": out["head"]} if "head" in out else {}
        if self.final:  # the run's own readouts: the rows metrics.csv has
            scores["probe"] = self.run.readouts.predict_probe(out["features"])
            scores["knn"] = self.run.readouts.predict_knn(out["features"])
        else:
            features, labels, k = self.bank
            neighbours = knn_neighbours(features, out["features"], k)
            scores["knn"] = (labels[neighbours] == 1).mean(axis=1, dtype=np.float64)
        return {c: np.asarray(scores[c], dtype=np.float64) for c in CLASSIFIERS if c in scores}


def _bank(run: LoadedRun, model: NoduleNet, train_images: np.ndarray, train_labels: np.ndarray, batch_size: int):
    """The kNN of ``fit_readouts`` on this checkpoint's train features: normalised float32, odd k."""
    features = extract(model, train_images, batch_size=batch_size, device=run.device)["features"]
    k = odd_k(int(run.record["config"].get("knn_k", run.readouts.knn_k)), len(features))
    return l2_normalise(features).astype(np.float32), np.asarray(train_labels), k


class _Planned:
    """One conflict split's followed rows: their stored images, and each switch rendered once."""

    def __init__(self, split: str, rows: np.ndarray, images: np.ndarray) -> None:
        self.split, self.rows, self.images = split, rows, images
        self.switched: list[tuple[str, np.ndarray, np.ndarray]] = []  # (kind, positions, HU images)


def _plan(
    split: str,
    data_dir: Path,
    scenario: Scenario,
    dataset_seed: int,
    n: int,
    size: int,
    dim: int,
    device: str,
    progress: Progress | None,
) -> _Planned:
    images, _, factors = load_split(data_dir, split)
    chosen = dynamics_rows(len(factors), n, dataset_seed, split)
    rows = factors.iloc[chosen].reset_index(drop=True)  # keeps the 'index' column: confound draws by row
    planned = _Planned(split, chosen, np.asarray(images[chosen]))
    work = []
    for switch in followed(build_switches(scenario, split, dataset_seed, len(factors), rows)):
        where, switched = switch.change(rows)
        ok = fits(switched, size, dim) if len(switched) else np.zeros(0, bool)
        if ok.any():
            work.append((switch, where[ok], switched.iloc[np.flatnonzero(ok)]))
    tick = counter(progress, f"dynamics: render {split}", sum(len(r) for *_, r in work))
    for switch, where, switched in work:  # rendered once, predicted by every epoch
        rendered, _ = render(switched, size, dim, device, view=getattr(switch, "view", 0), chunk=CHUNK)
        planned.switched.append((switch_kind(switch), where, rendered))
        tick(len(where))
    return planned


def _flip_counts(planned: _Planned, score: _Scorer, batch_size: int) -> dict[str, dict[str, tuple]]:
    """Per classifier and kind: flipped pairs and pairs per followed row."""
    base = score(planned.images, batch_size)
    found: dict[str, dict[str, tuple]] = {c: {} for c in base}
    for kind in KINDS:
        parts = [(where, score(images, batch_size)) for k, where, images in planned.switched if k == kind]
        if not parts:
            continue
        pairs = np.zeros(len(planned.rows))
        for where, _ in parts:
            np.add.at(pairs, where, 1)
        for classifier, p0 in base.items():
            flips = np.zeros(len(planned.rows))
            for where, p in parts:
                np.add.at(flips, where, (p[classifier] >= THRESHOLD) != (p0[where] >= THRESHOLD))
            found[classifier][kind] = (flips, pairs)
    return found


# ----------------------------------------------------------------------------- the stage
def _check_target(run_dir: Path, data_dir: Path, out: Path | None, force: bool) -> Path:
    """Where ``dynamics.csv`` goes: the run folder, or ``out`` (``evaluate_run``'s rule)."""
    if out is None:
        return run_dir / DYNAMICS_FILE
    target = check_out(out, [data_dir])
    if target == run_dir.resolve() or target in run_dir.resolve().parents:
        raise RunError(f"--out {out}: would replace the run folder {run_dir}; choose a new folder")
    out = Path(out)
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise RunError(f"--out {out}: is not a folder")
    if (out / DYNAMICS_FILE).exists() and not force:
        raise RunError(f"--out {out / DYNAMICS_FILE} already exists (use --force to replace it)")
    return out / DYNAMICS_FILE


def _epochs(run: LoadedRun, run_dir: Path) -> tuple[int, int]:
    """The run's ``(epochs_run, selected_epoch)`` from its ``config.json``."""
    try:
        return int(run.record["epochs_run"]), int(run.record["selected_epoch"])
    except (KeyError, TypeError, ValueError):
        raise RunError(f"{run_dir / 'config.json'}: incomplete run config (epochs_run, selected_epoch)") from None


def _scenario(manifest: dict[str, Any], data_dir: Path) -> Scenario:
    try:
        return load_scenario_dict(manifest["scenario"])
    except ScenarioError as error:
        raise RunError(f"DATA_DIR {data_dir}: dataset.json scenario: {error}") from None


def check_dynamics(
    run_dir: Path | str,
    data_dir: Path | str,
    *,
    out: Path | str | None = None,
    device: str = "cpu",
    force: bool = False,
) -> bool:
    """Check everything ``dynamics_run`` will read, before ``evaluate`` writes anything.

    The run folder, the dataset, ``out`` and every checkpoint (its name, record and weights,
    ``load_checkpoint``) are checked as ``dynamics_run`` checks them; nothing is written.

    Returns:
        Whether ``dynamics_run`` has something to score: False when ``data_dir`` is not the run's
        own dataset, is a real dataset (no switches to render), or the run kept no checkpoints
        (``evaluate`` then writes no ``dynamics.csv``).

    Raises:
        RunError, DatasetError: what ``dynamics_run`` would raise, named.
    """
    run_dir, data_dir = Path(run_dir), Path(data_dir)
    run = load_run(run_dir, device=device)
    manifest = load_manifest(data_dir)
    if not run.check_dataset(manifest, data_dir) or is_real(manifest):
        return False
    found = run_checkpoints(run_dir, _epochs(run, run_dir)[0])
    if not found:
        return False
    _check_target(run_dir, data_dir, None if out is None else Path(out), force)
    _scenario(manifest, data_dir)
    for epoch, path in found.items():
        load_checkpoint(run, path, epoch)
    return True


def dynamics_run(
    run_dir: Path | str,
    data_dir: Path | str,
    *,
    n: int = DYNAMICS_N,
    out: Path | str | None = None,
    device: str = "cpu",
    force: bool = False,
    progress: Progress | None = None,
    batch_size: int = 256,
    draws: int = BOOTSTRAP_DRAWS,
) -> pd.DataFrame:
    """Score every checkpoint of a run (module docstring) and write ``dynamics.csv``.

    Runs at the run's thread count, so the same inputs give the same bytes on CPU.

    Args:
        run_dir: a run folder of ``nodulab train`` with ``checkpoints/``.
        data_dir: the dataset it was trained on (the kNN banks are its ``train`` split).
        n: rows of each conflict split followed under the switches (``dynamics_rows``).
        out: where ``dynamics.csv`` goes. Default: the run folder (replaced, like ``metrics.csv``).
            A folder: created if missing, else ``dynamics.csv`` is added to it (an evaluation
            folder of ``evaluate --out``); an existing ``dynamics.csv`` there needs ``force``.
        device: where renders and networks run.
        force: replace ``dynamics.csv`` in an existing ``out``.
        progress: ``(stage, done, total)`` callback.
        batch_size: images per forward pass (``evaluate``'s default, so final rows match).
        draws: bootstrap resamples of the final epoch's intervals.

    Returns:
        The frame written: columns of ``RESULT_TABLES["dynamics"]``, epochs ascending, then
        ``val`` and the conflict splits, classifiers in ``CLASSIFIERS`` order, measures
        ``balanced_accuracy, auc`` then ``<kind>_flip_rate`` for ``KINDS``.

    Raises:
        NoCheckpoints: the run kept none (a ``RunError``).
        RunError: the run folder or a checkpoint is missing, malformed or another run's, the
            dataset is not the run's own, or ``n < 1``; ``DatasetError``: a bad dataset or ``out``.
    """
    run_dir, data_dir = Path(run_dir), Path(data_dir)
    if n < 1:
        raise RunError(f"dynamics: n must be at least 1 (got {n})")
    run = load_run(run_dir, device=device)
    epochs, final = _epochs(run, run_dir)
    found = run_checkpoints(run_dir, epochs)
    if not found:
        raise NoCheckpoints(f"run folder {run_dir}: no checkpoints (train with --checkpoints to keep some)")
    manifest = load_manifest(data_dir)
    if not run.check_dataset(manifest, data_dir):
        raise RunError(
            f"DATA_DIR {data_dir} is not the dataset this run was trained on (dynamics refits the kNN on "
            "the run's own train split)"
        )
    target = _check_target(run_dir, data_dir, None if out is None else Path(out), force)
    scenario = _scenario(manifest, data_dir)
    size, dim, seed = int(manifest["image"]["size"]), int(manifest["image"]["dim"]), int(manifest["seed"])
    conflicts = conflict_splits(scenario, list(manifest["splits"]))
    with run_threads(run.threads):
        frame = _score(
            run, found, final, data_dir, scenario, conflicts, n, seed, size, dim, batch_size, draws, progress
        )
        _write(frame, target, force)
    return frame


def _score(
    run: LoadedRun,
    found: dict[int, Path],
    final: int,
    data_dir: Path,
    scenario: Scenario,
    conflicts: list[str],
    n: int,
    seed: int,
    size: int,
    dim: int,
    batch_size: int,
    draws: int,
    progress: Progress | None,
) -> pd.DataFrame:
    splits = {}
    for split in ["val", *conflicts]:
        images, _, factors = load_split(data_dir, split)
        splits[split] = (images, factors["label"].to_numpy(dtype=np.int64))
    planned = [_plan(s, data_dir, scenario, seed, n, size, dim, run.device, progress) for s in conflicts]
    train_images, _, train_factors = load_split(data_dir, "train")  # the kNN banks only
    train_labels = train_factors["label"].to_numpy(dtype=np.int64)
    epochs = sorted(set(found) | {final})
    rows: list[tuple[Any, ...]] = []
    tick = counter(progress, "dynamics", len(epochs))
    for epoch in epochs:
        is_final = epoch == final
        model = run.model if is_final else load_checkpoint(run, found[epoch], epoch)
        if is_final and epoch in found:
            _check_same(run, found[epoch], epoch)
        bank = None if is_final else _bank(run, model, train_images, train_labels, batch_size)
        score = _Scorer(run, model, bank, is_final)
        for split, (images, labels) in splits.items():
            scores = score(images, batch_size)
            intervals = {}
            if is_final:
                intervals = bootstrap_intervals(
                    labels, scores, dict.fromkeys(scores, THRESHOLD), seed=bootstrap_seed(split), draws=draws
                )
            for classifier, p in scores.items():
                metrics = binary_metrics(labels, p, THRESHOLD)
                for measure in SCORES:
                    value = float(metrics[measure])
                    low, high = (
                        intervals[classifier][measure] if is_final and not math.isnan(value) else (math.nan,) * 2
                    )
                    rows.append((epoch, split, classifier, measure, value, low, high))
        for plan in planned:
            counts = _flip_counts(plan, score, batch_size)
            for classifier, per_kind in counts.items():
                for kind, (flips, pairs) in per_kind.items():
                    value = float(flips.sum() / pairs.sum())
                    low, high = (math.nan, math.nan)
                    if is_final:
                        low, high = flip_interval(flips, pairs, seed=_seed("flips", plan.split, kind), draws=draws)
                    rows.append((epoch, plan.split, classifier, f"{kind}_flip_rate", value, low, high))
        tick(1)
    frame = pd.DataFrame(rows, columns=list(RESULT_TABLES["dynamics"].columns))
    order = {s: i for i, s in enumerate(splits)}
    measures = {m: i for i, m in enumerate((*SCORES, *(f"{k}_flip_rate" for k in KINDS)))}
    classifiers = {c: i for i, c in enumerate(CLASSIFIERS)}
    keys = pd.DataFrame(
        {
            "epoch": frame["epoch"],
            "split": frame["split"].map(order),
            "classifier": frame["classifier"].map(classifiers),
            "measure": frame["measure"].map(measures),
        }
    )
    return frame.iloc[keys.sort_values(list(keys.columns), kind="stable").index].reset_index(drop=True)


def _check_same(run: LoadedRun, path: Path, epoch: int) -> None:
    """A checkpoint kept at the final epoch holds ``model.safetensors``'s weights."""
    stored = load_checkpoint(run, path, epoch).state_dict()
    final = run.model.state_dict()
    if any(not stored[k].equal(final[k]) for k in final):
        raise RunError(f"{path}: differs from model.safetensors, the run's weights at epoch {epoch}")


def _write(frame: pd.DataFrame, target: Path, force: bool) -> None:
    """``dynamics.csv`` renamed into place; a missing ``out`` folder is created atomically with it."""
    folder = target.parent
    if folder.is_dir():
        write_atomically(target, lambda tmp: write_table(frame, tmp))
        return
    try:
        with staged(folder, force=force, owner=DYNAMICS_FILE) as tmp:
            write_table(frame, tmp / DYNAMICS_FILE)
    except DatasetError as error:
        raise RunError(str(error)) from None
