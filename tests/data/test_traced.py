"""nodulab.data.traced: measures of a traced outline, and tracing a nodule in an image."""

import numpy as np
import pytest

from nodulab.data.traced import largest_slice, measure, trace


def _grid(n=81):
    c = (n - 1) / 2
    y, x = np.mgrid[0:n, 0:n]
    return y - c, x - c


def test_disc_measures():
    y, x = _grid()
    radius_px = 5.0 / 0.7
    m = measure(np.hypot(y, x) <= radius_px, 0.7)
    assert m["diameter_mm"] == pytest.approx(10.0, rel=0.03)
    assert m["area_mm2"] == pytest.approx(np.pi * 25, rel=0.06)
    # The brief asked solidity > 0.93 here; with the hull of the pixel squares' corners a 14 px disc
    # gives 0.91 (the hull's straight edges bridge the staircase outline, a rim about 0.5 px wide),
    # so a convex shape reaches 0.93 only from about 20 px across (next assert).
    assert m["solidity"] > 0.90
    assert m["aspect"] > 0.95
    assert m["radial_cv"] < 0.06
    assert measure(np.hypot(y, x) <= 2 * radius_px, 0.7)["solidity"] > 0.93


def test_ellipse_aspect():
    y, x = _grid()
    m = measure((x / 20.0) ** 2 + (y / 10.0) ** 2 <= 1, 0.7)
    assert m["aspect"] == pytest.approx(0.5, abs=0.03)


def test_ellipse_aspect_is_rotation_invariant():
    y, x = _grid()
    u, v = (x + y) / np.sqrt(2), (x - y) / np.sqrt(2)
    assert measure((u / 20.0) ** 2 + (v / 10.0) ** 2 <= 1, 0.7)["aspect"] == pytest.approx(0.5, abs=0.03)


def test_star_has_low_solidity_and_high_radial_cv():
    y, x = _grid()
    r, theta = np.hypot(y, x), np.arctan2(y, x)
    star = r <= 10 + 22 * np.maximum(np.cos(4 * theta), 0) ** 8  # thin spikes on a disc
    m = measure(star, 0.7)
    assert m["solidity"] < 0.8
    assert m["radial_cv"] > 0.2


def test_tiny_masks_do_not_crash():
    one = np.zeros((5, 5), bool)
    one[2, 2] = True
    m = measure(one, 0.5)
    assert m["area_mm2"] == pytest.approx(0.25)
    assert m["solidity"] == pytest.approx(1.0)
    assert np.isnan(m["radial_cv"]) and np.isnan(m["aspect"])
    two = one.copy()
    two[2, 3] = True
    m = measure(two, 0.5)
    assert m["solidity"] == pytest.approx(1.0) and m["aspect"] == 0.0 and m["radial_cv"] == 0.0
    empty = measure(np.zeros((4, 4), bool), 0.5)
    assert empty["area_mm2"] == 0.0 and np.isnan(empty["solidity"])


def test_measure_refuses_bad_input():
    with pytest.raises(ValueError, match="2D"):
        measure(np.ones((2, 2, 2), bool), 1.0)
    with pytest.raises(ValueError, match="pixel_mm"):
        measure(np.ones((2, 2), bool), 0.0)


def test_trace_keeps_centre_component_and_fills_holes():
    y, x = _grid(64)
    image = np.full((64, 64), -860.0)
    ring = (np.hypot(y, x) <= 10) & (np.hypot(y, x) > 4)  # a nodule with a dark hole
    image[ring] = 30.0
    image[(np.abs(y + 25) < 3) & (np.abs(x - 25) < 3)] = 30.0  # another blob in a corner
    mask = trace(image, (31.5, 31.5), -415.0)
    assert mask[31, 31] and mask[32, 32]  # the hole is filled
    assert not mask[6, 56]  # the other blob is not kept
    assert mask.sum() == (np.hypot(y, x) <= 10).sum()


def test_trace_nearest_component_when_centre_is_below_threshold():
    image = np.full((32, 32), -860.0)
    image[10:14, 20:24] = 30.0
    image[28:31, 0:3] = 30.0
    mask = trace(image, (12, 15), -400.0)
    assert mask[11, 21] and not mask[29, 1]
    assert not trace(np.full((8, 8), -900.0), (4, 4), -400.0).any()


def test_trace_3d_and_largest_slice():
    z, y, x = np.mgrid[0:21, 0:32, 0:32] - np.array([10, 15.5, 15.5])[:, None, None, None]
    image = np.where(np.sqrt(z**2 + y**2 + x**2) <= 6, 30.0, -860.0)
    mask = trace(image, (10, 15.5, 15.5), -415.0)
    assert mask.shape == image.shape
    assert np.array_equal(largest_slice(mask), mask[10])
    with pytest.raises(ValueError):
        largest_slice(mask[0])
