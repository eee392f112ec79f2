"""The run folder (design.md "Losses and training"): its layout, format version, reader, and every classifier it holds.

A run folder written by ``nodulab train``::

    RUN/config.json                 resolved config, versions, threads, dataset manifest hash,
                                    init_sha256 (the untrained weights, rebuilt from the seed)
    RUN/model.safetensors           the trained network (never pickled)
    RUN/readouts.safetensors        probe and kNN fitted on train, dfr fitted on val_balanced
    RUN/readouts_init.safetensors   probe and kNN of the untrained encoder (the controls)
    RUN/history.csv, history.png    per-epoch training record
    RUN/checkpoints/epoch_<k>.safetensors
                                    the weights at the end of epoch k, for the epochs ``train``
                                    was asked to keep (``--checkpoints``; default 1, 2, 4, ...
                                    below the last epoch, and the last), in ``model.safetensors``'s
                                    format with ``checkpoint_epoch`` in the metadata; read only by
                                    the dynamics stage (``nodulab.explanation.dynamics``), which
                                    accepts nothing else in the folder

``load_run`` opens one and ``LoadedRun.predict`` gives P(malignant) of every classifier the run
has (``CLASSIFIERS``): ``head``, ``probe``, ``knn``, ``dfr``, ``probe_init``, ``knn_init``.
Evaluations (``metrics.csv``, ``evaluation.json``) and explanations (``explain/``) are written by
their own modules into the run folder.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nodulab.common.errors import InputError
from nodulab.data.dataset import sha256_file
from nodulab.training.models import NoduleNet, build_model, load_model, state_sha256
from nodulab.training.readouts import Readouts, extract, load_readouts

RUN_FORMAT = 3
"""Version of a run folder's layout (written by ``train``); readers take ``READABLE_FORMATS``.
2: ``readouts_init.safetensors``, ``dfr`` in the readouts, ``threads`` and ``init_sha256`` in
``config.json``. 3: ``files_sha256`` in ``config.json`` ties the readouts files to their run."""
READABLE_FORMATS = (2, 3)
CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
READOUTS_FILE = "readouts.safetensors"
READOUTS_INIT_FILE = "readouts_init.safetensors"
HISTORY_FILE = "history.csv"
HISTORY_FIGURE = "history.png"
CHECKPOINTS_DIR = "checkpoints"
"""Folder of the per-epoch weights (``CHECKPOINT_FILE``); not part of ``config.json``."""
CHECKPOINT_FILE = "epoch_{epoch}.safetensors"
"""Name of epoch ``k``'s weights in ``CHECKPOINTS_DIR`` (``k`` in decimal, no leading zero)."""
CLASSIFIERS = ("head", "probe", "knn", "dfr", "probe_init", "knn_init")
"""Every classifier a run can have, in report order. ``head`` is the loss's own behaviour where
the loss has one; ``dfr`` is a feature-quality oracle; ``*_init`` are the untrained controls."""


class RunError(InputError):
    """A run folder is missing, incomplete, unreadable or of another run format."""


def read_run_format(path: Path) -> object:
    """The ``run_format`` recorded in a run's ``config.json``; ``None`` if it cannot be read."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8")).get("run_format")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError, RecursionError):
        return None


def read_run_config(path: Path) -> dict[str, Any]:
    """A run's ``config.json``, checked to be of this run format and complete.

    Raises:
        RunError: unreadable, not a run config, another run format, or a missing field.
    """
    found = read_run_format(path)
    if found is None:
        raise RunError(f"{path}: not a run config (unreadable JSON)")
    if found not in READABLE_FORMATS:
        raise RunError(f"{path}: run format {found!r}, this nodulab reads {', '.join(map(str, READABLE_FORMATS))}")
    record = json.loads(Path(path).read_text(encoding="utf-8"))
    try:
        dataset, config = record["dataset"], record["config"]
        _ = (dataset["image"], dataset["manifest_sha256"], int(config["seed"]), int(record["threads"]))
    except (KeyError, TypeError, ValueError) as error:
        raise RunError(f"{path}: incomplete run config (missing or bad {error})") from None
    if not 1 <= int(record["threads"]) <= 4096:
        raise RunError(f"{path}: threads must be a positive count, got {record['threads']!r}")
    return record


def _require(path: Path) -> Path:
    if not path.is_file():
        raise RunError(f"run folder {path.parent}: {path.name} is missing")
    return path


@contextmanager
def run_threads(count: int) -> Iterator[None]:
    """Run the block at the run's torch thread count (CPU results are bit-identical only at it)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(int(count))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@dataclass
class LoadedRun:
    """A run folder in memory: its record, trained and untrained networks, and their readouts."""

    folder: Path
    record: dict[str, Any]
    model: NoduleNet
    init: NoduleNet
    readouts: Readouts
    readouts_init: Readouts
    device: str

    @property
    def threads(self) -> int:
        return int(self.record["threads"])

    @property
    def classifiers(self) -> list[str]:
        """The classifiers this run has, in ``CLASSIFIERS`` order."""
        have = {"probe", "knn", "probe_init", "knn_init"}
        if self.model.head is not None:
            have.add("head")
        if self.readouts.dfr is not None:
            have.add("dfr")
        return [c for c in CLASSIFIERS if c in have]

    def check_dataset(self, manifest: dict[str, Any], data_dir: Path) -> bool:
        """Refuse a dataset of another image geometry; say whether it is the run's own dataset."""
        trained, found = self.record["dataset"]["image"], manifest.get("image", {})
        for key in ("dim", "size", "pixel_mm"):
            if found.get(key) != trained.get(key):
                raise RunError(
                    f"DATA_DIR {data_dir}: image {key} is {found.get(key)!r}, the run was trained "
                    f"on {trained.get(key)!r} (geometry must match)"
                )
        return sha256_file(Path(data_dir) / "dataset.json") == self.record["dataset"]["manifest_sha256"]

    def predict(self, images: np.ndarray | torch.Tensor, *, batch_size: int = 256) -> dict[str, np.ndarray]:
        """P(malignant) of every classifier for a set of images.

        Args:
            images: integer HU ``(N, *S)`` (e.g. a split's memory map) or float input ``(N, 1, *S)``.
            batch_size: images per forward pass.

        Returns:
            ``{classifier: (N,) float}`` for ``self.classifiers``.
        """
        scores: dict[str, np.ndarray] = {}
        for model, readouts, suffix in ((self.model, self.readouts, ""), (self.init, self.readouts_init, "_init")):
            out = extract(model, images, batch_size=batch_size, device=self.device)
            if "head" in out and not suffix:
                scores["head"] = out["head"]
            for name, p in readouts.predict(out["features"]).items():
                if not (suffix and name == "dfr"):
                    scores[name + suffix] = p
        return {c: scores[c] for c in self.classifiers}


TIED_FILES = (READOUTS_FILE, READOUTS_INIT_FILE)
"""Files whose sha256 ``config.json`` records (``files_sha256``, run format 3): a readouts file
copied from another run is refused."""


def check_files(run_dir: Path, record: dict[str, Any]) -> None:
    """Refuse a run whose tied files differ from the sha256 its ``config.json`` records (format 3)."""
    recorded = record.get("files_sha256")
    if recorded is None and record.get("run_format") == 2:
        return  # older runs recorded no file hashes
    if not isinstance(recorded, dict):
        raise RunError(f"{run_dir / CONFIG_FILE}: files_sha256 is missing or not a table")
    for name in TIED_FILES:
        if recorded.get(name) != sha256_file(run_dir / name):
            raise RunError(f"{run_dir / name} does not belong to this run (its sha256 differs from {CONFIG_FILE}'s)")


def load_run(run_dir: Path | str, device: torch.device | str = "cpu") -> LoadedRun:
    """Open a run folder: check its format and files, rebuild the untrained encoder from the seed.

    Raises:
        RunError: the folder or a file is missing, a file is not ours or of another format, or
            the rebuilt untrained weights differ from the recorded hash (another torch version).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"run folder {run_dir} does not exist")
    paths = [_require(run_dir / name) for name in (CONFIG_FILE, MODEL_FILE, READOUTS_FILE, READOUTS_INIT_FILE)]
    record = read_run_config(paths[0])
    check_files(run_dir, record)
    try:
        model, checkpoint = load_model(paths[1], device=device)
        width = int(model.architecture.get("embedding_dim", 128))  # the features the readouts take
        readouts, readouts_init = load_readouts(paths[2], width), load_readouts(paths[3], width)
    except (ValueError, KeyError, TypeError) as error:  # not safetensors, not ours, another format
        raise RunError(str(error)) from None
    with run_threads(int(record["threads"])):
        init = build_model(**checkpoint["architecture"], seed=int(record["config"]["seed"]))
    if record.get("init_sha256") != state_sha256(init):
        raise RunError(
            "the untrained encoder rebuilt from the run's seed differs from the one it was trained "
            "from (another torch version?); its _init controls cannot be scored"
        )
    return LoadedRun(run_dir, record, model, init.to(device).eval(), readouts, readouts_init, str(device))
