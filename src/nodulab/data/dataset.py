"""The dataset on disk (design.md "Dataset on disk"): generate, load, re-check, serve to torch.

Layout of a dataset folder::

    DIR/dataset.json            manifest: resolved scenario, seed, versions, shapes, sha256, cells
    DIR/<split>/images.npy      int16 HU, N×H×W or N×D×H×W (memory-mappable)
    DIR/<split>/masks.npy       uint8 region map (0 bg, 1 body, 2 spicules, 3 vessels)
    DIR/<split>/factors.csv     ``index`` + the §2 columns; floats as ``repr`` (exact round trip)

Every writer works in a temporary sibling folder and renames it into place when complete, so a
reader never sees half a dataset and a failed run leaves nothing behind. The manifest holds no
timestamps and no absolute paths: the same scenario and seed give the same bytes.
How every output is written safely lives in ``nodulab.common.writing``; re-measuring what was written in
``nodulab.data.validate``; MedMNIST-style, NIfTI and PNG copies
in ``nodulab.data.export``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from nodulab import __version__
from nodulab.common.choices import MAX_N
from nodulab.common.progress import Progress, counter
from nodulab.common.tables import float_text
from nodulab.common.writing import (  # noqa: F401 - re-exported: every writer in nodulab imports them from here
    DatasetError,
    OutExists,
    check_out,
    follow_umask,
    fsync_file,
    is_inside,
    remove_stale_scratch,
    rename_no_replace,
    staged,
    write_atomically,
)
from nodulab.synth.factors import FACTOR_COLUMNS, FACTORS
from nodulab.synth.lidc import RATINGS
from nodulab.synth.renderer import render
from nodulab.synth.rng import RNG_SCHEME
from nodulab.synth.sampling import sample_split
from nodulab.synth.scenario import MAX_SIZE, MIN_SIZE, SPLIT_NAME_RULE, Scenario, is_split_name
from nodulab.synth.scenarios import scenario_to_dict

MANIFEST = "dataset.json"
FORMAT = "nodulab-dataset/1"
ARRAYS = {"images": np.int16, "masks": np.uint8}
REAL = "real"
"""``kind`` of a dataset of real CT patches (``nodulab import-lidc``); a synthetic manifest has no ``kind``."""
REAL_COLUMNS = (
    "index",
    "label",
    "patient",
    "nodule",
    "annotation_id",
    "n_readers",
    "series",
    *(f"lidc_{name}" for name in RATINGS),
    "diameter_mm",
    "pixel_mm",
    "slice_mm",
    "attenuation",
    "offset_x_mm",
    "offset_y_mm",
    "offset_z_mm",
    "padded",
)
"""The columns of a real dataset's ``factors.csv``, in order (design.md "Real nodules")."""


def is_complete(out: Path | str, *, dataset: bool = False) -> bool:
    """Whether a ``staged`` output is in place (outputs appear by one rename, whole or not at all).

    Args:
        out: the output path.
        dataset: ``out`` is a dataset folder, complete when its manifest (written last) is there.
    """
    out = Path(out)
    return (out / MANIFEST).is_file() if dataset else out.is_file() or out.is_dir()


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


def is_real(manifest: dict[str, Any]) -> bool:
    """Whether a (checked) manifest describes real CT patches rather than a synthetic dataset."""
    return manifest.get("kind") == REAL


# ----------------------------------------------------------------------------- generate
class _ArrayFile:
    """An ``.npy`` file written front to back with plain writes (no memory map).

    A full disk then raises ``OSError(ENOSPC)`` at the write, where a writable memory map would
    die with SIGBUS. The bytes are those of ``np.lib.format.open_memmap``: a version 1.0 header,
    then the C-order body.
    """

    def __init__(self, path: Path, dtype: type, shape: tuple[int, ...]) -> None:
        self.path, self.dtype, self.shape = path, np.dtype(dtype), shape
        self.file = open(path, "xb")
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": shape}
        np.lib.format.write_array_header_1_0(self.file, header)
        self.rows = 0

    def append(self, block: np.ndarray) -> None:
        block = np.ascontiguousarray(block, dtype=self.dtype)
        self.file.write(block.tobytes())
        self.rows += len(block)

    def close(self) -> None:
        """Flush, fsync and close; the row count must match the header."""
        try:
            if self.rows != self.shape[0]:
                raise DatasetError(f"{self.path.name}: wrote {self.rows} rows, header says {self.shape[0]}")
            self.file.flush()
            os.fsync(self.file.fileno())
        finally:
            self.file.close()


def _write_split(
    folder: Path, frame: pd.DataFrame, size: int, dim: int, chunk: int, advance: Callable[[int], None]
) -> dict[str, Any]:
    """Render one split chunk by chunk into ``folder``; return its manifest entry."""
    folder.mkdir()
    shape = (len(frame),) + (size,) * dim
    files = {name: _ArrayFile(folder / f"{name}.npy", dtype, shape) for name, dtype in ARRAYS.items()}
    try:
        for start in range(0, len(frame), chunk):
            images, masks = render(frame.iloc[start : start + chunk], size=size, dim=dim)
            files["images"].append(images)
            files["masks"].append(masks)
            advance(len(images))
        for file in files.values():
            file.close()
    except BaseException:
        for file in files.values():
            file.file.close()  # release the handles; staged removes the folder
        raise
    write_factors(frame, folder / "factors.csv")
    return split_entry(folder, frame, shape)


def split_entry(folder: Path, frame: pd.DataFrame, shape: tuple[int, ...]) -> dict[str, Any]:
    """A written split's manifest entry: its row count, cells, and each file's name, shape and sha256."""
    entry: dict[str, Any] = {"n": len(frame), "cells": cell_counts(frame)}
    for name, dtype in ARRAYS.items():
        file = folder / f"{name}.npy"
        entry[name] = {
            "file": f"{folder.name}/{file.name}",
            "shape": list(shape),
            "dtype": np.dtype(dtype).name,
            "sha256": sha256_file(file),
        }
    entry["factors"] = {"file": f"{folder.name}/factors.csv", "sha256": sha256_file(folder / "factors.csv")}
    return entry


FACTOR_BYTES_PER_ROW = 400
"""Generous size of one ``factors.csv`` row, for the free-space check."""


def bytes_needed(scenario: Scenario) -> int:
    """Bytes a dataset of ``scenario`` takes on disk (arrays exactly, factor tables roughly)."""
    pixels = int(scenario.image.size) ** int(scenario.image.dim)
    itemsize = sum(np.dtype(t).itemsize for t in ARRAYS.values())
    return sum(int(split.n) * (pixels * itemsize + FACTOR_BYTES_PER_ROW) for split in scenario.splits.values())


def check_free_space(out: Path, needed: int, what: str = "the dataset") -> None:
    """Refuse to start when the filesystem of ``out`` has less than ``needed`` bytes free.

    Raises:
        DatasetError: with both sizes in MiB.
    """
    existing = next(p for p in (Path(out).absolute(), *Path(out).absolute().parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if needed > free:
        raise DatasetError(
            f"--out {out}: {what} needs {math.ceil(needed / 2**20):,} MiB, only {free // 2**20:,} MiB free there"
        )


def generate(
    scenario: Scenario,
    out: Path,
    *,
    seed: int = 0,
    force: bool = False,
    chunk: int = 256,
    progress: Progress | None = None,
) -> Path:
    """Render every split of a scenario to a dataset folder (design.md "Dataset on disk").

    Args:
        scenario: a resolved scenario (``scenarios.resolve`` applied).
        out: the dataset folder to create.
        seed: dataset seed; with the scenario it determines every byte written.
        force: replace an existing ``out`` once the new dataset is complete.
        chunk: samples rendered and written per step (bounds memory).
        progress: ``(stage, done, total)``: samples written so far, over every split.

    Returns:
        ``out``.

    Raises:
        DatasetError: ``out`` exists and ``force`` is false (``OutExists``), ``out`` is the
            current folder or a parent of it, the disk lacks the space the arrays need, or
            ``chunk`` < 1.
    """
    if chunk < 1:
        raise DatasetError(f"chunk must be >= 1, got {chunk}")
    out = Path(out)
    size, dim = int(scenario.image.size), int(scenario.image.dim)
    check_free_space(out, bytes_needed(scenario))
    advance = counter(progress, f"rendering {scenario.name}", sum(int(s.n) for s in scenario.splits.values()))
    with staged(out, force=force, owner=MANIFEST) as tmp:
        splits = {}
        for name in scenario.splits:
            frame = sample_split(scenario, name, seed)
            splits[name] = _write_split(tmp / name, frame, size, dim, chunk, advance)
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
        fsync_file(tmp / MANIFEST)
    return out


# ----------------------------------------------------------------------------- load
def read_manifest(root: Path) -> dict[str, Any]:
    """Read ``dataset.json`` of a dataset folder, unchecked (see :func:`check_manifest`).

    Raises:
        DatasetError: the folder or its manifest is missing, unreadable, or not a JSON object.
    """
    path = Path(root) / MANIFEST
    if not Path(root).is_dir():
        raise DatasetError(f"DIR {root} does not exist")
    if not path.is_file():
        raise DatasetError(f"DIR {root} is not a nodulab dataset ({MANIFEST} missing)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise DatasetError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise DatasetError(f"{path}: not a JSON object")
    return manifest


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_entry(where: str, split: str, entry: object, image: dict[str, Any]) -> None:
    """One split's manifest entry: counts, and file names that are exactly ``<split>/<file>``."""
    if not isinstance(entry, dict):
        raise DatasetError(f"{where}: splits.{split} is not an object")
    n = entry.get("n")
    if not _is_int(n) or not 0 <= n <= MAX_N:
        raise DatasetError(f"{where}: splits.{split}.n must be an integer in 0..{MAX_N:,} (got {n!r})")
    expected_shape = [n] + [image["size"]] * image["dim"]
    for key, dtype in (*ARRAYS.items(), ("factors", None)):
        item = entry.get(key)
        if not isinstance(item, dict):
            raise DatasetError(f"{where}: splits.{split}.{key} is missing")
        name = f"{split}/{key}.npy" if dtype is not None else f"{split}/factors.csv"
        if item.get("file") != name:
            raise DatasetError(f"{where}: splits.{split}.{key}.file must be {name!r} (got {item.get('file')!r})")
        digest = item.get("sha256")
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise DatasetError(f"{where}: splits.{split}.{key}.sha256 is not a sha256 digest")
        if dtype is not None and (item.get("shape") != expected_shape or item.get("dtype") != np.dtype(dtype).name):
            raise DatasetError(
                f"{where}: splits.{split}.{key} must be {np.dtype(dtype).name} of shape "
                f"{expected_shape} (got {item.get('dtype')!r} {item.get('shape')!r})"
            )
    if not isinstance(entry.get("cells"), list):
        raise DatasetError(f"{where}: splits.{split}.cells is missing")


def check_manifest(manifest: dict[str, Any], where: str = MANIFEST) -> dict[str, Any]:
    """Check a manifest's structure before any path or number in it is used.

    Split names follow the scenario rule; every file named is exactly ``<split>/images.npy``,
    ``<split>/masks.npy`` or ``<split>/factors.csv``, so nothing in a manifest steers a path.

    Returns:
        ``manifest``.

    Raises:
        DatasetError: naming the first bad field.
    """
    if manifest.get("format") != FORMAT:
        raise DatasetError(f"{where}: format is not {FORMAT}")
    image = manifest.get("image")
    if not isinstance(image, dict) or image.get("dim") not in (2, 3) or not _is_int(image.get("dim")):
        raise DatasetError(f"{where}: image.dim must be 2 or 3")
    size, pixel_mm = image.get("size"), image.get("pixel_mm")
    if not _is_int(size) or not MIN_SIZE <= size <= MAX_SIZE[image["dim"]]:
        raise DatasetError(f"{where}: image.size must be an integer in {MIN_SIZE}..{MAX_SIZE[image['dim']]}")
    if not isinstance(pixel_mm, (int, float)) or isinstance(pixel_mm, bool) or not 0 < pixel_mm < math.inf:
        raise DatasetError(f"{where}: image.pixel_mm must be a positive number")
    kind = manifest.get("kind")
    if kind == REAL:
        if not isinstance(manifest.get("real"), dict):
            raise DatasetError(f"{where}: real is missing (a dataset of kind 'real')")
    elif kind is not None:
        raise DatasetError(f"{where}: kind must be {REAL!r} or absent (got {kind!r})")
    elif not isinstance(manifest.get("scenario"), dict):
        raise DatasetError(f"{where}: scenario is missing")
    splits = manifest.get("splits")
    if not isinstance(splits, dict) or not splits:
        raise DatasetError(f"{where}: splits is missing or empty")
    for split, entry in splits.items():
        if not is_split_name(split):
            raise DatasetError(f"{where}: split name {split!r} is not allowed ({SPLIT_NAME_RULE})")
        _check_entry(where, split, entry, image)
    return manifest


def load_manifest(root: Path) -> dict[str, Any]:
    """Read and check ``dataset.json`` of a dataset folder.

    Raises:
        DatasetError: the folder or its manifest is missing, unreadable or malformed.
    """
    return check_manifest(read_manifest(root), str(Path(root) / MANIFEST))


def _open_array(root: Path, split: str, name: str, dtype: type, shape: list[int]) -> np.ndarray:
    """Memory-map ``root/split/name.npy`` after checking its header and its exact length.

    Object arrays are never loaded (no pickle); a truncated or padded file is refused.
    """
    path = Path(root) / split / f"{name}.npy"
    where = f"{split}/{name}.npy"
    if not path.is_file() or not is_inside(root, path):
        raise DatasetError(f"{where}: missing, or not a regular file inside the dataset")
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = {
                (1, 0): np.lib.format.read_array_header_1_0,
                (2, 0): np.lib.format.read_array_header_2_0,
            }.get(version)
            if read_header is None:
                raise DatasetError(f"{where}: unsupported .npy version {version}")
            found_shape, fortran, found_dtype = read_header(f)
            offset = f.tell()
    except ValueError as e:  # bad magic, bad header, object dtype header ...
        raise DatasetError(f"{where}: not a readable .npy file ({' '.join(str(e).split())})") from None
    if found_dtype != np.dtype(dtype) or fortran or list(found_shape) != list(shape):
        raise DatasetError(
            f"{where}: holds {found_dtype} {list(found_shape)}"
            f"{' (Fortran order)' if fortran else ''}; the manifest says {np.dtype(dtype).name} {shape}"
        )
    expected = offset + math.prod(shape) * np.dtype(dtype).itemsize
    actual = path.stat().st_size
    if actual != expected:
        raise DatasetError(f"{where}: {actual} bytes, expected {expected} (truncated or corrupt)")
    if math.prod(shape) == 0:
        return np.zeros(shape, dtype=dtype)
    return np.load(path, mmap_mode="r", allow_pickle=False)


TWIN_RANGES = {
    **{f"lidc_{name}": scale for name, scale in RATINGS.items()},
    **dict.fromkeys(("lidc_annotation_id", "lidc_nuisance_id", "lidc_patient"), (0, 2**53)),
    "lidc_diameter_mm": (0.0, 1000.0),
}
"""Valid values of the twin columns a ``[source]`` scenario writes (``nodulab.synth.twins``)."""


def _refuse_first(frame: pd.DataFrame, column: str, bad: Any, where: str) -> None:
    """Raise ``DatasetError`` naming the first row of ``column`` where ``bad`` holds, if any."""
    if np.any(bad):
        row = int(np.flatnonzero(np.asarray(bad))[0])
        value = frame[column].iloc[row]
        value = value.item() if isinstance(value, np.generic) else value
        raise DatasetError(f"{where}: column {column!r}, row {row}: bad value {value!r}")


def check_real_factors(frame: pd.DataFrame, n: int, where: str) -> pd.DataFrame:
    """Check a real dataset's factor table: row count, exactly :data:`REAL_COLUMNS`, values on their scales.

    Ratings are the readers' (a consensus median may end in .5); ids are non-negative integers.

    Raises:
        DatasetError: naming the first bad column and row.
    """
    if len(frame) != n:
        raise DatasetError(f"{where}: {len(frame)} rows, the manifest says {n}")
    if tuple(frame.columns) != REAL_COLUMNS:
        missing = [c for c in REAL_COLUMNS if c not in frame.columns]
        extra = [c for c in frame.columns if c not in REAL_COLUMNS]
        raise DatasetError(
            f"{where}: the columns of a real dataset are {', '.join(REAL_COLUMNS)}"
            + (f" (missing {', '.join(missing)})" if missing else "")
            + (f" (unexpected {', '.join(map(str, extra))})" if extra else "")
        )
    integral = {"index", "label", "patient", "nodule", "annotation_id", "n_readers", "series", "padded"}
    for column in frame.columns:
        if column == "attenuation":
            bad = ~frame[column].isin(FACTORS["attenuation"].choices)
        else:
            values = pd.to_numeric(frame[column], errors="coerce").to_numpy(dtype=np.float64)
            bad = ~np.isfinite(values)
            if column in integral:
                bad |= values != np.round(values)
                bad |= values < 0
                if column in ("label", "padded"):
                    bad |= ~np.isin(values, (0, 1))
            elif column.startswith("lidc_"):
                lo, hi = RATINGS[column.removeprefix("lidc_")]
                bad |= (values < lo) | (values > hi) | (values * 2 != np.round(values * 2))
            elif column.startswith("offset_"):
                bad |= np.abs(values) > FACTORS[column].high
            else:
                bad |= (values <= 0) | (values > 1000.0)
        _refuse_first(frame, column, bad, where)
    if not np.array_equal(frame["index"].to_numpy(), np.arange(n)):
        raise DatasetError(f"{where}: column 'index' is not 0..{n - 1}")
    return frame


def check_factors(frame: pd.DataFrame, n: int, where: str) -> pd.DataFrame:
    """Check a factor table: row count, ``index``, required columns, values of the right kind.

    Returns:
        ``frame`` (unchanged).

    Raises:
        DatasetError: naming the first bad column and row.
    """
    if len(frame) != n:
        raise DatasetError(f"{where}: {len(frame)} rows, the manifest says {n}")
    missing = [c for c in ("index", *FACTOR_COLUMNS, "seed") if c not in frame.columns]
    if missing:
        raise DatasetError(f"{where}: required columns missing: {', '.join(missing)}")
    binary = ["label", *cell_columns(frame)]
    for column in frame.columns:
        factor = FACTORS.get(column)
        if factor is not None and not factor.numeric:
            bad = ~frame[column].isin(factor.choices)
        else:
            values = pd.to_numeric(frame[column], errors="coerce").to_numpy(dtype=np.float64)
            bad = ~np.isfinite(values)
            if column in binary:
                bad |= ~np.isin(values, (0, 1))
            elif factor is not None:
                bad |= (values < factor.low) | (values > factor.high)
            elif column in TWIN_RANGES:  # a twin's LIDC rating, id or diameter
                lo, hi = TWIN_RANGES[column]
                bad |= (values < lo) | (values > hi)
            integral = column in ("index", "seed") or (factor is not None and factor.kind == "int")
            if integral or (column in TWIN_RANGES and column != "lidc_diameter_mm"):
                bad |= np.isfinite(values) & (values != np.round(values))
        _refuse_first(frame, column, bad, where)
    if not np.array_equal(frame["index"].to_numpy(), np.arange(n)):
        raise DatasetError(f"{where}: column 'index' is not 0..{n - 1}")
    return frame


def load_split(root: Path, split: str) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """Open one split read-only, after checking it against its manifest.

    The one loader every command goes through: it checks the manifest, each array's dtype, shape
    and exact byte length (no pickle, no truncated file), and the factor table's row count,
    columns and values, so nothing trains or exports on a malformed dataset.

    Returns:
        ``(images, masks, factors)``: int16 and uint8 memory maps, and the factor table.

    Raises:
        DatasetError: with a one-line message naming the split, file and problem.
    """
    manifest = load_manifest(root)
    if split not in manifest["splits"]:
        raise DatasetError(f"split {split!r} not in dataset (have {', '.join(manifest['splits'])})")
    entry = manifest["splits"][split]
    images, masks = (_open_array(root, split, name, dtype, entry[name]["shape"]) for name, dtype in ARRAYS.items())
    path = Path(root) / split / "factors.csv"
    if not path.is_file() or not is_inside(root, path):
        raise DatasetError(f"{split}/factors.csv: missing, or not a regular file inside the dataset")
    try:
        frame = read_factors(path)
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise DatasetError(f"{split}/factors.csv: unreadable ({' '.join(str(e).split())})") from None
    check = check_real_factors if is_real(manifest) else check_factors
    return images, masks, check(frame, entry["n"], f"{split}/factors.csv")


# ----------------------------------------------------------------------------- torch
def hu_to_input(hu: torch.Tensor) -> torch.Tensor:
    """Network input scaling (design.md "Losses and training"): HU / 1000, linear, no clipping.

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
            self._arrays = (
                np.load(self.folder / "images.npy", mmap_mode="r"),
                np.load(self.folder / "masks.npy", mmap_mode="r"),
            )
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
