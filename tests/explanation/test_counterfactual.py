"""Counterfactual reliance, sweeps and the cue-reliance index (``explanation.counterfactual``, ``switches``).

Hand-built models stand in for networks: a diameter thresholder (bright area after an erosion, so
thin spicules do not count), a spicule detector (bright pixels an opening removes) and a
centre-HU reader. Each must be found relying on exactly the factor it reads.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from conftest import file_tree
from nodulab.cli import app
from nodulab.common.tables import RESULT_TABLES, RUN_FIGURES, write_table
from nodulab.data import dataset as data
from nodulab.explanation import counterfactual
from nodulab.explanation.counterfactual import (
    bootstrap_interval,
    bootstrap_seed,
    counterfactuals,
    explain_split,
    is_degenerate,
    sweep_frame,
)
from nodulab.explanation.switches import build_switches, fits
from nodulab.synth.renderer import REGIONS, render
from nodulab.synth.sampling import sample_split
from nodulab.synth.scenario import Scenario
from nodulab.synth.scenarios import load_scenario, load_scenario_dict, resolve, scenario_to_dict
from nodulab.training import loop as train
from nodulab.training.models import build_model, save_model, state_sha256
from nodulab.training.readouts import fit_dfr, fit_readouts
from nodulab.training.runs import CLASSIFIERS, TIED_FILES

pytestmark = pytest.mark.usefixtures("one_thread")
SIZE, PIXEL_MM = 32, 1.4


def _scenario(**factors: object) -> Scenario:
    """size-confound at 32 px / 1.4 mm, solid or ground-glass bodies, small offsets."""
    d = scenario_to_dict(resolve(load_scenario("size-confound"), n=40, size=SIZE, pixel_mm=PIXEL_MM))
    d["factors"].update(
        {
            "attenuation": {"choice": ["solid", "ground_glass"]},
            "offset_x_mm": {"uniform": [-1, 1]},
            "offset_y_mm": {"uniform": [-1, 1]},
            **factors,
        }
    )
    return load_scenario_dict(d)


# ----------------------------------------------------------------------------- hand-built models
def _sigmoid(x: torch.Tensor) -> np.ndarray:
    return torch.sigmoid(x).numpy().astype(np.float64)


def hand_built(images: np.ndarray) -> dict[str, np.ndarray]:
    """Three models at once: ``diameter`` (threshold ~11.5 mm), ``spicules``, ``centre_hu``."""
    x = torch.from_numpy(np.asarray(images, dtype=np.float32))[:, None]
    erode = lambda b: -torch.nn.functional.max_pool2d(-b, 3, 1, 1)  # noqa: E731
    area = erode((x > -780).float()).sum((1, 2, 3))  # above parenchyma (-860), below ground glass (-650)
    bright = (x > -750).float()
    opened = torch.nn.functional.max_pool2d(
        erode(bright), 3, 1, 1
    )  # measured: <= 35 px at 10 mm, >= 36 px at 13 mm (spicules, attenuation)
    thin = (bright - opened).clamp(min=0).sum((1, 2, 3))  # measured: <= 4 round, >= 6 spiculated
    c = SIZE // 2
    centre = x[:, 0, c - 2 : c + 2, c - 2 : c + 2].mean((1, 2))
    return {
        "diameter": _sigmoid((area - 37.0) / 1.5),
        "spicules": _sigmoid((thin - 5.0) / 0.5),
        "centre_hu": _sigmoid((centre + 350.0) / 30.0),
    }


@pytest.fixture(scope="module")
def conflict() -> tuple[Scenario, pd.DataFrame]:
    s = _scenario()
    return s, sample_split(s, "test_conflict", 0)


def with_constant(images: np.ndarray) -> dict[str, np.ndarray]:
    """The hand-built models and ``constant``, a classifier that calls every image malignant (P 0.9)."""
    return {**hand_built(images), "constant": np.full(len(images), 0.9)}


@pytest.fixture(scope="module")
def explained(conflict: tuple[Scenario, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    s, rows = conflict
    switches = build_switches(s, "test_conflict", 0, len(rows), rows)
    tables, _ = explain_split("test_conflict", rows, None, with_constant, switches, SIZE, 2)
    return tables


def _flip(frame: pd.DataFrame, classifier: str, factor: str, kind: str) -> pd.Series:
    part = frame[(frame["classifier"] == classifier) & (frame["factor"] == factor) & (frame["kind"] == kind)]
    assert len(part), (classifier, factor, kind)
    return part["flip_rate"]


def test_tables_have_the_documented_columns(explained: dict[str, pd.DataFrame]) -> None:
    for name in ("reliance", "sweep", "cue"):
        assert tuple(explained[name].columns) == RESULT_TABLES[name].columns
    for frame in explained.values():
        assert set(frame["classifier"]) == {"diameter", "spicules", "centre_hu", "constant"}
    kinds = explained["reliance"].groupby(["factor", "value_from"])["kind"].first()
    assert kinds[("shape", "spiculated")] == "cue" and kinds[("diameter_mm", "6..10")] == "confound"
    assert kinds[("vessels", "0")] == "robustness"  # size-confound trains without vessels
    assert kinds[("noise_hu", "<60")] == "robustness" and kinds[("noise_hu", "<20")] == "nuisance"
    assert kinds[("rotation_deg", "r")] == "null" and kinds[("offset_mm", "xy")] == "null"
    assert kinds[("rerender", "stored")] == "null"
    assert ("vessels", ">0") not in kinds  # applied to no row: left out
    assert "offset_x_mm" not in set(explained["reliance"]["factor"])  # the mirror moves every axis at once


def test_in_support_marks_switches_off_the_training_support(explained: dict[str, pd.DataFrame]) -> None:
    r = explained["reliance"]
    support = r.groupby(["factor", "value_from"])["in_support"].agg(set)
    assert support[("vessels", "0")] == {0}  # size-confound trains without vessels
    assert support[("noise_hu", "<60")] == {0} and support[("noise_hu", "<20")] == {1}
    assert support[("diameter_mm", "6..10")] == {1}  # the other branch's diameters, spicules kept in mm
    assert support[("rotation_deg", "r")] == {1} and support[("rerender", "stored")] == {1}
    assert r["in_support"].dtype.kind == "i" and r["degenerate"].dtype.kind == "i"
    # the kind rule reads the same check
    fixed = r[r["kind"].isin(["nuisance", "robustness"])]
    assert ((fixed["kind"] == "nuisance") == (fixed["in_support"] == 1)).all()


def test_null_switches_give_every_row_a_null_flip_rate(explained: dict[str, pd.DataFrame]) -> None:
    r = explained["reliance"]
    for classifier, part in r.groupby("classifier"):
        null = part[part["kind"] == "null"]
        assert sorted(null["factor"]) == ["offset_mm", "rerender", "rotation_deg"], classifier
    assert r["null_flip_rate"].notna().all() and r["excess_flip_rate"].notna().all()
    assert ((r["null_flip_rate"] >= 0) & (r["null_flip_rate"] <= 1)).all()
    # every null switch applied to every row here, so the paired excess is flip_rate - null_flip_rate
    assert np.allclose(r["excess_flip_rate"], r["flip_rate"] - r["null_flip_rate"])
    # the centre reader and the diameter thresholder do not flip under the null switches
    for classifier in ("diameter", "centre_hu", "constant"):
        assert (r.loc[r["classifier"] == classifier, "null_flip_rate"] == 0).all(), classifier
    assert (r.loc[r["classifier"] == "spicules", "null_flip_rate"] > 0).any()  # a thin-strand counter does


def test_excess_interval_holds_the_excess(explained: dict[str, pd.DataFrame]) -> None:
    r = explained["reliance"]
    assert (
        (r["excess_low"] <= r["excess_flip_rate"] + 1e-12) & (r["excess_flip_rate"] <= r["excess_high"] + 1e-12)
    ).all()
    assert (r["excess_high"] - r["excess_low"] > 0).any()  # not a degenerate interval everywhere
    confound = r[(r["classifier"] == "diameter") & (r["kind"] == "confound")]
    assert (confound["excess_low"] >= 0.9).all()  # the diameter model's reliance stands above its null flips


def test_a_constant_classifier_is_degenerate(explained: dict[str, pd.DataFrame]) -> None:
    r = explained["reliance"]
    degenerate = r.groupby("classifier")["degenerate"].agg(set)
    assert degenerate["constant"] == {1}
    assert degenerate["diameter"] == degenerate["spicules"] == degenerate["centre_hu"] == {0}
    assert (r.loc[r["classifier"] == "constant", "flip_rate"] == 0).all()  # it flips on nothing: read as nothing


def test_diameter_model_flips_on_the_diameter_switch_only(explained: dict[str, pd.DataFrame]) -> None:
    r = explained["reliance"]
    assert (_flip(r, "diameter", "diameter_mm", "confound") >= 0.9).all()
    assert (_flip(r, "diameter", "shape", "cue") <= 0.1).all()
    assert (_flip(r, "diameter", "attenuation", "nuisance") <= 0.15).all()  # a few rows sit near the threshold


def test_spicule_detector_flips_on_the_cue_switch_only(explained: dict[str, pd.DataFrame]) -> None:
    r = explained["reliance"]
    assert (_flip(r, "spicules", "shape", "cue") >= 0.85).all()
    assert (_flip(r, "spicules", "diameter_mm", "confound") <= 0.15).all()
    # delta_p has the direction of the switch: removing spicules lowers P(malignant)
    cue = r[(r["classifier"] == "spicules") & (r["factor"] == "shape")].set_index("value_from")["delta_p"]
    assert cue["spiculated"] < -0.7 and cue["round"] > 0.7


def test_centre_hu_reader_flips_on_attenuation(explained: dict[str, pd.DataFrame]) -> None:
    r = explained["reliance"]
    assert (_flip(r, "centre_hu", "attenuation", "nuisance") >= 0.9).all()
    assert (_flip(r, "centre_hu", "shape", "cue") <= 0.1).all()
    assert (_flip(r, "centre_hu", "rotation_deg", "null") <= 0.1).all()


def test_sweep_of_the_diameter_model_is_a_step_at_its_threshold(explained: dict[str, pd.DataFrame]) -> None:
    s = explained["sweep"]
    line = s[(s["classifier"] == "diameter") & (s["factor"] == "diameter_mm")].set_index("value")["mean_p"]
    assert list(line.index) == [float(d) for d in range(6, 19)]
    assert (line.loc[6:10] < 0.1).all() and (line.loc[13:18] > 0.85).all()
    assert (np.diff(line.to_numpy()) > -0.05).all()  # a step up, not a bump
    flat = s[(s["classifier"] == "spicules") & (s["factor"] == "diameter_mm")]["mean_p"]
    assert flat.max() - flat.min() < 0.3  # the spicule detector barely cares about size


def test_cue_index_separates_cue_from_confound(explained: dict[str, pd.DataFrame]) -> None:
    cue = explained["cue"].set_index("classifier")
    shares = cue[["label_only", "confound_only", "both", "neither"]]
    assert np.allclose(shares.sum(axis=1), 1.0)
    assert cue.loc["diameter", "confound_only"] >= 0.85 and cue.loc["spicules", "label_only"] >= 0.85
    assert cue.loc["centre_hu", "neither"] >= 0.85
    assert set(cue["confound"]) == {"diameter_mm"}


# ----------------------------------------------------------------------------- the null floor, on a fake renderer
FEATURES = ("diameter_mm", "rotation_deg", "offset_x_mm", "view")


def _fake_render(rows: pd.DataFrame, size: int, dim: int, device=None, *, view: int = 0, chunk=None):
    """ "Images" that are the row's factors: pixel [0, k] holds ``FEATURES[k]`` (the render view for ``view``)."""
    images = np.zeros((len(rows), size, size))
    for k, name in enumerate(FEATURES):
        images[:, 0, k] = view if name == "view" else rows[name].to_numpy(dtype=float)
    return images, np.zeros(images.shape, np.uint8)


def row_readers(images: np.ndarray) -> dict[str, np.ndarray]:
    """Classifiers reading one factor each off ``_fake_render``'s images."""
    x = np.asarray(images)[:, 0, :]
    p = lambda hit: np.where(hit, 0.9, 0.1)  # noqa: E731
    return {
        "size": p(x[:, 0] >= 12),  # exactly invariant to rotation, offset and the nuisance draw
        "view": p(x[:, 3] != 0),  # flips under the re-render only
        "side": p(x[:, 2] > 0),  # flips under the mirrored offset only
        "quarter": p(x[:, 1] >= 45),
    }


def _fake_explain(monkeypatch: pytest.MonkeyPatch, s: Scenario) -> pd.DataFrame:
    monkeypatch.setattr(counterfactual, "render", _fake_render)
    rows = sample_split(s, "test_conflict", 0)
    switches = build_switches(s, "test_conflict", 0, len(rows), rows)
    tables, _ = explain_split("test_conflict", rows, None, row_readers, switches, SIZE, 2, sweep_rows=0)
    return tables["reliance"]


def test_null_flip_rate_is_the_mean_flip_under_the_null_switches(monkeypatch: pytest.MonkeyPatch) -> None:
    r = _fake_explain(monkeypatch, _scenario())
    of = lambda c: r[r["classifier"] == c].set_index(["factor", "value_from"])  # noqa: E731
    size = of("size")
    assert (size["null_flip_rate"] == 0).all()  # invariant to every null switch: null rate exactly 0
    assert (size.loc["diameter_mm", "flip_rate"] == 1).all() and (size.loc["diameter_mm", "excess_low"] == 1).all()
    assert (size.loc["diameter_mm", "excess_flip_rate"] == 1).all()
    assert size.loc[("rerender", "stored"), "flip_rate"] == 0
    for reader, factor in (("view", "rerender"), ("side", "offset_mm")):
        part = of(reader)
        null = part[part["kind"] == "null"].reset_index()
        assert (null["flip_rate"] == (null["factor"] == factor)).all()  # 1 under its switch, 0 under the others
        # one of three null switches flips every row: per row 1/3, whatever rows a switch covers
        assert np.allclose(part["null_flip_rate"], 1 / 3), reader
        assert np.allclose(part.loc["diameter_mm", "excess_flip_rate"], -1 / 3)  # no flip beyond the null ones
    degenerate = r.groupby("classifier")["degenerate"].agg(set)
    assert degenerate["view"] == {1}  # calls every stored image benign
    assert degenerate["size"] == degenerate["side"] == degenerate["quarter"] == {0}


def test_a_null_switch_off_the_training_support_does_not_count(monkeypatch: pytest.MonkeyPatch) -> None:
    r = _fake_explain(monkeypatch, _scenario(rotation_deg=0))  # trained (and tested) at rotation 0 only
    rotation = r[r["factor"] == "rotation_deg"]
    assert (rotation["kind"] == "null").all() and (rotation["in_support"] == 0).all()
    quarter = r[r["classifier"] == "quarter"]
    assert quarter.loc[quarter["factor"] == "rotation_deg", "flip_rate"].item() == 1  # 0 -> 90: every row flips
    assert (quarter["null_flip_rate"] == 0).all()  # ... but the switch is off the support: not in the null rate
    assert (r[r["factor"] == "rerender"]["in_support"] == 1).all()


def test_reliance_is_reproducible_to_the_byte(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    texts = []
    for name in ("a.csv", "b.csv"):
        write_table(_fake_explain(monkeypatch, _scenario()), tmp_path / name)
        texts.append((tmp_path / name).read_bytes())
    assert texts[0] == texts[1]
    values = np.random.default_rng(0).choice([-1.0, 0.0, 1.0], 50)
    assert bootstrap_interval(values, 7) == bootstrap_interval(values, 7) != bootstrap_interval(values, 8)
    low, high = bootstrap_interval(values, 7)
    assert low <= values.mean() <= high and high - low < 0.8
    assert np.isnan(bootstrap_interval(np.zeros(0), 7)).all()
    s = _scenario()
    rows = sample_split(s, "test_conflict", 0)
    [w] = [w for w in build_switches(s, "x", 0, len(rows), rows) if w.factor == "rerender"]
    assert bootstrap_seed("x", "a", w) == bootstrap_seed("x", "a", w) != bootstrap_seed("x", "b", w)
    assert not is_degenerate(np.array([0.9] * 94 + [0.1] * 6)) and is_degenerate(np.array([0.9] * 95 + [0.1] * 5))
    assert is_degenerate(np.full(10, 0.2)) and not is_degenerate(np.zeros(0))


# ----------------------------------------------------------------------------- switch locality
def _dilate(region: np.ndarray, px: int) -> np.ndarray:
    t = torch.from_numpy(region.astype(np.float32))[:, None]
    return torch.nn.functional.max_pool2d(t, 2 * px + 1, 1, px)[:, 0].numpy() > 0


def _switched(s: Scenario, rows: pd.DataFrame, factor: str, value_from: str):
    switch = next(
        w
        for w in build_switches(s, "test_balanced", 0, len(rows), rows)
        if w.factor == factor and w.value_from == value_from
    )
    where, changed = switch.change(rows)
    before, mask_before = render(rows.iloc[where], SIZE, 2)
    after, mask_after = render(changed, SIZE, 2)
    return switch, where, changed, (before, mask_before), (after, mask_after)


@pytest.fixture(scope="module")
def balanced() -> tuple[Scenario, pd.DataFrame]:
    """Finer pixels (0.7 mm) and smaller lesions, so most spicules cover half a pixel (mask region 2)."""
    d = scenario_to_dict(load_scenario("size-confound"))
    d["image"]["size"] = SIZE
    d["confounds"][0].update(malignant={"uniform": [7, 9]}, benign={"uniform": [4, 6]})
    d["factors"].update(
        {
            "attenuation": {"choice": ["solid", "ground_glass"]},
            "vessels": {"uniform": [0, 2]},
            "spicule_length_rel": {"uniform": [0.4, 0.6]},
            "spicule_width_mm": {"uniform": [0.8, 1.0]},
            "offset_x_mm": {"uniform": [-1, 1]},
            "offset_y_mm": {"uniform": [-1, 1]},
        }
    )
    d["splits"] = {name: {**split, "n": 16} for name, split in d["splits"].items()}
    s = load_scenario_dict(d)
    return s, sample_split(s, "test_balanced", 0)


def test_every_switch_changes_only_its_columns(balanced: tuple[Scenario, pd.DataFrame]) -> None:
    s, rows = balanced
    for switch in build_switches(s, "test_balanced", 0, len(rows), rows):
        where, changed = switch.change(rows)
        assert len(where), (switch.factor, switch.value_from)
        original = rows.iloc[where]
        for column in rows.columns:
            same = (changed[column].to_numpy() == original[column].to_numpy()).all()
            assert same or column in switch.columns, (switch.factor, switch.value_from, column)
        if switch.columns:
            assert not changed[list(switch.columns)].equals(original[list(switch.columns)])
            assert switch.view == 0
        else:  # the re-render: every row as it is, rendered with a fresh nuisance draw
            assert switch.factor == "rerender" and switch.view != 0 and changed.equals(original)


def _reach(rows: pd.DataFrame, size: int) -> np.ndarray:
    """Pixels a lesion's spicules can touch: the disc of radius r (1 + spicule length), plus the
    partial-volume pixel and the PSF's 3 sigma (1.2 mm FWHM at most)."""
    px = rows["pixel_mm"].to_numpy()[:, None, None]
    radius = (
        rows["diameter_mm"].to_numpy()[:, None, None] / 2 * (1 + rows["spicule_length_rel"].to_numpy()[:, None, None])
    )
    axis = np.arange(size) - (size - 1) / 2  # the renderer's pixel centres, in pixels from the middle
    dy = axis[None, :, None] * px - rows["offset_y_mm"].to_numpy()[:, None, None]
    dx = axis[None, None, :] * px - rows["offset_x_mm"].to_numpy()[:, None, None]
    return np.sqrt(dx**2 + dy**2) <= radius + px + 3 * 1.2 / 2.355


# An edge spreads over the Beta(3,3) profile of the margin blur (half support
# 0.5 * sqrt(28) * sqrt(0.8**2 + px**2 / 12) = 2.2 mm) plus the PSF (3 sigma = 1.5 mm): 6 px at 0.7 mm.
EDGE_PX = 7


@pytest.mark.parametrize("value_from, region", [("spiculated", "before"), ("round", "after")])
def test_cue_switch_keeps_the_body_and_moves_only_spicules(balanced, value_from: str, region: str) -> None:
    s, rows = balanced
    _, where, changed_rows, (before, m0), (after, m1) = _switched(s, rows, "shape", value_from)
    assert len(where) >= 3
    body = REGIONS["body"]
    assert np.array_equal(m0 == body, m1 == body)  # the body mask is bit-identical
    spicule = REGIONS["spicules"]
    has, lacks = (m0, m1) if region == "before" else (m1, m0)
    assert ((has == spicule).sum((1, 2)) > 0).all() and ((lacks == spicule).sum((1, 2)) == 0).all()
    changed = before != after
    assert changed.any(axis=(1, 2)).all()
    assert not (changed & ~_reach(changed_rows, SIZE)).any()  # nothing changes beyond the spicules' reach
    interior = ~_dilate(~(m0 == body), EDGE_PX)  # the body farther than an edge from its border
    assert not (changed & interior).any()


@pytest.mark.parametrize(
    "factor, value_from, near, px",
    [
        ("attenuation", "solid", ("body",), EDGE_PX),
        ("attenuation", "ground_glass", ("body",), EDGE_PX),
        ("margin_sigma_mm", "<0.5", ("body",), EDGE_PX),
        ("vessels", "0", ("vessels",), 4),
        ("vessels", ">0", ("vessels",), 4),
        ("diameter_mm", "4..6", ("body", "spicules"), EDGE_PX),
    ],
)
def test_a_switch_changes_the_image_only_where_its_factor_acts(balanced, factor, value_from, near, px) -> None:
    s, rows = balanced
    _, where, _, (before, m0), (after, m1) = _switched(s, rows, factor, value_from)
    assert len(where)
    allowed = np.zeros_like(before, dtype=bool)
    for name in near:
        allowed |= (m0 == REGIONS[name]) | (m1 == REGIONS[name])
    changed = before != after
    assert changed.any()
    assert not (changed & ~_dilate(allowed, px)).any()
    assert (~_dilate(allowed, px)).any()  # the check has a background to look at
    if factor in ("attenuation", "margin_sigma_mm"):
        assert np.array_equal(m0, m1)


def test_noise_and_rotation_keep_the_mask_where_they_should(balanced) -> None:
    s, rows = balanced
    *_, (before, m0), (after, m1) = _switched(s, rows, "noise_hu", "<20")
    assert np.array_equal(m0, m1) and (before != after).any()


def test_confound_draws_come_from_the_other_branch_and_do_not_depend_on_n(conflict) -> None:
    s, rows = conflict
    switches = [w for w in build_switches(s, "test_conflict", 0, len(rows), rows) if w.kind == "confound"]
    assert [(w.value_from, w.value_to) for w in switches] == [("13..18", "6..10"), ("6..10", "13..18")]
    for w in switches:
        lo, hi = (float(v) for v in w.value_to.split(".."))
        where, changed = w.change(rows)
        assert len(where) and ((changed["diameter_mm"] >= lo) & (changed["diameter_mm"] <= hi)).all()
        head = rows.iloc[:10]
        where10, changed10 = w.change(head)
        assert np.array_equal(changed10["diameter_mm"].to_numpy(), changed["diameter_mm"].to_numpy()[: len(where10)])
        again = build_switches(s, "test_conflict", 0, len(rows), rows)
        twin = next(x for x in again if x.value_from == w.value_from and x.kind == "confound")
        assert twin.change(rows)[1].equals(changed)


def test_lesions_that_would_not_fit_are_left_out_and_counted(conflict) -> None:
    s, rows = conflict
    big = rows.iloc[:6].copy()
    big["shape"], big["n_spicules"], big["spicule_length_rel"], big["offset_x_mm"] = "spiculated", 8, 1.5, 3.0
    # 32 px x 1.4 mm: half field 22.4 mm; diameter 18 needs 9 x 2.5 + 3 = 25.5 mm
    big["diameter_mm"] = 10.0
    assert fits(big, SIZE, 2).all()
    big.loc[big.index[:2], "diameter_mm"] = 18.0
    assert list(fits(big, SIZE, 2)) == [False, False, True, True, True, True]
    sweep = sweep_frame("x", big, hand_built, SIZE, 2, sweeps={"diameter_mm": (8.0, 18.0)})
    counts = sweep[sweep["classifier"] == "diameter"].set_index("value")["n"]
    # the sweep keeps spicules in mm: 7.5 mm on the 10 mm rows (9 + 7.5 + 3 fits), 13.5 mm on the
    # 18 mm ones (9 + 13.5 + 3 = 25.5 > 22.4; at 8 mm, 4 + 13.5 + 3 fits)
    assert counts[8.0] == 6 and counts[18.0] == 4
    [result] = counterfactuals(
        big,
        hand_built,
        [w for w in build_switches(s, "test_conflict", 0, len(rows), big) if w.factor == "offset_mm"],
        SIZE,
        2,
    )
    assert result.skipped == 2 and len(result.where) == 4


# ----------------------------------------------------------------------------- the command
def _features(model: torch.nn.Module, root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    images, _, factors = data.load_split(root, split)
    x = torch.from_numpy(np.asarray(images, dtype=np.float32))[:, None] / 1000.0
    with torch.no_grad():
        return model.eval().features(x).numpy(), factors["label"].to_numpy()


def _make_run(root: Path, run_dir: Path) -> None:
    """A run folder of this format without training: random encoders, readouts fitted on them."""
    init = build_model("small-cnn", 2, embedding_dim=8, projection_dim=4, head=True, seed=1)
    model = build_model("small-cnn", 2, embedding_dim=8, projection_dim=4, head=True, seed=2)
    run_dir.mkdir()
    manifest = data.load_manifest(root)
    record = {
        "run_format": train.RUN_FORMAT,
        "threads": 1,
        "config": {"seed": 1},
        "init_sha256": state_sha256(init),
        "dataset": {"image": manifest["image"], "manifest_sha256": data.sha256_file(root / "dataset.json")},
    }
    (run_dir / "config.json").write_text(json.dumps(record))
    save_model(model, run_dir / "model.safetensors", {"loss": "test"})
    for net, name in ((model, "readouts.safetensors"), (init, "readouts_init.safetensors")):
        readouts = fit_readouts(*_features(net, root, "train"), *_features(net, root, "val"), knn_k=3)
        if net is model:
            readouts.dfr = fit_dfr(*_features(net, root, "val_balanced"))
        readouts.save(run_dir / name)
    record["files_sha256"] = {name: data.sha256_file(run_dir / name) for name in TIED_FILES}  # this run's
    (run_dir / "config.json").write_text(json.dumps(record))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    scenario = resolve(load_scenario("size-confound"), n=12, size=SIZE, pixel_mm=PIXEL_MM)
    return data.generate(scenario, tmp_path_factory.mktemp("explain") / "ds", seed=0)


@pytest.fixture(scope="module")
def run(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("explain-run") / "run"
    _make_run(dataset, run_dir)
    return run_dir


def test_explain_command_writes_every_table_for_every_classifier(run: Path, dataset: Path) -> None:
    args = ["explain", str(run), str(dataset), "--splits", "test_conflict,test_iid", "--n", "6", "--device", "cpu"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "flip rate" in result.output
    folder = run / "explain"
    tables = [t for t in RESULT_TABLES.values() if t.file.startswith("explain/")]
    figures = [Path(f).name for f in RUN_FIGURES.values() if f.startswith("explain/")]
    assert set(file_tree(folder)) == {*(t.file_name for t in tables), *figures, "sweep.png", "explain.json"}
    for table in tables:  # each writer writes the columns declared for it
        assert tuple(pd.read_csv(run / table.file).columns) == table.columns, table.file
    assert list(pd.read_csv(folder / "probes.csv").columns) == ["factor", "target", "metric", "score", "control"]
    cam = pd.read_csv(folder / "cam.csv")
    assert list(cam.columns) == ["split", "classifier", "region", "mass", "area_share"]
    assert set(cam["split"]) == {"test_conflict", "test_iid"} and "knn" not in set(cam["classifier"])
    reliance = pd.read_csv(folder / "reliance.csv")
    assert tuple(reliance.columns) == RESULT_TABLES["reliance"].columns
    assert list(dict.fromkeys(reliance["classifier"])) == list(CLASSIFIERS)
    assert set(reliance["split"]) == {"test_conflict", "test_iid"} and (reliance["n"] <= 6).all()
    for name in ("sweep.csv", "cue.csv"):
        assert set(pd.read_csv(folder / name)["classifier"]) == set(CLASSIFIERS)
    first = file_tree(folder)
    again = CliRunner().invoke(app, [*args, "--force"])
    assert again.exit_code == 0, again.output
    assert file_tree(folder) == first  # same inputs, same bytes (CPU, the run's thread count)
    # the Python API writes the same tables as the CLI (and as a study): every writer by default
    import nodulab

    tables = nodulab.explain(run, dataset, splits=["test_conflict", "test_iid"], n=6, force=True)
    assert file_tree(folder) == first
    assert {"reliance", "sweep", "cue", "probes", "cam"} <= set(tables)


@pytest.mark.parametrize("case", ["no model", "other size", "unknown split", "n zero", "exists"])
def test_explain_bad_input_is_one_line_and_writes_nothing(case: str, run: Path, dataset: Path, tmp_path: Path) -> None:
    target = tmp_path / "run"
    target.mkdir()
    for name, content in file_tree(run).items():
        if not name.startswith("explain/"):
            (target / name).write_bytes(content)
    args, fragment = (
        ["--splits", "test_conflict", "--n", "2"],
        {
            "no model": "model.safetensors",
            "other size": "size",
            "unknown split": "test_nowhere",
            "n zero": "--n",
            "exists": "already exists",
        }[case],
    )
    data_dir = dataset
    if case == "no model":
        (target / "model.safetensors").unlink()
    elif case == "other size":
        other = resolve(load_scenario("size-confound"), n=4, size=40, pixel_mm=PIXEL_MM)
        data_dir = data.generate(other, tmp_path / "other", seed=0)
    elif case == "unknown split":
        args = ["--splits", "test_nowhere"]
    elif case == "n zero":
        args = ["--n", "0"]
    elif case == "exists":
        (target / "explain").mkdir()
        (target / "explain" / "keep.txt").write_text("mine")
    before = file_tree(target)
    result = CliRunner().invoke(app, ["explain", str(target), str(data_dir), *args])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr
    assert file_tree(target) == before and sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["run"] + (["other"] if case == "other size" else [])
    )
