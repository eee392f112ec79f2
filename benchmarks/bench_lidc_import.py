"""Cost of `nodulab import-lidc` per series, against reading the series whole, in the same run.

A fabricated LIDC-sized CT series (512 x 512 pixels at 0.7 mm, 150 slices of 1.25 mm; files
shuffled; rescale slope 2, intercept -1024) with four sphere nodules, each outlined by three
readers, in the shipped table formats (``tests/lidc_fabricate.py``). Two ways, interleaved,
medians compared:

* nodulab: ``import_lidc`` end to end (scan the headers, check the series, read the slices the
  patches need, rasterise the outlines, resample, write the dataset), 2D 64 px patches and 3D
  64^3 volumes at 0.7 mm;
* peers: what any whole-volume loader does first (MONAI's ``LoadImage`` + ``Spacing`` would do
  more): ``pydicom.dcmread`` + ``pixel_array`` of every file, sorted by z, rescaled to HU (the
  ratios are against this one); then also resampled to 0.7 mm isotropic with
  ``scipy.ndimage.zoom`` (order 1).

    python benchmarks/bench_lidc_import.py [--repeats 3] [--slices 150]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import lidc_fabricate as fab  # noqa: E402
from nodulab.data import lidc_import  # noqa: E402

PIXEL_MM, SLICE_MM, SIZE_PX = 0.7, 1.25, 512


def fabricate(root: Path, tables: Path, slices: int) -> list[Path]:
    """One series with four nodules; returns its files."""
    rng = np.random.default_rng(0)
    origin = (-180.0, -200.0, -350.0)
    z = fab.default_z(slices, origin[2], SLICE_MM)
    volume = rng.normal(-860.0, 20.0, (slices, SIZE_PX, SIZE_PX)).round()
    centres = [
        (origin[0] + x * PIXEL_MM, origin[1] + y * PIXEL_MM, z[k])
        for x, y, k in ((150, 160, 40), (350, 200, 70), (260, 380, 100), (100, 400, 120))
    ]
    radius = 5.0
    zz, yy, xx = np.meshgrid(
        np.array(z),
        origin[1] + np.arange(SIZE_PX) * PIXEL_MM,
        origin[0] + np.arange(SIZE_PX) * PIXEL_MM,
        indexing="ij",
        sparse=True,
    )
    for cx, cy, cz in centres:
        volume[(xx - cx) ** 2 + (yy - cy) ** 2 + (zz - cz) ** 2 <= radius**2] = 30.0
    uid = "1.3.6.1.4.1.14519.5.2.1.6279.6001.99"
    series = fab.write_series(
        root / "a" / "b",
        volume,
        uid=uid,
        patient=1,
        pixel_mm=PIXEL_MM,
        slice_mm=SLICE_MM,
        z_positions=z,
        origin_xy=origin[:2],
    )
    ann_rows, con_rows, next_id = [], [], 1
    for centre in centres:
        ids = range(next_id, next_id + 3)
        for j, aid in enumerate(ids):
            con_rows += fab.sphere_contours(
                aid,
                next_id,
                1,
                1,
                uid,
                pixel_mm=PIXEL_MM,
                slice_mm=SLICE_MM,
                z_positions=z,
                origin_xy=origin[:2],
                centre_mm_xyz=centre,
                radius_mm=radius,
                jitter_px=0.3,
                jitter_angle=2 * np.pi * j / 3,
            )
            ann_rows.append(fab.annotation_row(aid, 1, 1, malignancy=5, spiculation=4))
        next_id += 3
    fab.write_tables(tables, ann_rows, con_rows)
    return list(series.files)


def read_all(files: list[Path]) -> np.ndarray:
    import pydicom

    slices = [pydicom.dcmread(f) for f in files]
    slices.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
    return np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in slices])


def peer(files: list[Path]) -> None:
    ndimage.zoom(read_all(files).astype(np.float32), (SLICE_MM / PIXEL_MM, 1.0, 1.0), order=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--slices", type=int, default=150)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = fabricate(tmp / "root", tmp / "tables", args.slices)
        runs = {
            "import-lidc 2D 64 px": lambda i: lidc_import.import_lidc(
                tmp / "root", tmp / f"o2-{i}", options=lidc_import.Options(dim=2), tables=tmp / "tables"
            ),
            "import-lidc 3D 64^3": lambda i: lidc_import.import_lidc(
                tmp / "root", tmp / f"o3-{i}", options=lidc_import.Options(dim=3), tables=tmp / "tables"
            ),
            "peer: read all slices": lambda i: read_all(files),
            "peer: read all + zoom": lambda i: peer(files),
        }
        times: dict[str, list[float]] = {name: [] for name in runs}
        for i in range(args.repeats):
            for name, fn in runs.items():
                start = time.perf_counter()
                fn(i)
                times[name].append(time.perf_counter() - start)
    base = statistics.median(times["peer: read all slices"])
    print(f"one series of {args.slices} slices of {SIZE_PX}^2, 4 nodules x 3 readers; median of {args.repeats}")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"{name:26s} {m:7.2f} s   {m / base:5.2f}x the peer")


if __name__ == "__main__":
    main()
