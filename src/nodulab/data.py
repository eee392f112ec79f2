"""The dataset on disk (DESIGN §4): generate, load, re-check, serve to torch.

Layout of a dataset folder::

    DIR/dataset.json            manifest: resolved scenario, seed, versions, shapes, sha256, cells
    DIR/<split>/images.npy      int16 HU, N×H×W or N×D×H×W (memory-mappable)
    DIR/<split>/masks.npy       uint8 region map (0 bg, 1 body, 2 spicules, 3 vessels)
    DIR/<split>/factors.csv     ``index`` + the §2 columns; floats as ``repr`` (exact round trip)

Every writer works in a temporary sibling folder and renames it into place when complete, so a
reader never sees half a dataset and a failed run leaves nothing behind. The manifest holds no
timestamps and no absolute paths: the same scenario and seed give the same bytes.
``validate`` re-measures what was written (Morpho-MNIST habit); ``export`` writes MedMNIST-style
``.npz``, NIfTI and PNG copies.
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from nodulab import __version__
from nodulab.render import RNG_SCHEME, render
from nodulab.scenarios import Scenario, load_scenario_dict, sample_split, scenario_to_dict

MANIFEST = "dataset.json"
FORMAT = "nodulab-dataset/1"
ARRAYS = {"images": np.int16, "masks": np.uint8}

Progress = Callable[[int], Any]


class DatasetError(ValueError):
    """A dataset folder is missing, malformed, or would be overwritten without ``force``."""


# ----------------------------------------------------------------------------- atomic writes
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


def _float_text(value: float) -> str:
    return repr(float(value))  # shortest text that reads back to the same float64


def write_factors(frame: pd.DataFrame, path: Path) -> None:
    """Write a factor table with an ``index`` column; floats read back bit for bit."""
    table = frame.reset_index(drop=True)
    table.insert(0, "index", np.arange(len(table), dtype=np.int64))
    table.to_csv(path, index=False, float_format=_float_text, lineterminator="\n")


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


# ----------------------------------------------------------------------------- validate
@dataclass(frozen=True)
class Check:
    """One validation result."""

    name: str
    ok: bool
    detail: str


@dataclass
class ValidationReport:
    """All checks of ``validate``; ``ok`` when every check passed."""

    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def add(self, name: str, ok: bool, detail: str) -> None:
        self.checks.append(Check(name, bool(ok), detail))


def binomial_interval(n: int, p: float, level: float = 0.99) -> tuple[int, int]:
    """Exact central acceptance region ``[lo, hi]`` of Binomial(n, p).

    Computed from the log-space pmf (no scipy): ``P(X < lo) <= a/2`` and ``P(X > hi) <= a/2``
    with ``a = 1 - level``, each bound as tight as the discrete distribution allows.

    Returns:
        ``(lo, hi)`` success counts.
    """
    if n == 0 or p <= 0.0:
        return 0, 0
    if p >= 1.0:
        return n, n
    k = np.arange(n + 1, dtype=np.float64)
    log_comb = np.concatenate([[0.0], np.cumsum(np.log(n - k[1:] + 1.0) - np.log(k[1:]))])
    log_pmf = log_comb + k * math.log(p) + (n - k) * math.log1p(-p)
    pmf = np.exp(log_pmf - log_pmf.max())
    pmf /= pmf.sum()
    tail = (1.0 - level) / 2.0
    at_most = np.cumsum(pmf)  # P(X <= k)
    at_least = np.cumsum(pmf[::-1])  # P(X >= n - j)
    return int(np.argmax(at_most > tail)), int(n - np.argmax(at_least > tail))


def measured_diameter_mm(masks: np.ndarray, pixel_mm: np.ndarray) -> np.ndarray:
    """Equivalent diameter of each sample's body region (mask == 1).

    2D: ``2·sqrt(area/π)``; 3D: ``(6V/π)^(1/3)``, in mm. Reads the masks in bounded chunks.
    """
    dim = masks.ndim - 1
    step = max(1, (1 << 24) // max(1, int(np.prod(masks.shape[1:]))))
    counts = []
    for start in range(0, len(masks), step):
        block = np.asarray(masks[start : start + step])
        counts.append(np.count_nonzero(block.reshape(len(block), -1) == 1, axis=1))
    voxels = np.concatenate(counts) if counts else np.zeros(0)
    measure = voxels * np.asarray(pixel_mm, dtype=np.float64) ** dim
    return 2.0 * np.sqrt(measure / math.pi) if dim == 2 else np.cbrt(6.0 * measure / math.pi)


def _agreement(split: Any, factor: str) -> float:
    value = split.agreement
    return float(value[factor] if isinstance(value, Mapping) else value)


def _check_files(report: ValidationReport, root: Path, split: str, entry: dict[str, Any]) -> bool:
    """Re-hash every file of a split; return whether all of them exist."""
    present = True
    for key in (*ARRAYS, "factors"):
        rel, expected = entry[key]["file"], entry[key]["sha256"]
        if not (Path(root) / rel).is_file():
            report.add(f"{split}: sha256 {rel}", False, "file missing")
            present = False
            continue
        digest = sha256_file(Path(root) / rel)
        detail = "matches manifest" if digest == expected else f"{digest[:12]}… ≠ {expected[:12]}…"
        report.add(f"{split}: sha256 {rel}", digest == expected, detail)
    return present


def _check_rerender(
    report: ValidationReport,
    split: str,
    stored: tuple[np.ndarray, np.ndarray],
    frame: pd.DataFrame,
    image: dict[str, Any],
    n_rerender: int,
) -> None:
    """Render evenly spaced rows (first and last included) again; compare bytes."""
    idx = np.unique(np.linspace(0, len(frame) - 1, min(len(frame), n_rerender)).round().astype(int))
    if len(idx) == 0:
        return
    images, masks = render(frame.iloc[idx], size=image["size"], dim=image["dim"])
    bad = [int(i) for j, i in enumerate(idx)
           if not (np.array_equal(images[j], stored[0][i]) and np.array_equal(masks[j], stored[1][i]))]
    report.add(f"{split}: re-render", not bad,
               f"{len(idx)} rows byte-identical" if not bad else f"rows differ: {bad[:8]}")  # fmt: skip


def _check_labels(report: ValidationReport, split: str, frame: pd.DataFrame, spec: Any) -> None:
    n, malignant = len(frame), int((frame["label"] == 1).sum())
    rate = getattr(spec, "malignant_rate", None)
    if rate is None:
        ok = malignant == n - n // 2 and int((frame["label"] == 0).sum()) == n // 2
        report.add(f"{split}: label balance", ok, f"{n - malignant} benign / {malignant} malignant "
                   f"(stratified: {n // 2} / {n - n // 2})")  # fmt: skip
        return
    lo, hi = binomial_interval(n, float(rate))
    report.add(f"{split}: malignant rate", lo <= malignant <= hi,
               f"{malignant}/{n} malignant; 99% exact binomial range [{lo}, {hi}] for p={rate:g}")


def _check_agreement(report: ValidationReport, split: str, frame: pd.DataFrame, spec: Any) -> None:
    for column in cell_columns(frame):
        factor = column.removeprefix("agrees_")
        p, n, k = _agreement(spec, factor), len(frame), int(frame[column].sum())
        lo, hi = binomial_interval(n, p)
        report.add(f"{split}: agreement {factor}", lo <= k <= hi,
                   f"{k}/{n} agree; 99% exact binomial range [{lo}, {hi}] for p={p:g}")


def _check_diameter(report: ValidationReport, split: str, masks: np.ndarray, frame: pd.DataFrame) -> None:
    requested = frame["diameter_mm"].to_numpy(dtype=np.float64)
    keep = requested >= 6.0
    if not keep.any():
        report.add(f"{split}: diameter", True, "no sample with diameter >= 6 mm")
        return
    measured = measured_diameter_mm(masks, frame["pixel_mm"].to_numpy(dtype=np.float64))
    error = float(np.median(np.abs(measured[keep] - requested[keep]) / requested[keep]))
    detail = f"median relative error {error:.1%} over {int(keep.sum())} samples >= 6 mm (limit 10%)"
    report.add(f"{split}: diameter", error <= 0.10, detail)


def _check_cells(report: ValidationReport, split: str, frame: pd.DataFrame, entry: dict[str, Any]) -> None:
    ok = cell_counts(frame) == entry["cells"] and len(frame) == entry["n"]
    report.add(f"{split}: cell counts", ok, f"factors.csv {'matches' if ok else 'differs from'} manifest")


def validate(root: Path, *, n_rerender: int = 16) -> ValidationReport:
    """Re-check a dataset folder against its manifest and its scenario.

    Per split: sha256 of every file; byte-identical re-render of ``n_rerender`` evenly spaced
    rows; label balance (exact stratification, or a 99% exact binomial range for
    ``malignant_rate``); each confound's agreement inside its 99% exact binomial range; the
    median relative error of the measured body diameter (samples >= 6 mm) at most 10%.

    Args:
        root: dataset folder.
        n_rerender: rows re-rendered per split (0 skips the re-render).

    Returns:
        A ``ValidationReport``.

    Raises:
        DatasetError: ``root`` is not a dataset folder.
    """
    manifest = load_manifest(root)
    scenario = load_scenario_dict(manifest["scenario"])
    report = ValidationReport()
    scheme = manifest.get("rng_scheme")
    report.add("rng scheme", scheme == RNG_SCHEME, f"dataset {scheme}, installed {RNG_SCHEME}")
    for split, entry in manifest["splits"].items():
        if not _check_files(report, root, split, entry):
            continue
        images, masks, frame = load_split(root, split)
        expected = entry["images"]["shape"]
        shape_ok = list(images.shape) == expected == list(masks.shape) and len(frame) == expected[0]
        report.add(f"{split}: shapes", shape_ok, f"images {tuple(images.shape)}, {len(frame)} factor rows")
        if not shape_ok:
            continue
        _check_cells(report, split, frame, entry)
        _check_rerender(report, split, (images, masks), frame, manifest["image"], n_rerender)
        _check_labels(report, split, frame, scenario.splits[split])
        _check_agreement(report, split, frame, scenario.splits[split])
        _check_diameter(report, split, masks, frame)
    return report


# ----------------------------------------------------------------------------- export
EXPORT_FORMATS = ("medmnist", "nifti", "png")


def to_uint8(hu: np.ndarray) -> np.ndarray:
    """Lung-windowed (WL -600, WW 1500) 8-bit display values of HU arrays."""
    return np.rint(lung_window(hu.astype(np.float32)) * 255.0).astype(np.uint8)


def _central_slice(image: np.ndarray) -> np.ndarray:
    return image[image.shape[0] // 2] if image.ndim == 3 else image


def _export_medmnist(root: Path, manifest: dict[str, Any], target: Path, progress: Progress | None) -> None:
    arrays: dict[str, np.ndarray] = {}
    for split in manifest["splits"]:
        images, _, frame = load_split(root, split)
        windowed = np.empty(images.shape, dtype=np.uint8)
        for start in range(0, len(images), 1024):
            windowed[start : start + 1024] = to_uint8(images[start : start + 1024])
            if progress is not None:
                progress(len(images[start : start + 1024]))
        arrays[f"{split}_images"] = windowed
        arrays[f"{split}_labels"] = frame["label"].to_numpy(dtype=np.uint8)[:, None]
    with open(target, "wb") as f:
        np.savez_compressed(f, **arrays)


def _nifti_bytes(image: np.ndarray, pixel_mm: float) -> bytes:
    """Gzipped NIfTI-1 of one sample; array axes (z, y, x) become voxel axes (i=x, j=y, k=z)."""
    import nibabel as nib  # imported here: only exports need it

    volume = image[None] if image.ndim == 2 else image
    nifti = nib.Nifti1Image(np.ascontiguousarray(volume.transpose(2, 1, 0)), np.diag([pixel_mm] * 3 + [1.0]))
    nifti.header.set_xyzt_units("mm")
    nifti.set_qform(nifti.affine, code=1)
    nifti.set_sform(nifti.affine, code=1)
    return gzip.compress(nifti.to_bytes(), mtime=0)  # mtime 0: same sample, same bytes


def _export_files(
    root: Path, manifest: dict[str, Any], target: Path, progress: Progress | None, fmt: str
) -> None:
    """One file per sample (NIfTI or PNG) under ``target/<split>/``, plus ``labels.csv``."""
    from PIL import Image  # Pillow ships with matplotlib

    rows = []
    for split in manifest["splits"]:
        images, _, frame = load_split(root, split)
        spacing = frame["pixel_mm"].to_numpy(dtype=np.float64)
        (target / split).mkdir()
        for i in range(len(images)):
            rel = f"{split}/{i:06d}." + ("nii.gz" if fmt == "nifti" else "png")
            if fmt == "nifti":
                (target / rel).write_bytes(_nifti_bytes(np.asarray(images[i]), float(spacing[i])))
            else:
                Image.fromarray(to_uint8(_central_slice(np.asarray(images[i])))).save(target / rel)
            rows.append({"split": split, "index": i, "file": rel, "label": int(frame["label"].iloc[i])})
            if progress is not None:
                progress(1)
    pd.DataFrame(rows, columns=["split", "index", "file", "label"]).to_csv(
        target / "labels.csv", index=False, lineterminator="\n"
    )


def export(root: Path, fmt: str, out: Path, *, force: bool = False, progress: Progress | None = None) -> Path:
    """Export a dataset for other tools.

    Args:
        root: dataset folder.
        fmt: ``medmnist`` (one ``.npz``: ``<split>_images`` uint8 lung-windowed N×H×W or
            N×D×H×W, ``<split>_labels`` uint8 N×1), ``nifti`` (``<split>/<index>.nii.gz`` int16 HU
            with the pixel spacing, 2D as one slice, plus ``labels.csv``) or ``png``
            (``<split>/<index>.png`` lung-windowed 8-bit, central axial slice in 3D, plus
            ``labels.csv``).
        out: the file (medmnist) or folder to create, atomically.
        force: replace an existing ``out``.
        progress: optional callable receiving the number of samples just exported.

    Returns:
        ``out``.
    """
    if fmt not in EXPORT_FORMATS:
        raise DatasetError(f"--format must be one of {', '.join(EXPORT_FORMATS)}, got {fmt!r}")
    manifest = load_manifest(root)
    out = Path(out)
    with staged(out, force=force, is_file=fmt == "medmnist") as tmp:
        if fmt == "medmnist":
            _export_medmnist(root, manifest, tmp / out.name, progress)
        else:
            _export_files(root, manifest, tmp, progress, fmt)
    return out
