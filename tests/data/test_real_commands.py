"""validate, gallery, export and realism on a real dataset (``nodulab import-lidc``'s kind ``real``).

The datasets are written directly by ``tests/real_dataset.py`` (discs or balls of 30 HU on -860 HU
parenchyma, masks = the discs; spiculated rows have strands outside the mask).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from nodulab.cli import app
from nodulab.data import dataset as data
from nodulab.data import gallery, realism
from nodulab.data.validate import validate
from real_dataset import make_real_dataset

PIXEL_MM = 0.7


@pytest.fixture(scope="module")
def real2d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_real_dataset(tmp_path_factory.mktemp("real") / "r2", n=24, dim=2, size=32, pixel_mm=PIXEL_MM)


@pytest.fixture(scope="module")
def real3d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_real_dataset(tmp_path_factory.mktemp("real") / "r3", n=4, dim=3, size=24, pixel_mm=PIXEL_MM)


def invoke(*args: str | Path):
    return CliRunner().invoke(app, [str(a) for a in args])


def _copy(root: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(root, out)
    return out


def _rehash(root: Path, split: str, key: str) -> None:
    """Record a rewritten file's sha256 in dataset.json, so only the check under test can fail."""
    manifest = json.loads((root / data.MANIFEST).read_text())
    entry = manifest["splits"][split][key]
    entry["sha256"] = data.sha256_file(root / entry["file"])
    (root / data.MANIFEST).write_text(data.dump_json(manifest), encoding="utf-8")


def _edit_masks(root: Path, split: str, edit: Callable[[np.ndarray], None]) -> None:
    path = root / split / "masks.npy"
    masks = np.load(path)
    edit(masks)
    np.save(path, masks)
    _rehash(root, split, "masks")


def _edit_factors(root: Path, split: str, edit: Callable[[pd.DataFrame], None]) -> None:
    path = root / split / "factors.csv"
    frame = data.read_factors(path)
    edit(frame)
    data.write_factors(frame.drop(columns="index"), path)
    _rehash(root, split, "factors")


# ----------------------------------------------------------------------------- validate
@pytest.mark.parametrize("which", ["2d", "3d"])
def test_validate_passes_on_a_real_dataset(which: str, real2d: Path, real3d: Path) -> None:
    root = real2d if which == "2d" else real3d
    result = invoke("validate", root)
    assert result.exit_code == 0, result.output
    assert "no re-render: real CT" in result.output
    names = {c.name for c in validate(root).checks}
    for split in ("train", "val", "test_lidc"):
        for check in ("sha256 {s}/masks.npy", "ratings", "shapes", "masks", "diameter", "labels", "pixel_mm"):
            assert f"{split}: {check.format(s=split)}" in names
    assert {"re-render", "patients", "split sizes"} <= names
    assert not any("agreement" in n or "rng" in n for n in names)


def _empty_mask(root: Path) -> None:
    _edit_masks(root, "val", lambda m: m.__setitem__(3, 0))


def _grow_diameter(root: Path) -> None:
    _edit_factors(root, "train", lambda f: f.__setitem__("diameter_mm", f["diameter_mm"] * (1 + 1e-4)))


def _shared_patient(root: Path) -> None:
    _edit_factors(root, "val", lambda f: f.__setitem__("patient", f["patient"].where(f.index != 0, 0)))


def _mask_value(root: Path) -> None:
    _edit_masks(root, "test_lidc", lambda m: m.__setitem__((1, 0, 0), 2))


def _label_rule(root: Path) -> None:
    def edit(frame: pd.DataFrame) -> None:
        frame.loc[0, "lidc_malignancy"] = 3.0  # label 0 with malignancy 3: between the classes

    _edit_factors(root, "train", edit)


def _rating_scale(root: Path) -> None:
    def edit(frame: pd.DataFrame) -> None:
        frame.loc[2, "lidc_spiculation"] = 6.0  # spiculation is rated 1..5

    _edit_factors(root, "val", edit)


def _changed_bytes(root: Path) -> None:
    path = root / "train" / "images.npy"
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 1
    path.write_bytes(bytes(raw))  # sha256 left as recorded


FAULTS = {
    "mask emptied": (_empty_mask, "val: masks", "empty outline in rows [3]"),
    "mask value 2": (_mask_value, "test_lidc: masks", "other than 0/1"),
    "diameter changed": (_grow_diameter, "train: diameter", "24 rows differ"),
    "patient in two splits": (_shared_patient, "patients", "patient 0 in train and val"),
    "label against the rule": (_label_rule, "train: labels", "malignancy 3"),
    "rating off its scale": (_rating_scale, "val: ratings", "lidc_spiculation"),
    "file changed": (_changed_bytes, "train: sha256 train/images.npy", "≠"),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_validate_fails_naming_the_check(fault: str, real2d: Path, tmp_path: Path) -> None:
    root = _copy(real2d, tmp_path)
    damage, name, detail = FAULTS[fault]
    damage(root)
    result = invoke("validate", root)
    assert result.exit_code == 1, result.output
    failed = [line for line in result.output.splitlines() if line.startswith("✗")]
    assert any(line.startswith(f"✗ {name}:") and detail in line for line in failed), result.output
    report = validate(root)
    assert not report.ok and {c.name for c in report.checks if not c.ok} >= {name}


# ----------------------------------------------------------------------------- gallery
@pytest.mark.parametrize("which", ["2d", "3d"])
def test_gallery_draws_label_by_spiculation_rows(which: str, real2d: Path, real3d: Path, tmp_path: Path) -> None:
    root = real2d if which == "2d" else real3d
    out = tmp_path / "g.png"
    result = invoke("gallery", root, "--out", out, "--per-cell", "2")
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:4] == b"\x89PNG"
    fig = gallery.gallery_figure(root, per_cell=2)
    axes = [ax for sub in fig.subfigs[1].subfigs for ax in sub.axes]
    labels = {ax.get_ylabel() for ax in axes if ax.get_ylabel()}
    assert labels <= {f"{k}\nspiculation {op} 4" for k in ("benign", "malignant") for op in (">=", "<")}
    assert "malignant\nspiculation >= 4" in labels
    titles = [ax.get_title() for ax in axes if ax.get_title()]
    assert titles and all(t.startswith("mal ") and "spic " in t and t.endswith(" mm") for t in titles)
    assert "LIDC-IDRI" in fig.subfigs[0].get_suptitle()


# ----------------------------------------------------------------------------- export
def test_export_every_format_on_real_data(real2d: Path, real3d: Path, tmp_path: Path) -> None:
    from PIL import Image

    for root, tag in ((real2d, "2d"), (real3d, "3d")):
        for fmt, name in (("medmnist", "x.npz"), ("nifti", "nii"), ("png", "png")):
            result = invoke("export", root, "--format", fmt, "--out", tmp_path / f"{tag}-{name}")
            assert result.exit_code == 0, result.output
    manifest = data.load_manifest(real2d)
    with np.load(tmp_path / "2d-x.npz") as npz:
        assert sorted(npz.files) == sorted(f"{s}_{k}" for s in manifest["splits"] for k in ("images", "labels"))
        for split in manifest["splits"]:
            images, _, frame = data.load_split(real2d, split)
            assert npz[f"{split}_images"].shape == images.shape
            assert np.array_equal(npz[f"{split}_labels"][:, 0], frame["label"].to_numpy())
    for root, tag in ((real2d, "2d"), (real3d, "3d")):
        images, _, frame = data.load_split(root, "val")
        pixel_mm = data.load_manifest(root)["image"]["pixel_mm"]
        volume = nib.load(tmp_path / f"{tag}-nii" / "val" / "000001.nii.gz")
        assert volume.header.get_zooms() == pytest.approx((pixel_mm,) * 3)
        stored = np.asarray(volume.dataobj).transpose(2, 1, 0)
        assert np.array_equal(stored.reshape(images[1].shape), images[1])
        labels = pd.read_csv(tmp_path / f"{tag}-png" / "labels.csv")
        assert len(labels) == sum(e["n"] for e in data.load_manifest(root)["splits"].values())
        val = labels[labels["split"] == "val"]
        assert val["label"].tolist() == frame["label"].tolist()
        png = Image.open(tmp_path / f"{tag}-png" / val["file"].iloc[0])
        assert png.size == (images.shape[-1],) * 2


# ----------------------------------------------------------------------------- realism
def test_realism_traces_real_discs_like_the_readers(real2d: Path, tmp_path: Path) -> None:
    out = tmp_path / "r"
    result = invoke("realism", real2d, "--out", out)
    assert result.exit_code == 0, result.output
    assert "readers' outlines" in result.output and "Dice" in result.output and "spic. >=4" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["measures.csv", "realism.csv", "realism.png", "summary.json"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kind"] == "real" and summary["dice_on"].startswith("2D")
    overall = summary["overall"]
    assert overall["n"] == 72 and overall["untraced"] == 0
    assert overall["dice_median"] >= 0.9
    assert abs(overall["diameter_error_median_mm"]) < PIXEL_MM
    round_ = summary["by_spiculation"]["1"]  # no strands: the tracer finds the disc itself
    assert round_["n"] > 0 and round_["dice_q25"] >= 0.99 and abs(round_["diameter_error_median_mm"]) < 1e-9
    strands = summary["by_spiculation"][">=4"]  # the tracer keeps strands the readers left out
    assert strands["n"] > 0 and strands["dice_median"] < round_["dice_median"]
    assert strands["diameter_error_median_mm"] > 0
    table = pd.read_csv(out / "realism.csv")
    assert list(table.columns[:3]) == ["by", "group", "n"] and set(table["by"]) == {
        "all",
        "lidc_spiculation",
        "attenuation",
    }
    measures = pd.read_csv(out / "measures.csv")
    assert list(measures.columns) == list(realism.REAL_COLUMNS) and len(measures) == 72
    assert np.allclose(measures["diameter_error_mm"], measures["traced_diameter_mm"] - measures["diameter_mm"])
    assert (out / "realism.png").read_bytes()[:4] == b"\x89PNG"


def test_realism_3d_compares_largest_axial_slices(real3d: Path) -> None:
    result = realism.compare(real3d, splits=["train", "test_lidc"], n=3)
    assert result.summary["dice_on"].startswith("3D") and "largest axial slice" in result.summary["dice_on"]
    m = result.measures
    assert len(m) == 6 and set(m["split"]) == {"train", "test_lidc"}
    assert m["slice"].notna().all() and m["dice_volume"].notna().all()
    assert result.summary["overall"]["dice_median"] >= 0.9
    assert abs(result.summary["overall"]["diameter_error_median_mm"]) < PIXEL_MM
    assert result.summary["overall"]["dice_volume_median"] >= 0.9


def test_trace_real_dice_drops_when_the_outline_is_off() -> None:
    size = 32
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    disc = (yy**2 + xx**2) <= 6.0**2
    image = np.where(disc, 30, -860).astype(np.int16)
    row = pd.Series(
        {"pixel_mm": 1.0, "attenuation": "solid", "offset_x_mm": 0.0, "offset_y_mm": 0.0, "offset_z_mm": 0.0}
    )
    same = realism.trace_real(image, disc.astype(np.uint8), row)
    assert same["dice"] == 1.0 and same["traced_diameter_mm"] == pytest.approx(2 * np.sqrt(disc.sum() / np.pi))
    shifted = realism.trace_real(image, np.roll(disc, 4, axis=1).astype(np.uint8), row)
    assert shifted["dice"] < 0.8
    ground_glass = np.where(disc, -650, -860).astype(np.int16)  # traced at -755 HU: found only at its own threshold
    gg = realism.trace_real(ground_glass, disc.astype(np.uint8), pd.Series({**row, "attenuation": "ground_glass"}))
    assert gg["dice"] == 1.0
    assert realism.trace_real(ground_glass, disc.astype(np.uint8), row)["traced_area_mm2"] == 0.0
