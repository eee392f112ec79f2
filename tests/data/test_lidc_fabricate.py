"""The fabricated LIDC-like data (tests/lidc_fabricate.py) is what it claims: the importer's tests rely on it."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

import lidc_fabricate as fab
from nodulab.synth import lidc
from nodulab.synth.lidc import validate

PIXEL, SLICE = 0.7, 1.25
ORIGIN = (-100.0, -120.0, -300.0)


def read_hu(files) -> tuple[np.ndarray, list[float], list[pydicom.Dataset]]:
    """Files → (HU volume in z order, z positions, datasets in z order), read with pydicom only."""
    dss = sorted((pydicom.dcmread(f) for f in files), key=lambda d: float(d.ImagePositionPatient[2]))
    hu = np.stack([d.pixel_array.astype(float) * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in dss])
    return hu, [float(d.ImagePositionPatient[2]) for d in dss], dss


def segment(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The pixels on the segment from a to b (both included), one per step of the longer axis."""
    t = np.linspace(0.0, 1.0, int(np.abs(b - a).max()) + 1)[:, None]
    return np.rint(a + t * (b - a)).astype(np.int64)


def rasterise(points: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Pixel centres inside the closed polygon (even-odd rule), minus the outline (points and segments between them)."""
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]].astype(float)
    inside = np.zeros(shape, dtype=bool)
    xs, ys = points[:, 0].astype(float), points[:, 1].astype(float)
    for xa, ya, xb, yb in zip(xs, ys, np.roll(xs, -1), np.roll(ys, -1)):
        if ya != yb:
            inside ^= ((ya > rows) != (yb > rows)) & (cols < xa + (rows - ya) * (xb - xa) / (yb - ya))
    closed = np.concatenate([points, points[:1]])
    for a, b in zip(closed[:-1], closed[1:]):
        seg = segment(a, b)
        inside[seg[:, 1], seg[:, 0]] = False
    return inside


def truth_mask(shape, z, centre, radius, origin_xy) -> np.ndarray:
    """Voxels whose centres lie inside the sphere."""
    k, r, c = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), np.arange(shape[2]), indexing="ij")
    x, y, zz = origin_xy[0] + c * PIXEL, origin_xy[1] + r * PIXEL, np.asarray(z)[k]
    return (x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (zz - centre[2]) ** 2 <= radius**2


def contour_volume(rows: list[dict], shape, z) -> np.ndarray:
    """The 3D mask of one annotation's contours, rasterised slice by slice."""
    mask = np.zeros(shape, dtype=bool)
    for row in rows:
        pts = np.array(row["points"].split(), dtype=np.int64).reshape(-1, 2)
        k = int(np.argmin(np.abs(np.asarray(z) - float(row["z_mm"]))))
        assert abs(z[k] - float(row["z_mm"])) < 1e-6
        mask[k] |= rasterise(pts, shape[1:])
    return mask


@pytest.mark.parametrize("radius", [2.0, 3.0, 4.4, 6.0])
def test_sphere_volume_and_mean_hu_exact_within_a_percent(radius):
    rng = np.random.default_rng(int(radius * 10))
    for _ in range(3):
        centre = (
            ORIGIN[0] + 20 + rng.uniform(0, 1),
            ORIGIN[1] + 20 + rng.uniform(0, 1),
            ORIGIN[2] + 20 + rng.uniform(0, 2),
        )
        vol = fab.sphere_volume((32, 48, 48), PIXEL, SLICE, centre, radius, origin_xyz=ORIGIN)
        frac = fab.sphere_fraction(vol)
        assert frac.min() >= 0 and frac.max() <= 1
        exact = 4 / 3 * math.pi * radius**3
        assert abs(frac.sum() * PIXEL * PIXEL * SLICE / exact - 1) < 0.01
        # the mean HU of the sphere: HU integrated over the volume, the background's share removed
        mean_hu = (vol + 860.0).sum() * PIXEL * PIXEL * SLICE / exact - 860.0
        assert abs(mean_hu - 30.0) < 0.01 * 890
        # centre of mass at the centre (sub-voxel)
        k, r, c = np.nonzero(frac)
        w = frac[k, r, c]
        com = (ORIGIN[0] + (c * w).sum() / w.sum() * PIXEL, ORIGIN[1] + (r * w).sum() / w.sum() * PIXEL)
        assert np.allclose(com, centre[:2], atol=0.05 * PIXEL)


def test_series_reads_back_with_pydicom(tmp_path):
    z = fab.default_z(24, ORIGIN[2], SLICE)
    z = z[:10] + z[11:]  # one missing slice
    centre, radius = (ORIGIN[0] + 16.3, ORIGIN[1] + 17.1, z[5] + 0.4), 4.2  # clear of the gap
    vol = fab.sphere_volume((23, 48, 40), PIXEL, SLICE, centre, radius, origin_xyz=ORIGIN, z_positions=z)
    for syntax, slope, intercept in (("explicit_le", 2.0, -1024.0), ("implicit_le", 0.5, -1000.0)):
        s = fab.write_series(
            tmp_path / syntax,
            vol,
            uid="1.2.3.4." + str(len(syntax)),
            patient=7,
            pixel_mm=PIXEL,
            slice_mm=SLICE,
            z_positions=z,
            origin_xy=ORIGIN[:2],
            slope=slope,
            intercept=intercept,
            transfer_syntax=syntax,
        )
        assert len(s.files) == len(set(s.files)) == 23 and all(f.parent == tmp_path / syntax for f in s.files)
        on_disk = sorted(s.folder.iterdir())
        assert on_disk != list(s.files), "file names sort in z order: not shuffled"
        hu, zs, dss = read_hu(on_disk)
        assert zs == list(z)
        assert np.abs(hu - vol).max() <= slope / 2 + 1e-9
        d = dss[0]
        assert d.file_meta.TransferSyntaxUID == fab.TRANSFER_SYNTAXES[syntax]
        assert d.SOPClassUID == pydicom.uid.CTImageStorage and d.Modality == "CT"
        assert d.SeriesInstanceUID == s.uid and d.PatientID == "LIDC-IDRI-0007"
        assert [float(v) for v in d.PixelSpacing] == [PIXEL, PIXEL] and float(d.SliceThickness) == SLICE
        assert [float(v) for v in d.ImagePositionPatient] == [ORIGIN[0], ORIGIN[1], z[0]]
        assert (d.Rows, d.Columns, d.BitsAllocated, d.PixelRepresentation) == (48, 40, 16, 0)
        assert [int(x.InstanceNumber) for x in dss] == list(range(23, 0, -1))  # 1 = highest z
        assert len({x.SOPInstanceUID for x in dss}) == 23 and len({x.StudyInstanceUID for x in dss}) == 1
        # the volume survives the round trip (quantised by the slope)
        frac = fab.sphere_fraction(hu)
        assert abs(frac.sum() * PIXEL * PIXEL * SLICE / (4 / 3 * math.pi * radius**3) - 1) < 0.02


def test_write_series_variants(tmp_path):
    vol = np.full((3, 8, 8), -860.0)
    kw = dict(uid="1.2.3", patient=1, pixel_mm=PIXEL, slice_mm=SLICE, z_positions=[0, 1.25, 2.5], origin_xy=(0, 0))
    s = fab.write_series(tmp_path / "a", vol, omit=("RescaleSlope", "RescaleIntercept"), modality="MR", **kw)
    d = pydicom.dcmread(s.files[0])
    assert "RescaleSlope" not in d and "RescaleIntercept" not in d
    assert d.Modality == "MR" and d.SOPClassUID == pydicom.uid.MRImageStorage
    s = fab.write_series(tmp_path / "b", vol, shuffle=False, file_names="ordered", **kw)
    assert [f.name for f in s.files] == ["IMG0000.dcm", "IMG0001.dcm", "IMG0002.dcm"]
    again = fab.write_series(tmp_path / "c", vol, shuffle=False, file_names="ordered", **kw)
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(s.files, again.files))
    with pytest.raises(ValueError, match="uint16"):
        fab.write_series(tmp_path / "d", vol - 1000, **kw)


def test_jpeg2000_variant_cannot_be_decoded(tmp_path):
    vol = np.full((2, 8, 8), -860.0)
    s = fab.write_series(
        tmp_path,
        vol,
        uid="1.2.3",
        patient=1,
        pixel_mm=PIXEL,
        slice_mm=SLICE,
        z_positions=[0, 1.25],
        origin_xy=(0, 0),
        transfer_syntax="jpeg2000",
    )
    d = pydicom.dcmread(s.files[0])
    assert d.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.90"
    assert d.SeriesInstanceUID == "1.2.3" and d.Rows == 8
    with pytest.raises(Exception):  # noqa: B017 - whichever error the installed decoders raise
        d.pixel_array  # noqa: B018


def test_contours_rasterise_back_to_the_disk():
    rng = np.random.default_rng(3)
    for trial in range(40):
        centre = (ORIGIN[0] + rng.uniform(12, 20), ORIGIN[1] + rng.uniform(12, 20), ORIGIN[2] + rng.uniform(10, 20))
        radius = rng.uniform(0.8, 7.0)
        z = fab.default_z(28, ORIGIN[2], SLICE)
        jitter = 0.0 if trial % 2 else 0.3
        kw = dict(z_positions=z, origin_xy=ORIGIN[:2], centre_mm_xyz=centre, radius_mm=radius, jitter_px=jitter)
        rows = fab.sphere_contours(trial + 1, 1, 1, 5, "1.2", pixel_mm=PIXEL, slice_mm=SLICE, seed=trial, **kw)
        disks = fab.sphere_disks(pixel_mm=PIXEL, seed=trial, **kw)
        assert len(rows) == len(disks) > 0
        for row, (zk, disk, (r0, c0), _) in zip(rows, disks):
            assert row["z_mm"] == zk and row["inclusion"] == 1 and row["annotation_id"] == trial + 1
            pts = np.array(row["points"].split(), dtype=np.int64).reshape(-1, 2)
            got = rasterise(pts - (c0, r0), disk.shape)
            assert np.array_equal(got, disk), (trial, zk)
        if jitter == 0:  # without jitter the contours are the sphere's voxel-centre set
            want = truth_mask((28, 64, 64), z, centre, radius, ORIGIN[:2])
            assert np.array_equal(contour_volume(rows, (28, 64, 64), z), want)


def _shared_rasteriser():
    """``nodulab.synth.lidc.contour_mask`` (or the build script's ``rasterise``): what the table and importer use."""
    mask = getattr(lidc, "contour_mask", None)
    if mask is not None:
        return lambda pts, shape: mask([(1, pts)], shape, (0, 0))
    script = Path(__file__).resolve().parents[2] / "scripts" / "build_lidc_table.py"
    spec = importlib.util.spec_from_file_location("build_lidc_table_for_test", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "rasterise"):
        pytest.skip("no shared contour rasteriser in nodulab.synth.lidc or scripts/build_lidc_table.py")

    def rasterise_script(pts, shape):
        inside, outline = module.rasterise(pts, shape, (0, 0))
        return inside & ~outline

    return rasterise_script


def test_contours_match_the_shared_rasteriser():
    shared = _shared_rasteriser()
    for i, radius in enumerate((1.0, 2.7, 5.5, 8.0)):
        centre = (ORIGIN[0] + 15.2 + i / 7, ORIGIN[1] + 14.9 - i / 5, ORIGIN[2] + 12.0)
        rows = fab.sphere_contours(
            1,
            1,
            1,
            5,
            "1.2",
            pixel_mm=PIXEL,
            slice_mm=SLICE,
            z_positions=fab.default_z(20, ORIGIN[2], SLICE),
            origin_xy=ORIGIN[:2],
            centre_mm_xyz=centre,
            radius_mm=radius,
            jitter_px=0.3,
            seed=i,
        )
        for row in rows:
            pts = np.array(row["points"].split(), dtype=np.int64).reshape(-1, 2)
            assert np.array_equal(shared(pts, (48, 48)), rasterise(pts, (48, 48)))


def test_tables_load_and_have_the_spec_format(tmp_path):
    z = fab.default_z(16, ORIGIN[2], SLICE)
    kw = dict(z_positions=z, origin_xy=ORIGIN[:2], centre_mm_xyz=(-90.0, -110.0, -290.0), radius_mm=3.5)
    contours = fab.sphere_contours(11, 11, 2, 42, "1.2.3", pixel_mm=PIXEL, slice_mm=SLICE, **kw)
    contours += fab.sphere_contours(12, 11, 2, 42, "1.2.3", pixel_mm=PIXEL, slice_mm=SLICE, jitter_px=0.3, **kw)
    rows = [fab.annotation_row(i, 2, 42, malignancy=m, spiculation=1) for i, m in ((12, 2), (11, 4))]
    ann, con = fab.write_tables(tmp_path, rows, contours)
    text = ann.read_text()
    assert text.startswith("# fabricated")
    table = validate(pd.read_csv(io.StringIO("".join(x for x in text.splitlines(True) if not x.startswith("#")))))
    assert list(table["annotation_id"]) == [11, 12] and list(table["malignancy"]) == [4, 2]
    raw = con.read_bytes()
    assert raw[:2] == b"\x1f\x8b" and raw[4:8] == b"\0\0\0\0"  # gzip, mtime 0
    lines = gzip.decompress(raw).decode().splitlines()
    assert lines[0].startswith("#")
    body = [x for x in lines if not x.startswith("#")]
    assert body[0].split(",") == list(fab.CONTOUR_COLUMNS)
    frame = pd.read_csv(io.StringIO("\n".join(body)))
    assert len(frame) == len(contours) and set(frame["annotation_id"]) == {11, 12}
    assert (frame["series_uid"] == "1.2.3").all() and (frame["nodule"] == 11).all()
    assert frame["annotation_id"].is_monotonic_increasing
    assert all(len(p.split()) % 2 == 0 and len(p.split()) >= 6 for p in frame["points"])
    assert set(frame["z_mm"]) <= set(z)


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    base = tmp_path_factory.mktemp("archive")
    return fab.fabricate_archive(base / "dicom", base / "tables", n_patients=6, seed=0)


def test_archive_contents(archive):
    nodules = archive.nodules
    assert len(nodules) == 6 and len({n.patient for n in nodules}) == 6 and len({n.uid for n in nodules}) == 6
    sides = {n.is_test for n in nodules}
    assert sides == {True, False}
    assert {n.label for n in nodules} == {0, 1, None}
    assert {n.label for n in nodules if n.is_test} == {0, 1}
    assert sum(n.missing_z is not None for n in nodules) == 1
    assert {n.near_edge for n in nodules} == {"", "xy", "z"}
    assert all((n.series.slope, n.series.intercept) != (1.0, 0.0) for n in nodules)
    assert all(3.0 <= n.radius_mm <= 6.0 for n in nodules)
    files = sorted(p for p in archive.root.rglob("*") if p.is_file())
    assert len(files) == sum(len(n.series.files) for n in nodules)
    assert all(len(f.relative_to(archive.root).parts) == 3 for f in files)
    half = (64 - 1) / 2 * archive.pixel_mm  # a 64 px patch at 0.7 mm, centred on the nodule
    for n in nodules:
        depth = archive.shape_zyx[0] - (n.missing_z is not None)
        assert len(n.series.files) == depth and n.missing_z not in n.series.z_positions
        if n.missing_z is not None:  # the gap: below the sphere, inside a 3D patch
            assert n.centre_mm_xyz[2] - half < n.missing_z < n.centre_mm_xyz[2] - n.radius_mm - archive.slice_mm
        z, (ox, oy) = n.series.z_positions, n.series.origin_xy
        extent = (archive.shape_zyx[2] - 1) * archive.pixel_mm
        xy_room = min(n.centre_mm_xyz[0] - ox, n.centre_mm_xyz[1] - oy, ox + extent - n.centre_mm_xyz[0])
        xy_room = min(xy_room, oy + extent - n.centre_mm_xyz[1]) - half
        z_room = min(n.centre_mm_xyz[2] - z[0], z[-1] - n.centre_mm_xyz[2]) - half
        assert (xy_room < -5) == (n.near_edge == "xy") and (xy_room > 3 or n.near_edge == "xy")
        assert (z_room < -5) == (n.near_edge == "z") or n.near_edge == "xy"
        assert z_room > 3 or n.near_edge == "z"
        assert xy_room > -half + n.radius_mm  # the sphere itself is inside the scan
    table = validate(
        pd.read_csv(archive.annotations, comment="#"),
    )
    assert len(table) == 18 and set(table["patient"]) == {n.patient for n in nodules}


def test_archive_series_hold_the_sphere_and_the_readers_agree(archive):
    contours = pd.read_csv(archive.contours, comment="#")
    for n in archive.nodules:
        hu, zs, dss = read_hu(n.series.files)
        assert zs == list(n.series.z_positions) and {d.SeriesInstanceUID for d in dss} == {n.uid}
        frac = fab.sphere_fraction(hu, n.hu_in, n.hu_out)
        vol = frac.sum() * archive.pixel_mm**2 * archive.slice_mm
        assert abs(vol / (4 / 3 * math.pi * n.radius_mm**3) - 1) < 0.02
        shape = hu.shape
        truth = truth_mask(shape, zs, n.centre_mm_xyz, n.radius_mm, n.series.origin_xy)
        votes = np.zeros(shape, dtype=int)
        for aid in n.annotation_ids:
            rows = contours[contours["annotation_id"] == aid].to_dict("records")
            assert {r["nodule"] for r in rows} == {n.nodule} and {r["series_uid"] for r in rows} == {n.uid}
            votes += contour_volume(rows, shape, zs)
        assert (votes == len(n.annotation_ids)).any() and ((votes > 0) & (votes < len(n.annotation_ids))).any()
        consensus = votes * 2 >= len(n.annotation_ids)
        dice = 2 * (consensus & truth).sum() / (consensus.sum() + truth.sum())
        assert dice >= 0.95, (n.patient, dice)


def test_archive_is_the_same_bytes_each_time(archive, tmp_path):
    again = fab.fabricate_archive(tmp_path / "dicom", tmp_path / "tables", n_patients=6, seed=0)

    def digest(root: Path) -> dict[str, str]:
        return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*.dcm")}

    assert digest(again.root) == digest(archive.root)
    assert again.contours.read_bytes() == archive.contours.read_bytes()
    assert again.annotations.read_bytes() == archive.annotations.read_bytes()


def test_archive_tables_load_with_the_shared_loaders(archive):
    if not hasattr(lidc, "load_contours") or not hasattr(lidc, "cluster_annotations"):
        pytest.skip("nodulab.synth.lidc has no contours loader yet")
    table = lidc.load_table(archive.annotations)
    contours = lidc.load_contours(archive.contours)
    assert set(contours["annotation_id"]) == set(table["annotation_id"])
    for n in archive.nodules:
        ids = list(n.annotation_ids)
        clouds = []
        for aid in ids:
            rows = contours[contours["annotation_id"] == aid]
            clouds.append(
                np.concatenate(
                    [
                        np.column_stack([lidc.parse_points(p) * archive.pixel_mm, np.full(len(p.split()) // 2, z)])
                        for p, z in zip(rows["points"], rows["z_mm"])
                    ]
                )
            )
        nodules, _ = lidc.cluster_annotations(ids, clouds, archive.pixel_mm)
        assert nodules == [n.nodule] * len(ids)
