"""The dataset on disk (DESIGN §4): generate, load, re-check, serve to torch.

Layout of a dataset folder::

    DIR/dataset.json            manifest: resolved scenario, seed, versions, shapes, sha256, cells
    DIR/<split>/images.npy      int16 HU, N×H×W or N×D×H×W (memory-mappable)
    DIR/<split>/masks.npy       uint8 region map (0 bg, 1 body, 2 spicules, 3 vessels)
    DIR/<split>/factors.csv     ``index`` + the §2 columns; floats as ``repr`` (exact round trip)

Every writer works in a temporary sibling folder and renames it into place when complete, so a
reader never sees half a dataset and a failed run leaves nothing behind. The manifest holds no
timestamps and no absolute paths: the same scenario and seed give the same bytes.
Re-measuring what was written lives in ``nodulab.validate``; MedMNIST-style, NIfTI and PNG copies
in ``nodulab.export``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from nodulab import __version__
from nodulab.render import render
from nodulab.rng import RNG_SCHEME
from nodulab.sampling import sample_split
from nodulab.scenarios import Scenario, scenario_to_dict

MANIFEST = "dataset.json"
FORMAT = "nodulab-dataset/1"
ARRAYS = {"images": np.int16, "masks": np.uint8}

Progress = Callable[[int], Any]


class DatasetError(ValueError):
    """A dataset folder is missing, malformed, or would be overwritten without ``force``."""


# ----------------------------------------------------------------------------- atomic writes
def write_atomically(path: Path | str, write: Callable[[str], Any]) -> None:
    """Call ``write(tmp)`` on a temporary sibling of ``path``, then rename it into place.

    A reader never sees half a file, and a failed write leaves nothing behind.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def staged(out: Path, *, force: bool = False, is_file: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder of ``out``; put the result in place only on success.

    Args:
        out: final path (a folder, or a file when ``is_file``).
        force: replace an existing ``out`` (only after the new one is complete).
        is_file: the block writes ``tmp / out.name``, which becomes ``out``.

    Yields:
        The temporary folder. On any exception it is removed, with any parents created for it.
    """
    out = Path(out)
    if out.exists() and not force:
        raise DatasetError(f"--out {out} already exists (use --force to replace it)")
    created = [p for p in reversed(out.parents) if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    try:
        yield tmp
        _replace(tmp / out.name if is_file else tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for parent in reversed(created):
            if parent.exists() and not any(parent.iterdir()):
                parent.rmdir()
        raise
    if is_file:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _replace(src: Path, out: Path) -> None:
    """Rename ``src`` to ``out``; an existing ``out`` is moved aside first and deleted last."""
    if not out.exists() and not out.is_symlink():
        os.rename(src, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".old-{out.name}-", dir=out.parent)) / out.name
    os.rename(out, old)
    try:
        os.rename(src, out)
    except BaseException:
        os.rename(old, out)
        raise
    finally:
        _remove(old.parent)


# ----------------------------------------------------------------------------- small helpers
def sha256_file(path: Path, block: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in blocks (bounded memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def dump_json(obj: Any) -> str:
    """Canonical JSON text: sorted keys, indent 2, trailing newline."""
    return json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False) + "\n"


def float_text(value: float) -> str:
    return repr(float(value))  # shortest text that reads back to the same float64


def write_factors(frame: pd.DataFrame, path: Path) -> None:
    """Write a factor table with an ``index`` column; floats read back bit for bit."""
    table = frame.reset_index(drop=True)
    table.insert(0, "index", np.arange(len(table), dtype=np.int64))
    table.to_csv(path, index=False, float_format=float_text, lineterminator="\n")


def read_factors(path: Path) -> pd.DataFrame:
    """Read ``factors.csv`` exactly (floats round-trip; ``repr`` always writes a '.' or 'e')."""
    exact = {"float_precision": "round_trip"} if int(pd.__version__.split(".")[0]) < 3 else {}
    return pd.read_csv(path, **exact)


def cell_columns(frame: pd.DataFrame) -> list[str]:
    """The ``agrees_<factor>`` columns of a factor table, in table order."""
    return [c for c in frame.columns if c.startswith("agrees_")]


def cell_counts(frame: pd.DataFrame) -> list[dict[str, int]]:
    """Count samples in every (label, agrees_…) cell, empty cells included."""
    columns = ["label"] + cell_columns(frame)
    values = [frame[c].to_numpy() for c in columns]
    cells = []
    for key in itertools.product((0, 1), repeat=len(columns)):
        hit = np.ones(len(frame), dtype=bool)
        for column, value in zip(values, key):
            hit &= column == value
        cells.append({**dict(zip(columns, key)), "count": int(hit.sum())})
    return cells


# ----------------------------------------------------------------------------- generate
def _allocate(path: Path, dtype: type, shape: tuple[int, ...]) -> None:
    array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    del array  # the header is written; the body stays sparse until filled


def _fill(path: Path, start: int, block: np.ndarray) -> None:
    # Re-mapping per chunk releases the written pages, so resident memory stays one chunk.
    array = np.load(path, mmap_mode="r+")
    array[start : start + len(block)] = block
    array.flush()
    del array


def _write_split(
    folder: Path, frame: pd.DataFrame, size: int, dim: int, chunk: int, progress: Progress | None
) -> dict[str, Any]:
    """Render one split chunk by chunk into ``folder``; return its manifest entry."""
    folder.mkdir()
    shape = (len(frame),) + (size,) * dim
    for name, dtype in ARRAYS.items():
        _allocate(folder / f"{name}.npy", dtype, shape)
    for start in range(0, len(frame), chunk):
        images, masks = render(frame.iloc[start : start + chunk], size=size, dim=dim)
        _fill(folder / "images.npy", start, images)
        _fill(folder / "masks.npy", start, masks)
        if progress is not None:
            progress(len(images))
    write_factors(frame, folder / "factors.csv")
    entry: dict[str, Any] = {"n": len(frame), "cells": cell_counts(frame)}
    for name, dtype in ARRAYS.items():
        file = folder / f"{name}.npy"
        entry[name] = {"file": f"{folder.name}/{file.name}", "shape": list(shape),
                       "dtype": np.dtype(dtype).name, "sha256": sha256_file(file)}  # fmt: skip
    entry["factors"] = {"file": f"{folder.name}/factors.csv", "sha256": sha256_file(folder / "factors.csv")}
    return entry


def generate(
    scenario: Scenario,
    out: Path,
    *,
    seed: int = 0,
    force: bool = False,
    chunk: int = 256,
    progress: Progress | None = None,
) -> Path:
    """Render every split of a scenario to a dataset folder (DESIGN §4).

    Args:
        scenario: a resolved scenario (``scenarios.resolve`` applied).
        out: the dataset folder to create.
        seed: dataset seed; with the scenario it determines every byte written.
        force: replace an existing ``out`` once the new dataset is complete.
        chunk: samples rendered and written per step (bounds memory).
        progress: optional callable receiving the number of samples just written.

    Returns:
        ``out``.

    Raises:
        DatasetError: ``out`` exists and ``force`` is false, or ``chunk`` < 1.
    """
    if chunk < 1:
        raise DatasetError(f"chunk must be >= 1, got {chunk}")
    out = Path(out)
    size, dim = int(scenario.image.size), int(scenario.image.dim)
    with staged(out, force=force) as tmp:
        splits = {}
        for name in scenario.splits:
            frame = sample_split(scenario, name, seed)
            splits[name] = _write_split(tmp / name, frame, size, dim, chunk, progress)
        manifest = {
            "format": FORMAT,
            "nodulab_version": __version__,
            "rng_scheme": RNG_SCHEME,
            "seed": int(seed),
            "image": {"dim": dim, "size": size, "pixel_mm": float(scenario.image.pixel_mm)},
            "scenario": scenario_to_dict(scenario),
            "splits": splits,
        }
        (tmp / MANIFEST).write_text(dump_json(manifest), encoding="utf-8")
    return out


# ----------------------------------------------------------------------------- load
def load_manifest(root: Path) -> dict[str, Any]:
    """Read ``dataset.json`` of a dataset folder.

    Raises:
        DatasetError: the folder or its manifest is missing or unreadable.
    """
    path = Path(root) / MANIFEST
    if not Path(root).is_dir():
        raise DatasetError(f"DIR {root} does not exist")
    if not path.is_file():
        raise DatasetError(f"DIR {root} is not a nodulab dataset ({MANIFEST} missing)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DatasetError(f"{path}: format is not {FORMAT}")
    return manifest


def load_split(root: Path, split: str) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """Open one split read-only.

    Returns:
        ``(images, masks, factors)``: int16 and uint8 memory maps, and the factor table.
    """
    manifest = load_manifest(root)
    if split not in manifest["splits"]:
        raise DatasetError(f"split {split!r} not in dataset (have {', '.join(manifest['splits'])})")
    folder = Path(root) / split
    images = np.load(folder / "images.npy", mmap_mode="r")
    masks = np.load(folder / "masks.npy", mmap_mode="r")
    return images, masks, read_factors(folder / "factors.csv")


# ----------------------------------------------------------------------------- torch
def hu_to_input(hu: torch.Tensor) -> torch.Tensor:
    """Network input scaling (DESIGN §5): HU / 1000, linear, no clipping.

    Args:
        hu: float tensor of HU values, any shape.

    Returns:
        The scaled tensor (same shape).
    """
    return hu / 1000.0


def lung_window(hu: Any, level: float = -600.0, width: float = 1500.0) -> Any:
    """Display window: HU to [0, 1]. For display only: it merges calcified and solid.

    Args:
        hu: numpy array or torch tensor of HU values.
        level, width: window level and width in HU (default lung window WL -600, WW 1500).

    Returns:
        Floats in [0, 1], same shape and array type.
    """
    return ((hu - (level - width / 2.0)) / width).clip(0.0, 1.0)


class NoduleDataset(torch.utils.data.Dataset):
    """One split of a dataset folder, memory-mapped.

    Items are ``dict(image=float32 1×H×W or 1×D×H×W, label=int64 scalar, index=int)``, plus
    ``mask`` (uint8, same shape) when ``with_mask``. The arrays are opened lazily in each
    process, so DataLoader workers never copy them through pickling.

    Args:
        root: dataset folder. split: split name.
        transform: applied to the 1×… float32 HU tensor (default ``hu_to_input``).
        with_mask: also return the region mask.
    """

    def __init__(
        self,
        root: Path,
        split: str,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = hu_to_input,
        with_mask: bool = False,
    ) -> None:
        _, _, self.factors = load_split(root, split)
        self.folder = Path(root) / split
        self.split = split
        self.transform = transform
        self.with_mask = with_mask
        self.labels = self.factors["label"].to_numpy(dtype=np.int64)
        self._arrays: tuple[np.ndarray, np.ndarray] | None = None

    def _open(self) -> tuple[np.ndarray, np.ndarray]:
        if self._arrays is None:
            self._arrays = (np.load(self.folder / "images.npy", mmap_mode="r"),
                            np.load(self.folder / "masks.npy", mmap_mode="r"))  # fmt: skip
        return self._arrays

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_arrays": None}

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        images, masks = self._open()
        image = torch.from_numpy(np.asarray(images[i], dtype=np.float32))[None]
        item = {
            "image": self.transform(image) if self.transform is not None else image,
            "label": torch.tensor(self.labels[i], dtype=torch.int64),
            "index": int(i),
        }
        if self.with_mask:
            item["mask"] = torch.from_numpy(np.array(masks[i]))[None]
        return item
