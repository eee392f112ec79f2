"""Training: one encoder, any loss, the same two views for every loss (design.md "Losses and training").

The only thing that changes between runs of a study is the loss. Every loss sees the same two
views per sample (CE trains on both), drawn by the same seeded generator; the encoder, optimiser
(AdamW, linear warm-up then cosine decay), batch order and model-selection rule are shared.
After training, every model gets the same readouts on its frozen encoder (``nodulab.training.readouts``):
a linear probe and a kNN classifier fitted on ``train``, plus its own head where it has one;
beside them the same readouts of its untrained encoder (the same seed's initial weights: what
the input alone gives away), and ``dfr``, a probe fitted on ``val_balanced`` when the dataset
has one (a feature-quality oracle). Test splits and ``val_balanced`` are never used for
training, model selection or thresholds.

Run folder (written into a temporary folder, renamed into place when complete):
``config.json`` (everything resolved, versions and thread count included),
``model.safetensors``, ``readouts.safetensors`` (probe, kNN, dfr), ``readouts_init.safetensors``
(probe and kNN of the untrained encoder), ``history.csv`` and ``history.png`` (one row per
epoch), and ``checkpoints/epoch_<k>.safetensors``: the weights at the end of each epoch ``k``
asked for (``checkpoints``; default ``default_checkpoints``: 1, 2, 4, ... below the last epoch,
and the last). Checkpoints are only saved: nothing in training or selection reads them, they are
not part of ``TrainConfig`` or ``config.json``, and every other file of the run is byte-identical
with or without them. The dynamics stage (``nodulab.explanation.dynamics``, run by ``evaluate``
and the study, never by ``train``) scores them.
"""

from __future__ import annotations

import copy
import json
import math
import platform
import re
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from nodulab import __version__
from nodulab.common.choices import (
    DEFAULT_EPOCHS,
    DEVICES,
    MAX_BATCH_SIZE,
    MAX_EPOCHS,
    MAX_SEED,
    MAX_THREADS,
    SELECTIONS,
    VIEWS,
)
from nodulab.common.errors import InputError
from nodulab.common.plaintext import plain_text
from nodulab.common.scoring import binary_metrics
from nodulab.common.tables import REAL_DATASET
from nodulab.data.dataset import (
    DatasetError,
    check_out,
    hu_to_input,
    is_real,
    load_manifest,
    load_split,
    sha256_file,
    staged,
)
from nodulab.synth.scenario import BALANCED_SPLIT, ScenarioError
from nodulab.synth.scenarios import load_scenario_dict
from nodulab.training import losses
from nodulab.training.augment import geometric_conflicts, make_views
from nodulab.training.models import ENCODERS, NoduleNet, build_model, save_model, state_sha256
from nodulab.training.readouts import KNN_K, Readouts, extract, fit_dfr, fit_readouts, knn_neighbours, odd_k
from nodulab.training.runs import (
    CHECKPOINT_FILE,
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    HISTORY_FILE,
    MODEL_FILE,
    READABLE_FORMATS,
    READOUTS_FILE,
    READOUTS_INIT_FILE,
    RUN_FORMAT,
    TIED_FILES,
    read_run_format,
    run_threads,
)

WARMUP_FRACTION = 0.05
"""Share of the steps (at least one) with a linear learning-rate warm-up before cosine decay."""
COLLAPSE_DISTANCE = 1e-2
"""Mean pairwise distance of L2-normalised embeddings below which a warning says they collapsed."""
VAL_BANK = 2048
"""Train samples in the kNN bank used for the per-epoch validation score."""
SELECTION_SCORE = "val_knn_balanced_accuracy"
"""The one model-selection score for every loss: kNN balanced accuracy on ``val``."""

if TYPE_CHECKING:
    from matplotlib.figure import Figure

Progress = Callable[[str, int, int], None]


class TrainError(InputError):
    """Bad input to ``train``: the message is one line naming the option."""


class TrainingDiverged(TrainError):
    """The loss became NaN or infinite (a one-line error: the run is not written)."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a run; stored resolved in ``config.json``."""

    data_dir: str
    loss: str
    encoder: str = "small-cnn"
    epochs: int = DEFAULT_EPOCHS
    batch_size: int = 128
    lr: float = losses.OPTIMISER_PARAMS["lr"].default
    weight_decay: float = losses.OPTIMISER_PARAMS["weight_decay"].default
    seed: int = 0
    views: str = "both"
    device: str = "cpu"
    selection: str = "last"
    threads: int = 1
    embedding_dim: int = 128
    projection_dim: int = 128
    knn_k: int = KNN_K
    optimiser: str = "adamw"
    schedule: str = "warmup-cosine"
    warmup_fraction: float = WARMUP_FRACTION
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
        if found not in READABLE_FORMATS:
            raise TrainError(f"--out {out}: run format {found!r}, this nodulab writes {RUN_FORMAT}")
    if Path(out).exists() and not force:
        raise TrainError(f"--out {out} already exists (use --force to replace it)")


def _check(config: TrainConfig) -> None:
    if config.loss not in losses.names():
        raise TrainError(f"--loss: unknown loss {config.loss!r}; choose from {', '.join(losses.names())}")
    if config.encoder not in ENCODERS:
        raise TrainError(f"--encoder must be one of {', '.join(ENCODERS)}, got {config.encoder!r}")
    if not 1 <= config.epochs <= MAX_EPOCHS:
        raise TrainError(f"--epochs must be 1..{MAX_EPOCHS:,}, got {config.epochs}")
    if not 2 <= config.batch_size <= MAX_BATCH_SIZE:
        raise TrainError(f"--batch-size must be 2..{MAX_BATCH_SIZE:,}, got {config.batch_size}")
    if not (config.lr > 0 and math.isfinite(config.lr)):
        raise TrainError(f"--lr must be a positive number, got {config.lr}")
    if not (config.weight_decay >= 0 and math.isfinite(config.weight_decay)):
        raise TrainError(f"--weight-decay must be a non-negative number, got {config.weight_decay}")
    if not 1 <= config.threads <= MAX_THREADS:
        raise TrainError(f"--threads must be 1..{MAX_THREADS}, got {config.threads}")
    try:
        losses.check_params(config.loss, config.loss_params)
    except ValueError as error:
        raise TrainError(f"--loss-param: {error}") from None
    if config.views not in VIEWS:
        raise TrainError(f"--views must be one of {', '.join(VIEWS)}, got {config.views!r}")
    if config.selection not in SELECTIONS:
        raise TrainError(f"--select must be one of {', '.join(SELECTIONS)}, got {config.selection!r}")
    if not 0 <= config.seed <= MAX_SEED:
        raise TrainError(f"--seed must be 0..{MAX_SEED:,}, got {config.seed}")


def _check_views(config: TrainConfig, manifest: dict, data_dir: Path) -> None:
    """Refuse geometric views when the label or a confound is a factor the geometry changes; on real
    CT (``nodulab import-lidc``) only geometric views exist: there are no rows to render again."""
    if is_real(manifest):
        if config.views != "augment":
            raise TrainError(
                f"--views {config.views}: DATA_DIR {data_dir} holds real CT, which cannot be rendered again; "
                "use --views augment"
            )
        return
    try:  # the manifest's scenario is untrusted input: validate it as a scenario file would be
        scenario = load_scenario_dict(manifest["scenario"])
    except ScenarioError as error:
        raise TrainError(f"DATA_DIR {data_dir}: dataset.json scenario: {error}") from None
    conflicts = geometric_conflicts(scenario.label.factor, [c.factor for c in scenario.confounds])
    if conflicts and config.views != "rerender":
        raise TrainError(
            f"--views {config.views}: flips, rotations and shifts change {', '.join(conflicts)}, "
            "which this scenario's label or confounds use; use --views rerender"
        )


def default_checkpoints(epochs: int) -> tuple[int, ...]:
    """The epochs whose weights a run keeps by default: 1, 2, 4, 8, ... below ``epochs``, and ``epochs``.

    Log-spaced, because what a model relies on changes fastest early (easy features are learnt
    first); a 30-epoch run keeps 1, 2, 4, 8, 16, 30.
    """
    if epochs < 1:
        return ()
    found, k = [], 1
    while k < epochs:
        found.append(k)
        k *= 2
    return (*found, int(epochs))


CHECKPOINTS_NONE = "none"
"""``--checkpoints none``: keep no per-epoch weights."""


def check_checkpoints(checkpoints: Sequence[int] | str | None, epochs: int) -> tuple[int, ...]:
    """The epochs to keep, sorted and unique, from ``train``'s ``checkpoints`` argument.

    Args:
        checkpoints: ``None`` (``default_checkpoints(epochs)``), ``"none"`` or an empty sequence
            (no checkpoints), a comma-separated string (``"1,2,4"``, the CLI's) or integers.
        epochs: the run's epochs; every entry must lie in ``1..epochs``.

    Raises:
        TrainError: one line naming ``--checkpoints``: an entry that is not a whole number, or
            lies outside ``1..epochs``.
    """
    if checkpoints is None:
        return default_checkpoints(epochs)
    hint = "give epoch numbers such as 1,2,4,8 or none"
    if isinstance(checkpoints, str):
        if checkpoints.strip().lower() == CHECKPOINTS_NONE:
            return ()
        items: list[object] = [item.strip() for item in checkpoints.split(",")]
    elif isinstance(checkpoints, (int, np.integer)):
        items = [checkpoints]
    else:
        try:
            items = list(checkpoints)
        except TypeError:
            raise TrainError(f"--checkpoints: {checkpoints!r} is not a list of epochs ({hint})") from None
    values = []
    for item in items:
        if isinstance(item, str) and re.fullmatch(r"[0-9]{1,9}", item):
            values.append(int(item))
        elif isinstance(item, (int, np.integer)) and not isinstance(item, (bool, np.bool_)):
            values.append(int(item))
        else:
            raise TrainError(f"--checkpoints: {item!r} is not an epoch number ({hint})")
    outside = [v for v in values if not 1 <= v <= epochs]
    if outside:
        raise TrainError(f"--checkpoints: epoch {outside[0]} is outside 1..{epochs} (the run's --epochs)")
    return tuple(sorted(set(values)))


TRAINING_SPLITS = ("train", "val")
"""The only splits training reads for fitting and model selection."""


def training_split(root: Path, name: str) -> _Split:
    """Load ``train`` or ``val`` for training, fitting readouts or selection; refuse any other split.

    ``val_balanced`` fits ``dfr`` only and test splits are only scored: a run that trained or
    selected on them would report numbers that mean nothing.
    """
    if name not in TRAINING_SPLITS:
        raise TrainError(
            f"split {name!r} is never used for training or model selection (only {', '.join(TRAINING_SPLITS)})"
        )
    return _Split.load(root, name)


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


def _views(
    split: _Split,
    index: torch.Tensor,
    config: TrainConfig,
    image: dict,
    epoch: int,
    generator: torch.Generator,
    device: str,
) -> torch.Tensor:
    """The two views of a batch, stacked along the batch axis: ``(2B, 1, *S)`` on ``device``."""
    images = None
    if config.views == "augment":  # the other modes render from the rows
        images = hu_to_input(split.images[index].to(device).float()).unsqueeze(1)
    views = make_views(
        config.views,
        rows=split.factors.iloc[index.numpy()],
        images=images,
        size=image["size"],
        dim=image["dim"],
        epoch=epoch,
        seed=config.seed,
        generator=generator,
        device=device,
    )
    return channels_last(views)


def channels_last(views: torch.Tensor) -> torch.Tensor:
    """The same one-channel batch ``(B, 1, *S)`` with channel-last strides ``(prod S, 1, ...)``.

    With one channel both layouts hold the same bytes, but oneDNN and cuDNN choose their
    convolution kernels from the strides; channels-last ran 1.6x faster on CPU here.
    """
    return views.reshape(views.shape[0], *views.shape[2:], 1).movedim(-1, 1)


def _step_loss(
    model: NoduleNet,
    objective: losses.Objective,
    views: torch.Tensor,
    labels: torch.Tensor,
    index: torch.Tensor,
    device: str,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward both views and score them; labels are repeated per view (sample ids for simclr)."""
    targets = (labels if objective.uses_labels else index).repeat(2).to(device)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
        out = model(views)
    out = {name: value.float() for name, value in out.items()}
    return objective(out.get("projection"), targets, out.get("logits")), out


def _mean_pairwise_distance(embeddings: torch.Tensor) -> float:
    z = torch.nn.functional.normalize(embeddings.detach().float(), dim=1)
    return float(torch.pdist(z).mean()) if len(z) > 1 else float("nan")


def _schedule(
    optimiser: torch.optim.Optimizer, total_steps: int, warmup_fraction: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_fraction`` of the steps (at least one), then cosine decay to 0.

    Warm-up keeps the first steps of a fresh BatchNorm network small; the decay makes every loss
    settle by its last epoch, so "last epoch" selection reads a converged model.
    """
    warmup = max(1, round(warmup_fraction * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimiser, factor)


def train_epoch(
    model: NoduleNet,
    objective: losses.Objective,
    optimiser: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    split: _Split,
    config: TrainConfig,
    image: dict,
    epoch: int,
    generator: torch.Generator,
    device: str,
    progress: Progress | None = None,
) -> dict[str, float]:
    """One pass over ``split`` in a seeded order; stops with ``TrainingDiverged`` on NaN/inf.

    Returns the epoch's record: sample-weighted mean loss, the learning rate at its start, and
    per-step means of what tells a failed run from a good one: ``feature_spread`` (mean pairwise
    distance of the L2-normalised encoder features, every loss), ``embedding_distance`` (the
    same on the projection, where there is one) and the loss's own ``stats`` (mined triplets
    per step for triplet losses, positives per anchor for SupCon and NT-Xent).
    """
    model.train()
    order = torch.randperm(len(split.labels), generator=generator)
    batches = list(torch.split(order, config.batch_size))
    total, count = 0.0, 0
    sums: dict[str, float] = {}
    record = {"lr": float(optimiser.param_groups[0]["lr"])}
    for step, index in enumerate(batches, start=1):
        views = _views(split, index, config, image, epoch, generator, device)
        loss, out = _step_loss(model, objective, views, split.labels[index], index, device)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise TrainingDiverged(
                f"loss is {value} at epoch {epoch + 1}, step {step}: training stopped "
                f"(learning rate {optimiser.param_groups[0]['lr']:g})"
            )
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        scheduler.step()
        total += value * len(index)
        count += len(index)
        found = {"feature_spread": _mean_pairwise_distance(out["features"]), **objective.stats}
        if "projection" in out:
            found["embedding_distance"] = _mean_pairwise_distance(out["projection"])
        for key, v in found.items():
            sums[key] = sums.get(key, 0.0) + v
        if progress:
            progress("train", epoch * len(batches) + step, config.epochs * len(batches))
    record.update({key: v / len(batches) for key, v in sums.items()})
    return {"train_loss": total / count, **record}


def _validate(model: NoduleNet, train: _Split, val: _Split, config: TrainConfig, device: str) -> dict[str, float]:
    """Per-epoch validation: the head (if any) and a kNN on a fixed subset of train features."""
    bank_index = torch.randperm(len(train.labels), generator=torch.Generator().manual_seed(config.seed))[:VAL_BANK]
    bank = extract(model, train.images[bank_index].numpy(), device=device)
    found = extract(model, val.images.numpy(), device=device)
    if not (np.isfinite(bank["features"]).all() and np.isfinite(found["features"]).all()):
        # a step can blow the weights up without a non-finite loss on that step
        raise TrainingDiverged("the encoder's features are not finite after this epoch: training stopped")
    neighbours = knn_neighbours(bank["features"], found["features"], odd_k(config.knn_k, len(bank_index)))
    scores = {"knn": train.labels[bank_index].numpy()[neighbours].mean(axis=1, dtype=np.float64)}
    if "head" in found:
        scores["head"] = found["head"]
    row = {}
    for name, p in scores.items():
        metrics = binary_metrics(val.labels.numpy(), p)
        row[f"val_{name}_balanced_accuracy"] = metrics["balanced_accuracy"]
        row[f"val_{name}_auc"] = metrics["auc"]
    return row


def training_warnings(record: dict[str, float], objective: losses.Objective) -> list[str]:
    """What an epoch's record says went wrong: collapsed features or a triplet loss that is stuck.

    A collapsed embedding mines no semi-hard triplet (every distance is 0), so the triplet loss
    reads 0, not its margin: the count of mined triplets is what shows it.
    """
    epoch, found = int(record["epoch"]), []
    for key in ("feature_spread", "embedding_distance"):
        if record.get(key, math.inf) < COLLAPSE_DISTANCE:
            found.append(f"epoch {epoch}: embeddings collapsed ({key}, mean pairwise distance {record[key]:.2e})")
    metric = getattr(objective, "metric", objective)
    margin = getattr(metric, "margin", None)
    if "mined_triplets" in record and record["mined_triplets"] < 1.0:
        found.append(
            f"epoch {epoch}: triplet loss stuck: {record['mined_triplets']:.2f} semi-hard triplets "
            "mined per step (a collapsed or fully separated embedding mines nothing)"
        )
    elif (
        isinstance(metric, losses.SemiHardTriplet) and margin is not None and abs(record["train_loss"] - margin) < 1e-3
    ):
        found.append(f"epoch {epoch}: triplet loss stuck at the margin ({margin})")
    return found


def train(
    data_dir: Path | str,
    out: Path | str,
    *,
    loss: str,
    encoder: str = "small-cnn",
    epochs: int = DEFAULT_EPOCHS,
    batch_size: int = 128,
    lr: float = losses.OPTIMISER_PARAMS["lr"].default,
    weight_decay: float = losses.OPTIMISER_PARAMS["weight_decay"].default,
    loss_params: dict[str, float] | None = None,
    seed: int = 0,
    views: str = "both",
    device: str = "auto",
    selection: str = "last",
    threads: int | None = None,
    checkpoints: Sequence[int] | str | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> Path:
    """Train one model on ``DATA_DIR/train`` and fit its readouts; write the run folder.

    Args:
        data_dir: a dataset written by ``nodulab generate`` (needs ``train`` and ``val``).
        out: run folder to create (refused if it exists, unless ``force``).
        loss: a name from ``nodulab.training.losses.names()``.
        encoder: ``small-cnn`` or ``resnet18``.
        epochs, batch_size: the schedule (linear warm-up, then cosine decay to 0).
        lr, weight_decay: AdamW (weight decay 0 by default; ranges in ``losses.OPTIMISER_PARAMS``).
        loss_params: the loss's parameters (``temperature``, ``margin``, ``weight``); unset ones
            keep the registry's defaults. All are recorded in ``config.json``.
        seed: seeds the weights, the batch order and the views; same seed, same run on CPU at the
            same thread count.
        views: ``both`` (default: re-rendered nuisance, then flips, 90° rotations, shifts ≤ 2 px),
            ``augment`` (geometry only: the noise pattern matches across views) or ``rerender``
            (new nuisance only: the geometry matches). Geometric views are refused when the
            label or a confound is an offset or the rotation.
        device: ``auto``, ``cpu`` or ``cuda`` (bf16 autocast on CUDA).
        selection: ``last`` epoch (default, the same rule for every loss) or ``best-val`` (kNN
            balanced accuracy on val for every loss; val shares the training distribution, so
            val-selected checkpoints favour shortcuts).
        threads: torch CPU threads for the run (default: the current count); recorded, and
            restored by ``evaluate`` (CPU results are bit-identical only at the same count).
        checkpoints: the epochs whose weights go to ``checkpoints/epoch_<k>.safetensors`` (the
            state at the end of epoch ``k``): ``None`` for ``default_checkpoints(epochs)`` (1, 2,
            4, ... below ``epochs``, and ``epochs``), ``"none"`` or ``()`` for none, integers or a
            comma-separated string (``"1,2,4"``) in ``1..epochs``; an explicit list is kept as
            given (the last epoch is not added). Only saved, never read by training or
            selection, and not recorded in ``config.json``: every other file is byte-identical
            with or without them.
        force: replace an existing run folder.
        progress: called with (stage, done, total).

    Returns:
        The run folder.
    """
    data_dir, out = Path(data_dir), Path(out)
    config = TrainConfig(
        str(data_dir),
        loss,
        encoder,
        epochs,
        batch_size,
        float(lr),
        float(weight_decay),
        seed,
        views,
        resolve_device(device),
        selection,
        min(torch.get_num_threads(), MAX_THREADS) if threads is None else int(threads),
        loss_params=dict(loss_params or {}),
    )
    _check(config)
    keep = check_checkpoints(checkpoints, config.epochs)
    check_out(out, [data_dir])
    check_run_dir(out, force)
    try:
        manifest = load_manifest(data_dir)
        train_split, val_split = training_split(data_dir, "train"), training_split(data_dir, "val")
    except (DatasetError, OSError) as error:
        raise TrainError(f"DATA_DIR {data_dir}: {error}") from None
    _check_views(config, manifest, data_dir)
    for name, split in (("train", train_split), ("val", val_split)):
        if split.labels.unique().numel() < 2:
            raise TrainError(f"DATA_DIR {data_dir}: split {name} needs both classes")
    if selection == "best-val":
        warnings.warn(
            "--select best-val: val shares the training distribution, so the chosen checkpoint favours shortcuts",
            stacklevel=2,
        )
    with run_threads(config.threads):
        return _train(config, manifest, data_dir, out, train_split, val_split, force, progress, keep)


def _train(
    config: TrainConfig,
    manifest: dict,
    data_dir: Path,
    out: Path,
    train_split: _Split,
    val_split: _Split,
    force: bool,
    progress: Progress | None,
    checkpoints: tuple[int, ...] = (),
) -> Path:
    objective = losses.build(config.loss, **config.loss_params)
    image = manifest["image"]
    model = build_model(
        config.encoder,
        image["dim"],
        embedding_dim=config.embedding_dim,
        projection_dim=config.projection_dim,
        head=objective.uses_head,
        projector=objective.uses_embeddings,
        seed=config.seed,
    )
    init_sha256 = state_sha256(model)
    if progress:
        progress("readouts", 0, 3)
    readouts_init = _fit_readouts(model, train_split, val_split, config)
    model.to(config.device)
    optimiser = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps = -(-len(train_split.labels) // config.batch_size)
    scheduler = _schedule(optimiser, config.epochs * steps, config.warmup_fraction)
    generator = torch.Generator().manual_seed(config.seed)
    history, best = [], (-math.inf, None, config.epochs)
    kept: dict[int, dict[str, torch.Tensor]] = {}  # epoch -> weights at its end, written with the run
    for epoch in range(config.epochs):
        start = time.perf_counter()
        record = {"epoch": epoch + 1}
        record.update(
            train_epoch(
                model,
                objective,
                optimiser,
                scheduler,
                train_split,
                config,
                image,
                epoch,
                generator,
                config.device,
                progress,
            )
        )
        record.update(_validate(model, train_split, val_split, config, config.device))
        record["seconds"] = time.perf_counter() - start
        for message in training_warnings(record, objective):
            warnings.warn(message, stacklevel=3)
        history.append(record)
        if epoch + 1 in checkpoints:
            kept[epoch + 1] = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        if config.selection == "best-val" and record[SELECTION_SCORE] > best[0]:
            best = (record[SELECTION_SCORE], copy.deepcopy(model.state_dict()), epoch + 1)
    if config.selection == "best-val":
        model.load_state_dict(best[1])
    if progress:
        progress("readouts", 1, 3)
    readouts = _fit_readouts(model, train_split, val_split, config)
    if BALANCED_SPLIT in manifest["splits"]:
        balanced = _Split.load(data_dir, BALANCED_SPLIT)
        found = extract(model, balanced.images.numpy(), device=config.device)
        readouts.dfr = fit_dfr(found["features"], balanced.labels.numpy(), seed=config.seed)
    if progress:
        progress("readouts", 2, 3)
    record = _run_record(config, manifest, data_dir, history, init_sha256, selected_epoch=best[2])
    with staged(out, force=force, owner=CONFIG_FILE) as tmp:
        save_model(model, tmp / MODEL_FILE, record)
        readouts.save(tmp / READOUTS_FILE)
        readouts_init.save(tmp / READOUTS_INIT_FILE)
        frame = pd.DataFrame(history)
        frame.to_csv(tmp / HISTORY_FILE, index=False, float_format="%.6g")
        history_figure(frame, config.loss).savefig(tmp / "history.png", dpi=100, metadata={"Software": None})
        tied = {"files_sha256": {name: sha256_file(tmp / name) for name in TIED_FILES}}  # the readouts are this run's
        (tmp / CONFIG_FILE).write_text(json.dumps({**record, **tied}, indent=2, sort_keys=True) + "\n")
        _save_checkpoints(model, kept, tmp / CHECKPOINTS_DIR, record)
    if progress:
        progress("readouts", 3, 3)
    return out


def _save_checkpoints(model: NoduleNet, kept: dict[int, dict[str, torch.Tensor]], folder: Path, record: dict) -> None:
    """``checkpoints/epoch_<k>.safetensors``: ``save_model``'s format, the run record plus ``checkpoint_epoch``."""
    if not kept:
        return
    folder.mkdir()
    snapshot = copy.deepcopy(model).cpu()
    for epoch, state in sorted(kept.items()):
        snapshot.load_state_dict(state)
        save_model(snapshot, folder / CHECKPOINT_FILE.format(epoch=epoch), {**record, "checkpoint_epoch": epoch})


def _fit_readouts(model: NoduleNet, train_split: _Split, val_split: _Split, config: TrainConfig) -> Readouts:
    """The probe and kNN of ``model``'s frozen encoder, fitted on train (C chosen on val)."""
    found = {
        name: extract(model, split.images.numpy(), device=config.device)["features"]
        for name, split in (("train", train_split), ("val", val_split))
    }
    return fit_readouts(
        found["train"],
        train_split.labels.numpy(),
        found["val"],
        val_split.labels.numpy(),
        knn_k=config.knn_k,
        seed=config.seed,
    )


@plain_text
def history_figure(history: pd.DataFrame, title: str) -> Figure:
    """``history.png``: training loss and validation scores per epoch (learning rate dashed)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 3.2), layout="constrained")
    loss_ax, score_ax = fig.subplots(1, 2)
    loss_ax.plot(history["epoch"], history["train_loss"], marker=".", color="C0", label="train loss")
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("train loss")
    lr_ax = loss_ax.twinx()
    lr_ax.plot(history["epoch"], history["lr"], linestyle="--", color="0.6", label="learning rate")
    lr_ax.set_ylabel("learning rate (epoch start)", color="0.5")
    for column, name in (("val_knn_balanced_accuracy", "kNN"), ("val_head_balanced_accuracy", "head")):
        if column in history:
            score_ax.plot(history["epoch"], history[column], marker=".", label=f"{name} (val)")
    score_ax.set_xlabel("epoch")
    score_ax.set_ylabel("balanced accuracy on val")
    score_ax.legend(fontsize=8)
    fig.suptitle(f"{title}: val shares the training distribution (shortcuts score well here)", fontsize=9)
    return fig


def _run_record(
    config: TrainConfig, manifest: dict, data_dir: Path, history: list[dict], init_sha256: str, selected_epoch: int
) -> dict:
    """``config.json``: the resolved configuration, versions and where the data came from."""
    defaults = {key: p.default for key, p in losses.params(config.loss).items()}
    resolved = asdict(config) | {"loss_params": defaults | losses.check_params(config.loss, config.loss_params)}
    return {
        "run_format": RUN_FORMAT,
        "nodulab_version": __version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "config": resolved,
        "dataset": {
            "scenario": REAL_DATASET if is_real(manifest) else manifest["scenario"].get("name"),
            "seed": manifest.get("seed"),
            "image": manifest["image"],
            "manifest_sha256": sha256_file(data_dir / "dataset.json"),
        },
        "epochs_run": len(history),
        "selection": config.selection,
        "selection_score": SELECTION_SCORE if config.selection == "best-val" else None,
        "selected_epoch": selected_epoch,
        "threads": config.threads,
        "init_sha256": init_sha256,
    }
