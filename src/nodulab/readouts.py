"""The readouts every model gets on its frozen encoder (DESIGN §5): linear probe and kNN.

``extract`` runs a network in eval mode (weights and BatchNorm statistics untouched) and returns
its ``features``, the encoder output before any projection head, plus its own head's
P(malignant) when it has one. ``fit_readouts`` fits the two loss-independent classifiers on the
train features:

- **linear probe**: features standardised with the train mean/std, then an L2-regularised
  logistic regression (scikit-learn, lbfgs). C is chosen on ``val`` by balanced accuracy, ties
  toward the smaller C. ``val`` shares the training distribution, so a val-chosen C may favour
  shortcuts as much as training does; it is the same rule for every loss, and the test splits
  are never read.
- **kNN**: cosine similarity, k = 20 by default; P(malignant) is the malignant fraction among
  the k most similar train samples, ties in similarity broken by the lower train index.

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
from safetensors.numpy import load_file, save_file
from scipy.special import expit

from nodulab.data import hu_to_input, write_atomically
from nodulab.models import NoduleNet, read_record

READOUTS_FORMAT = "nodulab-readouts/1"
KNN_K = 20
PROBE_CS = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
PROBE_MAX_ITER = 5000
SCALE_FLOOR = 1e-6
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
            f"extract: expected integer HU (N, {axes}) or float input (N, 1, {axes}), "
            f"got {x.dtype} {tuple(x.shape)}"
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


# ----------------------------------------------------------------------------- readouts
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

    def predict_probe(self, features: np.ndarray) -> np.ndarray:
        """Linear-probe P(malignant); ``features`` ``(M, E)`` -> ``(M,)`` float64."""
        z = (np.asarray(features, dtype=np.float64) - self.probe_mean) / self.probe_scale
        return expit(z @ self.probe_coef + self.probe_intercept)

    def predict_knn(self, features: np.ndarray) -> np.ndarray:
        """kNN P(malignant): malignant fraction of the k nearest train samples, ``(M,)``."""
        neighbours = knn_neighbours(self.knn_bank, features, self.knn_k)
        return (self.knn_labels[neighbours] == 1).mean(axis=1, dtype=np.float64)

    def predict(self, features: np.ndarray) -> dict[str, np.ndarray]:
        """Both readouts.

        Args:
            features: ``(M, E)`` encoder features (``extract(...)["features"]``).

        Returns:
            ``{"probe": (M,), "knn": (M,)}`` P(malignant), float64.
        """
        features = np.asarray(features)
        if features.ndim != 2 or features.shape[1] != len(self.probe_coef):
            raise ValueError(f"readouts: expected features (M, {len(self.probe_coef)}), got {features.shape}")
        return {"probe": self.predict_probe(features), "knn": self.predict_knn(features)}

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
            "knn_k": int(self.knn_k),
        }
        metadata = {_METADATA_KEY: json.dumps(record, sort_keys=True)}
        write_atomically(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_readouts(path: Path | str) -> Readouts:
    """Read a file written by ``Readouts.save`` (no unpickling).

    Raises:
        ValueError: not a safetensors file, or not readouts of this format version.
    """
    record = read_record(path, READOUTS_FORMAT, "readouts file")
    arrays = load_file(str(path))
    return Readouts(
        probe_coef=arrays["probe_coef"],
        probe_intercept=float(record["probe_intercept"]),
        probe_mean=arrays["probe_mean"],
        probe_scale=arrays["probe_scale"],
        probe_c=float(record["probe_c"]),
        knn_bank=arrays["knn_bank"],
        knn_labels=arrays["knn_labels"],
        knn_k=int(record["knn_k"]),
        probe_val_scores=[(float(c), float(s)) for c, s in record["probe_val_scores"]],
    )


def _check_labelled(features: np.ndarray, labels: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(features, dtype=np.float64), np.asarray(labels).astype(np.int64)
    if x.ndim != 2 or y.shape != (len(x),):
        raise ValueError(f"fit_readouts: {name} wants features (N, E), labels (N,), got {x.shape}, {y.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"fit_readouts: {name} features contain non-finite values")
    if set(np.unique(y)) != {0, 1}:
        raise ValueError(f"fit_readouts: {name} labels need both classes (0 and 1), got {sorted(set(y))}")
    return x, y


def _fit_probe(x: np.ndarray, y: np.ndarray, c: float, seed: int) -> tuple[np.ndarray, float]:
    """Logistic regression on standardised train features; ``(coef (E,), intercept)``."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    probe = LogisticRegression(C=c, solver="lbfgs", max_iter=PROBE_MAX_ITER, random_state=seed)
    with warnings.catch_warnings():
        # separable features with a large C have their optimum at infinity: lbfgs stops at
        # max_iter with a classifier that already separates, which is all a probe needs
        warnings.simplefilter("ignore", ConvergenceWarning)
        probe.fit(x, y)
    return probe.coef_[0].astype(np.float64), float(probe.intercept_[0])


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
    from nodulab.metrics import binary_metrics  # scoring lives in metrics

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
    best: tuple[float, float, np.ndarray, float] | None = None  # (score, C, coef, intercept)
    for c in sorted(float(c) for c in cs):  # ascending: a strict ">" keeps the smaller C on ties
        coef, intercept = _fit_probe(standardised, y_train, c, seed)
        p_val = expit(((x_val - mean) / scale) @ coef + intercept)
        score = binary_metrics(y_val, p_val)["balanced_accuracy"]
        scores.append((c, score))
        if best is None or score > best[0]:
            best = (score, c, coef, intercept)
    assert best is not None
    return Readouts(
        probe_coef=best[2],
        probe_intercept=best[3],
        probe_mean=mean,
        probe_scale=scale,
        probe_c=best[1],
        knn_bank=l2_normalise(x_train).astype(np.float32),
        knn_labels=y_train,
        knn_k=min(int(knn_k), len(x_train)),
        probe_val_scores=scores,
    )
