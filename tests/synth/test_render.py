"""Physics, purity and robustness of the renderer (design.md "Factors of variation")."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import ndimage
from scipy.spatial import ConvexHull

from conftest import VALID_ROW, make_rows
from nodulab.synth import renderer as R
from nodulab.synth import rng
from nodulab.synth.renderer import REGIONS, render


def equivalent_diameter(mask: np.ndarray, pixel_mm: float) -> float:
    count = float((mask == REGIONS["body"]).sum())
    if mask.ndim == 2:
        return 2.0 * math.sqrt(count / math.pi) * pixel_mm
    return (6.0 * count / math.pi) ** (1.0 / 3.0) * pixel_mm


@pytest.mark.parametrize("dim,size,n", [(2, 64, 60), (3, 32, 16)])
def test_measured_diameter_matches_requested(dim: int, size: int, n: int) -> None:
    rows = make_rows(n, seed=2, dim=dim)
    _, masks = render(rows, size=size, dim=dim)
    measured = np.array([equivalent_diameter(m, p) for m, p in zip(masks, rows.pixel_mm)])
    keep = rows.diameter_mm.to_numpy() >= 6
    rel = np.abs(measured[keep] / rows.diameter_mm.to_numpy()[keep] - 1.0)
    assert np.median(rel) <= 0.10, f"median relative diameter error {np.median(rel):.3f}"


def _hu_rows(attenuation: str, n: int = 8) -> pd.DataFrame:
    return make_rows(
        n,
        seed=3,
        attenuation=attenuation,
        shape="round",
        vessels=0,
        noise_hu=10.0,
        diameter_mm=np.linspace(14, 18, n),
        margin_sigma_mm=0.3,
        kernel_fwhm_mm=0.8,
        offset_x_mm=0.0,
        offset_y_mm=0.0,
        solid_fraction=0.6,
    )


def _total_sigma(rows: pd.DataFrame) -> np.ndarray:
    psf = rows.kernel_fwhm_mm / (2.0 * math.sqrt(2.0 * math.log(2.0)))
    return np.sqrt(rows.margin_sigma_mm**2 + psf**2 + rows.pixel_mm**2 / 12.0).to_numpy()


def _eroded_body_mean(attenuation: str) -> float:
    rows = _hu_rows(attenuation)
    images, masks = render(rows)
    means = []
    for img, mask, sigma, px in zip(images, masks, _total_sigma(rows), rows.pixel_mm):
        steps = int(math.ceil(2.0 * sigma / px))
        inner = ndimage.binary_erosion(mask == REGIONS["body"], iterations=steps)
        assert inner.sum() > 10
        means.append(img[inner].mean())
    return float(np.mean(means))


def test_hu_by_attenuation_class() -> None:
    hu = {a: _eroded_body_mean(a) for a in ("ground_glass", "part_solid", "solid", "calcified")}
    assert -750 <= hu["ground_glass"] <= -450, hu
    assert -100 <= hu["solid"] <= 150, hu
    assert hu["ground_glass"] < hu["part_solid"] < hu["solid"] < hu["calcified"], hu


def test_calcified_core_is_dense_and_background_is_parenchyma() -> None:
    rows = _hu_rows("calcified")
    images, masks = render(rows)
    for img, row, sigma in zip(images, rows.itertuples(), _total_sigma(rows)):
        centre = (np.arange(64) - 31.5) * row.pixel_mm
        radius = np.hypot(centre[:, None], centre[None, :])
        core = radius <= row.solid_fraction * row.diameter_mm / 2 - 2 * sigma
        assert core.sum() > 4
        assert img[core].mean() > 200
    far = ndimage.binary_dilation(masks != 0, iterations=8, structure=np.ones((1, 3, 3))) == 0
    assert abs(np.median(images[far]) - R.PARENCHYMA_HU) <= 40


def _convexity(image: np.ndarray, threshold: float = -400.0) -> float:
    labels, _ = ndimage.label(image > threshold)
    centre = labels[image.shape[0] // 2, image.shape[1] // 2]
    points = np.argwhere(labels == centre)
    return len(points) / ConvexHull(points).volume


def test_spiculated_is_less_convex_and_denser_just_outside() -> None:
    base = make_rows(
        12,
        seed=4,
        attenuation="solid",
        vessels=0,
        noise_hu=5.0,
        margin_sigma_mm=0.2,
        diameter_mm=12.0,
        offset_x_mm=0.0,
        offset_y_mm=0.0,
        spicule_length_rel=0.8,
        spicule_width_mm=1.0,
    )
    round_img, _ = render(base.assign(shape="round"))
    spic_img, _ = render(base.assign(shape="spiculated"))
    conv_round = np.median([_convexity(i) for i in round_img])
    conv_spic = np.median([_convexity(i) for i in spic_img])
    assert conv_spic < conv_round - 0.05, (conv_spic, conv_round)
    centre = (np.arange(64) - 31.5) * 0.7
    radius = np.hypot(centre[:, None], centre[None, :])
    ring = (radius > 6.0 + 1.0) & (radius < 6.0 + 4.0)
    assert spic_img[:, ring].mean() > round_img[:, ring].mean() + 30


def test_noise_sd_is_noise_hu_and_kernel_correlates_it() -> None:
    rows = make_rows(6, seed=5, vessels=0)
    quiet, _ = render(rows.assign(noise_hu=0.0, kernel_fwhm_mm=0.8))
    loud, _ = render(rows.assign(noise_hu=40.0, kernel_fwhm_mm=0.8))
    noise = loud.astype(float) - quiet
    assert 36 <= noise.std() <= 44, noise.std()
    smooth, _ = render(rows.assign(noise_hu=40.0, kernel_fwhm_mm=2.5))
    quiet_smooth, _ = render(rows.assign(noise_hu=0.0, kernel_fwhm_mm=2.5))
    smooth_noise = smooth.astype(float) - quiet_smooth

    def lag1(x: np.ndarray) -> float:
        return float(np.corrcoef(x[:, :, :-1].ravel(), x[:, :, 1:].ravel())[0, 1])

    assert lag1(smooth_noise) > lag1(noise) + 0.2


def test_parenchyma_texture_sd() -> None:
    images, masks = render(make_rows(6, seed=6, vessels=0, noise_hu=0.0, diameter_mm=6.0))
    far = ndimage.binary_dilation(masks != 0, iterations=8, structure=np.ones((1, 3, 3))) == 0
    background = images[far].astype(float)
    assert 12 <= background.std() <= 30, background.std()


def test_offset_moves_the_body_centroid() -> None:
    rows = make_rows(6, seed=7, shape="round", offset_x_mm=2.1, offset_y_mm=-1.4)
    _, masks = render(rows)
    for mask in masks:
        cy, cx = np.argwhere(mask == REGIONS["body"]).mean(axis=0)
        assert abs((cx - 31.5) * 0.7 - 2.1) < 0.35 and abs((cy - 31.5) * 0.7 + 1.4) < 0.35


def test_rotation_rotates_the_lesion() -> None:
    rows = make_rows(4, seed=8, shape="lobulated", lobulation=0.3, offset_x_mm=0.0, offset_y_mm=0.0)
    _, m0 = render(rows.assign(rotation_deg=0.0))
    _, m90 = render(rows.assign(rotation_deg=90.0))
    body0, body90 = m0 == REGIONS["body"], m90 == REGIONS["body"]
    turned = np.rot90(body0, k=-1, axes=(1, 2))
    agree = (turned == body90).mean(axis=(1, 2))
    assert agree.min() > 0.995, agree
    assert (body0 != body90).any()


def test_margin_blur_softens_the_edge() -> None:
    rows = make_rows(4, seed=9, shape="round", attenuation="solid", vessels=0, noise_hu=0.0, diameter_mm=14.0)
    sharp, _ = render(rows.assign(margin_sigma_mm=0.0))
    soft, _ = render(rows.assign(margin_sigma_mm=2.0))

    def max_gradient(x: np.ndarray) -> float:
        return float(np.abs(np.diff(x.astype(float), axis=2)).max(axis=(1, 2)).mean())

    assert max_gradient(sharp) > 2 * max_gradient(soft)


# ----------------------------------------------------------------------------- purity
def test_pure_under_batch_order_size_and_chunking() -> None:
    rows = make_rows(20, seed=10)
    images, masks = render(rows)
    reversed_images, reversed_masks = render(rows.iloc[::-1], chunk=3)
    assert np.array_equal(images, reversed_images[::-1]) and np.array_equal(masks, reversed_masks[::-1])
    for i in (0, 7, 19):
        single, single_mask = render(rows.iloc[[i]])
        assert np.array_equal(single[0], images[i]) and np.array_equal(single_mask[0], masks[i])


def test_pure_in_3d() -> None:
    rows = make_rows(6, seed=11, dim=3)
    images, _ = render(rows, size=24, dim=3)
    again, _ = render(rows.iloc[[3, 0, 5]], size=24, dim=3, chunk=1)
    assert np.array_equal(again, images[[3, 0, 5]])


def test_same_rows_same_bytes_and_seed_matters() -> None:
    rows = make_rows(5, seed=12)
    a, _ = render(rows)
    b, _ = render(rows.copy())
    assert a.tobytes() == b.tobytes()
    c, _ = render(rows.assign(seed=rows.seed + 1))
    assert not np.array_equal(a, c)


def test_switching_attenuation_is_local() -> None:
    rows = make_rows(8, seed=13, attenuation="ground_glass", margin_sigma_mm=0.8, kernel_fwhm_mm=1.2)
    before, masks = render(rows)
    after, _ = render(rows.assign(attenuation="solid"))
    lesion = np.isin(masks, [REGIONS["body"], REGIONS["spicules"]])
    for b, a, m, px in zip(before, after, lesion, rows.pixel_mm):
        far = ndimage.distance_transform_edt(~m) * px > 10.0
        assert far.sum() > 100
        assert np.array_equal(b[far], a[far])
        assert not np.array_equal(b[~far], a[~far])


def test_adding_a_vessel_keeps_the_others() -> None:
    rows = make_rows(6, seed=14, vessels=2)
    _, two = render(rows)
    _, three = render(rows.assign(vessels=3))
    had = two == REGIONS["vessels"]
    assert np.all(three[had] == REGIONS["vessels"])
    assert (three == REGIONS["vessels"]).sum() > had.sum()


def test_adding_a_spicule_keeps_the_others() -> None:
    rows = make_rows(6, seed=15, shape="spiculated", n_spicules=6)
    _, six = render(rows)
    _, seven = render(rows.assign(n_spicules=7))
    had = six == REGIONS["spicules"]
    assert np.all(seven[had] == REGIONS["spicules"])


def test_view_redraws_nuisance_only() -> None:
    rows = make_rows(4, seed=16, vessels=0)
    a, ma = render(rows)
    b, mb = render(rows, view=1)
    assert np.array_equal(ma, mb)
    assert not np.array_equal(a, b)


def test_integer_hash_paths_agree() -> None:
    values = np.random.default_rng(0).integers(0, 2**32, 4096, dtype=np.uint64)
    reference = rng.mix32(values)
    wrapped = rng.mix32_int32(torch.from_numpy(values.astype(np.uint32).view(np.int32)))
    assert np.array_equal(wrapped.numpy().view(np.uint32).astype(np.uint64), reference)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_within_one_hu() -> None:
    rows = make_rows(16, seed=17)
    cpu, cpu_mask = render(rows)
    gpu, gpu_mask = render(rows, device="cuda")
    assert np.abs(cpu.astype(int) - gpu).max() <= 1
    assert (cpu_mask != gpu_mask).mean() < 1e-3


# ----------------------------------------------------------------------------- robustness
def test_missing_column_and_unknown_category_are_clear_errors() -> None:
    rows = make_rows(2)
    with pytest.raises(ValueError, match="diameter_mm"):
        render(rows.drop(columns="diameter_mm"))
    with pytest.raises(ValueError, match="attenuation 'metal'"):
        render(rows.assign(attenuation="metal"))
    with pytest.raises(ValueError, match="size"):
        render(rows, size=0)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.fixed_dictionaries(VALID_ROW),
    st.sampled_from([2, 3]),
)
def test_any_valid_row_renders_finite_values_in_range(row: dict, dim: int) -> None:
    size = 24 if dim == 2 else 12
    batch = R.prepare([row], size=size, dim=dim)
    hu, mask = R.render_tensor(batch)
    assert torch.isfinite(hu).all()
    assert hu.min() >= R.HU_MIN and hu.max() <= R.HU_MAX
    assert int(mask.max()) <= 3


def test_render_leaves_the_allocator_alone(monkeypatch: pytest.MonkeyPatch, rows_2d: pd.DataFrame) -> None:
    """``mallopt`` is process-wide: ``render`` must not call it; bulk renderers opt in."""
    import nodulab.synth.renderer as rendering

    calls = []

    def no_libc(*args: object, **kwargs: object) -> None:
        calls.append(args)
        raise OSError("no libc in this test")

    monkeypatch.setattr(rendering.ctypes, "CDLL", no_libc)
    rendering.keep_freed_tensors_mapped.cache_clear()
    rendering.render(rows_2d.iloc[:2], size=32, dim=2)
    assert calls == []
    assert rendering.keep_freed_tensors_mapped() is False and len(calls) == 1
    rendering.keep_freed_tensors_mapped.cache_clear()
