"""The on-disk dataset: generate, load, validate, torch Dataset, exports (design.md "Dataset on disk")."""

from __future__ import annotations

import gzip
import json
import math
import pickle
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from conftest import file_tree
from nodulab.data import dataset as data
from nodulab.data import export, validate
from nodulab.synth.sampling import sample_split
from nodulab.synth.scenarios import load_scenario, resolve

SMALL = {"n": 8, "size": 32, "pixel_mm": 1.4}


def small_scenario(dim: int = 2, **overrides):
    """The size-confound preset, shrunk so a whole dataset renders in about a second."""
    geometry = {**SMALL, "dim": dim, **overrides}
    if dim == 3:
        geometry.update(size=16, pixel_mm=2.8)  # same field of view, 4096 voxels per sample
    return resolve(load_scenario("size-confound"), **geometry)


def flip_byte(path: Path, offset_from_end: int = 100) -> None:
    raw = bytearray(path.read_bytes())
    raw[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(raw))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return data.generate(small_scenario(), tmp_path_factory.mktemp("ds") / "ds", seed=0)


@pytest.fixture(scope="module")
def dataset_3d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return data.generate(small_scenario(dim=3, n=4), tmp_path_factory.mktemp("ds3") / "ds", seed=0)


# ----------------------------------------------------------------------------- generate
def test_layout_and_dtypes(dataset: Path) -> None:
    manifest = data.load_manifest(dataset)
    for split, entry in manifest["splits"].items():
        images, masks, frame = data.load_split(dataset, split)
        assert images.dtype == np.int16 and masks.dtype == np.uint8
        assert images.shape == masks.shape == (8, 32, 32)
        assert isinstance(images, np.memmap) and not images.flags.writeable
        assert list(frame["index"]) == list(range(8))
        assert set(np.unique(masks)) <= {0, 1, 2, 3}
        assert entry["images"]["shape"] == [8, 32, 32]


def test_factors_csv_round_trips_exactly(dataset: Path) -> None:
    scenario = small_scenario()
    for split in scenario.splits:
        written = sample_split(scenario, split, 0).reset_index(drop=True)
        _, _, read = data.load_split(dataset, split)
        assert list(read.columns) == ["index", *written.columns]
        for column in written.columns:
            a, b = written[column].to_numpy(), read[column].to_numpy()
            if written[column].dtype.kind == "f":
                assert read[column].dtype.kind == "f", column
                assert np.array_equal(a, b), column  # bit-exact, not approximately
            else:
                assert [str(v) for v in a] == [str(v) for v in b], column


def test_manifest_is_canonical_without_paths_or_timestamps(dataset: Path) -> None:
    text = (dataset / "dataset.json").read_text()
    manifest = json.loads(text)
    assert text == json.dumps(manifest, sort_keys=True, indent=2, ensure_ascii=False) + "\n"
    assert str(dataset.parent) not in text and "/tmp" not in text
    assert not re.search(r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}", text)
    assert not any(k in text for k in ('"created', '"time', '"date', '"host'))
    assert manifest["seed"] == 0 and manifest["rng_scheme"] and manifest["nodulab_version"]
    for entry in manifest["splits"].values():
        assert sum(c["count"] for c in entry["cells"]) == entry["n"]
        assert len(entry["cells"]) == 4  # (label, agrees_diameter_mm), empty cells included
        for key in ("images", "masks", "factors"):
            assert not entry[key]["file"].startswith("/")
            assert re.fullmatch(r"[0-9a-f]{64}", entry[key]["sha256"])


def test_same_seed_same_bytes_whatever_the_chunk(tmp_path: Path, dataset: Path) -> None:
    again = data.generate(small_scenario(), tmp_path / "again", seed=0, chunk=3)
    assert file_tree(again) == file_tree(dataset)
    other = data.generate(small_scenario(), tmp_path / "other", seed=1)
    assert file_tree(other)["train/images.npy"] != file_tree(dataset)["train/images.npy"]


def test_existing_out_refused_then_replaced_with_force(tmp_path: Path) -> None:
    out = data.generate(small_scenario(), tmp_path / "ds", seed=1)  # an earlier dataset
    (out / "keep.txt").write_text("mine")
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(data.DatasetError, match="exists"):
        data.generate(small_scenario(), out)
    assert sorted(p.name for p in out.iterdir()) == before
    data.generate(small_scenario(), out, force=True)
    assert (out / "dataset.json").is_file() and not (out / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # no temp or old folders left


def test_failure_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def broken_render(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("boom")
        return real_render(*args, **kwargs)

    real_render = data.render
    monkeypatch.setattr(data, "render", broken_render)
    with pytest.raises(RuntimeError, match="boom"):
        data.generate(small_scenario(), tmp_path / "a" / "b" / "ds", chunk=4)
    assert list(tmp_path.iterdir()) == []


def test_progress_counts_every_sample(tmp_path: Path) -> None:
    seen: list[tuple[str, int, int]] = []
    data.generate(small_scenario(), tmp_path / "ds", chunk=5, progress=lambda *report: seen.append(report))
    total = 8 * len(small_scenario().splits)
    done = [d for _, d, _ in seen]
    assert {(stage, t) for stage, _, t in seen} == {(f"rendering {small_scenario().name}", total)}
    assert done == sorted(done) and done[-1] == total and max(b - a for a, b in zip([0, *done], done)) <= 5


# ----------------------------------------------------------------------------- validate
def test_validate_passes_on_fresh_dataset(dataset: Path) -> None:
    report = validate.validate(dataset)
    assert report.ok, [c for c in report.checks if not c.ok]
    names = " ".join(c.name for c in report.checks)
    for word in ("sha256", "re-render", "label balance", "agreement diameter_mm", "diameter"):
        assert word in names


def test_validate_fails_after_one_flipped_byte(tmp_path: Path) -> None:
    root = data.generate(small_scenario(), tmp_path / "ds")
    flip_byte(root / "train" / "images.npy")  # inside the last sample, which is re-rendered
    report = validate.validate(root)
    failed = {c.name for c in report.checks if not c.ok}
    assert not report.ok
    assert failed == {"train: sha256 train/images.npy", "train: re-render"}


def test_validate_refuses_a_folder_without_manifest(tmp_path: Path) -> None:
    with pytest.raises(data.DatasetError, match="dataset.json"):
        validate.validate(tmp_path)


@pytest.mark.parametrize("n, p", [(1, 0.5), (8, 0.95), (20, 0.5), (37, 0.1), (50, 0.999)])
def test_binomial_interval_matches_explicit_sums(n: int, p: float) -> None:
    pmf = [math.comb(n, k) * p**k * (1 - p) ** (n - k) for k in range(n + 1)]
    lo, hi = validate.binomial_interval(n, p, level=0.99)
    assert sum(pmf[:lo]) <= 0.005 < sum(pmf[: lo + 1])
    assert sum(pmf[hi + 1 :]) <= 0.005 < sum(pmf[hi:])


def test_binomial_interval_edges() -> None:
    assert validate.binomial_interval(10, 0.0) == (0, 0)
    assert validate.binomial_interval(10, 1.0) == (10, 10)
    assert validate.binomial_interval(0, 0.5) == (0, 0)


def test_measured_diameter_of_drawn_disc_and_ball() -> None:
    y, x = np.mgrid[:64, :64] - 31.5
    disc = (np.hypot(y, x) <= 10.0).astype(np.uint8)[None]
    assert validate.measured_diameter_mm(disc, np.array([0.5]))[0] == pytest.approx(10.0, rel=0.02)
    z, y, x = np.mgrid[:32, :32, :32] - 15.5
    ball = (np.sqrt(z**2 + y**2 + x**2) <= 8.0).astype(np.uint8)[None]
    assert validate.measured_diameter_mm(ball, np.array([1.0]))[0] == pytest.approx(16.0, rel=0.02)


# ----------------------------------------------------------------------------- torch
def test_nodule_dataset_items(dataset: Path) -> None:
    ds = data.NoduleDataset(dataset, "train")
    images, _, frame = data.load_split(dataset, "train")
    assert len(ds) == 8 and ds.factors.equals(frame)
    item = ds[3]
    assert item["image"].shape == (1, 32, 32) and item["image"].dtype == torch.float32
    assert item["label"].dtype == torch.int64 and int(item["label"]) == frame["label"][3]
    assert item["index"] == 3
    assert torch.equal(item["image"], torch.from_numpy(images[3].astype(np.float32))[None] / 1000.0)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch["image"].shape == (4, 1, 32, 32) and batch["label"].shape == (4,)


def test_nodule_dataset_3d_masks_and_pickling(dataset_3d: Path) -> None:
    ds = data.NoduleDataset(dataset_3d, "val", transform=None, with_mask=True)
    item = ds[0]
    assert item["image"].shape == item["mask"].shape == (1, 16, 16, 16)
    assert item["image"].abs().max() > 100  # raw HU without a transform
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._arrays is None and torch.equal(clone[0]["image"], item["image"])


def test_lung_window_and_input_scaling() -> None:
    hu = np.array([-2000, -1350, -600, 150, 3000])
    assert np.allclose(data.lung_window(hu), [0.0, 0.0, 0.5, 1.0, 1.0])
    t = torch.tensor([-1024.0, 0.0, 3071.0])
    assert torch.equal(data.hu_to_input(t), t / 1000.0)  # linear, never clipped


# ----------------------------------------------------------------------------- export
def test_export_medmnist(dataset: Path, tmp_path: Path) -> None:
    out = export.export(dataset, "medmnist", tmp_path / "nodules.npz")
    splits = data.load_manifest(dataset)["splits"]
    with np.load(out) as npz:
        assert sorted(npz.files) == sorted(f"{s}_{k}" for s in splits for k in ("images", "labels"))
        images, _, frame = data.load_split(dataset, "train")
        assert npz["train_images"].dtype == np.uint8 and npz["train_images"].shape == (8, 32, 32)
        assert np.array_equal(npz["train_images"], export.to_uint8(np.asarray(images)))
        assert npz["train_labels"].shape == (8, 1)
        assert np.array_equal(npz["train_labels"][:, 0], frame["label"])


def test_export_nifti_spacing_and_values(dataset: Path, dataset_3d: Path, tmp_path: Path) -> None:
    out = export.export(dataset, "nifti", tmp_path / "nii")
    images, _, _ = data.load_split(dataset, "val")
    volume = nib.load(out / "val" / "000002.nii.gz")
    assert volume.header.get_zooms() == pytest.approx((1.4, 1.4, 1.4))
    assert volume.shape == (32, 32, 1) and volume.get_data_dtype() == np.int16
    assert np.array_equal(np.asarray(volume.dataobj)[:, :, 0].T, images[2])
    labels = pd.read_csv(out / "labels.csv")
    assert len(labels) == 8 * len(data.load_manifest(dataset)["splits"])
    assert all((out / f).is_file() for f in labels["file"])
    with gzip.open(out / "val" / "000002.nii.gz") as f:
        assert len(f.read()) > 32 * 32 * 2
    out3 = export.export(dataset_3d, "nifti", tmp_path / "nii3")
    images3, _, _ = data.load_split(dataset_3d, "train")
    volume3 = nib.load(out3 / "train" / "000001.nii.gz")
    assert volume3.header.get_zooms() == pytest.approx((2.8, 2.8, 2.8))
    assert np.array_equal(np.asarray(volume3.dataobj).transpose(2, 1, 0), images3[1])


@pytest.mark.parametrize("which", ["2d", "3d"])
def test_export_png(which: str, dataset: Path, dataset_3d: Path, tmp_path: Path) -> None:
    from PIL import Image

    root, size, n = (dataset, 32, 8) if which == "2d" else (dataset_3d, 16, 4)
    out = export.export(root, "png", tmp_path / "png")
    for split in data.load_manifest(root)["splits"]:
        files = sorted((out / split).glob("*.png"))
        assert len(files) == n
        with Image.open(files[0]) as im:
            assert im.mode == "L" and im.size == (size, size)
    assert len(pd.read_csv(out / "labels.csv")) == n * len(data.load_manifest(root)["splits"])


def test_export_refuses_existing_out_and_unknown_format(dataset: Path, tmp_path: Path) -> None:
    (tmp_path / "x.npz").write_bytes(b"old")
    with pytest.raises(data.DatasetError, match="exists"):
        export.export(dataset, "medmnist", tmp_path / "x.npz")
    assert (tmp_path / "x.npz").read_bytes() == b"old"
    export.export(dataset, "medmnist", tmp_path / "x.npz", force=True)
    assert (tmp_path / "x.npz").read_bytes()[:2] == b"PK"
    with pytest.raises(data.DatasetError, match="format"):
        export.export(dataset, "jpeg", tmp_path / "y")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.npz"]


def test_3d_dataset_validates_and_draws(dataset_3d: Path, tmp_path: Path) -> None:
    from nodulab.data.gallery import gallery

    report = validate.validate(dataset_3d)
    assert report.ok, [c for c in report.checks if not c.ok]
    out = gallery(dataset_3d, tmp_path / "g.png", per_cell=1)
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_3d_gallery_view_is_a_slab_mip_through_the_nodule() -> None:
    from nodulab.data.gallery import axial_mip

    volume = np.full((21, 4, 4), -860, dtype=np.int16)
    row = pd.Series({"offset_z_mm": 2.0, "pixel_mm": 1.0})  # nodule centre at slice 12
    volume[14, 1, 1] = 100  # 2 mm from the centre: inside the 6 mm slab
    volume[16, 2, 2] = 200  # 4 mm away: outside
    mip = axial_mip(volume, row)
    assert mip[1, 1] == 100 and mip[2, 2] == -860
