"""A small real-kind dataset written directly (no DICOM): for the commands that read one.

Each row is a disc (2D) or ball (3D) of body HU on -860 HU parenchyma with noise, centred at
``(size - 1) / 2``; its mask is the disc; spiculated rows (rating >= 4) get a few thin strands
outside the mask, so a model trained on synthetic spiculation has something to find. The
dataset is what ``nodulab import-lidc`` writes (``dataset.json`` kind ``real``, ``REAL_COLUMNS``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from nodulab import __version__
from nodulab.data.dataset import FORMAT, MANIFEST, REAL, REAL_COLUMNS, dump_json, split_entry, staged, write_factors
from nodulab.synth import lidc

SPLITS = ("train", "val", "test_lidc")


def _row(rng: np.random.Generator, patient: int, nodule: int, label: int) -> dict:
    ratings = {f"lidc_{name}": float(rng.integers(lo, hi + 1)) for name, (lo, hi) in lidc.RATINGS.items()}
    ratings["lidc_malignancy"] = float(rng.choice([4, 5]) if label else rng.choice([1, 2]))
    ratings["lidc_spiculation"] = float(rng.choice([4, 5]) if rng.random() < (0.7 if label else 0.2) else 1)
    ratings["lidc_texture"] = 5.0
    return {
        "label": label,
        "patient": patient,
        "nodule": nodule,
        "annotation_id": nodule,
        "n_readers": 3,
        "series": 0,
        **ratings,
        "diameter_mm": 0.0,
        "pixel_mm": 0.0,
        "slice_mm": 1.25,
        "attenuation": "solid",
        "offset_x_mm": 0.0,
        "offset_y_mm": 0.0,
        "offset_z_mm": 0.0,
        "padded": 0,
    }


def _draw(rng: np.random.Generator, row: dict, size: int, dim: int, pixel_mm: float) -> tuple[np.ndarray, np.ndarray]:
    axes = np.meshgrid(*[(np.arange(size) - (size - 1) / 2) * pixel_mm] * dim, indexing="ij")
    radius = float(rng.uniform(3.0, 7.0))
    inside = sum(a**2 for a in axes) <= radius**2
    image = np.full((size,) * dim, -860.0) + rng.normal(0, 20, (size,) * dim)
    image[inside] = 30.0 + rng.normal(0, 20, int(inside.sum()))
    if row["lidc_spiculation"] >= 4:
        for angle in rng.uniform(0, 2 * np.pi, 8):
            for t in np.linspace(radius, radius + 6, 24):
                px = [int(round((size - 1) / 2 + t * f / pixel_mm)) for f in (np.sin(angle), np.cos(angle))]
                index = ((size - 1) // 2,) * (dim - 2) + tuple(px)
                if all(0 <= i < size for i in index):
                    image[index] = 0.0
    row["diameter_mm"] = float(2 * np.sqrt(inside.reshape(-1, size, size).max(axis=0).sum() / np.pi) * pixel_mm)
    row["pixel_mm"] = pixel_mm
    return np.rint(image).clip(-1024, 3071).astype(np.int16), inside.astype(np.uint8)


def make_real_dataset(
    root: Path, *, n: int = 24, dim: int = 2, size: int = 32, pixel_mm: float = 0.7, seed: int = 0
) -> Path:
    """Write a real-kind dataset with ``n`` rows per split (half of them malignant) at ``root``."""
    rng = np.random.default_rng(seed)
    with staged(Path(root), owner=MANIFEST) as tmp:
        entries, series = {}, []
        for s, split in enumerate(SPLITS):
            rows, images, masks = [], [], []
            for i in range(n):
                row = _row(rng, patient=100 * s + i // 2, nodule=1000 * s + i, label=i % 2)
                image, mask = _draw(rng, row, size, dim, pixel_mm)
                rows.append(row)
                images.append(image)
                masks.append(mask)
            frame = pd.DataFrame(rows, columns=[c for c in REAL_COLUMNS if c != "index"])
            (tmp / split).mkdir()
            np.save(tmp / split / "images.npy", np.stack(images))
            np.save(tmp / split / "masks.npy", np.stack(masks))
            write_factors(frame, tmp / split / "factors.csv")
            entries[split] = split_entry(tmp / split, frame, (n, *images[0].shape))
            series.append({"uid": f"1.2.3.{s}", "patient": 100 * s, "slices": 40, "rows": n})
        manifest = {
            "format": FORMAT,
            "kind": REAL,
            "nodulab_version": __version__,
            "image": {"dim": dim, "size": size, "pixel_mm": pixel_mm},
            "real": {
                "source": "LIDC-IDRI",
                "citation": lidc.CITATION,
                "tables": {},
                "readers": "consensus",
                "series": series,
                "skipped": [],
                "padded": 0,
                "left_out": {},
            },
            "splits": entries,
        }
        (tmp / MANIFEST).write_text(dump_json(manifest), encoding="utf-8")
    return Path(root)
