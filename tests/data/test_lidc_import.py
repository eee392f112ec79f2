"""``nodulab import-lidc`` on fabricated LIDC-IDRI DICOM (``tests/lidc_fabricate.py``).

The archive: six patients, one CT series each (rescale slope/intercept not 1/0, files shuffled in
random folders, one series with a missing slice), a sphere of known centre, radius and HU per
series, three readers' outlines of it, and the two tables in the shipped formats.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lidc_fabricate as fab
from nodulab.data import lidc_import
from nodulab.data.dataset import DatasetError, load_manifest, load_split
from nodulab.synth.twins import is_test_patient

SIZE = 64


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> fab.Archive:
    base = tmp_path_factory.mktemp("lidc")
    return fab.fabricate_archive(base / "root", base / "tables")


def _import(archive: fab.Archive, out: Path, **options) -> lidc_import.ImportResult:
    opts = lidc_import.Options(**{"size": SIZE, **options})
    return lidc_import.import_lidc(archive.root, out, options=opts, tables=archive.annotations.parent)


@pytest.fixture(scope="module", params=[2, 3], ids=["2d", "3d"])
def imported(request, archive, tmp_path_factory) -> tuple[int, Path, lidc_import.ImportResult]:
    dim = request.param
    out = tmp_path_factory.mktemp(f"imported{dim}") / "real"
    result = lidc_import.import_lidc(
        archive.root, out, options=lidc_import.Options(dim=dim, size=SIZE), tables=archive.annotations.parent
    )
    return dim, out, result


def _rows(root: Path):
    for split in load_manifest(root)["splits"]:
        images, masks, factors = load_split(root, split)
        for i, row in factors.iterrows():
            yield split, np.asarray(images[i]), np.asarray(masks[i]), row


def _true_sphere(n: fab.Nodule, image: np.ndarray, row, pixel_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Per patch voxel: inside the true sphere (bool); and the sphere's centre in patch voxels.

    The patch's centre voxel lies on the imported centre; that centre is estimated here from the
    image itself (its HU-weighted centroid), independently of the importer's outline centroid.
    """
    size, dim = image.shape[-1], image.ndim
    fraction = np.clip((image.astype(float) - n.hu_out) / (n.hu_in - n.hu_out), 0, 1)
    grids = np.meshgrid(*[np.arange(size)] * dim, indexing="ij")
    weights = np.where(fraction > 0.05, fraction, 0)
    centroid = np.array([(g * weights).sum() / weights.sum() for g in grids])
    return fraction, centroid


def _nodule(archive: fab.Archive, patient: int) -> fab.Nodule:
    return archive.by_patient(int(patient))


def test_patches_are_centred_with_the_spheres_hu_diameter_and_outline(archive, imported) -> None:
    dim, root, _ = imported
    pixel_mm = load_manifest(root)["image"]["pixel_mm"]
    rows = list(_rows(root))
    assert len(rows) == 5  # six nodules, one of median malignancy 3 left out
    for _, image, mask, row in rows:
        n = _nodule(archive, row["patient"])
        size = image.shape[-1]
        fraction, centroid = _true_sphere(n, image, row, pixel_mm)
        if not row["padded"]:  # a padded patch's -1024 would pull an HU-weighted centroid
            assert np.abs(centroid - (size - 1) / 2).max() < 0.5, (row["patient"], centroid)
        # the sphere, placed where its centre is found, against the readers' consensus mask
        grids = np.meshgrid(*[np.arange(size)] * dim, indexing="ij")
        centre = np.array([(g * mask).sum() / mask.sum() for g in grids])
        distance = np.sqrt(sum((g - c) ** 2 for g, c in zip(grids, centre))) * pixel_mm
        truth = distance <= n.radius_mm
        dice = 2 * (truth & (mask == 1)).sum() / (truth.sum() + mask.sum())
        assert dice >= 0.95, (row["patient"], dice)
        # HU: the sphere's core (more than one source voxel inside) is the sphere's HU
        core = distance <= n.radius_mm - 1.5
        assert abs(np.median(image[core]) - n.hu_in) <= 5
        assert (
            abs(
                np.median(image[distance >= n.radius_mm + 2.0][image[distance >= n.radius_mm + 2.0] > -1024]) - n.hu_out
            )
            <= 5
        )
        # diameter: the area-equivalent (2D) or volume-equivalent (3D) diameter of the HU fraction
        if dim == 2:
            measured = 2 * np.sqrt(fraction.sum() / np.pi) * pixel_mm
        else:
            measured = 2 * np.cbrt(3 * fraction.sum() / (4 * np.pi)) * pixel_mm
        assert abs(measured - n.diameter_mm) <= 0.05 * n.diameter_mm + pixel_mm / 2, (measured, n.diameter_mm)
        assert abs(row["diameter_mm"] - n.diameter_mm) <= 0.1 * n.diameter_mm + pixel_mm


def test_labels_splits_and_padding(archive, imported) -> None:
    dim, root, result = imported
    seen: dict[int, str] = {}
    for split, _, _, row in _rows(root):
        n = _nodule(archive, row["patient"])
        assert row["label"] == n.label
        assert row["n_readers"] == 3
        assert row["lidc_malignancy"] == n.median_malignancy
        assert seen.setdefault(int(row["patient"]), split) == split  # one split per patient
        assert (split == "test_lidc") == bool(is_test_patient(np.array([row["patient"]]))[0])
        assert row["padded"] == int(n.near_edge == "xy" or (dim == 3 and n.near_edge == "z"))
    real = result.manifest["real"]
    assert real["left_out"] == {"malignancy 3: between --benign and --malignant": 1}
    gaps = {s["patient"]: s["missing_slices"] for s in real["series"]}
    assert sum(gaps.values()) == 1 and gaps[next(n.patient for n in archive.nodules if n.missing_z is not None)] == 1
    assert len(real["series"]) == 6 and real["skipped"] == []


def test_reimport_gives_the_same_bytes(archive, imported, tmp_path) -> None:
    dim, first, _ = imported
    size = load_manifest(first)["image"]["size"]
    second = tmp_path / "again"
    _import(archive, second, dim=dim, size=size)
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file())
    for name in files:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_label_thresholds_and_each_reader(archive, tmp_path) -> None:
    wider = _import(archive, tmp_path / "wider", malignant_from=3)
    assert sum(wider.counts.values()) == 6 and wider.manifest["real"]["left_out"] == {}
    each = _import(archive, tmp_path / "each", readers="each")
    frames = [load_split(tmp_path / "each", s)[2] for s in each.counts]
    rows = [r for f in frames for _, r in f.iterrows()]
    assert all(r["n_readers"] == 1 for r in rows)
    # per reader: ratings 4, 5 → 1; 1, 2 → 0; 3 left out (readers of 6 nodules, 18 annotations)
    ratings = [m for n in archive.nodules for m in n.malignancy]
    assert len(rows) == sum(m != 3 for m in ratings)
    assert sorted(r["annotation_id"] for r in rows) == sorted(
        a for n in archive.nodules for a, m in zip(n.annotation_ids, n.malignancy) if m != 3
    )
    with pytest.raises(DatasetError, match="--benign"):
        lidc_import.Options(benign_to=4, malignant_from=4).check()


# ----------------------------------------------------------------------------- hostile input
def _variant(archive: fab.Archive, tmp_path: Path, patient_slot: int, **changes) -> Path:
    """A copy of the archive whose series of one patient is written again with ``changes``."""
    root = tmp_path / "root"
    shutil.copytree(archive.root, root)
    n = archive.nodules[patient_slot]
    folder = root / n.series.folder.relative_to(archive.root)
    volume, z = fab.read_series_hu(n.series.files)
    shutil.rmtree(folder)
    args = dict(
        uid=n.uid,
        patient=n.patient,
        pixel_mm=archive.pixel_mm,
        slice_mm=archive.slice_mm,
        z_positions=z,
        origin_xy=n.series.origin_xy,
        slope=n.series.slope,
        intercept=n.series.intercept,
    )
    fab.write_series(folder, volume, **{**args, **changes})
    return root


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nodulab", *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=300
    )


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"modality": "MR"}, "modality MR, not CT"),
        ({"omit": ("RescaleSlope", "RescaleIntercept")}, "RescaleSlope missing"),
        ({"transfer_syntax": "jpeg2000"}, "pixel data cannot be decoded (JPEG 2000"),
        ("uneven", "non-uniform slice spacing"),
        ({"pixel_mm": 0.8}, "PixelSpacing 0.8 mm, the table's outlines were traced at 0.7 mm"),
    ],
    ids=["not-ct", "no-rescale", "jpeg2000", "uneven-spacing", "other-pixel-grid"],
)
def test_a_series_that_cannot_be_read_is_skipped_and_listed(archive, tmp_path, changes, reason) -> None:
    if changes == "uneven":
        z = list(fab.read_series_hu(archive.nodules[0].series.files)[1])
        z[10] += 0.3 * archive.slice_mm  # a step 30% off: neither regular nor one missing slice
        changes = {"z_positions": z}
    root = _variant(archive, tmp_path, 0, **changes)
    out = tmp_path / "out"
    done = _cli("import-lidc", root, "--out", out, "--tables", archive.annotations.parent)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("skipped series")]
    assert len(lines) == 1 and archive.nodules[0].uid in lines[0] and reason in lines[0], done.stdout
    skipped = load_manifest(out)["real"]["skipped"]
    assert [s["uid"] for s in skipped] == [archive.nodules[0].uid] and reason in skipped[0]["reason"]
    assert sum(e["n"] for e in load_manifest(out)["splits"].values()) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "root"]  # nothing outside --out


def test_two_series_in_one_folder_are_told_apart_by_uid(archive, tmp_path) -> None:
    root = tmp_path / "root"
    shutil.copytree(archive.root, root)
    flat = root / "flat"
    flat.mkdir()
    for n in archive.nodules[:2]:
        folder = root / n.series.folder.relative_to(archive.root)
        for f in folder.iterdir():
            f.rename(flat / f"{n.patient}-{f.name}")
    result = lidc_import.import_lidc(
        root, tmp_path / "out", options=lidc_import.Options(size=32), tables=archive.annotations.parent
    )
    assert len(result.manifest["real"]["series"]) == 6 and not result.skipped


@pytest.mark.parametrize(
    "case", ["no-lidc-series", "out-inside-root", "out-inside-tables", "root-is-file", "bad-tables"]
)
def test_refused_with_one_line_and_nothing_written(archive, tmp_path, case) -> None:
    root, out, tables = archive.root, tmp_path / "out", archive.annotations.parent
    expect = {
        "no-lidc-series": "no LIDC-IDRI series",
        "out-inside-root": "--out",
        "out-inside-tables": "--out",
        "root-is-file": "is not a folder",
        "bad-tables": "lidc_contours.csv.gz",
    }[case]
    if case == "no-lidc-series":
        root = tmp_path / "other"
        volume, z = fab.read_series_hu(archive.nodules[0].series.files)
        s = archive.nodules[0].series
        fab.write_series(
            root / "x",
            volume,
            uid="1.2.3.4",
            patient=1,
            pixel_mm=s.pixel_mm,
            slice_mm=s.slice_mm,
            z_positions=z,
            origin_xy=s.origin_xy,
        )
        (root / "notes.txt").write_text("not DICOM")
    elif case == "out-inside-root":
        root = tmp_path / "root"
        shutil.copytree(archive.root, root)
        out = root / "inside"
    elif case == "out-inside-tables":
        tables = tmp_path / "tables"
        shutil.copytree(archive.annotations.parent, tables)
        out = tables / "inside"
    elif case == "root-is-file":
        root = archive.annotations
    else:
        tables = tmp_path / "tables"
        shutil.copytree(archive.annotations.parent, tables)
        (tables / "lidc_contours.csv.gz").write_bytes(b"not gzip")
    before = sorted(p for p in tmp_path.rglob("*"))
    done = _cli("import-lidc", root, "--out", out, "--tables", tables)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert len(done.stderr.strip().splitlines()) == 1 and expect in done.stderr, done.stderr
    assert sorted(p for p in tmp_path.rglob("*")) == before


def test_import_follows_the_umask(archive, tmp_path) -> None:
    old = os.umask(0o027)
    try:
        _import(archive, tmp_path / "out", size=32)
    finally:
        os.umask(old)
    for path in (tmp_path / "out").rglob("*"):
        assert path.stat().st_mode & 0o777 == (0o750 if path.is_dir() else 0o640), path


def test_the_shipped_tables_locate_a_real_nodule(tmp_path) -> None:
    """A series fabricated under a real SeriesInstanceUID of the shipped table, its nodules painted
    from the readers' own outlines (-860 HU + 890 HU × the share of readers including a pixel): the
    import with the shipped tables finds each, centres it and gives back the painted region (HU at
    least midway, a share of at least half) as the mask."""
    from nodulab.synth import lidc

    contours = lidc.load_contours()
    sizes = contours.groupby("nodule")["annotation_id"].nunique()
    rows_per_scan = contours.groupby("series_uid").size()
    full = contours[contours["nodule"].isin(sizes[sizes == 4].index)]
    uid = rows_per_scan[rows_per_scan.index.isin(full["series_uid"])].idxmin()
    mine = contours[contours["series_uid"] == uid]
    step = float(mine["slice_mm"].iloc[0])
    pixel = float(mine["pixel_mm"].iloc[0])
    z_traced = np.unique(np.round(mine["z_mm"].to_numpy(), 3))
    z = list(np.arange(z_traced.min() - 30, z_traced.max() + 30 + step / 2, step))
    assert all(np.isclose(z, t).any() for t in z_traced), "the traced slices lie on the series' grid"
    volume = np.full((len(z), 512, 512), -860.0)
    nodules = sorted(set(mine["nodule"]))
    for nodule in nodules:
        o = lidc_import.outline(mine, sorted(set(mine.loc[mine["nodule"] == nodule, "annotation_id"])))
        for k, zk in enumerate(o.z):
            r0, c0 = o.origin
            h, w = o.fraction[k].shape
            sl = volume[int(np.argmin(np.abs(np.array(z) - zk)))]
            sl[r0 : r0 + h, c0 : c0 + w] = np.maximum(sl[r0 : r0 + h, c0 : c0 + w], -860.0 + 890.0 * o.fraction[k])
    patient = int(mine["patient"].iloc[0])
    fab.write_series(
        tmp_path / "root" / "s",
        volume,
        uid=uid,
        patient=patient,
        pixel_mm=pixel,
        slice_mm=step,
        z_positions=z,
        origin_xy=(-180.0, -170.0),
        slope=1.0,
        intercept=-1024.0,
    )
    out = tmp_path / "out"
    result = lidc_import.import_lidc(
        tmp_path / "root", out, options=lidc_import.Options(malignant_from=1.5, benign_to=1)
    )
    assert not result.skipped and result.manifest["real"]["tables"][lidc.CONTOURS] == lidc.contours_sha256()
    for _, image, mask, row in _rows(out):
        assert row["patient"] == patient
        painted = image >= -415  # midway between -860 and 30
        dice = 2 * (painted & (mask == 1)).sum() / (painted.sum() + mask.sum())
        assert dice >= 0.97, (row["nodule"], dice)
        grid = np.arange(image.shape[-1])
        centre = [(grid[:, None] * painted).sum() / painted.sum(), (grid[None, :] * painted).sum() / painted.sum()]
        assert np.abs(np.array(centre) - (image.shape[-1] - 1) / 2).max() < 1.0


# ----------------------------------------------------------------------------- the spacing rule
@given(
    step=st.floats(0.5, 5.0),
    n=st.integers(3, 40),
    jitter=st.lists(st.floats(-0.02, 0.02), min_size=40, max_size=40),
    gap=st.one_of(st.none(), st.integers(0, 38)),
    order=st.randoms(use_true_random=False),
)
@settings(max_examples=200, deadline=None)
def test_the_spacing_rule_accepts_1_percent_and_one_missing_slice_only(step, n, jitter, gap, order) -> None:
    """Steps within 1% of the median step, or exactly one step of two, are read (in any file order);
    anything else is skipped with its reason."""
    steps = [step * (1 + j) for j in jitter[: n - 1]]
    if gap is not None and gap < n - 1:
        steps[gap] *= 2
    z = np.concatenate([[0.0], np.cumsum(steps)])
    headers = [
        lidc_import.SliceHeader(Path(f"{k}.dcm"), float(zk), (0.0, 0.0), (0.7, 0.7), (8, 8), 1.0, -1024.0)
        for k, zk in enumerate(z)
    ]
    order.shuffle(headers)
    diffs = np.diff(z)
    median = np.median(diffs)
    regular = np.abs(diffs - median) <= 0.01 * median
    doubled = np.abs(diffs - 2 * median) <= 0.01 * median
    readable = bool(np.all(regular | doubled) and doubled.sum() <= 1)
    try:
        volume = lidc_import.check_volume(lidc_import.Series("1.2.3", headers))
    except lidc_import.Skip as e:
        assert not readable and "non-uniform slice spacing" in str(e)
    else:
        assert readable and np.array_equal(volume.z, z) and volume.gaps == int(doubled.sum())


def test_the_cli_knows_the_importers_readers() -> None:
    from nodulab import cli

    assert cli.READERS == lidc_import.READERS


def test_a_second_copy_of_a_series_is_read_once(archive, tmp_path) -> None:
    root = tmp_path / "root"
    shutil.copytree(archive.root, root)
    n = archive.nodules[0]
    shutil.copytree(root / n.series.folder.relative_to(archive.root), root / "zz-copy")
    options = lidc_import.Options(size=32)
    result = lidc_import.import_lidc(root, tmp_path / "out", options=options, tables=archive.annotations.parent)
    assert not result.skipped and result.manifest["real"]["files"]["duplicate copies"] == len(n.series.files)
    assert sum(result.counts.values()) == 5


def test_without_the_dicom_extra_one_line_says_how_to_install_it(archive, tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "pydicom", None)  # import pydicom raises ImportError
    with pytest.raises(DatasetError, match=r"pip install 'nodulab\[dicom\]'"):
        _import(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()
