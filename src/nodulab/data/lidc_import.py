"""Real nodules: import LIDC-IDRI CT from the user's own copy as a nodulab dataset (design.md "Real nodules").

``nodulab import-lidc DICOM_ROOT --out DIR`` finds the series of the shipped contours table
(:data:`nodulab.synth.lidc.CONTOURS`) anywhere under ``DICOM_ROOT`` (matched by
SeriesInstanceUID, never by path), reads them with pydicom (the optional extra
``nodulab[dicom]``, imported here only), and writes one patch per nodule (``--readers
consensus``) or per reader annotation (``--readers each``):

* **HU**: stored value × RescaleSlope + RescaleIntercept of each slice (pydicom's
  ``pixel_array`` gives the stored values; the modality LUT is applied here, per slice). A
  series without both tags is skipped: it is not guessed. HU are clipped to [-1024, 3071]
  (values below, e.g. the -2000 or -3024 outside a scanner's field of view, become air).
* **Slice order** comes from ImagePositionPatient z, never from file names or InstanceNumber.
  Only axial series (ImageOrientationPatient 1,0,0,0,1,0) with one pixel grid and in-plane
  position are read. Spacing: every step between neighbouring slices within 1% of the median
  step, or exactly one step of two (a missing slice, interpolated across and recorded);
  anything else skips the series.
* **Resampling** to isotropic ``--pixel-mm``: trilinear interpolation (order 1, no anti-aliasing
  filter) in patient millimetres; in z between the slices actually present. The patch's centre
  pixel ``(size - 1) / 2`` per axis lies on the nodule's centre, like a synthetic nodule with
  zero offsets. Linear interpolation of a sharp edge blurs it by up to one source voxel; a
  sphere's mean HU and diameter come back within that (``tests/data/test_lidc_import.py``).
  2D patches are the axial plane through the centre. A sample outside the scan is -1024 HU
  (the row's ``padded`` = 1; counted).
* **Outlines**: each reader's contours are rasterised on the slice's pixel grid
  (:func:`nodulab.synth.lidc.contour_mask`: LIDC's points are the first voxel outside the
  nodule); the fraction of the nodule's readers that include a pixel is resampled like the image
  (between traced slices linearly, 0 beyond them) and the mask is 1 (body) where at least half
  of them do (``each``: the one reader). No spicule or vessel regions: 0 and 1 only.
* **Centre**: the centroid (mm) of the consensus region (≥ 50% of the readers) on the traced
  slices; the union's when no pixel reaches 50%. ``each``: that reader's outline.
* **Label**: the median of the readers' malignancy ratings (``each``: the reader's own):
  ≥ ``--malignant`` (default 4) → 1, ≤ ``--benign`` (default 2) → 0, in between left out and
  counted. The other ratings are medians too (they may end in .5).
* **Splits by patient**: ``test_lidc`` for the patients of :func:`nodulab.synth.twins.is_test_patient`
  (the same fixed hash as the ``[source]`` presets), ``val`` for about 20% of the rest (a second
  fixed hash), ``train`` for the others: no patient is on two sides.

A series that cannot be read (modality, tags, geometry, spacing, pixel data the installed
decoders cannot decode) is skipped and listed, one line each. Same inputs, same bytes.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from nodulab import __version__
from nodulab.common.progress import Progress, counter
from nodulab.common.tables import REAL_SPLITS
from nodulab.data import traced
from nodulab.data.dataset import (
    ARRAYS,
    FORMAT,
    MANIFEST,
    REAL,
    REAL_COLUMNS,
    DatasetError,
    check_free_space,
    check_out,
    dump_json,
    fsync_file,
    split_entry,
    staged,
    write_factors,
)
from nodulab.synth import lidc
from nodulab.synth.renderer import HU_MAX, HU_MIN
from nodulab.synth.scenario import MAX_SIZE, MIN_SIZE
from nodulab.synth.twins import ATTENUATION, is_test_patient

HU_RANGE = (HU_MIN, HU_MAX)
AGREEMENT = 0.5
SPACING_TOLERANCE = 0.01
VAL_SHARE = 0.2
READERS = ("consensus", "each")
SPLITS = ("train", "val", REAL_SPLITS[0])
PIXEL_MM_RANGE = (0.2, 3.0)
INTERPOLATION = (
    "trilinear (order 1) in patient mm, no anti-aliasing; z between the slices present; "
    "outside the scan -1024 HU; HU clipped to [-1024, 3071] before interpolation"
)
AXIAL = np.array([1.0, 0.0, 0.0, 0.0, 1.0, 0.0])
HEADER_TAGS = (
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "Modality",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "Rows",
    "Columns",
    "RescaleSlope",
    "RescaleIntercept",
)
DICOM_HINT = "reading DICOM needs the optional extra: pip install 'nodulab[dicom]'"


def _pydicom() -> Any:
    try:
        import pydicom
    except ImportError:
        raise DatasetError(DICOM_HINT) from None
    return pydicom


@dataclass(frozen=True)
class Options:
    """What ``import-lidc`` was asked for (checked by :meth:`check`)."""

    dim: int = 2
    size: int = 64
    pixel_mm: float = 0.7
    readers: str = "consensus"
    n: int | None = None
    malignant_from: float = 4
    benign_to: float = 2

    def check(self) -> Options:
        if self.dim not in (2, 3):
            raise DatasetError(f"--dim must be 2 or 3 (got {self.dim})")
        if not MIN_SIZE <= self.size <= MAX_SIZE[self.dim]:
            raise DatasetError(f"--size must be in {MIN_SIZE}..{MAX_SIZE[self.dim]} for --dim {self.dim}")
        lo, hi = PIXEL_MM_RANGE
        if not (math.isfinite(self.pixel_mm) and lo <= self.pixel_mm <= hi):
            raise DatasetError(f"--pixel-mm must be in {lo}..{hi} mm (got {self.pixel_mm})")
        if self.readers not in READERS:
            raise DatasetError(f"--readers must be one of {', '.join(READERS)} (got {self.readers!r})")
        if self.n is not None and self.n < 1:
            raise DatasetError(f"--n must be >= 1 (got {self.n})")
        for flag, value in (("--malignant", self.malignant_from), ("--benign", self.benign_to)):
            if not 1 <= value <= 5:
                raise DatasetError(f"{flag} must be a malignancy rating in 1..5 (got {value})")
        if self.benign_to >= self.malignant_from:
            raise DatasetError(
                f"--benign ({self.benign_to}) must be below --malignant ({self.malignant_from}): "
                "a nodule cannot be both"
            )
        return self


@dataclass
class SliceHeader:
    """What the scan of DICOM_ROOT keeps of one file (no pixel data)."""

    path: Path
    z: float
    xy: tuple[float, float]
    pixel_mm: tuple[float, float]
    shape: tuple[int, int]
    slope: float
    intercept: float


@dataclass
class Series:
    """One series of the table found under DICOM_ROOT."""

    uid: str
    slices: list[SliceHeader] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


class Skip(Exception):
    """A series that cannot be read: its one-line reason."""


@dataclass
class ImportResult:
    """What :func:`import_lidc` wrote and left out."""

    out: Path
    manifest: dict[str, Any]
    skipped: list[tuple[str, str]]  # (series uid, reason)

    @property
    def counts(self) -> dict[str, int]:
        return {split: entry["n"] for split, entry in self.manifest["splits"].items()}


# ----------------------------------------------------------------------------- tables
def _tables(tables: Path | None) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, str]]:
    """The annotation and contour tables (shipped, or the pair in ``tables``), and their sha256."""
    if tables is None:
        paths: tuple[Path | None, Path | None] = (None, None)
    else:
        tables = Path(tables)
        paths = (tables / lidc.TABLE, tables / lidc.CONTOURS)
        for path in paths:
            if not path.is_file():
                raise DatasetError(f"--tables {tables}: {path.name} missing")
    loaded = []
    for path, load, name in ((paths[0], lidc.load_table, lidc.TABLE), (paths[1], lidc.load_contours, lidc.CONTOURS)):
        try:
            loaded.append(load(path))
        except (ValueError, OSError, EOFError) as e:
            raise DatasetError(f"--tables {path or name}: {' '.join(str(e).split())}") from None
    annotations, contours = loaded
    digests = {lidc.TABLE: lidc.table_sha256(paths[0]), lidc.CONTOURS: lidc.contours_sha256(paths[1])}
    unknown = sorted(set(contours["annotation_id"]) - set(annotations["annotation_id"]))
    if unknown:
        raise DatasetError(f"{lidc.CONTOURS}: annotation_id {unknown[0]} is not in {lidc.TABLE}")
    return annotations.set_index("annotation_id", drop=False), contours, digests


# ----------------------------------------------------------------------------- finding the series
def _files(root: Path) -> Iterator[Path]:
    """Regular files under ``root`` in a fixed order; symbolic links are not followed."""
    for folder, dirs, names in os.walk(root, followlinks=False):
        dirs.sort()
        for name in sorted(names):
            path = Path(folder) / name
            if path.is_file() and not path.is_symlink():
                yield path


def _number(ds: Any, keyword: str, count: int | None = None) -> Any:
    value = ds.get(keyword)
    if value is None or value == "":
        raise Skip(f"{keyword} missing")
    try:
        values = [float(v) for v in (value if count is not None else [value])]
    except (TypeError, ValueError):
        raise Skip(f"{keyword} is not a number ({str(value)[:40]!r})") from None
    if (count is not None and len(values) != count) or not all(math.isfinite(v) for v in values):
        raise Skip(f"{keyword} must be {count or 1} finite number(s)")
    return values if count is not None else values[0]


def _header(ds: Any, path: Path) -> SliceHeader:
    modality = str(ds.get("Modality", "")).strip()
    if modality != "CT":
        raise Skip(f"modality {modality or 'missing'}, not CT")
    orientation = np.array(_number(ds, "ImageOrientationPatient", 6))
    if not np.allclose(orientation, AXIAL, atol=1e-3):
        raise Skip("not an axial series (ImageOrientationPatient is not 1,0,0,0,1,0)")
    x, y, z = _number(ds, "ImagePositionPatient", 3)
    row_mm, col_mm = _number(ds, "PixelSpacing", 2)
    rows, cols = int(_number(ds, "Rows")), int(_number(ds, "Columns"))
    if not (row_mm > 0 and col_mm > 0 and 0 < rows <= 4096 and 0 < cols <= 4096):
        raise Skip("PixelSpacing, Rows or Columns out of range")
    slope, intercept = _number(ds, "RescaleSlope"), _number(ds, "RescaleIntercept")
    if slope == 0:
        raise Skip("RescaleSlope is 0")
    return SliceHeader(path, z, (x, y), (row_mm, col_mm), (rows, cols), slope, intercept)


def find_series(root: Path, wanted: set[str], progress: Progress | None = None) -> tuple[dict[str, Series], Counter]:
    """Every series of ``wanted`` under ``root``, by SeriesInstanceUID; and counts of the other files.

    A second file of an image already found (the same SOPInstanceUID: a copy of the archive in the
    archive) is counted and not read again.
    """
    pydicom = _pydicom()
    paths = list(_files(root))
    advance = counter(progress, "scanning DICOM_ROOT", len(paths))
    found: dict[str, Series] = {}
    seen = Counter()
    instances: set[str] = set()
    for path in paths:
        advance(1)
        try:
            with warnings.catch_warnings():  # pydicom warns of odd tags: a file is read, or refused by its reason
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(HEADER_TAGS))
        except Exception:  # noqa: BLE001 - a file pydicom cannot parse is not a DICOM file here
            seen["not DICOM"] += 1
            continue
        uid = str(ds.get("SeriesInstanceUID", "")).strip()
        if uid not in wanted:
            seen["other series"] += 1
            continue
        instance = str(ds.get("SOPInstanceUID", "")).strip()
        if instance and instance in instances:  # a second copy of one image (the first path in order is read)
            seen["duplicate copies"] += 1
            continue
        instances.add(instance)
        seen["read"] += 1
        series = found.setdefault(uid, Series(uid))
        try:
            series.slices.append(_header(ds, path))
        except Skip as e:
            series.problems.append(str(e))
    return found, seen


# ----------------------------------------------------------------------------- one series
@dataclass
class Volume:
    """A checked series: slices sorted by z, and a reader of their HU."""

    uid: str
    slices: list[SliceHeader]
    z: np.ndarray
    step: float
    gaps: int
    origin: tuple[float, float]
    pixel_mm: float
    shape: tuple[int, int]
    _cache: dict[int, np.ndarray] = field(default_factory=dict)

    def hu(self, k: int) -> np.ndarray:
        """HU of slice ``k`` (float32, clipped to [-1024, 3071])."""
        if k not in self._cache:
            pydicom = _pydicom()
            s = self.slices[k]
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    ds = pydicom.dcmread(s.path)
            except Exception as e:  # noqa: BLE001 - a file that changed or broke since the scan
                raise Skip(f"a slice cannot be read again ({' '.join(str(e).split())[:120]})") from None
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    stored = ds.pixel_array
            except Exception as e:  # noqa: BLE001 - any decoder failure skips the series, named
                syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
                name = getattr(syntax, "name", None) or "unknown transfer syntax"
                raise Skip(f"pixel data cannot be decoded ({name}: {' '.join(str(e).split())[:120]})") from None
            if stored.shape != s.shape:
                raise Skip(f"pixel data of {stored.shape} where Rows × Columns say {s.shape}")
            hu = stored.astype(np.float64) * s.slope + s.intercept
            self._cache[k] = np.clip(hu, *HU_RANGE).astype(np.float32)
        return self._cache[k]


def check_volume(series: Series) -> Volume:
    """Sort a series by z and check its geometry and spacing; ``Skip`` says why it cannot be read."""
    if series.problems:
        counts = Counter(series.problems)
        raise Skip("; ".join(f"{p}" + (f" ({n} files)" if n > 1 else "") for p, n in sorted(counts.items())))
    slices = sorted(series.slices, key=lambda s: s.z)
    if len(slices) < 2:
        raise Skip("fewer than 2 slices")
    first = slices[0]
    for s in slices[1:]:
        if s.shape != first.shape or not np.allclose(s.pixel_mm, first.pixel_mm, rtol=1e-4):
            raise Skip("slices of different pixel grids in one series")
        if not np.allclose(s.xy, first.xy, atol=0.01):
            raise Skip("slices not aligned (ImagePositionPatient x, y differ)")
    if abs(first.pixel_mm[0] - first.pixel_mm[1]) > 1e-4 * first.pixel_mm[0]:
        raise Skip(f"non-square pixels ({first.pixel_mm[0]:g} × {first.pixel_mm[1]:g} mm)")
    z = np.array([s.z for s in slices])
    steps = np.diff(z)
    if np.any(steps <= 1e-6):
        raise Skip(f"two slices at z = {z[1:][steps <= 1e-6][0]:g} mm")
    step = float(np.median(steps))
    regular = np.abs(steps - step) <= SPACING_TOLERANCE * step
    missing = np.abs(steps - 2 * step) <= SPACING_TOLERANCE * step
    if np.any(~regular & ~missing) or missing.sum() > 1:
        worst = float(steps[np.argmax(np.abs(steps - step))])
        raise Skip(
            f"non-uniform slice spacing (steps {steps.min():g}..{steps.max():g} mm, median {step:g}; "
            f"worst {worst:g}): more than 1% or more than one missing slice"
        )
    return Volume(series.uid, slices, z, step, int(missing.sum()), first.xy, first.pixel_mm[0], first.shape)


def check_against_table(volume: Volume, contours: pd.DataFrame) -> None:
    """The series must have the pixel grid its contours were traced on: spacing and extent."""
    table_mm = float(contours["pixel_mm"].iloc[0])
    if abs(volume.pixel_mm - table_mm) > SPACING_TOLERANCE * table_mm:
        raise Skip(f"PixelSpacing {volume.pixel_mm:g} mm, the table's outlines were traced at {table_mm:g} mm")
    points = np.concatenate([lidc.parse_points(t) for t in contours["points"]])
    if points[:, 0].max() >= volume.shape[1] or points[:, 1].max() >= volume.shape[0]:
        raise Skip(f"the table's outlines reach beyond the series' {volume.shape[1]} × {volume.shape[0]} pixels")


# ----------------------------------------------------------------------------- nodules
@dataclass
class Outline:
    """The readers' outlines of one nodule (or one annotation) on the series' pixel grid."""

    ids: list[int]  # annotation ids
    z: np.ndarray  # traced slice positions (mm), sorted
    fraction: np.ndarray  # (len(z), H, W) share of the readers including each pixel
    origin: tuple[int, int]  # (row, column) of fraction[:, 0, 0] on the slice grid


def outline(contours: pd.DataFrame, ids: list[int]) -> Outline:
    """Rasterise the annotations ``ids`` and average them into each pixel's share of readers."""
    rows = contours[contours["annotation_id"].isin(ids)]
    points = {i: lidc.parse_points(t) for i, t in zip(rows.index, rows["points"])}
    every = np.concatenate(list(points.values()))
    x0, y0 = every.min(axis=0) - 2
    x1, y1 = every.max(axis=0) + 2
    shape = (int(y1 - y0 + 1), int(x1 - x0 + 1))
    z_of = dict(zip(rows.index, np.round(rows["z_mm"].to_numpy(dtype=float), 3)))
    zs = np.unique(list(z_of.values()))
    fraction = np.zeros((len(zs), *shape), dtype=np.float64)
    for aid in ids:
        by_z: dict[float, list] = defaultdict(list)
        for i, inclusion in zip(
            rows.index[rows["annotation_id"] == aid], rows["inclusion"][rows["annotation_id"] == aid]
        ):
            by_z[z_of[i]].append((bool(inclusion), points[i]))
        for z, drawn in by_z.items():
            k = int(np.searchsorted(zs, z))
            fraction[k] += lidc.contour_mask(drawn, shape, (int(y0), int(x0)))
    fraction /= len(ids)
    return Outline(list(ids), zs, fraction, (int(y0), int(x0)))


def centre_mm(o: Outline, volume: Volume) -> np.ndarray:
    """Centroid (x, y, z in mm) of the region at least half the readers include (else the union)."""
    region = o.fraction >= AGREEMENT - 1e-9
    if not region.any():
        region = o.fraction > 0
    k, r, c = np.nonzero(region)
    x = volume.origin[0] + (c + o.origin[1]).mean() * volume.pixel_mm
    y = volume.origin[1] + (r + o.origin[0]).mean() * volume.pixel_mm
    return np.array([x, y, o.z[k].mean()])


def _grid(centre: np.ndarray, size: int, pixel_mm: float, dim: int) -> np.ndarray:
    """Patient coordinates (x, y, z; mm) of every patch voxel: shape (3, [size,] size, size)."""
    offsets = (np.arange(size) - (size - 1) / 2.0) * pixel_mm
    if dim == 2:
        y, x = np.meshgrid(offsets, offsets, indexing="ij")
        z = np.zeros_like(x)
    else:
        z, y, x = np.meshgrid(offsets, offsets, offsets, indexing="ij")
    return np.stack([x + centre[0], y + centre[1], z + centre[2]])


def _z_index(z: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Fractional index of each z among sorted ``positions`` (linear between them; NaN outside)."""
    index = np.interp(z, positions, np.arange(len(positions), dtype=np.float64))
    return np.where((z < positions[0] - 1e-6) | (z > positions[-1] + 1e-6), np.nan, index)


def _trilinear(read: Callable[[int], np.ndarray], k: np.ndarray, r: np.ndarray, c: np.ndarray, shape: tuple) -> tuple:
    """Sample slices ``read(k)`` (each ``shape``) at fractional (k, r, c); NaN k or outside → nan."""
    from scipy.ndimage import map_coordinates

    outside = np.isnan(k) | (r < 0) | (r > shape[0] - 1) | (c < 0) | (c > shape[1] - 1)
    k = np.where(outside, 0.0, k)
    k0 = np.floor(k).astype(np.int64)
    w = k - k0
    out = np.zeros(k.shape, dtype=np.float64)
    for kk in np.unique(k0[~outside]):
        at = (k0 == kk) & ~outside
        for layer, weight in ((kk, 1.0 - w[at]), (kk + 1, w[at])):
            used = weight > 0
            if not used.any():
                continue
            plane = read(int(layer))
            values = map_coordinates(plane, [r[at][used], c[at][used]], order=1, mode="nearest", prefilter=False)
            part = np.zeros(int(at.sum()))
            part[used] = weight[used] * values
            out[at] += part
    return out, outside


def patch(volume: Volume, o: Outline, centre: np.ndarray, opts: Options) -> tuple[np.ndarray, np.ndarray, bool]:
    """HU patch (int16), mask (uint8) and whether it reached outside the scan."""
    x, y, z = _grid(centre, opts.size, opts.pixel_mm, opts.dim)
    c = (x - volume.origin[0]) / volume.pixel_mm
    r = (y - volume.origin[1]) / volume.pixel_mm
    hu, outside = _trilinear(volume.hu, _z_index(z, volume.z), r, c, volume.shape)
    image = np.rint(np.where(outside, HU_RANGE[0], hu)).clip(*HU_RANGE).astype(np.int16)
    # the readers' share: linear between traced slices, falling to 0 one slice step beyond them
    step = volume.step
    zs = np.concatenate([[o.z[0] - step], o.z, [o.z[-1] + step]])
    layers = np.concatenate([np.zeros((1, *o.fraction.shape[1:])), o.fraction, np.zeros((1, *o.fraction.shape[1:]))])
    share, _ = _trilinear(lambda k: layers[k], _z_index(z, zs), r - o.origin[0], c - o.origin[1], layers.shape[1:])
    mask = (share >= AGREEMENT - 1e-9).astype(np.uint8)
    return image, mask, bool(outside.any())


# ----------------------------------------------------------------------------- rows
def _median(values: pd.Series) -> float:
    return float(np.median(values.to_numpy(dtype=np.float64)))


def _split(patient: int) -> str:
    if is_test_patient(np.array([patient]))[0]:
        return REAL_SPLITS[0]
    digest = hashlib.blake2b(f"nodulab/lidc-val/{int(patient)}".encode(), digest_size=4).digest()
    return "val" if int.from_bytes(digest, "little") % 1000 < VAL_SHARE * 1000 else "train"


def _label(malignancy: float, opts: Options) -> int | None:
    if malignancy >= opts.malignant_from:
        return 1
    if malignancy <= opts.benign_to:
        return 0
    return None


def _units(contours: pd.DataFrame, readers: str) -> list[tuple[int, list[int]]]:
    """(nodule, annotation ids) per row to write, in a fixed order."""
    ids = contours.groupby("nodule", sort=True)["annotation_id"].unique()
    if readers == "consensus":
        return [(int(n), sorted(int(a) for a in a_ids)) for n, a_ids in ids.items()]
    return [(int(n), [int(a)]) for n, a_ids in ids.items() for a in sorted(a_ids)]


def _row(annotations: pd.DataFrame, nodule: int, ids: list[int], patient: int, series: int) -> dict[str, Any]:
    rated = annotations.loc[ids]
    row: dict[str, Any] = {
        "label": -1,
        "patient": patient,
        "nodule": nodule,
        "annotation_id": min(ids),
        "n_readers": len(ids),
        "series": series,
    }
    for name in lidc.RATINGS:
        row[f"lidc_{name}"] = _median(rated[name])
    return row


class _Rows:
    """Patches of one split, appended to raw files in the staging folder (bounded memory)."""

    def __init__(self, folder: Path, split: str, shape: tuple[int, ...]) -> None:
        self.folder, self.split, self.shape = folder, split, shape
        self.raw = {name: open(folder / f".{split}.{name}.raw", "xb") for name in ARRAYS}
        self.rows: list[dict[str, Any]] = []

    def add(self, image: np.ndarray, mask: np.ndarray, row: dict[str, Any]) -> None:
        self.raw["images"].write(np.ascontiguousarray(image, dtype=np.int16).tobytes())
        self.raw["masks"].write(np.ascontiguousarray(mask, dtype=np.uint8).tobytes())
        self.rows.append(row)

    def finish(self) -> dict[str, Any]:
        """Write ``<split>/`` (arrays, factors.csv) from the raw files; return the manifest entry."""
        target = self.folder / self.split
        target.mkdir()
        shape = (len(self.rows), *self.shape)
        for name, dtype in ARRAYS.items():
            raw = self.raw[name]
            raw.close()
            with open(raw.name, "rb") as src, open(target / f"{name}.npy", "xb") as dst:
                header = {
                    "descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                    "fortran_order": False,
                    "shape": shape,
                }
                np.lib.format.write_array_header_1_0(dst, header)
                shutil.copyfileobj(src, dst, 1 << 20)
                dst.flush()
                os.fsync(dst.fileno())
            os.unlink(raw.name)
        frame = pd.DataFrame(self.rows, columns=[c for c in REAL_COLUMNS if c != "index"])
        write_factors(frame, target / "factors.csv")
        return split_entry(target, frame, shape)

    def close(self) -> None:
        for raw in self.raw.values():
            raw.close()


# ----------------------------------------------------------------------------- import
def import_lidc(
    dicom_root: Path,
    out: Path,
    *,
    options: Options = Options(),  # noqa: B008 - frozen
    tables: Path | None = None,
    force: bool = False,
    progress: Progress | None = None,
    skipped: Callable[[str, str], None] | None = None,
) -> ImportResult:
    """Import the LIDC-IDRI series under ``dicom_root`` as a real nodulab dataset at ``out``.

    Args:
        dicom_root: the user's LIDC-IDRI copy (any folder layout).
        out: the dataset folder to create (not inside ``dicom_root`` or ``tables``, nor holding them).
        options: geometry, readers, label rule and ``n`` (at most that many rows).
        tables: a folder with ``lidc_annotations.csv`` and ``lidc_contours.csv.gz`` in the shipped
            formats (default: the shipped tables).
        force: replace an existing ``out`` (a nodulab dataset) once the new one is complete.
        progress: ``(stage, done, total)``.
        skipped: called with (series uid, reason) for every series that cannot be read.

    Raises:
        DatasetError: bad options or tables, ``out`` inside ``dicom_root``, no LIDC-IDRI series
            found, or no nodule imported; nothing is written then.
    """
    opts = options.check()
    root, out = Path(dicom_root), Path(out)
    if not root.is_dir():
        raise DatasetError(f"DICOM_ROOT {root} is not a folder")
    inputs = [root] if tables is None else [root, Path(tables)]
    check_out(out, inputs)
    if (out.exists() or out.is_symlink()) and not force:
        raise DatasetError(f"--out {out} already exists (use --force to replace it)")
    annotations, contours, digests = _tables(tables)
    found, seen = find_series(root, set(contours["series_uid"]), progress)
    if not found:
        raise DatasetError(
            f"DICOM_ROOT {root}: no LIDC-IDRI series of the table there ({seen['read'] + seen['other series']} "
            f"DICOM files of other series, {seen['not DICOM']} other files)"
        )
    by_uid = dict(iter(contours[contours["series_uid"].isin(found)].groupby("series_uid")))
    units_by_uid = {uid: _units(c, opts.readers) for uid, c in by_uid.items()}
    per_row = opts.size**opts.dim * sum(np.dtype(t).itemsize for t in ARRAYS.values())
    check_free_space(out, 2 * per_row * sum(len(u) for u in units_by_uid.values()) + (1 << 20))
    shape = (opts.size,) * opts.dim
    rows_written = 0
    left_out: Counter = Counter()
    listed: list[tuple[str, str]] = []
    series_read: list[dict[str, Any]] = []
    padded = 0
    advance = counter(progress, "importing series", len(found))
    with staged(out, force=force, inputs=inputs, owner=MANIFEST) as tmp:
        splits = {name: _Rows(tmp, name, shape) for name in SPLITS}
        try:
            for uid in sorted(found):
                if opts.n is not None and rows_written >= opts.n:
                    break
                advance(1)
                mine = by_uid[uid]
                patient = int(mine["patient"].iloc[0])
                try:
                    volume = check_volume(found[uid])
                    check_against_table(volume, mine)
                    made = []
                    for nodule, ids in units_by_uid[uid]:
                        if len(ids) > lidc.MAX_READERS:
                            left_out[
                                f"a cluster of more than {lidc.MAX_READERS} outlines (a reader's joins two nodules)"
                            ] += 1
                            continue
                        o = outline(mine, ids)
                        row = _row(annotations, nodule, ids, patient, len(series_read))
                        label = _label(row["lidc_malignancy"], opts)
                        if label is None:
                            left_out[f"malignancy {row['lidc_malignancy']:g}: between --benign and --malignant"] += 1
                            continue
                        if not (o.fraction > 0).any():
                            left_out["an outline without a pixel inside"] += 1
                            continue
                        image, mask, out_of_scan = patch(volume, o, centre_mm(o, volume), opts)
                        made.append((image, mask, {**row, "label": label}, out_of_scan))
                except Skip as e:
                    listed.append((uid, str(e)))
                    if skipped is not None:
                        skipped(uid, str(e))
                    continue
                split = _split(patient)
                kept = 0
                for image, mask, row, out_of_scan in made:
                    if opts.n is not None and rows_written >= opts.n:
                        left_out["beyond --n"] += 1
                        continue
                    slice2d = mask if opts.dim == 2 else traced.largest_slice(mask)
                    diameter = (
                        traced.measure(slice2d.astype(bool), opts.pixel_mm)["diameter_mm"] if slice2d.any() else 0.0
                    )
                    if not diameter > 0:
                        left_out["outline smaller than one pixel of the patch"] += 1
                        continue
                    texture = int(math.floor(row["lidc_texture"] + 0.5))
                    row.update(
                        diameter_mm=float(diameter),
                        pixel_mm=float(opts.pixel_mm),
                        slice_mm=float(volume.step),
                        attenuation=ATTENUATION[texture],
                        offset_x_mm=0.0,
                        offset_y_mm=0.0,
                        offset_z_mm=0.0,
                        padded=int(out_of_scan),
                    )
                    padded += int(out_of_scan)
                    splits[split].add(image, mask, row)
                    rows_written += 1
                    kept += 1
                series_read.append(
                    {
                        "uid": uid,
                        "patient": patient,
                        "slices": len(volume.slices),
                        "slice_step_mm": round(volume.step, 6),
                        "missing_slices": volume.gaps,
                        "rows": kept,
                    }
                )
            if rows_written == 0:
                reasons = "; ".join(f"{n} {r}" for r, n in sorted(left_out.items())) or "none to import"
                raise DatasetError(
                    f"no nodule imported from {root}: {len(listed)} of {len(found)} series skipped"
                    + (f" (first: {listed[0][1]})" if listed else "")
                    + f"; rows left out: {reasons}"
                )
            entries = {name: rows.finish() for name, rows in splits.items()}
        finally:
            for rows in splits.values():
                rows.close()
        manifest = {
            "format": FORMAT,
            "kind": REAL,
            "nodulab_version": __version__,
            "image": {"dim": opts.dim, "size": opts.size, "pixel_mm": float(opts.pixel_mm)},
            "real": {
                "source": "LIDC-IDRI",
                "citation": lidc.CITATION,
                "tables": digests,
                "readers": opts.readers,
                "agreement": AGREEMENT,
                "label": {
                    "rating": "median of the readers' malignancy"
                    if opts.readers == "consensus"
                    else "the reader's malignancy",
                    "malignant_from": opts.malignant_from,
                    "benign_to": opts.benign_to,
                },
                "interpolation": INTERPOLATION,
                "hu_range": list(HU_RANGE),
                "series": series_read,
                "skipped": [{"uid": uid, "reason": reason} for uid, reason in listed],
                "padded": padded,
                "left_out": dict(sorted(left_out.items())),
                "files": dict(sorted(seen.items())),
            },
            "splits": entries,
        }
        (tmp / MANIFEST).write_text(dump_json(manifest), encoding="utf-8")
        fsync_file(tmp / MANIFEST)
    return ImportResult(out, manifest, listed)
