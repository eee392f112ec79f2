"""The factor table (design.md "Factors of variation") is the contract; pin its names, order,
ranges and defaults, and the
lists derived from it (a new factor is one entry, no list edited)."""

from __future__ import annotations

import ast

import numpy as np
import pytest
from hypothesis import strategies as st

from conftest import VALID_ROW, make_rows, row_strategies
from nodulab.explanation import probes
from nodulab.synth import renderer
from nodulab.synth.factors import ATTENUATIONS, FACTOR_COLUMNS, FACTORS, OPTIONAL, SHAPES, Factor
from nodulab.synth.scenario import SOURCE_MAPPED
from nodulab.training.augment import GEOMETRIC_FACTORS

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


# ----------------------------------------------------------------------------- lists derived from the table
# What each list was when it was kept by hand beside the table (the regression reference; the
# derived lists must stay these, in this order where order shows in an output).
RENDER_REQUIRED = (*DESIGN_ORDER[1:], "seed")
PROBE_CATEGORICAL = ("label", "shape", "attenuation")
PROBE_NUMERIC = (  # probes.csv row order
    "diameter_mm",
    "lobulation",
    "n_spicules",
    "spicule_length_rel",
    "spicule_width_mm",
    "solid_fraction",
    "margin_sigma_mm",
    "vessels",
    "noise_hu",
    "kernel_fwhm_mm",
    "offset_x_mm",
    "offset_y_mm",
    "offset_z_mm",
    "elongation",
    "irregularity",
    "spicule_grade",
)
SPICULATED = ("shape", ("spiculated",))
PROBE_ACTS_ON = {
    "n_spicules": SPICULATED,
    "spicule_length_rel": SPICULATED,
    "spicule_width_mm": SPICULATED,
    "spicule_grade": SPICULATED,
    "lobulation": ("shape", ("lobulated", "spiculated")),
    "solid_fraction": ("attenuation", ("part_solid", "calcified")),
}
OPTIONAL_NEUTRAL = {"elongation": 0.0, "irregularity": 0.0, "spicule_grade": 1.0}
SOURCE_FACTORS = {"shape", "lobulation", "spicule_grade", "elongation", "diameter_mm", "margin_sigma_mm", "attenuation"}
ROW_STRATEGIES = {
    "shape": st.sampled_from(["round", "lobulated", "spiculated"]),
    "lobulation": st.floats(0, 0.3),
    "n_spicules": st.integers(0, 24),
    "spicule_length_rel": st.floats(0.2, 1.5),
    "spicule_width_mm": st.floats(0.3, 2),
    "diameter_mm": st.floats(3, 30),
    "attenuation": st.sampled_from(["ground_glass", "part_solid", "solid", "calcified"]),
    "solid_fraction": st.floats(0.1, 0.9),
    "margin_sigma_mm": st.floats(0, 2.5),
    "vessels": st.integers(0, 6),
    "noise_hu": st.floats(0, 100),
    "kernel_fwhm_mm": st.floats(0.3, 3),
    "pixel_mm": st.floats(0.2, 3),
    "offset_x_mm": st.floats(-10, 10),
    "offset_y_mm": st.floats(-10, 10),
    "offset_z_mm": st.floats(-10, 10),
    "rotation_deg": st.floats(0, 360),
    "seed": st.integers(0, 2**63 - 1),
}

THROWAWAY = Factor(
    "wobble_mm",
    "float",
    "mm",
    "a factor added by this test only",
    low=0.0,
    high=2.0,
    default=0.0,
    neutral=0.0,
    expressed_when=("shape", ("lobulated",)),
)
"""A new opt-in numeric factor, shown on lobulated rows only: one entry, no list edited."""
WITH_THROWAWAY = {**FACTORS, THROWAWAY.name: THROWAWAY}


def _spec(strategy: st.SearchStrategy) -> tuple[str, dict[str, object]]:
    """A strategy as (function, arguments) from its repr: ``floats(min_value=0, max_value=0.3)``
    and ``floats(min_value=0.0, max_value=0.3)`` compare equal, and so do a list and a tuple."""
    call = ast.parse(repr(strategy), mode="eval").body
    assert isinstance(call, ast.Call) and isinstance(call.func, ast.Name), repr(strategy)
    values = [ast.literal_eval(a) for a in call.args] + [ast.literal_eval(k.value) for k in call.keywords]
    names = [str(i) for i in range(len(call.args))] + [str(k.arg) for k in call.keywords]
    return call.func.id, {n: tuple(v) if isinstance(v, list) else v for n, v in zip(names, values, strict=True)}


def test_derived_lists_are_what_was_kept_by_hand():
    assert renderer._REQUIRED == RENDER_REQUIRED
    assert probes.CATEGORICAL == PROBE_CATEGORICAL
    assert probes.NUMERIC == PROBE_NUMERIC
    assert probes.ACTS_ON == PROBE_ACTS_ON
    assert OPTIONAL == OPTIONAL_NEUTRAL and list(OPTIONAL) == list(OPTIONAL_NEUTRAL)
    assert set(SOURCE_MAPPED) == SOURCE_FACTORS  # membership only: no output lists them
    assert GEOMETRIC_FACTORS == ("offset_x_mm", "offset_y_mm", "offset_z_mm", "rotation_deg")
    assert list(VALID_ROW) == list(ROW_STRATEGIES)
    assert {k: _spec(v) for k, v in VALID_ROW.items()} == {k: _spec(v) for k, v in ROW_STRATEGIES.items()}


def test_the_table_is_consistent_with_itself():
    for f in FACTORS.values():
        if f.optional:
            assert f.numeric and f.low <= f.neutral <= f.high, f.name
        if f.expressed_when is not None:
            column, values = f.expressed_when
            assert FACTORS[column].kind == "category" and set(values) < set(FACTORS[column].choices), f.name


def test_a_new_factor_joins_the_derived_lists_unedited(monkeypatch: pytest.MonkeyPatch):
    assert probes.numeric_factors(WITH_THROWAWAY) == (*PROBE_NUMERIC, "wobble_mm")
    assert probes.expressed_where(WITH_THROWAWAY) == {**PROBE_ACTS_ON, "wobble_mm": ("shape", ("lobulated",))}
    assert probes.categorical_factors(WITH_THROWAWAY) == PROBE_CATEGORICAL
    assert _spec(row_strategies(WITH_THROWAWAY, optional=True)["wobble_mm"]) == _spec(st.floats(0, 2))
    assert row_strategies(WITH_THROWAWAY).keys() == VALID_ROW.keys()  # opt-in: not required in a row
    assert list(row_strategies(WITH_THROWAWAY, optional=True))[-2:] == ["wobble_mm", "seed"]

    # probes decode it where it shows; the renderer reads rows without its column as before
    rows = make_rows(30, seed=3, shape=["round", "lobulated", "spiculated"] * 10)
    rows["wobble_mm"] = np.linspace(0.0, 2.0, len(rows))
    monkeypatch.setattr(probes, "NUMERIC", probes.numeric_factors(WITH_THROWAWAY))
    monkeypatch.setattr(probes, "ACTS_ON", probes.expressed_where(WITH_THROWAWAY))
    found = {name: (target, rows_) for name, target, rows_, _ in probes.probe_targets(rows)}
    assert found["wobble_mm"][0] == "value among lobulated"
    assert (rows["shape"].to_numpy()[found["wobble_mm"][1]] == "lobulated").all()
    before = renderer.render(rows.iloc[:2].drop(columns="wobble_mm"), size=16)
    monkeypatch.setattr(renderer, "FACTORS", WITH_THROWAWAY)
    after = renderer.render(rows.iloc[:2].drop(columns="wobble_mm"), size=16)
    assert all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))
