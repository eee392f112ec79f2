"""Fabricated LIDC-IDRI-like data for tests: CT series as DICOM files, and the two shipped tables' formats.

No LIDC-IDRI image ships with nodulab (the user supplies their own copy), so everything that reads one is
tested on files made here, in the same formats:

* :func:`sphere_volume`: a CT volume in HU with one sphere (a solid nodule in lung parenchyma), its
  edge partial-volume averaged so that the volume and mean HU are exact to well within 1%.
* :func:`write_series`: one DICOM Part 10 file per slice (pydicom), stored as uint16 with a rescale
  slope/intercept, shuffled on disk; hostile variants (other modality, missing tags, a compressed
  transfer syntax nothing can decode).
* :func:`sphere_contours`, :func:`annotation_row`, :func:`write_tables`: readers' outlines and ratings in
  the formats of ``tables/lidc_contours.csv.gz`` and ``tables/lidc_annotations.csv``.
* :func:`fabricate_archive`: a small archive of all of these (a few patients, one nodule each).

Geometry (as in DICOM, LIDC and pylidc): voxel ``(k, r, c)`` of a volume has its centre at
``x = ox + c * pixel_mm``, ``y = oy + r * pixel_mm``, ``z = z_positions[k]``; contour points are
``(x, y) = (column, row)`` pixel indices.
"""

from __future__ import annotations

import csv
import gzip
import io
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    MRImageStorage,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from scipy import ndimage

from nodulab.data.traced import measure
from nodulab.synth.lidc import COLUMNS, CONTOUR_COLUMNS, RATINGS, format_points, validate
from nodulab.synth.twins import is_test_patient

TRANSFER_SYNTAXES = {
    "explicit_le": ExplicitVRLittleEndian,
    "implicit_le": ImplicitVRLittleEndian,
    "jpeg2000": JPEG2000Lossless,  # 1.2.840.10008.1.2.4.90; the pixel data written is undecodable junk
}
SOP_CLASSES = {"CT": CTImageStorage, "MR": MRImageStorage}  # any other modality: Secondary Capture
LIDC_UID_ROOT = "1.3.6.1.4.1.14519.5.2.1.6279.6001."  # the prefix of LIDC-IDRI's UIDs (TCIA)
SUPERSAMPLE = 4
"""Sub-samples per axis and voxel used by :func:`sphere_volume` for the sphere's partial-volume edge."""


# --------------------------------------------------------------------------------------------- volumes


def default_z(n: int, origin_z: float, slice_mm: float) -> list[float]:
    """``n`` slice positions ``origin_z + k * slice_mm``, rounded as written to DICOM (see :func:`ds_number`)."""
    return [ds_number(origin_z + k * slice_mm) for k in range(n)]


def ds_number(value: float) -> float:
    """``value`` rounded to 4 decimals: the float that a DICOM DS string of it (``repr``) reads back as exactly."""
    out = round(float(value), 4)
    return 0.0 if out == 0 else out


def sphere_volume(
    shape_zyx: Sequence[int],
    pixel_mm: float,
    slice_mm: float,
    centre_mm_xyz: Sequence[float],
    radius_mm: float,
    hu_in: float = 30.0,
    hu_out: float = -860.0,
    origin_xyz: Sequence[float] = (-100.0, -120.0, -300.0),
    z_positions: Sequence[float] | None = None,
) -> np.ndarray:
    """A float64 HU volume ``(D, H, W)``: ``hu_out`` everywhere, ``hu_in`` inside a sphere, mixed at its edge.

    Voxel ``(k, r, c)`` is the box of size ``pixel_mm × pixel_mm × slice_mm`` centred at
    ``(ox + c * pixel_mm, oy + r * pixel_mm, z_positions[k])`` (``z_positions`` defaults to
    ``oz + k * slice_mm``; give it to leave a gap, i.e. a missing slice). Its HU is
    ``hu_out + f * (hu_in - hu_out)`` with ``f`` the fraction of the box inside the sphere, estimated on a
    ``4 × 4 × 4`` grid of sub-voxel centres (:data:`SUPERSAMPLE`). The sub-sampling errors are unbiased and
    average out over the sphere's surface, so ``Σ f × voxel volume`` matches ``4/3 π r³`` to within 0.5%
    for r ≥ 2 mm at 0.7 × 0.7 × 1.25 mm voxels (and the mean HU of the sphere likewise); a voxel wholly
    inside is exactly ``hu_in``.
    """
    depth, height, width = (int(s) for s in shape_zyx)
    ox, oy, oz = (float(v) for v in origin_xyz)
    z = np.asarray(default_z(depth, oz, slice_mm) if z_positions is None else z_positions, dtype=float)
    if z.shape != (depth,):
        raise ValueError(f"sphere_volume: {len(z)} z positions for {depth} slices")
    cx, cy, cz = (float(v) for v in centre_mm_xyz)
    volume = np.full((depth, height, width), float(hu_out))
    # Only voxels whose box can reach the sphere are sub-sampled.
    ks = np.nonzero(np.abs(z - cz) <= radius_mm + slice_mm)[0]
    r0 = max(0, int(math.floor((cy - radius_mm - oy) / pixel_mm)) - 1)
    r1 = min(height, int(math.ceil((cy + radius_mm - oy) / pixel_mm)) + 2)
    c0 = max(0, int(math.floor((cx - radius_mm - ox) / pixel_mm)) - 1)
    c1 = min(width, int(math.ceil((cx + radius_mm - ox) / pixel_mm)) + 2)
    if len(ks) == 0 or r0 >= r1 or c0 >= c1:
        return volume
    sub = (np.arange(SUPERSAMPLE) + 0.5) / SUPERSAMPLE - 0.5  # offsets in voxel units
    zz = (z[ks][:, None] + sub[None, :] * slice_mm - cz) ** 2  # (K, S)
    yy = (oy + (np.arange(r0, r1)[:, None] + sub[None, :]) * pixel_mm - cy) ** 2  # (R, S)
    xx = (ox + (np.arange(c0, c1)[:, None] + sub[None, :]) * pixel_mm - cx) ** 2  # (C, S)
    inside = (
        zz[:, None, None, :, None, None] + yy[None, :, None, None, :, None] + xx[None, None, :, None, None, :]
        <= radius_mm**2
    )
    frac = inside.mean(axis=(3, 4, 5))
    volume[ks[:, None, None], np.arange(r0, r1)[None, :, None], np.arange(c0, c1)[None, None, :]] = hu_out + frac * (
        hu_in - hu_out
    )
    return volume


def sphere_fraction(volume_hu: np.ndarray, hu_in: float = 30.0, hu_out: float = -860.0) -> np.ndarray:
    """Per voxel, the fraction inside the sphere, read back from HU (the inverse of :func:`sphere_volume`)."""
    return (np.asarray(volume_hu, dtype=float) - hu_out) / (hu_in - hu_out)


# ----------------------------------------------------------------------------------------------- DICOM


@dataclass(frozen=True)
class Series:
    """What :func:`write_series` wrote: one file per slice, ``files[k]`` holding slice ``k`` (z order)."""

    uid: str
    study_uid: str
    patient: int
    patient_id: str
    folder: Path
    files: tuple[Path, ...]
    z_positions: tuple[float, ...]
    origin_xy: tuple[float, float]
    pixel_mm: float
    slice_mm: float
    slope: float
    intercept: float
    modality: str
    transfer_syntax: str
    shape_zyx: tuple[int, int, int]
    omitted: tuple[str, ...] = ()


def _ds_string(value: float) -> str:
    text = repr(ds_number(value))
    if len(text) > 16:
        raise ValueError(f"write_series: {value} does not fit a DICOM DS (16 characters)")
    return text


def write_series(
    folder: str | Path,
    volume_hu: np.ndarray,
    *,
    uid: str,
    patient: int,
    pixel_mm: float,
    slice_mm: float,
    z_positions: Sequence[float],
    origin_xy: Sequence[float],
    slope: float = 2.0,
    intercept: float = -1024.0,
    shuffle: bool = True,
    seed: int = 0,
    modality: str = "CT",
    transfer_syntax: str = "explicit_le",
    omit: Iterable[str] = (),
    file_names: str = "random",
    study_uid: str | None = None,
) -> Series:
    """Write ``volume_hu`` (``(D, H, W)``, HU) as one DICOM Part 10 file per slice under ``folder``.

    Each file has the file meta (transfer syntax ``transfer_syntax``: ``explicit_le``, ``implicit_le``, or
    ``jpeg2000``, which declares JPEG 2000 Lossless and holds encapsulated junk bytes that no decoder
    can read: ``pixel_array`` raises), and the tags an importer needs: SOP class (CT Image Storage for
    CT, MR Image Storage for MR, else Secondary Capture), Study/Series/SOP Instance UIDs, PatientID
    ``LIDC-IDRI-NNNN``, Modality, Rows, Columns, PixelSpacing, SliceThickness, ImagePositionPatient
    ``[ox, oy, z]``, ImageOrientationPatient ``[1, 0, 0, 0, 1, 0]``, SliceLocation, InstanceNumber,
    RescaleSlope/Intercept, 16-bit unsigned pixels (stored = round((HU − intercept) / slope); out of
    uint16 range raises ``ValueError``). ``omit``: keywords deleted before writing (hostile files).

    InstanceNumber runs 1..D from the *highest* z down (as in many LIDC series), so an importer that
    sorts by it rather than by ImagePositionPatient gets the volume upside down. With ``shuffle`` the
    files are written in a random order; ``file_names="random"``: 16 random hex digits + ``.dcm``,
    ``"ordered"``: ``IMG{k:04d}.dcm`` in z order. The output is the same bytes for the same arguments.
    """
    volume = np.asarray(volume_hu, dtype=float)
    if volume.ndim != 3:
        raise ValueError(f"write_series: expected a (D, H, W) volume, got shape {volume.shape}")
    depth, height, width = volume.shape
    z = [ds_number(v) for v in z_positions]
    if len(z) != depth:
        raise ValueError(f"write_series: {len(z)} z positions for {depth} slices")
    if transfer_syntax not in TRANSFER_SYNTAXES:
        raise ValueError(f"write_series: transfer_syntax must be one of {', '.join(TRANSFER_SYNTAXES)}")
    if file_names not in ("random", "ordered"):
        raise ValueError("write_series: file_names must be 'random' or 'ordered'")
    stored = np.rint((volume - intercept) / slope)
    if stored.min() < 0 or stored.max() > 65535:
        raise ValueError(f"write_series: stored values {stored.min()}..{stored.max()} outside uint16")
    stored = stored.astype(np.uint16)
    rng = np.random.default_rng([seed, patient, 19])
    study = study_uid or generate_uid(prefix=LIDC_UID_ROOT, entropy_srcs=["study", uid])
    omit = tuple(omit)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ox, oy = (float(v) for v in origin_xy)
    sop_class = SOP_CLASSES.get(modality, SecondaryCaptureImageStorage)
    ts = TRANSFER_SYNTAXES[transfer_syntax]
    if file_names == "random":
        names = [f"{int(v):016x}.dcm" for v in rng.integers(0, 2**63, size=depth, dtype=np.int64)]
    else:
        names = [f"IMG{k:04d}.dcm" for k in range(depth)]
    order = rng.permutation(depth) if shuffle else np.arange(depth)
    rank = np.argsort(np.argsort(-np.asarray(z), kind="stable"), kind="stable")  # 0 = highest z
    files: list[Path] = [folder / name for name in names]
    for k in (int(i) for i in order):
        sop_uid = generate_uid(prefix=LIDC_UID_ROOT, entropy_srcs=["sop", uid, str(k)])
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ts
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = sop_uid
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = uid
        ds.PatientID = f"LIDC-IDRI-{patient:04d}"
        ds.PatientName = f"LIDC-IDRI-{patient:04d}"
        ds.Modality = modality
        ds.Manufacturer = "nodulab fabricated"
        ds.SeriesNumber = 1
        ds.InstanceNumber = int(rank[k]) + 1
        ds.ImagePositionPatient = [_ds_string(ox), _ds_string(oy), _ds_string(z[k])]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.SliceLocation = _ds_string(z[k])
        ds.PixelSpacing = [_ds_string(pixel_mm), _ds_string(pixel_mm)]
        ds.SliceThickness = _ds_string(slice_mm)
        ds.RescaleSlope = _ds_string(slope)
        ds.RescaleIntercept = _ds_string(intercept)
        ds.RescaleType = "HU"
        ds.Rows = height
        ds.Columns = width
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        if transfer_syntax == "jpeg2000":
            junk = b"\xff\x4f\xff\x51" + rng.integers(0, 256, size=256, dtype=np.uint8).tobytes()
            ds.PixelData = encapsulate([junk])
            ds["PixelData"].VR = "OB"
            ds["PixelData"].is_undefined_length = True
        else:
            ds.PixelData = stored[k].tobytes()
            ds["PixelData"].VR = "OW"
        for keyword in omit:
            if keyword in ds:
                del ds[keyword]
        ds.save_as(files[k], enforce_file_format=True)
    return Series(
        uid=uid,
        study_uid=study,
        patient=patient,
        patient_id=f"LIDC-IDRI-{patient:04d}",
        folder=folder,
        files=tuple(files),
        z_positions=tuple(z),
        origin_xy=(ox, oy),
        pixel_mm=float(pixel_mm),
        slice_mm=float(slice_mm),
        slope=float(slope),
        intercept=float(intercept),
        modality=modality,
        transfer_syntax=transfer_syntax,
        shape_zyx=(depth, height, width),
        omitted=omit,
    )


def read_series_hu(files: Iterable[str | Path]) -> tuple[np.ndarray, list[float]]:
    """A test's reference reader: files → ``(volume_hu sorted by z, z positions)`` with pydicom.

    HU = pixel_array × RescaleSlope + RescaleIntercept; slices sorted by ImagePositionPatient z.
    """
    slices = []
    for f in files:
        ds = pydicom.dcmread(f)
        hu = ds.pixel_array.astype(float) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        slices.append((float(ds.ImagePositionPatient[2]), hu))
    slices.sort(key=lambda s: s[0])
    return np.stack([s[1] for s in slices]), [s[0] for s in slices]


# -------------------------------------------------------------------------------------------- contours


def disk_pixels(
    centre_px_xy: Sequence[float], radius_px: float, shape_hw: Sequence[int] | None = None
) -> tuple[np.ndarray, tuple[int, int]]:
    """The pixels whose centres lie within ``radius_px`` of ``centre_px_xy`` (x = column, y = row).

    Returns ``(mask, (row0, col0))``: a boolean mask on a box with a margin of 2 pixels around the disk,
    and the box's top-left pixel (it may be negative). With ``shape_hw``, the mask is the whole image
    ``(H, W)`` instead and the offset ``(0, 0)``.
    """
    cx, cy = (float(v) for v in centre_px_xy)
    if shape_hw is None:
        r0, c0 = int(math.floor(cy - radius_px)) - 2, int(math.floor(cx - radius_px)) - 2
        h, w = int(math.ceil(cy + radius_px)) + 3 - r0, int(math.ceil(cx + radius_px)) + 3 - c0
    else:
        (h, w), r0, c0 = (int(s) for s in shape_hw), 0, 0
    rows, cols = np.mgrid[r0 : r0 + h, c0 : c0 + w]
    return (cols - cx) ** 2 + (rows - cy) ** 2 <= radius_px**2, (r0, c0)


def ring_points(disk: np.ndarray, offset_rc: Sequence[int], centre_px_xy: Sequence[float]) -> np.ndarray:
    """The LIDC-style outline of a pixel set: ``(n, 2)`` int64 ``(x, y)`` points.

    The points are the pixels just outside the set that are 4-adjacent to a pixel of it (the disk
    dilated by a cross, minus the disk: an 8-connected ring one pixel thick), ordered by angle around
    ``centre_px_xy`` (then by distance) as a closed polygon. For a digital disk, rasterising that
    polygon (pixel centres inside by the even-odd rule) and removing the outline pixels (the points and
    the pixels on the segments between consecutive points, as ``scripts/build_lidc_table.py`` does)
    gives back exactly the disk's pixels; checked by ``tests/data/test_lidc_fabricate.py``.
    """
    ring = ndimage.binary_dilation(disk, ndimage.generate_binary_structure(2, 1)) & ~disk
    rows, cols = np.nonzero(ring)
    ys, xs = rows + int(offset_rc[0]), cols + int(offset_rc[1])
    cx, cy = (float(v) for v in centre_px_xy)
    order = np.lexsort((np.hypot(ys - cy, xs - cx), np.arctan2(ys - cy, xs - cx)))
    return np.stack([xs[order], ys[order]], axis=1).astype(np.int64)


def reader_centre_px(
    centre_mm_xyz: Sequence[float],
    origin_xy: Sequence[float],
    pixel_mm: float,
    jitter_px: float,
    seed: int,
    jitter_angle: float | None = None,
) -> tuple[float, float]:
    """One reader's outline centre in pixels (x, y): the true one moved ``jitter_px`` in a direction.

    The direction is ``jitter_angle`` (radians, from +x towards +y) or, when None, drawn from ``seed``.
    """
    cx = (float(centre_mm_xyz[0]) - float(origin_xy[0])) / pixel_mm
    cy = (float(centre_mm_xyz[1]) - float(origin_xy[1])) / pixel_mm
    if jitter_px:
        angle = np.random.default_rng([seed, 1019]).uniform(0, 2 * np.pi) if jitter_angle is None else jitter_angle
        cx, cy = cx + jitter_px * math.cos(angle), cy + jitter_px * math.sin(angle)
    return cx, cy


def sphere_disks(
    *,
    pixel_mm: float,
    z_positions: Sequence[float],
    origin_xy: Sequence[float],
    centre_mm_xyz: Sequence[float],
    radius_mm: float,
    jitter_px: float = 0.0,
    seed: int = 0,
    jitter_angle: float | None = None,
) -> list[tuple[float, np.ndarray, tuple[int, int], tuple[float, float]]]:
    """Per slice that cuts the sphere with at least one pixel centre inside: ``(z, disk, (row0, col0), centre_px)``.

    The disk is the slice's pixel set inside the sphere (pixel centres within ``sqrt(r² − dz²)`` of
    the reader's centre, see :func:`reader_centre_px`), as :func:`disk_pixels` returns it.
    """
    centre = reader_centre_px(centre_mm_xyz, origin_xy, pixel_mm, jitter_px, seed, jitter_angle)
    out = []
    for z in z_positions:
        dz = float(z) - float(centre_mm_xyz[2])
        if abs(dz) > radius_mm:
            continue
        disk, offset = disk_pixels(centre, math.sqrt(radius_mm**2 - dz**2) / pixel_mm)
        if disk.any():
            out.append((float(z), disk, offset, centre))
    return out


def sphere_contours(
    annotation_id: int,
    nodule: int,
    scan_id: int,
    patient: int,
    uid: str,
    *,
    pixel_mm: float,
    slice_mm: float,
    z_positions: Sequence[float],
    origin_xy: Sequence[float],
    centre_mm_xyz: Sequence[float],
    radius_mm: float,
    jitter_px: float = 0.0,
    seed: int = 0,
    jitter_angle: float | None = None,
) -> list[dict]:
    """One reader's outline of a sphere: rows in ``lidc_contours.csv.gz``'s format, one inclusion contour per slice.

    A slice is outlined when its plane cuts the sphere with at least one pixel centre inside (the
    disk of :func:`sphere_disks`); its points are :func:`ring_points` (the pixels just outside the
    disk, LIDC's convention), ``x`` = column, ``y`` = row. ``jitter_px`` moves this reader's centre by
    that many pixels in the direction ``jitter_angle`` (radians) or, when None, one drawn from ``seed``,
    so that readers disagree slightly.
    """
    rows = []
    disks = sphere_disks(
        pixel_mm=pixel_mm,
        z_positions=z_positions,
        origin_xy=origin_xy,
        centre_mm_xyz=centre_mm_xyz,
        radius_mm=radius_mm,
        jitter_px=jitter_px,
        seed=seed,
        jitter_angle=jitter_angle,
    )
    for z, disk, offset, centre in disks:
        rows.append(
            {
                "annotation_id": int(annotation_id),
                "nodule": int(nodule),
                "scan_id": int(scan_id),
                "patient": int(patient),
                "series_uid": uid,
                "pixel_mm": float(pixel_mm),
                "slice_mm": float(slice_mm),
                "z_mm": ds_number(z),
                "inclusion": 1,
                "points": format_points(ring_points(disk, offset, centre)),
            }
        )
    return rows


# ---------------------------------------------------------------------------------------------- tables


def annotation_row(
    annotation_id: int,
    scan_id: int,
    patient: int,
    *,
    malignancy: int,
    spiculation: int,
    texture: int = 5,
    subtlety: int = 4,
    internal_structure: int = 1,
    calcification: int = 6,
    sphericity: int = 5,
    margin: int = 4,
    lobulation: int = 1,
    pixel_mm: float = 0.7,
    slice_mm: float = 1.25,
    n_slices: int = 1,
    largest_mask: np.ndarray | None = None,
) -> dict:
    """One row of ``lidc_annotations.csv`` (``nodulab.synth.lidc.COLUMNS``).

    The measures come from ``largest_mask`` (the annotation's largest traced axial slice, measured with
    ``nodulab.data.traced.measure``) when given, else from a 5 mm disk; a NaN measure (a 1–2 pixel mask)
    becomes a plausible positive value (radial_cv 0.05, aspect 1).
    """
    if largest_mask is None:
        largest_mask, _ = disk_pixels((0.0, 0.0), 2.5 / pixel_mm)
    measures = measure(largest_mask, pixel_mm)
    fallback = {"radial_cv": 0.05, "aspect": 1.0, "solidity": 1.0}
    for key, value in fallback.items():
        if not np.isfinite(measures[key]) or measures[key] <= 0:
            measures[key] = value
    ratings = {
        "subtlety": subtlety,
        "internal_structure": internal_structure,
        "calcification": calcification,
        "sphericity": sphericity,
        "margin": margin,
        "lobulation": lobulation,
        "spiculation": spiculation,
        "texture": texture,
        "malignancy": malignancy,
    }
    row = {"annotation_id": int(annotation_id), "scan_id": int(scan_id), "patient": int(patient)}
    row.update({k: int(ratings[k]) for k in RATINGS})
    row.update({"pixel_mm": float(pixel_mm), "slice_mm": float(slice_mm), "n_slices": int(n_slices)})
    row.update(
        {k: round(float(measures[k]), 4) for k in ("diameter_mm", "area_mm2", "solidity", "radial_cv", "aspect")}
    )
    return {c: row[c] for c in COLUMNS}


def _cell(value) -> str:
    if isinstance(value, float):
        text = repr(round(value, 6))
        return text[:-2] if text.endswith(".0") else text
    return str(value)


def _csv_text(header: str, columns: Sequence[str], rows: Iterable[dict]) -> str:
    buf = io.StringIO()
    buf.write(header)
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_cell(row[c]) for c in columns])
    return buf.getvalue()


def write_tables(
    folder: str | Path, annotation_rows: Sequence[dict], contour_rows: Sequence[dict]
) -> tuple[Path, Path]:
    """Write ``folder/lidc_annotations.csv`` and ``folder/lidc_contours.csv.gz`` (gzip: mtime 0, level 9).

    Both start with ``#`` lines (``# fabricated ...``); the annotation table is checked with
    ``nodulab.synth.lidc.validate``. Contour rows are sorted by annotation_id (stable: per annotation,
    the rows keep their order). Returns the two paths.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    header = "# fabricated by tests/lidc_fabricate.py: not LIDC-IDRI data\n"
    ann = _csv_text(header, COLUMNS, sorted(annotation_rows, key=lambda r: r["annotation_id"]))
    validate(pd.read_csv(io.StringIO("".join(line for line in ann.splitlines(True) if not line.startswith("#")))))
    ann_path = folder / "lidc_annotations.csv"
    ann_path.write_text(ann, encoding="utf-8")
    con = _csv_text(header, CONTOUR_COLUMNS, sorted(contour_rows, key=lambda r: r["annotation_id"]))
    con_path = folder / "lidc_contours.csv.gz"
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
        gz.write(con.encode("utf-8"))
    con_path.write_bytes(buf.getvalue())
    return ann_path, con_path


# --------------------------------------------------------------------------------------------- archive


@dataclass(frozen=True)
class Nodule:
    """One fabricated patient: its series, its nodule (a sphere) and the readers' annotations of it."""

    patient: int
    scan_id: int
    uid: str
    series: Series
    centre_mm_xyz: tuple[float, float, float]
    radius_mm: float
    hu_in: float
    hu_out: float
    annotation_ids: tuple[int, ...]
    nodule: int  # the smallest annotation id (spec A's cluster id)
    malignancy: tuple[int, ...]  # per reader
    spiculation: tuple[int, ...]
    texture: tuple[int, ...]
    median_malignancy: float
    label: int | None  # 1 (median ≥ 4), 0 (≤ 2), None (3: left out by default)
    is_test: bool  # nodulab.synth.twins.is_test_patient
    near_edge: str  # "" (patch fits), "xy" (a 64 px / 0.7 mm patch needs x/y padding) or "z" (only a 3D one needs z)
    missing_z: float | None  # the z of the slice left out of the series (a gap), else None

    @property
    def diameter_mm(self) -> float:
        """The sphere's diameter."""
        return 2 * self.radius_mm


@dataclass(frozen=True)
class Archive:
    """What :func:`fabricate_archive` wrote."""

    root: Path
    annotations: Path
    contours: Path
    nodules: tuple[Nodule, ...]
    pixel_mm: float
    slice_mm: float
    shape_zyx: tuple[int, int, int]

    def by_patient(self, patient: int) -> Nodule:
        """The nodule of one patient."""
        return next(n for n in self.nodules if n.patient == patient)


# Per patient slot: (reader malignancy ratings, spiculation ratings, texture, wanted test side, placement).
_PLAN = (
    ((4, 5, 5), (4, 5, 4), 5, True, "centre"),  # test side, malignant
    ((1, 2, 2), (1, 1, 1), 5, True, "gap"),  # test side, benign, the series with one missing slice
    ((3, 3, 4), (2, 3, 2), 3, False, "centre"),  # median 3: left out by default
    ((5, 4, 4), (5, 4, 5), 5, False, "edge_xy"),  # malignant, near the x/y edge: padded
    ((2, 1, 3), (1, 2, 1), 4, False, "edge_z"),  # benign, near the last slice: padded in 3D only
    ((4, 4, 5), (1, 1, 2), 5, False, "centre"),  # malignant
)
_RESCALE = ((2.0, -1024.0), (0.5, -1024.0), (1.25, -1000.0))  # HU 30 and -860 stored exactly
_SYNTAX = ("explicit_le", "implicit_le")


def _patients(n: int, want_test: Sequence[bool], rng: np.random.Generator) -> list[int]:
    candidates = rng.permutation(np.arange(1, 1013))
    test = is_test_patient(candidates)
    pools = {True: list(candidates[test]), False: list(candidates[~test])}
    return [int(pools[w].pop(0)) for w in want_test[:n]]


def fabricate_archive(
    root: str | Path,
    tables_dir: str | Path,
    *,
    n_patients: int = 6,
    seed: int = 0,
    n_slices: int = 48,
    size_px: int = 96,
    pixel_mm: float = 0.7,
    slice_mm: float = 1.25,
    n_readers: int = 3,
    jitter_px: float = 0.3,
    patch_px: int = 64,
) -> Archive:
    """A small LIDC-like archive: one CT series with one sphere nodule per patient, and the two tables.

    Per patient (cycling through a plan of 6 when ``n_patients`` > 6): ``n_slices`` slices of
    ``size_px`` × ``size_px`` at ``pixel_mm``, ``slice_mm`` apart, origin varying per series; a sphere
    of radius 3–6 mm (HU 30 in −860); ``n_readers`` readers whose outlines are the sphere's disks with
    their centres moved ``jitter_px`` in directions spread evenly around the true one (so that the
    ≥ 50% consensus stays close to the sphere). Slots:

    0. test side, malignant (median 4+);
    1. test side, benign; its series misses one slice (3 slices below the sphere, inside a 3D patch);
    2. median malignancy 3 (left out by default);
    3. malignant, near the x/y edge (a ``patch_px`` patch at ``pixel_mm`` needs ~8 mm of padding);
    4. benign, near the last slice (only a 3D patch needs padding);
    5. malignant.

    Patient numbers are drawn so that slots 0–1 are on the test side of
    ``nodulab.synth.twins.is_test_patient`` and the rest on the train side. Rescale slope/intercept
    cycle through (2, −1024), (0.5, −1024), (1.25, −1000) (each stores HU 30 and −860 exactly); transfer
    syntaxes explicit/implicit VR little endian; files shuffled with random names, at
    ``root/<hex>/<hex>/<hex>.dcm`` (one folder per series). Tables: ``tables_dir/lidc_annotations.csv``
    and ``tables_dir/lidc_contours.csv.gz``. The same arguments give the same bytes.
    """
    root, tables_dir = Path(root), Path(tables_dir)
    rng = np.random.default_rng([seed, 190])
    plan = [_PLAN[i % len(_PLAN)] for i in range(n_patients)]
    patients = _patients(n_patients, [p[3] for p in plan], rng)
    extent = (size_px - 1) * pixel_mm
    half_patch = (patch_px - 1) / 2 * pixel_mm
    nodules, ann_rows, con_rows = [], [], []
    next_id = 1
    for i, ((mal, spic, texture, _, place), patient) in enumerate(zip(plan, patients)):
        scan_id = i + 1
        uid = generate_uid(prefix=LIDC_UID_ROOT, entropy_srcs=["series", str(seed), str(patient)])
        radius = float(np.round(rng.uniform(3.0, 6.0), 2))
        ox = ds_number(-extent / 2 + rng.uniform(-30, 30))
        oy = ds_number(-extent / 2 - 20 + rng.uniform(-30, 30))
        oz = ds_number(-300 + rng.uniform(-50, 50))
        z = default_z(n_slices, oz, slice_mm)
        mid_xy, mid_z = extent / 2, (z[-1] - z[0]) / 2
        near_edge, missing = "", None
        dx, dy = rng.uniform(-4, 4, 2)
        dz = rng.uniform(-1.5, 1.5) * slice_mm
        if place == "edge_xy":  # ~ 8 mm of padding needed on one side
            dx = -(mid_xy - (half_patch - 8.0))
            near_edge = "xy"
        elif place == "edge_z":
            dz = (z[-1] - z[0]) / 2 - radius - 2 * slice_mm
            near_edge = "z"
        centre = (ds_number(ox + mid_xy + dx), ds_number(oy + mid_xy + dy), ds_number(z[0] + mid_z + dz))
        if place == "gap":  # leave out one slice a few slices below the nodule (still inside a 3D patch)
            k_gap = int(np.searchsorted(z, centre[2] - radius)) - 3
            missing = z[k_gap]
            z = z[:k_gap] + z[k_gap + 1 :]
        slope, intercept = _RESCALE[i % len(_RESCALE)]
        volume = sphere_volume(
            (len(z), size_px, size_px), pixel_mm, slice_mm, centre, radius, origin_xyz=(ox, oy, oz), z_positions=z
        )
        folder = root / f"{int(rng.integers(0, 2**31)):08x}" / f"{int(rng.integers(0, 2**31)):08x}"
        series = write_series(
            folder,
            volume,
            uid=uid,
            patient=patient,
            pixel_mm=pixel_mm,
            slice_mm=slice_mm,
            z_positions=z,
            origin_xy=(ox, oy),
            slope=slope,
            intercept=intercept,
            seed=seed,
            transfer_syntax=_SYNTAX[i % len(_SYNTAX)],
        )
        ids = tuple(range(next_id, next_id + n_readers))
        next_id += n_readers
        phase = float(rng.uniform(0, 2 * np.pi))  # the readers' centres spread evenly around the true one
        for j, aid in enumerate(ids):
            kwargs = dict(
                pixel_mm=pixel_mm,
                z_positions=z,
                origin_xy=(ox, oy),
                centre_mm_xyz=centre,
                radius_mm=radius,
                jitter_px=jitter_px,
                jitter_angle=phase + 2 * np.pi * j / n_readers,
            )
            rows = sphere_contours(aid, ids[0], scan_id, patient, uid, slice_mm=slice_mm, **kwargs)
            con_rows.extend(rows)
            disks = sphere_disks(**kwargs)
            largest = max(disks, key=lambda d: int(d[1].sum()))[1]
            ann_rows.append(
                annotation_row(
                    aid,
                    scan_id,
                    patient,
                    malignancy=mal[j % len(mal)],
                    spiculation=spic[j % len(spic)],
                    texture=texture,
                    pixel_mm=pixel_mm,
                    slice_mm=slice_mm,
                    n_slices=len(rows),
                    largest_mask=largest,
                )
            )
        mal_r = tuple(mal[j % len(mal)] for j in range(n_readers))
        median = float(np.median(mal_r))
        nodules.append(
            Nodule(
                patient=patient,
                scan_id=scan_id,
                uid=uid,
                series=series,
                centre_mm_xyz=centre,
                radius_mm=radius,
                hu_in=30.0,
                hu_out=-860.0,
                annotation_ids=ids,
                nodule=ids[0],
                malignancy=mal_r,
                spiculation=tuple(spic[j % len(spic)] for j in range(n_readers)),
                texture=(texture,) * n_readers,
                median_malignancy=median,
                label=1 if median >= 4 else 0 if median <= 2 else None,
                is_test=bool(is_test_patient(np.array([patient]))[0]),
                near_edge=near_edge,
                missing_z=missing,
            )
        )
    ann_path, con_path = write_tables(tables_dir, ann_rows, con_rows)
    return Archive(
        root=root,
        annotations=ann_path,
        contours=con_path,
        nodules=tuple(nodules),
        pixel_mm=pixel_mm,
        slice_mm=slice_mm,
        shape_zyx=(n_slices, size_px, size_px),
    )
