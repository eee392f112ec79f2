"""Scenario loading, validation and factor-table sampling (design.md "Scenarios")."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nodulab.synth.factors import FACTOR_COLUMNS, FACTORS, OPTIONAL
from nodulab.synth.sampling import row_seeds, sample_split
from nodulab.synth.scenario import Scenario, ScenarioError
from nodulab.synth.scenarios import (
    list_presets,
    load_scenario,
    load_scenario_dict,
    preset_names,
    resolve,
    scenario_to_dict,
)

Z99 = 2.5758  # two-sided 99% normal quantile

BASE = {
    "name": "t",
    "image": {"dim": 2, "size": 64, "pixel_mm": 0.7},
    "label": {"factor": "shape", "malignant": "spiculated", "benign": ["round"]},
    "confounds": [{"factor": "diameter_mm", "malignant": {"uniform": [13, 18]}, "benign": {"uniform": [6, 10]}}],
    "splits": {"train": {"n": 200, "agreement": 0.9}, "val": {"n": 20, "agreement": 0.9}},
}


def scenario(edit: Callable[[dict], object] | None = None) -> Scenario:
    """BASE, edited in place by ``edit``, validated."""
    d = copy.deepcopy(BASE)
    if edit is not None:
        edit(d)
    return load_scenario_dict(d)


def agrees_with_label(frame: pd.DataFrame, factor: str, malignant: Callable, benign: Callable):
    """Whether each row's confound value lies in the branch that matches its label."""
    in_malignant = frame[factor].map(malignant).to_numpy(bool)
    in_benign = frame[factor].map(benign).to_numpy(bool)
    assert not (in_malignant & in_benign).any()
    assert (in_malignant | in_benign).all()
    return np.where(frame["label"] == 1, in_malignant, in_benign).astype(int)


# ----------------------------------------------------------------------------- presets
def test_presets_are_the_five_of_the_design_and_the_two_lidc_ones():
    assert preset_names() == sorted(
        ["clean", "size-confound", "attenuation-confound", "scanner-shift", "paper", "lidc", "lidc-balanced"]
    )
    for name, description in list_presets():
        assert description and "\n" not in description
        assert load_scenario(name).name == name


SYNTHETIC = [name for name in preset_names() if not name.startswith("lidc")]  # lidc: tests/synth/test_twins.py


@pytest.mark.parametrize("name", SYNTHETIC)
def test_every_preset_loads_resolves_and_samples(name):
    s = resolve(load_scenario(name), n=50)
    assert s.label.benign == ["round"] and s.label.malignant == "spiculated"
    assert {"train", "val"} <= set(s.splits)
    for split in s.splits:
        frame = sample_split(s, split, dataset_seed=0)
        agrees = [f"agrees_{c.factor}" for c in s.confounds]
        assert list(frame.columns) == [*FACTOR_COLUMNS, *agrees, "seed"]
        assert list(frame.index) == list(range(50))
        assert frame["label"].sum() == 25
        assert (frame["shape"] == np.where(frame["label"] == 1, "spiculated", "round")).all()
        assert (frame["pixel_mm"] == 0.7).all() and (frame["offset_z_mm"] == 0).all()
        assert frame[[*agrees]].isin([0, 1]).all().all()


def test_size_confound_preset_is_the_design_example():
    s = load_scenario("size-confound")
    assert [c.factor for c in s.confounds] == ["diameter_mm"]
    agreement = {name: split.agreement for name, split in s.splits.items()}
    assert agreement == {
        "train": 0.95,
        "val": 0.95,
        "val_balanced": 0.5,
        "test_iid": 0.95,
        "test_balanced": 0.5,
        "test_conflict": 0.0,
        "test_scanner": 0.5,
    }
    assert s.splits["train"].n == 8000 and s.splits["test_conflict"].n == 2000


@pytest.mark.parametrize("name", SYNTHETIC)
def test_presets_with_a_confound_have_a_balanced_split(name):
    s = load_scenario(name)
    assert ("val_balanced" in s.splits) == bool(s.confounds)  # clean and scanner-shift: dfr is absent


@pytest.mark.parametrize(
    "split, match",
    [
        ({"n": 20, "agreement": 0.9}, r"splits.val_balanced.agreement: val_balanced balances"),
        ({"n": 20, "agreement": {"diameter_mm": 0.0}}, r"splits.val_balanced.agreement.diameter_mm"),
        ({"n": 20, "agreement": 0.5, "malignant_rate": 0.3}, r"splits.val_balanced.malignant_rate"),
        ({"n": 20, "agreement": 0.5, "factors": {"noise_hu": 50}}, r"splits.val_balanced.factors"),
    ],
)
def test_val_balanced_must_be_balanced(split, match):
    with pytest.raises(ScenarioError, match=match):
        scenario(lambda d: d["splits"].update(val_balanced=split))
    ok = scenario(lambda d: d["splits"].update(val_balanced={"n": 20, "agreement": 0.5}))
    assert "val_balanced" in ok.splits


@pytest.mark.parametrize("name", ["val_other", "balanced", "test", "val_balanced2"])
def test_split_naming_rule(name):
    with pytest.raises(ScenarioError, match=f"splits.{name}: splits are train, val, val_balanced and test_"):
        scenario(lambda d: d["splits"].update({name: {"n": 20, "agreement": 0.5}}))


# ----------------------------------------------------------------------------- labels, agreement
@pytest.mark.parametrize("n", [1, 2, 7, 50, 101])
def test_labels_are_stratified_exactly(n):
    frame = sample_split(resolve(scenario(), n=n), "train", 3)
    assert (frame["label"] == 0).sum() == n // 2
    assert (frame["label"] == 1).sum() == math.ceil(n / 2)


@given(n=st.integers(1, 300), rate=st.floats(0.01, 0.99))
@settings(max_examples=30, deadline=None)
def test_malignant_rate_sets_the_malignant_count(n, rate):
    s = scenario(lambda d: d["splits"]["train"].update(n=n, malignant_rate=rate))
    assert sample_split(s, "train", 0)["label"].sum() == math.floor(n * rate + 0.5)


def test_labels_are_permuted_not_sorted():
    label = sample_split(scenario(), "train", 0)["label"].to_numpy()
    assert 0 < np.abs(np.diff(label)).sum() and label[:100].sum() != 100


def binomial_ok(k: int, n: int, p: float) -> bool:
    if p in (0.0, 1.0):
        return k == n * p
    return abs(k - n * p) <= Z99 * math.sqrt(n * p * (1 - p)) + 0.5


def test_size_agreement_per_split_and_agrees_column_is_correct():
    s = resolve(load_scenario("size-confound"), n=2000)
    for split, spec in s.splits.items():
        frame = sample_split(s, split, 1)
        agrees = frame["agrees_diameter_mm"].to_numpy()
        assert binomial_ok(int(agrees.sum()), 2000, spec.agreement), split
        expected = agrees_with_label(frame, "diameter_mm", lambda d: 13 <= d <= 18, lambda d: 6 <= d <= 10)
        np.testing.assert_array_equal(agrees, expected)
    conflict = sample_split(s, "test_conflict", 1)
    assert (conflict["agrees_diameter_mm"] == 0).all()
    assert (conflict.loc[conflict["label"] == 1, "diameter_mm"] <= 10).all()


def test_paper_agreement_tables_break_one_confound_at_a_time():
    s = resolve(load_scenario("paper"), n=1000)
    expect = {
        "test_size_conflict": (0.0, 0.95),
        "test_attenuation_conflict": (0.95, 0.0),
        "test_both_conflict": (0.0, 0.0),
        "test_balanced": (0.5, 0.5),
        "train": (0.95, 0.95),
    }
    for split, (p_size, p_attenuation) in expect.items():
        frame = sample_split(s, split, 2)
        assert binomial_ok(int(frame["agrees_diameter_mm"].sum()), 1000, p_size), split
        assert binomial_ok(int(frame["agrees_attenuation"].sum()), 1000, p_attenuation), split
        expected = agrees_with_label(frame, "attenuation", lambda a: a == "solid", lambda a: a == "ground_glass")
        np.testing.assert_array_equal(frame["agrees_attenuation"], expected)


def test_confounds_are_drawn_independently_given_the_label():
    frame = sample_split(resolve(load_scenario("paper"), n=4000), "test_balanced", 0)
    a, b = frame["agrees_diameter_mm"], frame["agrees_attenuation"]
    assert abs(np.corrcoef(a, b)[0, 1]) < Z99 / math.sqrt(4000)


def test_split_factor_overrides_apply_to_that_split_only():
    s = resolve(load_scenario("size-confound"), n=300)
    for split in s.splits:
        frame = sample_split(s, split, 0)
        lo, hi = (40, 60) if split == "test_scanner" else (10, 30)
        assert frame["noise_hu"].between(lo, hi).all(), split
        lo, hi = (1.8, 2.5) if split == "test_scanner" else (0.6, 1.2)
        assert frame["kernel_fwhm_mm"].between(lo, hi).all(), split
        assert (frame["vessels"] == 0).all()


def test_scanner_shift_trains_on_low_noise_and_tests_on_high():
    s = resolve(load_scenario("scanner-shift"), n=200)
    assert sample_split(s, "train", 0)["noise_hu"].between(5, 15).all()
    assert sample_split(s, "train", 0)["kernel_fwhm_mm"].between(0.6, 0.9).all()
    assert sample_split(s, "test_scanner", 0)["noise_hu"].between(40, 60).all()


# ----------------------------------------------------------------------------- randomness
def test_same_seed_same_frame_and_different_seed_different_frame():
    s = scenario()
    pd.testing.assert_frame_equal(sample_split(s, "train", 7), sample_split(s, "train", 7))
    a, b = sample_split(s, "train", 7), sample_split(s, "train", 8)
    assert not a["diameter_mm"].equals(b["diameter_mm"])
    assert not a["seed"].equals(b["seed"])


def test_each_factor_has_its_own_stream():
    before = sample_split(scenario(), "train", 0)
    after = sample_split(scenario(lambda d: d.update(factors={"noise_hu": {"normal": [20, 3]}})), "train", 0)
    changed = [c for c in before.columns if not before[c].equals(after[c])]
    assert changed == ["noise_hu"]


def test_row_seeds_do_not_depend_on_n_and_differ_across_splits():
    small = sample_split(resolve(scenario(), n=10), "train", 5)
    large = sample_split(resolve(scenario(), n=30), "train", 5)
    np.testing.assert_array_equal(small["seed"], large["seed"][:10])
    seeds = row_seeds(5, "train", 0, 30)
    assert seeds.dtype == np.int64 and (seeds >= 0).all() and len(set(seeds)) == 30
    np.testing.assert_array_equal(seeds, large["seed"])
    np.testing.assert_array_equal(row_seeds(5, "train", 10, 20), seeds[10:20])
    assert not set(seeds) & set(row_seeds(5, "val", 0, 30))
    assert not set(seeds) & set(row_seeds(6, "train", 0, 30))
    assert row_seeds(5, "train", 3, 3).shape == (0,)


# ----------------------------------------------------------------------------- refusals
def _set(path: str, value: object) -> Callable[[dict], None]:
    def edit(d: dict) -> None:
        *parents, last = path.split(".")
        for key in parents:
            d = d.setdefault(key, {})
        d[last] = value

    return edit


def _drop(path: str) -> Callable[[dict], None]:
    def edit(d: dict) -> None:
        *parents, last = path.split(".")
        for key in parents:
            d = d[key]
        del d[last]

    return edit


def _two_confounds(d: dict) -> None:
    d["confounds"].append({"factor": "attenuation", "malignant": "solid", "benign": "ground_glass"})
    d["splits"]["train"]["agreement"] = {"diameter_mm": 0.9}


BAD = [
    (_set("factors.diamter_mm", 5), "factors.diamter_mm"),
    (_set("splits.train.agreement", 1.5), "splits.train.agreement: 1.5 is outside [0, 1]"),
    (_set("splits.val.agreement", -0.1), "splits.val.agreement"),
    (_set("factors.lobulation", -2), "factors.lobulation"),
    (_set("confounds", [{"factor": "diameter_mm", "malignant": -2, "benign": 5}]), "confounds.diameter_mm.malignant"),
    (
        _set(
            "confounds", [{"factor": "diameter_mm", "malignant": {"uniform": [9, 18]}, "benign": {"uniform": [6, 10]}}]
        ),
        "confounds.diameter_mm",
    ),
    (
        _set(
            "confounds", [{"factor": "diameter_mm", "malignant": {"normal": [12, 1]}, "benign": {"uniform": [6, 9.5]}}]
        ),
        "confounds.diameter_mm",
    ),
    (
        _set(
            "confounds",
            [{"factor": "attenuation", "malignant": {"choice": ["solid", "part_solid"]}, "benign": "part_solid"}],
        ),
        "confounds.attenuation",
    ),
    (_set("factors.diameter_mm", {"uniform": [6, 18]}), "factors.diameter_mm"),
    (_set("confounds", [{"factor": "shape", "malignant": "round", "benign": "lobulated"}]), "confounds.shape"),
    (_drop("splits.train"), "splits.train"),
    (_set("splits.dev", {"n": 5, "agreement": 0.5}), "splits.dev"),
    (_set("image.size", 16), "splits.train"),
    (_set("image.dim", 4), "image.dim"),
    (_set("image.size", 4096), "image.size"),
    (_set("image.pixel_mm", 5.0), "image.pixel_mm"),
    (_set("image.colour", "red"), "image.colour: unknown key"),
    (_set("colour", "red"), "colour: unknown key"),
    (_drop("label"), "label: required key is missing"),
    (_set("label.malignant", "huge"), "label.malignant"),
    (_set("label.benign", ["spiculated"]), "label.benign"),
    (_set("label.factor", "diameter_mm"), "label.factor"),
    (_two_confounds, "splits.train.agreement.attenuation"),
    (_set("splits.train.agreement", {"diameter_mm": 0.9, "size": 0.5}), "splits.train.agreement.size"),
    (_drop("splits.val.agreement"), "splits.val.agreement"),
    (_set("splits.train.n", 0), "splits.train.n"),
    (_set("splits.train.n", "many"), "splits.train.n"),
    (_set("splits.train.malignant_rate", 1.0), "splits.train.malignant_rate"),
    (_set("splits.train.factors", {"shape": "round"}), "splits.train.factors.shape"),
    (_set("splits.train.factors", {"diameter_mm": 8}), "splits.train.factors.diameter_mm"),
    (_set("splits.train.factors", {"pixel_mm": 1.0}), "splits.train.factors.pixel_mm"),
    (_set("factors.offset_z_mm", 1.0), "factors.offset_z_mm"),
    (_set("factors.attenuation", "metal"), "factors.attenuation"),
    (_set("factors.attenuation", {"uniform": [0, 1]}), "factors.attenuation"),
    (_set("factors.noise_hu", "loud"), "factors.noise_hu"),
    (_set("factors.n_spicules", 2.5), "factors.n_spicules"),
    (_set("factors.n_spicules", {"uniform": [4, 8.5]}), "factors.n_spicules"),
    (_set("factors.noise_hu", {"uniform": [30, 10]}), "factors.noise_hu"),
    (_set("factors.noise_hu", {"uniform": [10]}), "factors.noise_hu"),
    (_set("factors.noise_hu", {"uniform": [10, 30], "bins": 3}), "factors.noise_hu"),
    (_set("factors.noise_hu", {"normal": [20, 0]}), "factors.noise_hu"),
    (_set("factors.noise_hu", {"choice": [10, 20], "weights": [1]}), "factors.noise_hu"),
    (_set("factors.noise_hu", float("nan")), "factors.noise_hu"),
    (_set("factors.noise_hu", True), "factors.noise_hu"),
]


@pytest.mark.parametrize(("edit", "key"), BAD, ids=[key for _, key in BAD])
def test_bad_scenarios_are_refused_naming_the_key(edit, key):
    with pytest.raises(ScenarioError) as caught:
        scenario(edit)
    message = str(caught.value)
    assert key in message and "\n" not in message


def test_base_scenario_is_valid():
    assert scenario().splits["train"].n == 200  # so every refusal above is the edit's doing


def test_unknown_preset_and_missing_file_are_refused(tmp_path):
    with pytest.raises(ScenarioError, match="no-such-preset"):
        load_scenario("no-such-preset")
    with pytest.raises(ScenarioError, match="missing.toml"):
        load_scenario(tmp_path / "missing.toml")


def test_unreadable_toml_is_refused(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text('name = "x"\n[image\nsize = 64\n')
    with pytest.raises(ScenarioError, match="broken.toml") as caught:
        load_scenario(path)
    assert "\n" not in str(caught.value)


def test_lesion_that_cannot_fit_is_refused_with_the_numbers():
    with pytest.raises(ScenarioError, match=r"splits\.\w+: .*field of view.* > 5\.6 mm"):
        resolve(load_scenario("size-confound"), size=16)
    resolve(load_scenario("size-confound"), size=64, pixel_mm=0.7)  # 9 * 2 + 3 <= 22.4


def test_field_of_view_ignores_spicules_when_nothing_is_spiculated():
    d = copy.deepcopy(BASE)
    d["label"] = {"factor": "attenuation", "malignant": "solid", "benign": ["ground_glass"]}
    d["factors"] = {"shape": "round"}
    d["confounds"] = []
    d["image"]["size"] = 40  # 9 + 3 = 12 <= 14, but 9 * 2 + 3 = 21 > 14
    assert load_scenario_dict(d).image.size == 40
    d["factors"] = {"shape": {"choice": ["round", "spiculated"]}}
    with pytest.raises(ScenarioError, match="splits.train"):
        load_scenario_dict(d)


def test_field_of_view_counts_the_z_offset_in_3d():
    d = copy.deepcopy(BASE)
    d["image"] = {"dim": 3, "size": 64, "pixel_mm": 0.7}
    d["factors"] = {"offset_z_mm": {"uniform": [-5, 5]}}
    with pytest.raises(ScenarioError, match="offset 5 mm"):
        load_scenario_dict(d)


# ----------------------------------------------------------------------------- resolve, files
def test_resolve_overrides_and_leaves_the_original_alone():
    s = load_scenario("size-confound")
    r = resolve(s, n=12, dim=3, size=48, pixel_mm=1.0)
    assert {split.n for split in r.splits.values()} == {12}
    assert (r.image.dim, r.image.size, r.image.pixel_mm) == (3, 48, 1.0)
    assert s.splits["train"].n == 8000 and s.image.dim == 2
    frame = sample_split(r, "train", 0)
    assert (frame["pixel_mm"] == 1.0).all() and frame["offset_z_mm"].abs().max() > 0
    assert frame["offset_z_mm"].between(-3, 3).all()


def test_dict_form_round_trips_through_json():
    s = load_scenario("paper")
    d = json.loads(json.dumps(scenario_to_dict(s)))
    again = load_scenario_dict(d)
    assert scenario_to_dict(again) == d
    for name in ("train", "test_size_conflict"):
        pd.testing.assert_frame_equal(
            sample_split(resolve(s, n=40), name, 3), sample_split(resolve(again, n=40), name, 3)
        )
    listed = set(d["factors"])
    assert listed == set(FACTORS) - set(OPTIONAL) - {"shape", "pixel_mm", "offset_z_mm", "diameter_mm", "attenuation"}
    d["factors"]["lobulation"]["uniform"][1] = 0.25  # the dict is a copy, not the defaults
    assert FACTORS["lobulation"].default == {"uniform": [0.05, 0.2]}


def test_load_from_path_names_the_scenario_after_the_file(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text(
        '[label]\nfactor = "shape"\nmalignant = "lobulated"\nbenign = ["round"]\n'
        "[factors]\nvessels = { choice = [0, 6], weights = [1, 0] }\n"
        "n_spicules = { normal = [10, 2] }\n"
        "[splits]\ntrain = { n = 40 }\nval = { n = 10 }\ntest_x = { n = 5 }\n"
    )
    s = load_scenario(path)
    assert s.name == "mine" and load_scenario(str(path)).name == "mine"
    frame = sample_split(s, "train", 0)
    assert (frame["vessels"] == 0).all() and frame["vessels"].dtype == np.int64
    assert frame["n_spicules"].between(4, 16).all() and frame["n_spicules"].dtype == np.int64
    assert load_scenario(path, n=3, size=40).splits["test_x"].n == 3  # 9 + 3 <= 14


def test_unknown_split_is_refused():
    with pytest.raises(ScenarioError, match="splits.test_nope"):
        sample_split(scenario(), "test_nope", 0)


# ----------------------------------------------------------------------------- property tests
NUMERIC = [f for f in FACTORS.values() if f.numeric and f.name != "pixel_mm"]


@st.composite
def numeric_range(draw):
    factor = draw(st.sampled_from(NUMERIC))
    if factor.kind == "int":
        values = st.integers(int(factor.low), int(factor.high))
    else:
        values = st.floats(factor.low, factor.high, allow_nan=False)
    a, b = sorted((draw(values), draw(values)))
    return factor, a, b


def _roomy(d: dict) -> None:
    d["image"] = {"dim": 3, "size": 256, "pixel_mm": 3.0}  # everything fits
    d["confounds"] = []
    d["splits"] = {"train": {"n": 40}, "val": {"n": 1}}


@given(numeric_range())
@settings(max_examples=60, deadline=None)
def test_uniform_ranges_sample_within_them(spec):
    factor, a, b = spec
    s = scenario(lambda d: (_roomy(d), d.update(factors={factor.name: {"uniform": [a, b]}})))
    values = sample_split(s, "train", 0)[factor.name]
    assert values.between(a, b).all()
    if factor.kind == "int":
        assert values.dtype == np.int64


@given(numeric_range(), st.floats(0.01, 20))
@settings(max_examples=60, deadline=None)
def test_normals_are_truncated_to_three_sd_and_the_valid_range(spec, sd):
    factor, mu, _ = spec
    s = scenario(lambda d: (_roomy(d), d.update(factors={factor.name: {"normal": [mu, sd]}})))
    values = sample_split(s, "train", 0)[factor.name]
    lo, hi = max(factor.low, mu - 3 * sd), min(factor.high, mu + 3 * sd)
    assert values.between(lo - 1e-9, hi + 1e-9).all()


def test_weights_are_respected():
    s = scenario(lambda d: d.update(factors={"attenuation": {"choice": ["solid", "calcified"], "weights": [3, 1]}}))
    frame = sample_split(resolve(s, n=4000), "train", 0)
    assert set(frame["attenuation"]) == {"solid", "calcified"}
    assert binomial_ok(int((frame["attenuation"] == "solid").sum()), 4000, 0.75)


def test_defaults_follow_the_design_table():
    frame = sample_split(resolve(scenario(), n=2000), "train", 0)
    for name, lo, hi in [
        ("lobulation", 0.05, 0.2),
        ("spicule_length_rel", 0.4, 1.0),
        ("spicule_width_mm", 0.5, 1.0),
        ("solid_fraction", 0.3, 0.7),
        ("margin_sigma_mm", 0.2, 0.8),
        ("noise_hu", 10, 30),
        ("kernel_fwhm_mm", 0.6, 1.2),
        ("offset_x_mm", -3, 3),
        ("offset_y_mm", -3, 3),
        ("rotation_deg", 0, 360),
    ]:
        assert frame[name].between(lo, hi).all() and frame[name].max() - frame[name].min() > (hi - lo) * 0.9, name
    assert set(frame["n_spicules"]) == set(range(6, 17))
    assert set(frame["vessels"]) == {0, 1, 2, 3}
    assert set(frame["attenuation"]) == {"ground_glass", "part_solid", "solid"}
    assert (frame["rotation_deg"] < 360).all()


def test_the_readme_scenario_example_is_valid(tmp_path):
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    example = tmp_path / "example.toml"
    example.write_text(re.search(r"```toml\n(.*?)```", readme, re.S).group(1))
    assert load_scenario(example).name == "size-confound"
