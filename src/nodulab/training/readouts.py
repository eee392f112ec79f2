"""The readouts every model gets on its frozen encoder (design.md "Losses and training"): linear probe and kNN.

``extract`` runs a network in eval mode (weights and BatchNorm statistics untouched) and returns
its ``features``, the encoder output before any projection head, plus its own head's
P(malignant) when it has one. ``fit_readouts`` fits the two loss-independent classifiers on the
train features:

- **linear probe**: features standardised with the train mean/std, then an L2-regularised
  logistic regression (scikit-learn, lbfgs). C is chosen on ``val`` by balanced accuracy, ties
  toward the smaller C. ``val`` shares the training distribution, so a val-chosen C may favour
  shortcuts as much as training does; it is the same rule for every loss, and the test splits
  are never read.
  C values whose fit stopped at the iteration limit are recorded; a warning is raised only
  when the chosen C did (separable features at a large C never converge: that is expected).
- **kNN**: cosine similarity, k = 21 by default and always odd (the largest odd number up to
  ``min(k, N)``), so the two classes never tie; P(malignant) is the malignant fraction among
  the k most similar train samples, ties in similarity broken by the lower train index.
- **DFR** (``fit_dfr``): Deep Feature Reweighting (Kirichenko et al. 2022), a logistic probe
  fitted on a group-balanced held-out split (``val_balanced``), C chosen by stratified 5-fold
  cross-validation inside that split. It sees the confound groups balanced, so it measures what
  the features contain apart from what the head uses: a feature-quality oracle, not the
  model's own behaviour.

``Readouts`` are saved as safetensors (arrays) with JSON metadata, never pickled.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file
from scipy.special import expit

from nodulab.common.errors import InputError
from nodulab.common.writing import write_safetensors
from nodulab.data.dataset import hu_to_input
from nodulab.training.models import NoduleNet, read_record

READOUTS_FORMAT = "nodulab-readouts/1"
KNN_K = 21
PROBE_CS = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
PROBE_MAX_ITER = 5000
SCALE_FLOOR = 1e-6
DFR_FOLDS = 5
NORM_EPS = 1e-12
_METADATA_KEY = "nodulab"
_QUERY_BLOCK = 1024


# ----------------------------------------------------------------------------- features
def _as_input(batch: np.ndarray | torch.Tensor, spatial_dims: int | None) -> torch.Tensor:
    """One batch as float32 network input ``(B, 1, *S)``; integer arrays are HU ``(B, *S)``."""
    # np.array copies: memory maps are read-only, and torch warns on non-writable arrays
    x = batch if isinstance(batch, torch.Tensor) else torch.from_numpy(np.array(batch))
    if not x.is_floating_point():
        x = hu_to_input(x.to(torch.float32)).unsqueeze(1)
    dims = x.dim() - 2 if spatial_dims is None else spatial_dims
    if x.dim() != dims + 2 or x.shape[1] != 1 or dims not in (2, 3):
        axes = ", ".join("S" * dims)
        raise ValueError(
            f"extract: expected integer HU (N, {axes}) or float input (N, 1, {axes}), got {x.dtype} {tuple(x.shape)}"
        )
    return x.to(torch.float32)


def extract(
    model: NoduleNet,
    images: torch.Tensor | np.ndarray,
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> dict[str, np.ndarray]:
    """Features (and the model's own head) of a set of images, with the network frozen.

    Runs in eval mode under ``no_grad``: no parameter or buffer (BatchNorm statistics included)
    changes. Each module's train/eval flag and the model's device are restored afterwards.

    Args:
        model: the network.
        images: integer HU ``(N, H, W)`` / ``(N, D, H, W)`` (e.g. the int16 memory map of a
            split; converted with ``hu_to_input`` batch by batch) or float network input
            ``(N, 1, *S)``.
        batch_size: images per forward pass.
        device: where to run.

    Returns:
        ``{"features": float32 (N, E)}`` (encoder output, before any projector), plus
        ``"head": float32 (N,)`` P(malignant) when the model has a head.
    """
    if batch_size < 1:
        raise ValueError(f"extract: batch_size must be >= 1, got {batch_size}")
    spatial_dims = model.architecture.get("spatial_dims")
    modes = {module: module.training for module in model.modules()}
    home = next(model.parameters()).device
    features, heads = [], []
    try:
        model.to(device).eval()
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                x = _as_input(images[start : start + batch_size], spatial_dims).to(device)
                f = model.features(x)
                features.append(f.float().cpu())
                if model.head is not None:
                    heads.append(torch.softmax(model.head(f).float(), dim=1)[:, 1].cpu())
    finally:
        model.to(home)
        for module, training in modes.items():
            module.training = training
    width = int(model.architecture.get("embedding_dim", 0))
    out = {"features": torch.cat(features).numpy() if features else np.zeros((0, width), np.float32)}
    if model.head is not None:
        out["head"] = torch.cat(heads).numpy() if heads else np.zeros(0, np.float32)
    return out


# ----------------------------------------------------------------------------- kNN
def l2_normalise(features: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float64); an all-zero row stays zero.

    Args:
        features: ``(N, E)``.

    Returns:
        ``(N, E)`` float64.
    """
    x = np.asarray(features, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), NORM_EPS)


def knn_neighbours(bank: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` bank rows most cosine-similar to each query.

    Exact and deterministic: equal similarities go to the lower bank index. Works in query
    blocks, without a full sort (threshold at the k-th largest similarity, then fill ties in
    index order).

    Args:
        bank: ``(N, E)`` features (normalised here).
        queries: ``(M, E)`` features (normalised here).
        k: neighbours per query, ``1 <= k <= N``.

    Returns:
        ``(M, k)`` int64 bank indices, most similar first (ties: lower index first).
    """
    bank_n, queries_n = l2_normalise(bank), l2_normalise(queries)
    n = len(bank_n)
    if not 1 <= k <= n:
        raise ValueError(f"knn: k must be in [1, {n}] (the bank size), got {k}")
    out = np.empty((len(queries_n), k), dtype=np.int64)
    for start in range(0, len(queries_n), _QUERY_BLOCK):
        sim = queries_n[start : start + _QUERY_BLOCK] @ bank_n.T  # (m, N)
        kth = np.partition(sim, n - k, axis=1)[:, n - k : n - k + 1]  # k-th largest per row
        above = sim > kth
        tied = sim == kth
        # of the rows equal to the k-th value, keep the lowest indices until k are chosen
        room = k - above.sum(axis=1, keepdims=True)
        chosen = above | (tied & (np.cumsum(tied, axis=1) <= room))
        cols = np.nonzero(chosen)[1].reshape(len(sim), k)  # ascending index within each row
        order = np.argsort(-np.take_along_axis(sim, cols, axis=1), axis=1, kind="stable")
        out[start : start + len(sim)] = np.take_along_axis(cols, order, axis=1)
    return out


def odd_k(k: int, n: int) -> int:
    """The kNN's k: the largest odd number up to ``min(k, n)``, so two classes never tie."""
    k = min(int(k), int(n))
    if k < 1:
        raise ValueError(f"knn: need k >= 1 and a non-empty bank, got k={k}, n={n}")
    return k if k % 2 else k - 1 if k > 1 else 1


def _linear_p(
    features: np.ndarray, mean: np.ndarray, scale: np.ndarray, coef: np.ndarray, intercept: float
) -> np.ndarray:
    """P(malignant) of a logistic probe on standardised features, ``(M,)`` float64."""
    z = (np.asarray(features, dtype=np.float64) - mean) / scale
    return expit(z @ coef + intercept)


# ----------------------------------------------------------------------------- readouts
@dataclass
class LinearProbe:
    """A logistic probe on standardised features (used for ``dfr``).

    Attributes:
        coef: ``(E,)`` weights. intercept: bias. mean, scale: ``(E,)`` standardisation.
        c: the chosen inverse regularisation strength. converged: whether its fit converged.
    """

    coef: np.ndarray
    intercept: float
    mean: np.ndarray
    scale: np.ndarray
    c: float
    converged: bool = True

    def predict(self, features: np.ndarray) -> np.ndarray:
        """P(malignant), ``(M,)`` float64."""
        return _linear_p(features, self.mean, self.scale, self.coef, self.intercept)


@dataclass
class Readouts:
    """A fitted linear probe and kNN classifier on one encoder's features.

    Attributes:
        probe_coef: ``(E,)`` logistic-regression weights on standardised features.
        probe_intercept: its bias.
        probe_mean, probe_scale: ``(E,)`` train mean and std (floored at 1e-6).
        probe_c: the inverse regularisation strength chosen on val.
        knn_bank: ``(N, E)`` L2-normalised train features.
        knn_labels: ``(N,)`` train labels (1 = malignant).
        knn_k: neighbours per query (at most N).
        probe_val_scores: ``(C, val balanced accuracy)`` for every C tried.
        probe_not_converged: the C values whose fit stopped at the iteration limit.
        dfr: the DFR probe fitted on ``val_balanced``, or None when the dataset has none.
    """

    probe_coef: np.ndarray
    probe_intercept: float
    probe_mean: np.ndarray
    probe_scale: np.ndarray
    probe_c: float
    knn_bank: np.ndarray
    knn_labels: np.ndarray
    knn_k: int
    probe_val_scores: list[tuple[float, float]] = field(default_factory=list)
    probe_not_converged: list[float] = field(default_factory=list)
    dfr: LinearProbe | None = None

    def predict_probe(self, features: np.ndarray) -> np.ndarray:
        """Linear-probe P(malignant); ``features`` ``(M, E)`` -> ``(M,)`` float64."""
        return _linear_p(features, self.probe_mean, self.probe_scale, self.probe_coef, self.probe_intercept)

    def predict_knn(self, features: np.ndarray) -> np.ndarray:
        """kNN P(malignant): malignant fraction of the k nearest train samples, ``(M,)``."""
        neighbours = knn_neighbours(self.knn_bank, features, self.knn_k)
        return (self.knn_labels[neighbours] == 1).mean(axis=1, dtype=np.float64)

    def predict(self, features: np.ndarray) -> dict[str, np.ndarray]:
        """Every readout: probe, kNN, and DFR when fitted.

        Args:
            features: ``(M, E)`` encoder features (``extract(...)["features"]``).

        Returns:
            ``{"probe": (M,), "knn": (M,)}`` (plus ``"dfr"``) P(malignant), float64.
        """
        features = np.asarray(features)
        if features.ndim != 2 or features.shape[1] != len(self.probe_coef):
            raise ValueError(f"readouts: expected features (M, {len(self.probe_coef)}), got {features.shape}")
        out = {"probe": self.predict_probe(features), "knn": self.predict_knn(features)}
        if self.dfr is not None:
            out["dfr"] = self.dfr.predict(features)
        return out

    def save(self, path: Path | str) -> None:
        """Write a safetensors file (arrays) with JSON metadata; atomic (temp file + rename)."""
        tensors = {
            "probe_coef": np.ascontiguousarray(self.probe_coef, dtype=np.float64),
            "probe_mean": np.ascontiguousarray(self.probe_mean, dtype=np.float64),
            "probe_scale": np.ascontiguousarray(self.probe_scale, dtype=np.float64),
            "knn_bank": np.ascontiguousarray(self.knn_bank),
            "knn_labels": np.ascontiguousarray(self.knn_labels, dtype=np.int64),
        }
        record = {
            "format": READOUTS_FORMAT,
            "probe_intercept": float(self.probe_intercept),
            "probe_c": float(self.probe_c),
            "probe_val_scores": [[float(c), float(s)] for c, s in self.probe_val_scores],
            "probe_not_converged": [float(c) for c in self.probe_not_converged],
            "knn_k": int(self.knn_k),
        }
        if self.dfr is not None:
            for name in ("coef", "mean", "scale"):
                tensors[f"dfr_{name}"] = np.ascontiguousarray(getattr(self.dfr, name), dtype=np.float64)
            record["dfr"] = {
                "intercept": float(self.dfr.intercept),
                "c": float(self.dfr.c),
                "converged": bool(self.dfr.converged),
            }
        metadata = {_METADATA_KEY: json.dumps(record, sort_keys=True)}
        write_safetensors(path, save_file, tensors, metadata)


class ReadoutsError(InputError):
    """A readouts file whose record or arrays are not what ``Readouts.save`` writes (named)."""


def load_readouts(path: Path | str, width: int | None = None) -> Readouts:
    """Read a file written by ``Readouts.save`` (no unpickling), every key and array checked.

    The file is untrusted: its record's numbers must be finite (``knn_k`` an integer in 1..N),
    its arrays of ``Readouts.save``'s kinds and shapes (``(E,)`` probe vectors, an ``(N, E)``
    bank with ``N >= 1``, ``(N,)`` labels of 0 and 1), every value finite, the scales positive.

    Args:
        path: the file.
        width: the encoder's feature width ``E`` the readouts must take (unchecked if None).

    Raises:
        ValueError: not a safetensors file, or not readouts of this format version;
            ``ReadoutsError`` (a ``ValueError``): a key or array that does not fit, named.
    """
    record = read_record(path, READOUTS_FORMAT, "readouts file")
    try:
        arrays = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ReadoutsError(f"{path}: not a safetensors file ({' '.join(str(err).split())[:200]})") from None
    names = ["probe_coef", "probe_mean", "probe_scale", "knn_bank", "knn_labels"]
    dfr_record = record.get("dfr")
    if dfr_record is not None:
        names += ["dfr_coef", "dfr_mean", "dfr_scale"]
    bad = sorted(set(names) ^ set(arrays))
    if bad:
        raise ReadoutsError(f"{path}: array {bad[0]} is {'missing' if bad[0] in names else 'not a readouts array'}")
    bank, labels = arrays["knn_bank"], arrays["knn_labels"]
    if bank.ndim != 2 or bank.shape[0] < 1 or bank.shape[1] < 1 or not np.issubdtype(bank.dtype, np.floating):
        raise ReadoutsError(f"{path}: knn_bank is {bank.dtype} {bank.shape}, not (N, E) floats with N >= 1")
    n, e = bank.shape
    if width is not None and e != width:
        raise ReadoutsError(f"{path}: knn_bank has {e} features per row, the encoder gives {width}")
    for name in names:
        array = arrays[name]
        shape = (n, e) if name == "knn_bank" else (n,) if name == "knn_labels" else (e,)
        if array.shape != shape:
            raise ReadoutsError(f"{path}: {name} has shape {array.shape}, the readouts need {shape}")
        if name == "knn_labels":
            if not np.issubdtype(array.dtype, np.integer) or not np.isin(array, (0, 1)).all():
                raise ReadoutsError(f"{path}: knn_labels must be labels 0 and 1")
        elif not np.issubdtype(array.dtype, np.floating) or not np.isfinite(array).all():
            raise ReadoutsError(f"{path}: {name} must hold finite numbers")
        elif name.endswith("_scale") and not (array > 0).all():
            raise ReadoutsError(f"{path}: {name} must be positive")
    knn_k = record.get("knn_k")
    if type(knn_k) is not int or not 1 <= knn_k <= n:
        raise ReadoutsError(f"{path}: knn_k must be an integer in 1..{n} (the bank's rows), got {knn_k!r}")
    try:
        dfr = None
        if dfr_record is not None:
            dfr = LinearProbe(
                arrays["dfr_coef"],
                _finite(dfr_record["intercept"], "dfr.intercept"),
                arrays["dfr_mean"],
                arrays["dfr_scale"],
                _finite(dfr_record["c"], "dfr.c"),
                bool(dfr_record["converged"]),
            )
        return Readouts(
            probe_coef=arrays["probe_coef"],
            probe_intercept=_finite(record["probe_intercept"], "probe_intercept"),
            probe_mean=arrays["probe_mean"],
            probe_scale=arrays["probe_scale"],
            probe_c=_finite(record["probe_c"], "probe_c"),
            knn_bank=bank,
            knn_labels=labels,
            knn_k=knn_k,
            probe_val_scores=[(_finite(c, "probe_val_scores"), float(s)) for c, s in record["probe_val_scores"]],
            probe_not_converged=[float(c) for c in record.get("probe_not_converged", [])],
            dfr=dfr,
        )
    except (KeyError, TypeError, ValueError) as error:
        if isinstance(error, ReadoutsError):
            raise ReadoutsError(f"{path}: {error}") from None
        raise ReadoutsError(f"{path}: readouts record: missing or bad {' '.join(str(error).split())[:200]}") from None


def _finite(value: object, key: str) -> float:
    """A record's number, refused (naming ``key``) unless it is a finite int or float."""
    if type(value) not in (int, float) or not np.isfinite(value):
        raise ReadoutsError(f"readouts record: {key} must be a finite number, got {value!r}")
    return float(value)


def _balanced_accuracy(labels: np.ndarray, p_malignant: np.ndarray) -> float:
    """Balanced accuracy at the 0.5 threshold (``metrics.THRESHOLD``), both classes present."""
    from sklearn.metrics import balanced_accuracy_score

    return float(balanced_accuracy_score(labels, (p_malignant >= 0.5).astype(np.int64)))


def _check_labelled(features: np.ndarray, labels: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(features, dtype=np.float64), np.asarray(labels).astype(np.int64)
    if x.ndim != 2 or y.shape != (len(x),):
        raise ValueError(f"fit_readouts: {name} wants features (N, E), labels (N,), got {x.shape}, {y.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"fit_readouts: {name} features contain non-finite values")
    if set(np.unique(y)) != {0, 1}:
        raise ValueError(f"fit_readouts: {name} labels need both classes (0 and 1), got {sorted(set(y))}")
    return x, y


def _fit_probe(x: np.ndarray, y: np.ndarray, c: float, seed: int) -> tuple[np.ndarray, float, bool]:
    """Logistic regression on standardised train features; ``(coef (E,), intercept, converged)``."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    probe = LogisticRegression(C=c, solver="lbfgs", max_iter=PROBE_MAX_ITER, random_state=seed)
    with warnings.catch_warnings():
        # separable features with a large C have their optimum at infinity: lbfgs stops at
        # max_iter with a classifier that already separates; recorded, warned only if chosen
        warnings.simplefilter("ignore", ConvergenceWarning)
        probe.fit(x, y)
    converged = int(np.max(probe.n_iter_)) < PROBE_MAX_ITER
    return probe.coef_[0].astype(np.float64), float(probe.intercept_[0]), converged


def fit_readouts(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    val_features: np.ndarray,
    val_labels: np.ndarray,
    *,
    knn_k: int = KNN_K,
    cs: Sequence[float] = PROBE_CS,
    seed: int = 0,
) -> Readouts:
    """Fit the linear probe and the kNN classifier on frozen-encoder features.

    Probe: standardise with the train mean/std (std floored at 1e-6); for each C fit an
    lbfgs logistic regression on train and score balanced accuracy (threshold 0.5) on val;
    keep the best C, ties toward the smaller C. The kept probe is the one fitted on train
    alone with that C (val only chooses C). ``val`` shares the training distribution, so this
    is the same rule for every loss and may favour shortcuts; the test splits are never touched.

    kNN: the train features, L2-normalised, with their labels; k = ``min(knn_k, N)``.

    Args:
        train_features: ``(N, E)``. train_labels: ``(N,)`` 0/1 (1 = malignant).
        val_features: ``(M, E)``. val_labels: ``(M,)`` 0/1, both classes present.
        knn_k: neighbours (default 20).
        cs: the C values tried.
        seed: ``random_state`` of the logistic regression.

    Returns:
        The fitted ``Readouts``.
    """
    x_train, y_train = _check_labelled(train_features, train_labels, "train")
    x_val, y_val = _check_labelled(val_features, val_labels, "val")
    if x_val.shape[1] != x_train.shape[1]:
        raise ValueError(f"fit_readouts: train has {x_train.shape[1]} features, val {x_val.shape[1]}")
    if not cs or any(not c > 0 for c in cs):
        raise ValueError(f"fit_readouts: cs must be a non-empty list of positive numbers, got {list(cs)}")
    if knn_k < 1:
        raise ValueError(f"fit_readouts: knn_k must be >= 1, got {knn_k}")
    mean = x_train.mean(axis=0)
    scale = np.maximum(x_train.std(axis=0), SCALE_FLOOR)
    standardised = (x_train - mean) / scale
    scores: list[tuple[float, float]] = []
    not_converged: list[float] = []
    best: tuple[float, float, np.ndarray, float] | None = None  # (score, C, coef, intercept)
    for c in sorted(float(c) for c in cs):  # ascending: a strict ">" keeps the smaller C on ties
        coef, intercept, converged = _fit_probe(standardised, y_train, c, seed)
        if not converged:
            not_converged.append(c)
        score = _balanced_accuracy(y_val, _linear_p(x_val, mean, scale, coef, intercept))
        scores.append((c, score))
        if best is None or score > best[0]:
            best = (score, c, coef, intercept)
    assert best is not None
    if best[1] in not_converged:
        warnings.warn(
            f"linear probe: the chosen C = {best[1]:g} stopped at the iteration limit ({PROBE_MAX_ITER})", stacklevel=2
        )
    return Readouts(
        probe_coef=best[2],
        probe_intercept=best[3],
        probe_mean=mean,
        probe_scale=scale,
        probe_c=best[1],
        knn_bank=l2_normalise(x_train).astype(np.float32),
        knn_labels=y_train,
        knn_k=odd_k(knn_k, len(x_train)),
        probe_val_scores=scores,
        probe_not_converged=not_converged,
    )


def fit_dfr(features: np.ndarray, labels: np.ndarray, *, cs: Sequence[float] = PROBE_CS, seed: int = 0) -> LinearProbe:
    """Deep Feature Reweighting: a logistic probe fitted on a group-balanced split.

    Features are standardised on that split; C is chosen from ``cs`` by stratified
    ``DFR_FOLDS``-fold cross-validation (balanced accuracy, ties toward the smaller C) inside
    the same split (the same lbfgs fit as the train probe), then refitted on all of it. Fit it on ``val_balanced`` only:
    never on a split it is scored on.

    Args:
        features: ``(N, E)`` frozen-encoder features of the balanced split.
        labels: ``(N,)`` 0/1, both classes with at least ``DFR_FOLDS`` samples each.
        cs: the C values tried. seed: seeds the fold assignment and the solver.

    Returns:
        The fitted :class:`LinearProbe`.
    """
    from sklearn.model_selection import StratifiedKFold

    x, y = _check_labelled(features, labels, "dfr")
    if np.bincount(y, minlength=2).min() < DFR_FOLDS:
        raise ValueError(f"fit_dfr: each class needs at least {DFR_FOLDS} samples for {DFR_FOLDS}-fold CV")
    mean = x.mean(axis=0)
    scale = np.maximum(x.std(axis=0), SCALE_FLOOR)
    z = (x - mean) / scale
    folds = list(StratifiedKFold(DFR_FOLDS, shuffle=True, random_state=seed).split(z, y))
    best: tuple[float, float] | None = None  # (mean held-out balanced accuracy, C)
    for c in sorted(float(c) for c in cs):  # ascending: a strict ">" keeps the smaller C on ties
        held_out = []
        for fit_rows, score_rows in folds:
            coef, intercept, _ = _fit_probe(z[fit_rows], y[fit_rows], c, seed)
            held_out.append(_balanced_accuracy(y[score_rows], expit(z[score_rows] @ coef + intercept)))
        score = float(np.mean(held_out))
        if best is None or score > best[0]:
            best = (score, c)
    assert best is not None
    coef, intercept, converged = _fit_probe(z, y, best[1], seed)
    if not converged:
        warnings.warn(
            f"dfr probe: the chosen C = {best[1]:g} stopped at the iteration limit ({PROBE_MAX_ITER})", stacklevel=2
        )
    return LinearProbe(coef, intercept, mean, scale, best[1], converged)
