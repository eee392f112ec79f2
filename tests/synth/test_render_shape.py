"""Shape realism (issue 10): elongation, irregularity and spicule grade in the renderer.

Geometry is measured on the region mask (body = 1, spicules = 2), which is computed from the
analytic geometry before any blur, so the tolerances below are pixel-quantisation ones: at
0.35 mm pixels a 14 mm body is 20 pixels across, and the second moments of its mask give the axis
ratio of an ellipse to about +-0.01 (measured); we allow +-0.04.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import ndimage

from conftest import VALID_ROW, make_rows
from nodulab.explanation.switches import fits
from nodulab.synth import renderer as R
from nodulab.synth.factors import OPTIONAL
from nodulab.synth.renderer import LOBULATION_EXPRESSION, REGIONS, body_reach, render

PX, SIZE, DIAMETER = 0.35, 64, 14.0


def _quiet(n: int, seed: int, dim: int = 2, **fixed) -> pd.DataFrame:
    """Centred lesions, no noise or vessels: the mask is all geometry."""
    base = dict(noise_hu=0.0, vessels=0, offset_x_mm=0.0, offset_y_mm=0.0, offset_z_mm=0.0)
    return make_rows(n, seed=seed, dim=dim, **{**base, **fixed})


def _axis_ratios(region: np.ndarray) -> np.ndarray:
    """sqrt of the covariance eigenvalues of the region's pixels over the largest one (ascending)."""
    points = np.argwhere(region).astype(float)
    w = np.linalg.eigvalsh(np.cov(points.T))
    return np.sqrt(w / w[-1])


def _radii(region: np.ndarray, pixel_mm: float) -> np.ndarray:
    """Distances (mm) from the patch centre of the region's boundary pixels."""
    edge = region & ~ndimage.binary_erosion(region)
    centre = (np.array(region.shape) - 1) / 2.0
    return np.linalg.norm(np.argwhere(edge) - centre, axis=1) * pixel_mm


# ----------------------------------------------------------------------------- elongation
@pytest.mark.parametrize("e", [0.2, 0.4, 0.6])
def test_elongated_body_has_minor_over_major_one_minus_e(e: float) -> None:
    rows = _quiet(6, seed=1, shape="round", diameter_mm=DIAMETER, pixel_mm=PX, elongation=e)
    _, masks = render(rows, size=SIZE)
    ratios = [_axis_ratios(m == REGIONS["body"])[0] for m in masks]
    assert np.allclose(ratios, 1.0 - e, atol=0.04), ratios


def test_area_is_kept_with_elongation_irregularity_and_lobes() -> None:
    rows = _quiet(24, seed=2, diameter_mm=DIAMETER, pixel_mm=PX, n_spicules=0, lobulation=0.3)
    rows["elongation"] = np.linspace(0.0, 0.7, len(rows))
    rows["irregularity"] = np.linspace(0.3, 0.0, len(rows))
    _, masks = render(rows, size=SIZE)
    area = (masks == REGIONS["body"]).sum(axis=(1, 2)) * PX**2
    rel = area / (math.pi * (DIAMETER / 2) ** 2)
    assert np.all(np.abs(rel - 1.0) <= 0.04), rel


@pytest.mark.parametrize("e", [0.0, 0.3, 0.6])
def test_3d_volume_is_kept_and_the_spheroid_is_prolate(e: float) -> None:
    px, d = 0.6, 12.0
    rows = _quiet(4, seed=3, dim=3, shape="round", diameter_mm=d, pixel_mm=px, elongation=e, irregularity=0.0)
    _, masks = render(rows, size=40, dim=3)
    for m in masks:
        body = m == REGIONS["body"]
        volume = body.sum() * px**3
        assert abs(volume / (math.pi / 6 * d**3) - 1.0) <= 0.05
        ratios = _axis_ratios(body)
        assert np.allclose(ratios[:2], 1.0 - e, atol=0.04), ratios  # two short axes, one long


def test_3d_volume_is_kept_when_irregular_and_elongated() -> None:
    px, d = 0.6, 12.0
    rows = _quiet(6, seed=4, dim=3, diameter_mm=d, pixel_mm=px, n_spicules=0, elongation=0.5, irregularity=0.3)
    _, masks = render(rows, size=40, dim=3)
    volume = (masks == REGIONS["body"]).sum(axis=(1, 2, 3)) * px**3
    assert np.all(np.abs(volume / (math.pi / 6 * d**3) - 1.0) <= 0.05), volume


# ----------------------------------------------------------------------------- irregularity
def test_irregularity_raises_the_radial_spread_of_the_boundary() -> None:
    cvs = []
    for a in (0.0, 0.1, 0.2):
        rows = _quiet(8, seed=5, shape="round", diameter_mm=DIAMETER, pixel_mm=PX, irregularity=a)
        _, masks = render(rows, size=SIZE)
        radii = [_radii(m == REGIONS["body"], PX) for m in masks]
        cvs.append([r.std() / r.mean() for r in radii])
    cvs = np.array(cvs)  # (amplitude, row)
    assert np.all(cvs[0] < 0.03), cvs[0]  # a pixelated circle
    assert np.all(np.diff(cvs, axis=0) > 0.01), cvs


def test_irregularity_is_expressed_for_every_shape() -> None:
    rows = _quiet(
        3,
        seed=6,
        diameter_mm=DIAMETER,
        pixel_mm=PX,
        n_spicules=0,
        lobulation=0.0,
        shape=["round", "lobulated", "spiculated"],
        rotation_deg=0.0,
    ).assign(seed=6)
    _, plain = render(rows, size=SIZE)
    _, rough = render(rows.assign(irregularity=0.2), size=SIZE)
    assert ((plain == REGIONS["body"]) != (rough == REGIONS["body"])).any(axis=(1, 2)).all()
    # Lobulation 0 + the same seed: the three shapes get the same irregular body.
    assert (rough[0] == rough[1]).all() and (rough[0] == rough[2]).all()


# ----------------------------------------------------------------------------- spicule grade
def test_spicule_area_grows_with_grade_and_vanishes_at_zero() -> None:
    areas = []
    for g in (0.0, 0.25, 0.5, 0.75, 1.0):
        rows = _quiet(32, seed=7, shape="spiculated", diameter_mm=DIAMETER, pixel_mm=PX, spicule_grade=g)
        _, masks = render(rows, size=SIZE)
        areas.append((masks == REGIONS["spicules"]).sum(axis=(1, 2)) * PX**2)
    assert (areas[0] == 0).all()
    means = [a.mean() for a in areas]
    assert np.all(np.diff(means) > 0.5), means


def test_low_grade_spicules_are_few_short_and_broad() -> None:
    rows = _quiet(4, seed=8, shape="spiculated", n_spicules=12, diameter_mm=DIAMETER, pixel_mm=PX)
    full = R.prepare(rows, size=SIZE)
    low = R.prepare(rows.assign(spicule_grade=0.25), size=SIZE)
    assert ((full.spic_slope > 0).sum(1) == 12).all() and ((low.spic_slope > 0).sum(1) == 3).all()
    # The first three spicules share their draws; the surface is at twice the base (spic_base).
    first = lambda b, x: getattr(b, x)[:, :3]  # noqa: E731
    length = lambda b: first(b, "spic_tip") - 2 * first(b, "spic_base")  # noqa: E731
    base_w = lambda b: first(b, "spic_slope") * length(b) + first(b, "spic_tip_half_w")  # noqa: E731
    assert (length(low) < 0.5 * length(full)).all()
    assert (base_w(low) > 1.2 * base_w(full)).all()
    assert (first(low, "spic_tip_half_w") / base_w(low) > first(full, "spic_tip_half_w") / base_w(full) + 0.1).all()


# ----------------------------------------------------------------------------- neutral = absent
@pytest.mark.parametrize("dim,size", [(2, 64), (3, 24)])
def test_neutral_columns_render_the_bytes_of_absent_columns(dim: int, size: int) -> None:
    rows = make_rows(12, seed=9, dim=dim)
    images, masks = render(rows, size=size, dim=dim)
    neutral_images, neutral_masks = render(rows.assign(**OPTIONAL), size=size, dim=dim)
    assert images.tobytes() == neutral_images.tobytes() and masks.tobytes() == neutral_masks.tobytes()
    # A shaped row in the batch changes nothing for the neutral rows (only rows that need it).
    mixed = rows.assign(**OPTIONAL)
    mixed.loc[0, ["elongation", "irregularity", "spicule_grade"]] = [0.5, 0.2, 0.3]
    mixed_images, _ = render(mixed, size=size, dim=dim)
    assert mixed_images[1:].tobytes() == images[1:].tobytes()
    assert not np.array_equal(mixed_images[0], images[0])


# ----------------------------------------------------------------------------- purity, locality
def _shaped_rows(n: int, seed: int, dim: int = 2) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = make_rows(n, seed=seed, dim=dim)
    rows["elongation"] = rng.uniform(0, 0.7, n)
    rows["irregularity"] = rng.uniform(0, 0.3, n)
    rows["spicule_grade"] = rng.uniform(0, 1, n)
    return rows


@pytest.mark.parametrize("dim,size", [(2, 64), (3, 24)])
def test_a_shaped_row_alone_equals_it_in_a_shuffled_batch(dim: int, size: int) -> None:
    rows = _shaped_rows(10, seed=10, dim=dim)
    order = np.random.default_rng(0).permutation(len(rows))
    images, masks = render(rows.iloc[order], size=size, dim=dim, chunk=4)
    for i in (0, 3, 9):
        alone, alone_mask = render(rows.iloc[[i]], size=size, dim=dim)
        j = int(np.flatnonzero(order == i)[0])
        assert np.array_equal(alone[0], images[j]) and np.array_equal(alone_mask[0], masks[j])


def test_changing_elongation_is_local_to_the_body_reach() -> None:
    rows = make_rows(12, seed=11, n_spicules=0, irregularity=0.2, elongation=0.1)
    before, _ = render(rows)
    after, _ = render(rows.assign(elongation=0.6))
    lobes = rows["lobulation"] * rows["shape"].map(LOBULATION_EXPRESSION)
    reach = body_reach(0.6, rows["irregularity"], 2, lobulation=lobes) * rows["diameter_mm"] / 2
    axis = (np.arange(64) - 31.5) * 0.7
    for b, a, row, r in zip(before, after, rows.itertuples(), reach):
        far = np.hypot(axis[:, None] - row.offset_y_mm, axis[None, :] - row.offset_x_mm) > r + 4.0
        assert far.sum() > 100
        assert np.array_equal(b[far], a[far])
        assert not np.array_equal(b, a)


def test_rotating_by_90_degrees_rotates_an_elongated_irregular_body() -> None:
    rows = _quiet(6, seed=12, shape="lobulated", diameter_mm=DIAMETER, pixel_mm=PX, elongation=0.5, irregularity=0.2)
    _, m0 = render(rows.assign(rotation_deg=10.0), size=SIZE)
    _, m90 = render(rows.assign(rotation_deg=100.0), size=SIZE)
    turned = np.rot90(m0 == REGIONS["body"], k=-1, axes=(1, 2))
    body90 = m90 == REGIONS["body"]
    iou = (turned & body90).sum(axis=(1, 2)) / (turned | body90).sum(axis=(1, 2))
    assert iou.min() > 0.97, iou
    assert ((m0 == REGIONS["body"]) != body90).any()


# ----------------------------------------------------------------------------- reach, fits
@pytest.mark.parametrize("dim,size,px", [(2, 64, 0.35), (3, 40, 0.6)])
def test_body_reach_bounds_the_rendered_body(dim: int, size: int, px: float) -> None:
    rows = _quiet(12, seed=13, dim=dim, diameter_mm=10.0, pixel_mm=px, n_spicules=0)
    rows["elongation"] = np.linspace(0, 0.7, len(rows))
    rows["irregularity"] = np.linspace(0.3, 0, len(rows))
    _, masks = render(rows, size=size, dim=dim)
    lobes = rows["lobulation"] * rows["shape"].map(LOBULATION_EXPRESSION)
    reach = body_reach(rows["elongation"], rows["irregularity"], dim, lobulation=lobes)
    for m, bound in zip(masks, reach):
        farthest = _radii(m == REGIONS["body"], px).max() / 5.0
        assert farthest <= bound + px / 5.0, (farthest, bound)
    assert body_reach(np.zeros(3), np.zeros(3), dim).tolist() == [1.0, 1.0, 1.0]


def test_fits_counts_the_stretched_body() -> None:
    rows = make_rows(2, seed=14, shape="round", diameter_mm=28.0, offset_x_mm=0.0, offset_y_mm=0.0)
    assert fits(rows, 64, 2).all()  # 14 mm <= 22.4 mm
    assert not fits(rows.assign(elongation=0.7), 64, 2).any()  # 14 / sqrt(0.3) = 25.6 mm
    assert fits(rows.assign(elongation=0.0, irregularity=0.0, spicule_grade=1.0), 64, 2).all()


# ----------------------------------------------------------------------------- robustness
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.fixed_dictionaries(
        {
            **VALID_ROW,
            "elongation": st.floats(0, 0.7),
            "irregularity": st.floats(0, 0.3),
            "spicule_grade": st.floats(0, 1),
        }
    ),
    st.sampled_from([2, 3]),
)
def test_any_valid_shaped_row_renders_finite_values_and_valid_masks(row: dict, dim: int) -> None:
    size = 24 if dim == 2 else 12
    batch = R.prepare([row], size=size, dim=dim)
    for name in ("body_r0", "spic_tip", "spic_slope", "spic_base", "elong_coef", "irr_amp"):
        assert np.isfinite(getattr(batch, name).numpy()).all(), name
    assert (batch.spic_tip >= batch.spic_base).all() and (batch.spic_slope >= 0).all()
    hu, mask = R.render_tensor(batch)
    assert np.isfinite(hu.numpy()).all()
    assert hu.min() >= R.HU_MIN and hu.max() <= R.HU_MAX
    assert set(np.unique(mask.numpy())) <= {0, 1, 2, 3}
    spicules = row["shape"] == "spiculated" and math.ceil(row["n_spicules"] * row["spicule_grade"] - 1e-9) > 0
    if not spicules:
        assert not (mask == REGIONS["spicules"]).any()


# ----------------------------------------------------------------------------- explain's switches
def test_shape_switches_exist_only_for_carried_columns_and_change_one_column() -> None:
    from nodulab.explanation.switches import build_switches
    from nodulab.synth.sampling import sample_split
    from nodulab.synth.scenarios import load_scenario, resolve

    s = resolve(load_scenario("size-confound"), n=40)
    rows = sample_split(s, "test_balanced", 0)
    plain = {w.factor for w in build_switches(s, "test_balanced", 0, len(rows), rows)}
    assert not plain & set(OPTIONAL)
    rng = np.random.default_rng(0)
    shaped = rows.assign(
        elongation=rng.uniform(0, 0.7, len(rows)),
        irregularity=rng.uniform(0, 0.3, len(rows)),
        spicule_grade=rng.uniform(0, 1, len(rows)),
    )
    expected = {
        ("elongation", "<0.2", 0.4),
        ("elongation", ">=0.2", 0.0),
        ("irregularity", "<0.08", 0.15),
        ("irregularity", ">=0.08", 0.0),
        ("spicule_grade", "<0.6", 1.0),
        ("spicule_grade", ">=0.6", 0.25),
    }
    found = set()
    for w in build_switches(s, "test_balanced", 0, len(shaped), shaped):
        if w.factor not in OPTIONAL:
            continue
        where, changed = w.change(shaped)
        assert len(where) and w.columns == (w.factor,)
        original = shaped.iloc[where]
        for column in shaped.columns:  # the seed and every other column kept
            assert column == w.factor or (changed[column].to_numpy() == original[column].to_numpy()).all(), column
        (value,) = set(changed[w.factor])
        found.add((w.factor, w.value_from, value))
        if w.factor == "spicule_grade":
            assert (original["shape"] == "spiculated").all() and (original["n_spicules"] > 0).all()
    assert found == expected
