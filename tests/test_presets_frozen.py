"""The shipped presets generate the same data as at the reference commit (cb71f8e).

Every shipped preset, in 2D and 3D (n=6 per split, seed 3), is generated and compared with
``tests/frozen_presets.json``, taken at commit cb71f8e. A refactor, or an opt-in feature that a
preset does not name, must leave what a preset writes unchanged.

The comparison is split by what is portable across machines. CPU determinism in nodulab holds
per machine, not across machines: the renderer's parameters come from float64 numpy (exp,
cbrt, log: numpy's AVX-512 kernels where the CPU has them, libm elsewhere; they differ in the
last bit) and its pixels from float32 torch, so another CPU or another numpy/torch build can
move a float by an ulp, and a rendered HU that sits next to a .5 then rounds the other way: a
few pixels differ by 1 HU.

- Exact bytes (one sha256 per preset, ``portable_sha256``): every ``factors.csv`` (integer
  generators and plain IEEE arithmetic only), ``dataset.json`` without ``nodulab_version`` and
  without the images' and masks' sha256 (it still names the factors' sha256, shapes, dtypes,
  cells and the resolved scenario), the ``.npy`` headers (dtype, order, shape), and the list of
  files written.
- Tolerant fingerprint of the float-derived arrays, per split and per image: mean and SD of
  the HU in ``images.npy``; for ``masks.npy`` the pixel count of each region value 0..3 and the
  centroid of the lesion (mask > 0), since counts alone do not see a translation. Dtypes and
  shapes exactly. The tolerances (below) let ~1 HU in a few dozen pixels pass and catch a
  geometric or HU change.
- Exact bytes of the arrays where they are defined, on one machine: each preset generated twice
  in one process gives identical files.

Which files are float-sensitive was measured with the code at cb71f8e. On the reference
machine, numpy without AVX-512/AVX2, OpenBLAS as Haswell, torch at AVX2 or default capability
and torch on one thread changed no byte at n=6; so every float render parameter and every blur
output was moved by random 1-ulp steps instead (1..64 of them): ``images.npy`` changed in nearly
every split (by 1 HU, in at most 91 pixels of an image), ``masks.npy`` once (one pixel, at the
largest nudge), ``factors.csv`` and the stripped ``dataset.json`` never.

To re-take the reference after an intended change of what a preset generates, run this file
(``PYTHONPATH=src python tests/test_presets_frozen.py``); it rewrites ``frozen_presets.json``.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from nodulab.data.dataset import generate
from nodulab.synth.scenarios import load_scenario, resolve

# Tiny tensors (n=6): one intra-op thread (conftest) is several times faster, bytes unchanged.
pytestmark = pytest.mark.usefixtures("one_thread")

REFERENCE = Path(__file__).with_name("frozen_presets.json")
PRESETS = ("attenuation-confound", "clean", "paper", "scanner-shift", "size-confound")
KEYS = tuple(f"{name}-{dim}d" for name in PRESETS for dim in (2, 3))
ARRAYS = ("images", "masks")

# Tolerances, per image. Cross-machine noise is k pixels off by 1 HU: the mean moves by at most
# k / N (N = 4,096 pixels in 2D, 32,768 voxels in 3D), the SD by sum(+-(x - mean)) / (N * SD).
# 0.05 HU admits any k <= 204 in 2D for the mean, and for the SD k <= 40 even with every flip
# the same way at 5 SD from the mean (flips near .5 go both ways, so far more in practice);
# ulp-nudged renders at cb71f8e moved the mean by <= 0.004 HU and the SD by <= 0.008 HU.
# A real change moves them far more: 2 HU more on the body moves the mean of a 2D image by
# ~0.25 HU (3D: ~0.07) and its SD by ~0.6 (3D: ~0.3); the lesion moved by half a pixel, up to
# 0.46 / 1.8 HU in 2D (3D: the mask centroid below); a 1 % larger radius, ~2 HU; 1 % more
# noise, the SD by 0.12..0.5 HU.
TOL_MEAN_HU = 0.05
TOL_SD_HU = 0.05
# Masks are thresholded float geometry: a pixel on the threshold may flip (ulp-nudged renders:
# never up to 16 ulps, one pixel at ~64). Counts may differ by 2 pixels per region; the lesion
# centroid by 0.25 pixel (one flipped pixel 10 px out of the smallest lesion, 44 px, moves it by
# 0.23). A translation by one pixel moves it by 1, by half a pixel ~0.6..0.8, by 0.1 px ~0.2..0.35
# (that one also changes counts by 4..10 pixels).
TOL_COUNT_PX = 2
TOL_CENTROID_PX = 0.25


def generate_preset(key: str, out: Path) -> Path:
    name, dim_text = key.rsplit("-", 1)
    dim = int(dim_text[0])
    size, pixel_mm = (64, 0.7) if dim == 2 else (32, 1.4)
    return generate(resolve(load_scenario(name), n=6, dim=dim, size=size, pixel_mm=pixel_mm), out, seed=3)


def _npy_header(path: Path) -> bytes:
    """The bytes of an ``.npy`` file before its data (magic, version, dtype, order, shape)."""
    with path.open("rb") as f:
        head = f.read(12)
    # NPY format: 6-byte magic, 2 version bytes, header length (uint16 in 1.0, uint32 after).
    size = 10 + int.from_bytes(head[8:10], "little") if head[6] == 1 else 12 + int.from_bytes(head[8:12], "little")
    with path.open("rb") as f:
        return f.read(size)


def portable_digest(root: Path) -> str:
    """sha256 of everything written that does not depend on float kernels (see the docstring)."""
    h = hashlib.sha256()
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    h.update(json.dumps(files).encode())
    manifest = json.loads((root / "dataset.json").read_text(encoding="utf-8"))
    manifest.pop("nodulab_version")
    for entry in manifest["splits"].values():
        for name in ARRAYS:
            entry[name].pop("sha256")
    h.update(json.dumps(manifest, sort_keys=True).encode())
    for rel in files:
        path = root / rel
        if path.name == "factors.csv":
            h.update(rel.encode() + path.read_bytes())
        elif path.suffix == ".npy":
            h.update(rel.encode() + _npy_header(path))
    return h.hexdigest()


def array_fingerprint(root: Path) -> dict[str, Any]:
    """Per split: dtype and shape of the arrays, and per-image statistics (unrounded)."""
    manifest = json.loads((root / "dataset.json").read_text(encoding="utf-8"))
    out: dict[str, Any] = {}
    for split in sorted(manifest["splits"]):
        images = np.load(root / split / "images.npy")
        masks = np.load(root / split / "masks.npy")
        axes = tuple(range(1, images.ndim))
        hu = images.astype(np.float64)
        lesion = masks > 0
        grid = np.indices(masks.shape[1:], dtype=np.float64)
        n_lesion = lesion.sum(axis=axes)
        centroid = [
            [float((lesion[i] * grid[a]).sum() / n_lesion[i]) for a in range(masks.ndim - 1)] if n_lesion[i] else None
            for i in range(len(masks))
        ]
        out[split] = {
            "images": {"dtype": images.dtype.name, "shape": list(images.shape),
                       "mean": hu.mean(axis=axes).tolist(), "sd": hu.std(axis=axes).tolist()},
            "masks": {"dtype": masks.dtype.name, "shape": list(masks.shape),
                      "counts": np.stack([(masks == v).sum(axis=axes) for v in range(4)], 1).tolist(),
                      "centroid": centroid},
        }  # fmt: skip
    return out


def _rounded(x: Any) -> Any:
    if isinstance(x, float):
        return round(x, 4)
    if isinstance(x, list):
        return [_rounded(v) for v in x]
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    return x


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    return json.loads(REFERENCE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def generated() -> dict[str, Path]:
    """Each preset generated once per session, shared by the tests below (lazily filled)."""
    return {}


def _first(key: str, generated: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    if key not in generated:
        generated[key] = generate_preset(key, tmp_path_factory.mktemp(key) / "d")
    return generated[key]


def test_reference_lists_every_preset(reference: dict[str, Any]) -> None:
    assert sorted(reference) == sorted(KEYS)


@pytest.mark.parametrize("key", KEYS)
def test_preset_portable_bytes_unchanged(
    key: str, reference: dict[str, Any], generated: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> None:
    root = _first(key, generated, tmp_path_factory)
    assert portable_digest(root) == reference[key]["portable_sha256"]


@pytest.mark.parametrize("key", KEYS)
def test_preset_arrays_match_fingerprint(
    key: str, reference: dict[str, Any], generated: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> None:
    got = array_fingerprint(_first(key, generated, tmp_path_factory))
    want = reference[key]["splits"]
    assert sorted(got) == sorted(want)
    bad: list[str] = []
    for split, ref in want.items():
        layout = [
            f"{split}/{name}.npy {field}: {got[split][name][field]} != {ref[name][field]}"
            for name in ARRAYS
            for field in ("dtype", "shape")
            if got[split][name][field] != ref[name][field]
        ]
        if layout:
            bad += layout
            continue
        img, ref_img = got[split]["images"], ref["images"]
        msk, ref_msk = got[split]["masks"], ref["masks"]
        for i in range(len(ref_img["mean"])):
            where = f"{split} image {i}"
            if abs(img["mean"][i] - ref_img["mean"][i]) > TOL_MEAN_HU:
                bad.append(f"{where}: mean HU {img['mean'][i]:.4f} != {ref_img['mean'][i]:.4f}")
            if abs(img["sd"][i] - ref_img["sd"][i]) > TOL_SD_HU:
                bad.append(f"{where}: SD HU {img['sd'][i]:.4f} != {ref_img['sd'][i]:.4f}")
            if any(abs(a - b) > TOL_COUNT_PX for a, b in zip(msk["counts"][i], ref_msk["counts"][i])):
                bad.append(f"{where}: mask region counts {msk['counts'][i]} != {ref_msk['counts'][i]}")
            c, ref_c = msk["centroid"][i], ref_msk["centroid"][i]
            if (c is None) != (ref_c is None) or (
                c is not None and any(abs(a - b) > TOL_CENTROID_PX for a, b in zip(c, ref_c))
            ):
                bad.append(f"{where}: lesion centroid {_rounded(c)} != {ref_c}")
    assert not bad, f"{key}: {len(bad)} differences, first: " + "; ".join(bad[:8])


def _all_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("key", KEYS)
def test_preset_bytes_deterministic(
    key: str, generated: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> None:
    first = _all_bytes(_first(key, generated, tmp_path_factory))
    second = _all_bytes(generate_preset(key, tmp_path_factory.mktemp(key) / "d"))
    assert sorted(first) == sorted(second)
    assert [rel for rel in first if first[rel] != second[rel]] == []


def _write_reference(path: Path) -> None:
    """Regenerate every preset with the imported nodulab and rewrite the reference file."""
    import tempfile

    data: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for key in KEYS:
            root = generate_preset(key, Path(tmp) / key)
            data[key] = {"portable_sha256": portable_digest(root), "splits": _rounded(array_fingerprint(root))}
    assert all(math.isfinite(v) for s in data.values() for e in s["splits"].values() for v in e["images"]["mean"])
    lines = [f"{json.dumps(k)}:{json.dumps(data[k], sort_keys=True, separators=(',', ':'))}" for k in sorted(data)]
    path.write_text("{\n" + ",\n".join(lines) + "\n}\n", encoding="utf-8")


if __name__ == "__main__":
    _write_reference(REFERENCE)
    print(f"wrote {REFERENCE}")
