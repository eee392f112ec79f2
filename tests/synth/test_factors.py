"""The factor table (DESIGN §2) is the contract; pin its names, order, ranges and defaults."""

from __future__ import annotations

import pytest

from nodulab.synth.factors import ATTENUATIONS, FACTOR_COLUMNS, FACTORS, SHAPES

DESIGN_ORDER = (
    "label",
    "shape",
    "lobulation",
    "n_spicules",
    "spicule_length_rel",
    "spicule_width_mm",
    "diameter_mm",
    "attenuation",
    "solid_fraction",
    "margin_sigma_mm",
    "vessels",
    "noise_hu",
    "kernel_fwhm_mm",
    "pixel_mm",
    "offset_x_mm",
    "offset_y_mm",
    "offset_z_mm",
    "rotation_deg",
)


def test_columns_follow_the_design_table():
    assert FACTOR_COLUMNS == DESIGN_ORDER
    assert all(name == f.name for name, f in FACTORS.items())


def test_categorical_factors():
    assert SHAPES == ("round", "lobulated", "spiculated")
    assert ATTENUATIONS == ("ground_glass", "part_solid", "solid", "calcified")
    assert FACTORS["shape"].choices == SHAPES and FACTORS["attenuation"].choices == ATTENUATIONS
    assert FACTORS["attenuation"].default == {"choice": list(ATTENUATIONS[:3])}
    assert {n for n, f in FACTORS.items() if f.kind == "int"} == {"n_spicules", "vessels"}


@pytest.mark.parametrize(
    ("name", "low", "high", "default"),
    [
        ("lobulation", 0, 0.3, [0.05, 0.2]),
        ("n_spicules", 0, 24, [6, 16]),
        ("spicule_length_rel", 0.2, 1.5, [0.4, 1.0]),
        ("spicule_width_mm", 0.3, 2, [0.5, 1.0]),
        ("diameter_mm", 3, 30, [6, 18]),
        ("solid_fraction", 0.1, 0.9, [0.3, 0.7]),
        ("margin_sigma_mm", 0, 2.5, [0.2, 0.8]),
        ("vessels", 0, 6, [0, 3]),
        ("noise_hu", 0, 100, [10, 30]),
        ("kernel_fwhm_mm", 0.3, 3, [0.6, 1.2]),
        ("offset_x_mm", -10, 10, [-3, 3]),
        ("offset_y_mm", -10, 10, [-3, 3]),
        ("offset_z_mm", -10, 10, [-3, 3]),
        ("rotation_deg", 0, 360, [0, 360]),
    ],
)
def test_numeric_ranges_and_defaults(name, low, high, default):
    factor = FACTORS[name]
    assert (factor.low, factor.high) == (low, high)
    assert factor.default == {"uniform": default}
    assert low <= default[0] <= default[1] <= high


def test_pixel_mm_comes_from_the_image():
    assert FACTORS["pixel_mm"].default is None
    assert (FACTORS["pixel_mm"].low, FACTORS["pixel_mm"].high) == (0.2, 3.0)
