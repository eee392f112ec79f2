"""Training: one encoder, any loss, the same two views for every loss (DESIGN §5).

The only thing that changes between runs of a study is the loss. Every loss sees the same two
views per sample (CE trains on both), drawn by the same seeded generator; the encoder, optimiser
(Adam), schedule, batch order and model-selection rule are shared. After training, every model
gets the same readouts on its frozen encoder (``nodulab.readouts``): a linear probe and a kNN
classifier, plus its own head where it has one. Test splits are never read here.

Run folder (written into a temporary folder, renamed into place when complete):
``config.json`` (everything resolved, versions included), ``model.safetensors``,
``readouts.safetensors``, ``history.csv`` (one row per epoch).
"""

from __future__ import annotations

import copy
import json
import math
import platform
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch

from nodulab import __version__, losses
from nodulab.augment import augment_views, rerender_views
from nodulab.choices import DEVICES, SELECTIONS, VIEWS
from nodulab.data import DatasetError, check_out, hu_to_input, load_manifest, load_split, sha256_file, staged
from nodulab.metrics import RUN_FORMAT, binary_metrics, read_run_format
from nodulab.models import ENCODERS, NoduleNet, build_model, save_model
from nodulab.readouts import KNN_K, extract, fit_readouts, knn_neighbours

COLLAPSE_DISTANCE = 1e-2
"""Mean pairwise distance of L2-normalised embeddings below which a warning says they collapsed."""
VAL_BANK = 2048
"""Train samples in the kNN bank used for the per-epoch validation score."""

Progress = Callable[[str, int, int], None]


class TrainError(ValueError):
    """Bad input to ``train``: the message is one line naming the option."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a run; stored resolved in ``config.json``."""

    data_dir: str
    loss: str
    encoder: str = "small-cnn"
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    seed: int = 0
    views: str = "augment"
    device: str = "cpu"
    selection: str = "last"
    embedding_dim: int = 128
    projection_dim: int = 128
    knn_k: int = KNN_K
    loss_params: dict = field(default_factory=dict)


def resolve_device(device: str) -> str:
    """``auto`` → ``cuda`` when available, else ``cpu``; refuses an unavailable ``cuda``."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in DEVICES:
        raise TrainError(f"--device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise TrainError("--device cuda: no CUDA device is available")
    return device


def check_run_dir(out: Path, force: bool) -> None:
    """Refuse a run folder of another run format, or an existing one without ``force``."""
    config = Path(out) / "config.json"
    if config.is_file():
        found = read_run_format(config)
        if found != RUN_FORMAT:
            raise TrainError(f"--out {out}: run format {found!r}, this nodulab writes {RUN_FORMAT}")
    if Path(out).exists() and not force:
        raise TrainError(f"--out {out} already exists (use --force to replace it)")


def _check(config: TrainConfig) -> None:
    if config.loss not in losses.names():
        raise TrainError(f"--loss: unknown loss {config.loss!r}; choose from {', '.join(losses.names())}")
    if config.encoder not in ENCODERS:
        raise TrainError(f"--encoder must be one of {', '.join(ENCODERS)}, got {config.encoder!r}")
    if config.epochs < 1:
        raise TrainError(f"--epochs must be >= 1, got {config.epochs}")
    if config.batch_size < 2:
        raise TrainError(f"--batch-size must be >= 2, got {config.batch_size}")
    if not (config.lr > 0 and math.isfinite(config.lr)):
        raise TrainError(f"--lr must be a positive number, got {config.lr}")
    if config.views not in VIEWS:
        raise TrainError(f"--views must be one of {', '.join(VIEWS)}, got {config.views!r}")
    if config.selection not in SELECTIONS:
        raise TrainError(f"--select must be one of {', '.join(SELECTIONS)}, got {config.selection!r}")
    if config.seed < 0:
        raise TrainError(f"--seed must be >= 0, got {config.seed}")


@dataclass
class _Split:
    """One split held in memory: int16 HU images, labels, factor rows."""

    images: torch.Tensor
    labels: torch.Tensor
    factors: pd.DataFrame

    @classmethod
    def load(cls, root: Path, name: str) -> _Split:
        images, _, factors = load_split(root, name)
        labels = torch.tensor(factors["label"].to_numpy(), dtype=torch.int64)
        return cls(torch.from_numpy(np.array(images)), labels, factors)


def _views(split: _Split, index: torch.Tensor, config: TrainConfig, image: dict, epoch: int,
           generator: torch.Generator, device: str) -> torch.Tensor:  # fmt: skip
    """The two views of a batch, stacked along the batch axis: ``(2B, 1, *S)`` on ``device``."""
    if config.views == "rerender":
        rows = split.factors.iloc[index.numpy()]
        views = rerender_views(rows, image["size"], image["dim"], epoch=epoch, device=device)
    else:
        batch = hu_to_input(split.images[index].to(device).float()).unsqueeze(1)
        views = augment_views(batch, generator)
    return channels_last(views)


def channels_last(views: torch.Tensor) -> torch.Tensor:
    """The same one-channel batch ``(B, 1, *S)`` with channel-last strides ``(prod S, 1, ...)``.

    With one channel both layouts hold the same bytes, but oneDNN and cuDNN choose their
    convolution kernels from the strides; channels-last ran 1.6x faster on CPU here.
    """
    return views.reshape(views.shape[0], *views.shape[2:], 1).movedim(-1, 1)


def _step_loss(model: NoduleNet, objective: losses.Objective, views: torch.Tensor, labels: torch.Tensor,
               index: torch.Tensor, device: str) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """Forward both views and score them; labels are repeated per view (sample ids for simclr)."""
    targets = (labels if objective.uses_labels else index).repeat(2).to(device)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
        out = model(views)
    embeddings = out.get("projection")
    embeddings = embeddings.float() if embeddings is not None else None
    logits = out.get("logits")
    logits = logits.float() if logits is not None else None
    return objective(embeddings, targets, logits), embeddings


def _mean_pairwise_distance(embeddings: torch.Tensor) -> float:
    z = torch.nn.functional.normalize(embeddings.detach().float(), dim=1)
    return float(torch.pdist(z).mean()) if len(z) > 1 else float("nan")


def train_epoch(model: NoduleNet, objective: losses.Objective, optimiser: torch.optim.Optimizer, split: _Split,
                config: TrainConfig, image: dict, epoch: int, generator: torch.Generator, device: str,
                progress: Progress | None = None) -> dict[str, float]:  # fmt: skip
    """One pass over ``split`` in a seeded order; stops with ``TrainingDiverged`` on NaN/inf."""
    model.train()
    order = torch.randperm(len(split.labels), generator=generator)
    batches = list(torch.split(order, config.batch_size))
    total, count, distance = 0.0, 0, float("nan")
    for step, index in enumerate(batches, start=1):
        views = _views(split, index, config, image, epoch, generator, device)
        loss, embeddings = _step_loss(model, objective, views, split.labels[index], index, device)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise TrainingDiverged(f"loss is {value} at epoch {epoch + 1}, step {step}: training stopped")
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        total += value * len(index)
        count += len(index)
        if embeddings is not None and step == len(batches):
            distance = _mean_pairwise_distance(embeddings)
        if progress:
            progress("train", epoch * len(batches) + step, config.epochs * len(batches))
    return {"train_loss": total / count, "embedding_distance": distance}


def _validate(model: NoduleNet, train: _Split, val: _Split, config: TrainConfig, device: str) -> dict[str, float]:
    """Per-epoch validation: the head (if any) and a kNN on a fixed subset of train features."""
    bank_index = torch.randperm(len(train.labels), generator=torch.Generator().manual_seed(config.seed))[:VAL_BANK]
    bank = extract(model, train.images[bank_index].numpy(), device=device)
    found = extract(model, val.images.numpy(), device=device)
    neighbours = knn_neighbours(bank["features"], found["features"], min(config.knn_k, len(bank_index)))
    scores = {"knn": train.labels[bank_index].numpy()[neighbours].mean(axis=1, dtype=np.float64)}
    if "head" in found:
        scores["head"] = found["head"]
    row = {}
    for name, p in scores.items():
        metrics = binary_metrics(val.labels.numpy(), p)
        row[f"val_{name}_balanced_accuracy"] = metrics["balanced_accuracy"]
        row[f"val_{name}_auc"] = metrics["auc"]
    return row


def _warn_collapse(config: TrainConfig, record: dict[str, float], objective: losses.Objective) -> None:
    epoch = int(record["epoch"])
    if record["embedding_distance"] < COLLAPSE_DISTANCE:
        warnings.warn(f"epoch {epoch}: embeddings collapsed (mean pairwise distance "
                      f"{record['embedding_distance']:.2e})", stacklevel=3)  # fmt: skip
    margin = getattr(objective, "margin", None)
    if config.loss == "triplet" and margin is not None and abs(record["train_loss"] - margin) < 1e-3:
        warnings.warn(f"epoch {epoch}: triplet loss stuck at the margin ({margin})", stacklevel=3)


def _selection_score(record: dict[str, float]) -> float:
    return record.get("val_head_balanced_accuracy", record["val_knn_balanced_accuracy"])


def train(
    data_dir: Path | str,
    out: Path | str,
    *,
    loss: str,
    encoder: str = "small-cnn",
    epochs: int = 10,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    views: str = "augment",
    device: str = "auto",
    selection: str = "last",
    force: bool = False,
    progress: Progress | None = None,
) -> Path:
    """Train one model on ``DATA_DIR/train`` and fit its readouts; write the run folder.

    Args:
        data_dir: a dataset written by ``nodulab generate`` (needs ``train`` and ``val``).
        out: run folder to create (refused if it exists, unless ``force``).
        loss: a name from ``nodulab.losses.names()``.
        encoder: ``small-cnn`` or ``resnet18``.
        epochs, batch_size, lr: Adam schedule (constant learning rate).
        seed: seeds the weights, the batch order and the views; same seed, same run on CPU.
        views: ``augment`` (flips, 90° rotations, shifts ≤ 2 px) or ``rerender`` (fresh nuisance).
        device: ``auto``, ``cpu`` or ``cuda`` (bf16 autocast on CUDA).
        selection: ``last`` epoch (default, the same rule for every loss) or ``best-val`` (val shares
            the training distribution, so val-selected checkpoints favour shortcuts).
        force: replace an existing run folder.
        progress: called with (stage, done, total).

    Returns:
        The run folder.
    """
    data_dir, out = Path(data_dir), Path(out)
    config = TrainConfig(str(data_dir), loss, encoder, epochs, batch_size, lr, seed, views,
                         resolve_device(device), selection)  # fmt: skip
    _check(config)
    check_out(out, [data_dir])
    check_run_dir(out, force)
    try:
        manifest = load_manifest(data_dir)
        train_split, val_split = _Split.load(data_dir, "train"), _Split.load(data_dir, "val")
    except (DatasetError, OSError) as error:
        raise TrainError(f"DATA_DIR {data_dir}: {error}") from None
    for name, split in (("train", train_split), ("val", val_split)):
        if split.labels.unique().numel() < 2:
            raise TrainError(f"DATA_DIR {data_dir}: split {name} needs both classes")
    if selection == "best-val":
        warnings.warn("--select best-val: val shares the training distribution, so the chosen "
                      "checkpoint favours shortcuts", stacklevel=2)  # fmt: skip
    objective = losses.build(loss)
    image = manifest["image"]
    model = build_model(encoder, image["dim"], embedding_dim=config.embedding_dim,
                        projection_dim=config.projection_dim, head=objective.uses_head,
                        projector=objective.uses_embeddings, seed=seed).to(config.device)  # fmt: skip
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    history, best = [], (-math.inf, None)
    for epoch in range(epochs):
        start = time.perf_counter()
        record = {"epoch": epoch + 1}
        record.update(train_epoch(model, objective, optimiser, train_split, config, image, epoch, generator,
                                  config.device, progress))  # fmt: skip
        record.update(_validate(model, train_split, val_split, config, config.device))
        record["seconds"] = time.perf_counter() - start
        _warn_collapse(config, record, objective)
        history.append(record)
        if selection == "best-val" and _selection_score(record) > best[0]:
            best = (_selection_score(record), copy.deepcopy(model.state_dict()))
    if selection == "best-val":
        model.load_state_dict(best[1])
    if progress:
        progress("readouts", 0, 1)
    found = {name: extract(model, split.images.numpy(), device=config.device)
             for name, split in (("train", train_split), ("val", val_split))}  # fmt: skip
    readouts = fit_readouts(found["train"]["features"], train_split.labels.numpy(), found["val"]["features"],
                            val_split.labels.numpy(), knn_k=config.knn_k, seed=seed)  # fmt: skip
    record = _run_record(config, objective, manifest, data_dir, history)
    with staged(out, force=force) as tmp:
        save_model(model, tmp / "model.safetensors", record)
        readouts.save(tmp / "readouts.safetensors")
        pd.DataFrame(history).to_csv(tmp / "history.csv", index=False, float_format="%.6g")
        (tmp / "config.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    if progress:
        progress("readouts", 1, 1)
    return out


def _run_record(config: TrainConfig, objective: losses.Objective, manifest: dict, data_dir: Path,
                history: list[dict]) -> dict:  # fmt: skip
    """``config.json``: the resolved configuration, versions and where the data came from."""
    loss_params = {}
    for part in (getattr(objective, "metric", None), objective):  # a hybrid's metric term, then itself
        loss_params.update({k: getattr(part, k) for k in ("margin", "temperature", "weight") if hasattr(part, k)})
    resolved = asdict(config) | {"loss_params": loss_params}
    return {
        "run_format": RUN_FORMAT,
        "nodulab_version": __version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "config": resolved,
        "dataset": {"scenario": manifest["scenario"].get("name"), "seed": manifest.get("seed"),
                    "image": manifest["image"], "manifest_sha256": sha256_file(data_dir / "dataset.json")},  # fmt: skip
        "epochs_run": len(history),
        "selection": config.selection,
    }
