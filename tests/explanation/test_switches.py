"""The switches of ``explain`` (``explanation.switches``): a diameter switch changes size only, support in mm.

A diameter switch, the size confound's switch and the diameter sweep keep every spicule's length
beyond the body and its width in millimetres (``with_diameter``), checked on the renderer's own
geometry (``prepare``); ``spicule_length_rel`` is judged against the training support in mm.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from nodulab.explanation import counterfactual
from nodulab.explanation.counterfactual import sweep_frame
from nodulab.explanation.switches import (
    DIAMETER_COLUMNS,
    build_switches,
    rows_in_support,
    spicule_mm_support,
    with_diameter,
)
from nodulab.synth.renderer import RenderBatch, prepare
from nodulab.synth.sampling import sample_split
from nodulab.synth.scenarios import load_scenario, resolve

SIZE = 64  # prepare only: nothing is rendered


def _spiculated(preset: str, split: str) -> tuple[object, pd.DataFrame]:
    """A preset's rows, every one spiculated with spicules long enough that no tip is clamped to the body."""
    s = resolve(load_scenario(preset), n=24)
    rows = sample_split(s, split, 0).assign(shape="spiculated", spicule_length_rel=0.9)
    return s, rows


def _beyond(b: RenderBatch, rows: pd.DataFrame) -> np.ndarray:
    """Each present spicule's tip minus the body radius (diameter / 2), mm."""
    return b.spic_tip.double().numpy() - rows["diameter_mm"].to_numpy()[:, None] / 2


def _half_width(b: RenderBatch) -> np.ndarray:
    """Each spicule's half width where it leaves the body (``spic_base`` is half the surface radius), mm."""
    surface = 2 * b.spic_base.double()
    return (b.spic_slope.double() * (b.spic_tip.double() - surface) + b.spic_tip_half_w.double()).numpy()


@pytest.mark.parametrize(
    "preset, split, kind, value_from",
    [
        ("clean", "test_iid", "nuisance", "<12"),
        ("clean", "test_iid", "nuisance", ">=12"),
        ("size-confound", "test_conflict", "confound", "13..18"),
        ("size-confound", "test_conflict", "confound", "6..10"),
    ],
)
def test_a_diameter_switch_keeps_every_spicule_in_mm(preset: str, split: str, kind: str, value_from: str) -> None:
    s, rows = _spiculated(preset, split)
    [switch] = [
        w
        for w in build_switches(s, split, 0, len(rows), rows)
        if w.factor == "diameter_mm" and w.value_from == value_from
    ]
    assert switch.kind == kind and switch.columns == DIAMETER_COLUMNS and switch.in_support
    where, changed = switch.change(rows)
    original = rows.iloc[where]
    assert (
        len(where) >= 3 and (np.abs(changed["diameter_mm"].to_numpy() - original["diameter_mm"].to_numpy()) > 2).all()
    )
    before, after = prepare(original, SIZE, 2), prepare(changed, SIZE, 2)
    naive = prepare(original.assign(diameter_mm=changed["diameter_mm"].to_numpy()), SIZE, 2)
    present = before.spic_slope.numpy() > 0
    assert present.sum() >= 3 * 6 and np.array_equal(present, after.spic_slope.numpy() > 0)
    for b in (before, after):  # no tip is clamped to the surface + a pixel: tip - radius is the drawn length
        surface = 2 * b.spic_base.double().numpy()
        assert (b.spic_tip.double().numpy() - surface - b.pixel_mm.double().numpy()[:, None])[present].min() > 0.01
    np.testing.assert_allclose(_beyond(after, changed)[present], _beyond(before, original)[present], rtol=0, atol=1e-5)
    np.testing.assert_allclose(_half_width(after)[present], _half_width(before)[present], rtol=0, atol=1e-5)
    np.testing.assert_array_equal(after.spic_tip_half_w.numpy(), before.spic_tip_half_w.numpy())
    np.testing.assert_array_equal(after.spic_dir.numpy(), before.spic_dir.numpy())
    # the control: setting the diameter alone scales every spicule with the body
    grown = np.abs(_beyond(naive, changed) - _beyond(before, original))[present]
    assert grown.min() > 0.2


def test_with_diameter_keeps_the_mm_length_and_touches_two_columns() -> None:
    _, rows = _spiculated("clean", "test_iid")
    out = with_diameter(rows, 16.0)
    assert (out["diameter_mm"] == 16.0).all() and out.index.equals(rows.index)
    np.testing.assert_allclose(
        out["spicule_length_rel"] * out["diameter_mm"], rows["spicule_length_rel"] * rows["diameter_mm"], rtol=1e-15
    )
    same = [c for c in rows.columns if c not in DIAMETER_COLUMNS]
    assert out[same].equals(rows[same]) and rows["diameter_mm"].ne(16.0).any()  # the input is left alone
    per_row = with_diameter(rows, np.arange(len(rows)) + 6.0)
    assert (per_row["diameter_mm"].to_numpy() == np.arange(len(rows)) + 6.0).all()


def test_the_diameter_sweep_keeps_spicules_in_mm(monkeypatch: pytest.MonkeyPatch) -> None:
    _, rows = _spiculated("clean", "test_iid")
    rows = rows.iloc[:4].assign(diameter_mm=8.0, offset_x_mm=0.0, offset_y_mm=0.0)
    seen: list[pd.DataFrame] = []

    def fake_render(frame: pd.DataFrame, size: int, dim: int, device=None, *, view: int = 0, chunk=None):
        seen.append(frame.copy())
        return np.zeros((len(frame), size, size), np.int16), np.zeros((len(frame), size, size), np.uint8)

    monkeypatch.setattr(counterfactual, "render", fake_render)
    predict = lambda images: {"any": np.full(len(images), 0.5)}  # noqa: E731
    sweep_frame("x", rows, predict, SIZE, 2, sweeps={"diameter_mm": (6.0, 12.0), "noise_hu": (40.0,)})
    [six, twelve, noise] = seen
    for frame, d in ((six, 6.0), (twelve, 12.0)):
        assert (frame["diameter_mm"] == d).all()
        np.testing.assert_allclose(frame["spicule_length_rel"] * d, 0.9 * 8.0)
    assert (noise["spicule_length_rel"] == 0.9).all() and (noise["noise_hu"] == 40.0).all()


def test_spicule_length_is_judged_in_mm_against_the_training_support() -> None:
    s = resolve(load_scenario("size-confound"), n=24)
    # train: spicule_length_rel 0.4..1.0, diameter 13..18 or 6..10 -> spicules 2.6..9 mm or 1.2..5 mm
    np.testing.assert_allclose(sorted(spicule_mm_support(s)), [(1.2, 5.0), (2.6, 9.0)], rtol=1e-12)
    rows = pd.DataFrame(
        {
            "spicule_length_rel": [1.3, 0.5, 1.5, 0.4, 0.2],
            "diameter_mm": [6.0, 12.0, 14.0, 4.0, 30.0],
        }
    )
    # 3.9 mm (rel 1.3 alone would be out), 3 mm (diameter 12 alone would be out), 10.5 mm, 0.8 mm, 3 mm
    assert rows_in_support(s, rows, ("spicule_length_rel",)).tolist() == [True, True, False, False, True]
    both = rows_in_support(s, rows, DIAMETER_COLUMNS)
    assert both.tolist() == [True, False, False, False, False]  # 12, 4 and 30 mm bodies: no training diameter
    assert rows_in_support(s, rows, ()).all()


def test_in_support_and_kind_follow_the_training_support() -> None:
    s = resolve(load_scenario("clean"), n=24)
    rows = sample_split(s, "test_iid", 0)
    switches = {(w.factor, w.value_from): w for w in build_switches(s, "test_iid", 0, len(rows), rows)}
    assert not switches[("vessels", "0")].in_support and switches[("vessels", "0")].kind == "robustness"
    assert switches[("noise_hu", "<20")].in_support and switches[("noise_hu", "<20")].kind == "nuisance"
    for key in (("diameter_mm", "<12"), ("diameter_mm", ">=12")):  # 16 and 8 mm, spicules kept in mm: in support
        assert switches[key].in_support and switches[key].kind == "nuisance"
    nulls = [w for w in switches.values() if w.kind == "null"]
    assert [(w.factor, w.value_from, w.value_to) for w in nulls] == [
        ("rerender", "stored", "redrawn"),
        ("rotation_deg", "r", "r+90"),
        ("offset_mm", "xy", "-xy"),
    ]
    assert all(w.in_support for w in nulls)
    assert {"offset_x_mm", "offset_y_mm"}.isdisjoint(w.factor for w in switches.values())
    # 3D: the mirror moves z too
    s3 = resolve(load_scenario("clean"), n=8, dim=3)
    rows3 = sample_split(s3, "test_iid", 0)
    [mirror] = [w for w in build_switches(s3, "test_iid", 0, len(rows3), rows3) if w.factor == "offset_mm"]
    where, changed = mirror.change(rows3)
    assert mirror.value_from == "xyz" and len(where) == len(rows3)
    for axis in ("offset_x_mm", "offset_y_mm", "offset_z_mm"):
        np.testing.assert_array_equal(changed[axis].to_numpy(), -rows3[axis].to_numpy())
