"""Copies of a dataset for other tools: MedMNIST-style ``.npz``, NIfTI volumes, PNG images.

Images are lung-windowed to 8 bits for ``medmnist`` and ``png``; NIfTI keeps int16 HU and the true
spacing. Every writer works in a temporary sibling and renames it into place.
"""

from __future__ import annotations

import gzip
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from nodulab.common.choices import EXPORT_FORMATS
from nodulab.common.progress import Progress, counter
from nodulab.data.dataset import DatasetError, check_out, load_manifest, load_split, lung_window, staged


def to_uint8(hu: np.ndarray) -> np.ndarray:
    """Lung-windowed (WL -600, WW 1500) 8-bit display values of HU arrays."""
    return np.rint(lung_window(hu.astype(np.float32)) * 255.0).astype(np.uint8)


def _central_slice(image: np.ndarray) -> np.ndarray:
    return image[image.shape[0] // 2] if image.ndim == 3 else image


def _export_medmnist(root: Path, manifest: dict[str, Any], target: Path, advance: Callable[[int], None]) -> None:
    arrays: dict[str, np.ndarray] = {}
    for split in manifest["splits"]:
        images, _, frame = load_split(root, split)
        windowed = np.empty(images.shape, dtype=np.uint8)
        for start in range(0, len(images), 1024):
            windowed[start : start + 1024] = to_uint8(images[start : start + 1024])
            advance(len(images[start : start + 1024]))
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


def _export_files(root: Path, manifest: dict[str, Any], target: Path, advance: Callable[[int], None], fmt: str) -> None:
    """One file per sample (NIfTI or PNG) under ``target/<split>/``, plus ``labels.csv``."""
    from PIL import Image  # Pillow ships with matplotlib

    rows = []
    for split in manifest["splits"]:
        images, _, frame = load_split(root, split)
        spacing = frame["pixel_mm"].to_numpy(dtype=np.float64)
        folder = target / split
        if folder.resolve().parent != target.resolve():  # split names are checked; never write elsewhere
            raise DatasetError(f"split {split!r} would be written outside --out")
        folder.mkdir()
        for i in range(len(images)):
            rel = f"{split}/{i:06d}." + ("nii.gz" if fmt == "nifti" else "png")
            if fmt == "nifti":
                (target / rel).write_bytes(_nifti_bytes(np.asarray(images[i]), float(spacing[i])))
            else:
                Image.fromarray(to_uint8(_central_slice(np.asarray(images[i])))).save(target / rel)
            rows.append({"split": split, "index": i, "file": rel, "label": int(frame["label"].iloc[i])})
            advance(1)
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
        progress: ``(stage, done, total)``: samples exported so far.

    Returns:
        ``out``.
    """
    if fmt not in EXPORT_FORMATS:
        raise DatasetError(f"--format must be one of {', '.join(EXPORT_FORMATS)}, got {fmt!r}")
    out = Path(out)
    check_out(out, [root])
    manifest = load_manifest(root)
    advance = counter(progress, f"exporting {fmt}", sum(int(e["n"]) for e in manifest["splits"].values()))
    with staged(out, force=force, is_file=fmt == "medmnist", owner="labels.csv") as tmp:
        if fmt == "medmnist":
            _export_medmnist(root, manifest, tmp / out.name, advance)
        else:
            _export_files(root, manifest, tmp, advance, fmt)
    return out
