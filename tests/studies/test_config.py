"""Study files: validation (one-line errors naming the key), presets, the grid and fair tuning."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.conftest import assert_one_line_error
from typer.testing import CliRunner

from nodulab.cli import app
from nodulab.studies.config import StudyError, load_study, preset_names, study_from_dict
from nodulab.studies.driver import plan
from nodulab.training import losses

runner = CliRunner()
BASE = {"name": "t", "scenarios": ["clean", "size-confound"], "losses": ["ce", "supcon"], "seeds": 2}


def test_presets_load_and_are_listed() -> None:
    assert {"quick", "paper", "paper-3d"} <= set(preset_names())
    result = runner.invoke(app, ["studies"])
    assert result.exit_code == 0
    for name in preset_names():
        assert name in result.output
    paper = load_study("paper")
    assert paper.model.losses == losses.names() == load_study("paper-3d").model.losses  # losses = "all"
    assert paper.model.seeds == 5 and paper.model.tuning.budget > 1
    assert {s.image.size for s in paper.scenarios.values()} == {64}
    assert {s.image.dim for s in load_study("paper-3d").scenarios.values()} == {3}


def test_standard_preset_is_the_cpu_answer() -> None:
    """55 runs at the budget where the matched ceiling is learnt (README: the budget table)."""
    standard = load_study("standard")
    assert standard.planned_runs() == 55 and standard.model.seeds == 5
    assert standard.ceilings == {"size-confound": "clean", "attenuation-confound": "clean"}
    assert [(c.n_train, c.epochs) for c in standard.cells()] == [(2000, 30)]
    assert standard.model.train.checkpoints_for(30) == [1, 2, 4, 8, 16, 30]
    assert {s.image.size for s in standard.scenarios.values()} == {32}


def test_quick_preset_shape() -> None:
    quick = load_study("quick")
    assert set(quick.scenarios) == {"clean", "size-confound"}
    assert quick.model.seeds >= 3 and quick.model.train.epochs <= 10
    assert [(c.n_train, c.epochs) for c in quick.cells()] == [(2000, 6)]  # 2x the old budget: the ceiling is learnt
    assert quick.ceilings == {"size-confound": "clean"}
    assert quick.losses("clean") == ["ce"] and quick.losses("size-confound") == ["ce", "supcon", "simclr"]
    assert quick.explain_splits("size-confound") == ["test_conflict"] and quick.explain_splits("clean") == []
    assert {s.image.size for s in quick.scenarios.values()} == {32}


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"seeds": 0}, "seeds"),
        ({"losses": ["ce", "focal"]}, "unknown loss 'focal'"),
        ({"losses": []}, "losses"),
        ({"scenarios": ["clean", "no-such-preset"]}, "scenarios[1]: no-such-preset: unknown preset"),
        ({"scenarios": ["clean", "clean"]}, "a second scenario named 'clean'"),
        ({"scenario_losses": {"other": ["ce"]}}, "scenario_losses.other"),
        ({"tuning": {"budget": 0}}, "tuning.budget"),
        ({"train": {"views": "mixup"}}, "views"),
        ({"train": {"threads": 0}}, "train.threads"),
        ({"data": {"n": {"tran": 100}}}, "unknown split 'tran'"),
        ({"data": {"n": 0}}, "data.n"),
        ({"data": {"size": 8}}, "field of view"),
        ({"epochs": 3}, "epochs: unknown key"),
        ({"train": {"epochs": [4, 4]}}, "listed twice"),
        ({"train": {"epochs": []}}, "empty list"),
        ({"train": {"epochs": [2, 0]}}, "epochs must be 1..10,000, got 0"),
        ({"train": {"epochs": 2**40}}, "epochs must be 1..10,000"),
        ({"train": {"epochs": 4, "checkpoints": [5]}}, "checkpoints: 5 is not an epoch"),
        ({"data": {"n": {"val": [10, 20]}}}, "only n.train may be a list"),
        ({"data": {"n": {"train": [10, 0]}}}, "train must be 1..1,000,000, got 0"),
        ({"ceilings": {"clean": "clean"}}, "has no confound, so it needs no ceiling"),
        ({"ceilings": {"nowhere": "clean"}}, "ceilings.nowhere: not a scenario"),
        ({"hypotheses": {"comparisons": ["size-confound"]}}, "is not 'scenario/split'"),
        ({"hypotheses": {"comparisons": ["nowhere/test_iid"]}}, "'nowhere/test_iid': not a scenario"),
        ({"hypotheses": {"comparisons": ["clean/val"]}}, "clean has no test split 'val'"),
        (
            {"hypotheses": {"comparisons": ["clean/test_iid"], "reference": "simclr"}},
            "'simclr' is not trained on clean",
        ),
        ({"hypotheses": {"comparisons": ["clean/test_iid"], "readout": "knn"}}, "readout: one of own, probe, dfr"),
        ({"hypotheses": {"comparisons": ["clean/test_iid"] * 2}}, "listed twice"),
        ({"hypotheses": {"family": []}}, "family"),
    ],
)
def test_bad_study_is_one_line(change: dict, fragment: str) -> None:
    with pytest.raises(StudyError) as error:
        study_from_dict({**BASE, **change})
    assert "\n" not in str(error.value) and fragment in str(error.value), str(error.value)


@settings(max_examples=25, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["seeds", "losses", "scenarios", "name", "tuning"]),
        st.one_of(st.integers(-3, 3), st.text(max_size=5), st.lists(st.text(max_size=4), max_size=2)),
    )
)
def test_garbage_studies_fail_with_study_error(garbage: dict) -> None:
    try:
        study_from_dict({**BASE, **garbage})
    except StudyError as error:
        assert "\n" not in str(error)


def test_cli_bad_input_one_line(tmp_path: Path) -> None:
    result = runner.invoke(app, ["study", "no-such-study", "--out", str(tmp_path / "o")])
    assert_one_line_error(result, "unknown study preset")
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "b"\nscenarios = ["clean"]\nlosses = ["ce"]\nseeds = 0\n')
    assert_one_line_error(runner.invoke(app, ["study", str(bad), "--out", str(tmp_path / "o")]), "seeds")
    bad.write_text('name = "b"\nscenarios = ["clean", "nope.toml"]\nlosses = ["ce"]\nseeds = 1\n')
    assert_one_line_error(
        runner.invoke(app, ["study", str(bad), "--out", str(tmp_path / "o")]), "nope.toml: no such scenario file"
    )
    bad.write_text("seeds = [")
    assert_one_line_error(runner.invoke(app, ["study", str(bad), "--out", str(tmp_path / "o")]), "unreadable TOML")
    assert not (tmp_path / "o").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "precious.txt").write_text("keep")
    assert_one_line_error(runner.invoke(app, ["study", "quick", "--out", str(tmp_path / "full")]), "non-empty")
    assert (tmp_path / "full" / "precious.txt").read_text() == "keep"


def test_scenario_paths_are_relative_to_the_study_file(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "mine.toml").write_text(
        (Path(__file__).parents[2] / "src/nodulab/presets/clean.toml").read_text().replace('"clean"', '"mine"')
    )
    (tmp_path / "s.toml").write_text('scenarios = ["sub/mine.toml"]\nlosses = ["ce"]\nseeds = 1\n')
    study = load_study(tmp_path / "s.toml")
    assert list(study.scenarios) == ["mine"] and study.name == "s"


def test_split_sizes_and_hash() -> None:
    study = study_from_dict({**BASE, "data": {"size": 32, "pixel_mm": 1.4, "n": {"train": 300, "test": 50}}})
    sc = study.scenarios["size-confound"]
    assert sc.splits["train"].n == 300 and sc.splits["val"].n == 1000
    assert {sc.splits[s].n for s in sc.splits if s.startswith("test_")} == {50}
    again = study_from_dict({**BASE, "data": {"size": 32, "pixel_mm": 1.4, "n": {"train": 300, "test": 50}}})
    other = study_from_dict({**BASE, "data": {"size": 32, "pixel_mm": 1.4, "n": {"train": 301, "test": 50}}})
    assert study.sha256 == again.sha256 != other.sha256


def test_identity_leaves_out_the_seed_count_and_nothing_else() -> None:
    """``identity`` (what names a store) is the same for any seed count, ``sha256`` is not; every
    other setting changes both. A run's key does not hold the seed count: the runs of 2 seeds are
    the first runs of 3, config for config."""
    two, three = study_from_dict(BASE), study_from_dict({**BASE, "seeds": 3})
    assert two.identity == three.identity and two.sha256 != three.sha256 != two.identity
    assert three.record()["planned_runs"] > two.record()["planned_runs"]  # counted, but not in the identity
    others = [
        {**BASE, "name": "u"},
        {**BASE, "description": "another"},
        {**BASE, "losses": ["supcon", "ce"]},
        {**BASE, "scenarios": ["clean"]},
        {**BASE, "train": {"epochs": 2}},
        {**BASE, "data": {"seed": 1}},
        {**BASE, "tuning": {"budget": 2}},
        {**BASE, "explain": {"splits": ["test_conflict"]}},
    ]
    identities = {two.identity} | {study_from_dict(d).identity for d in others}
    assert len(identities) == len(others) + 1
    manifests = dict.fromkeys(two.scenarios, "0" * 64)
    first, more = plan(two, manifests), plan(three, manifests)
    assert [(s.run_id, s.config) for s in first] == [(s.run_id, s.config) for s in more if s.seed < 2]
    assert {s.seed for s in more} - {s.seed for s in first} == {2}


def test_seeds_override_is_validated_like_the_file(tmp_path: Path) -> None:
    (tmp_path / "s.toml").write_text('scenarios = ["clean"]\nlosses = ["ce"]\nseeds = 2\n')
    study, more = load_study(tmp_path / "s.toml"), load_study(tmp_path / "s.toml", seeds=5)
    assert (study.model.seeds, more.model.seeds) == (2, 5) and study.identity == more.identity
    assert load_study("quick", seeds=1).model.seeds == 1 and load_study("quick", seeds=1).identity == (
        load_study("quick").identity
    )
    for bad, fragment in ((0, "greater than or equal to 1"), (101, "less than or equal to 100"), (True, "integer")):
        with pytest.raises(StudyError, match=f"^--seeds: .*{fragment}"):
            load_study(tmp_path / "s.toml", seeds=bad)


def test_fair_tuning_grid() -> None:
    """Every loss gets the same number of draws; draw 0 is the defaults; keys are unique."""
    study = study_from_dict({**BASE, "losses": ["ce", "supcon", "simclr", "ce+triplet"], "tuning": {"budget": 3}})
    manifests = dict.fromkeys(study.scenarios, "0" * 64)
    specs = plan(study, manifests)
    assert len(specs) == 2 * 2 * 4 * 3 and len({s.run_id for s in specs}) == len(specs)
    per_loss: dict[str, int] = {}
    for spec in specs:
        per_loss[spec.loss] = per_loss.get(spec.loss, 0) + 1
        drawn = losses.draw_params(spec.loss, spec.draw, spec.seed)
        assert spec.config["lr"] == drawn["lr"] and spec.config["weight_decay"] == drawn["weight_decay"]
        assert spec.config["loss_params"] == {k: v for k, v in drawn.items() if k in losses.params(spec.loss)}
        if spec.draw == 0:
            assert spec.config["lr"] == losses.OPTIMISER_PARAMS["lr"].default
    assert set(per_loss.values()) == {2 * 2 * 3}
    # the dataset is part of a run's key
    moved = plan(study, {**manifests, "clean": "1" * 64})
    assert {s.run_id for s in moved if s.scenario == "clean"}.isdisjoint({s.run_id for s in specs})


def test_oversized_or_unreadable_study_file(tmp_path: Path) -> None:
    big = tmp_path / "big.toml"
    big.write_bytes(b"#" * (1 << 20) + b"\n")
    with pytest.raises(StudyError, match="not a study file"):
        load_study(big)
    with pytest.raises(StudyError, match="no such study file"):
        load_study(tmp_path / "missing.toml")


def test_out_may_not_hold_or_be_the_study_files(tmp_path: Path) -> None:
    """A study never writes over what it read: --out holding the study file or a scenario file is refused."""
    (tmp_path / "sc").mkdir()
    (tmp_path / "sc" / "mine.toml").write_text(
        (Path(__file__).parents[2] / "src/nodulab/presets/clean.toml").read_text().replace('"clean"', '"mine"')
    )
    (tmp_path / "s.toml").write_text('scenarios = ["sc/mine.toml"]\nlosses = ["ce"]\nseeds = 1\n')
    assert set(load_study(tmp_path / "s.toml").sources) == {tmp_path / "s.toml", tmp_path / "sc" / "mine.toml"}
    before = (tmp_path / "sc" / "mine.toml").read_bytes()
    for out in (tmp_path / "sc", tmp_path / "sc" / "mine.toml", tmp_path / "s.toml"):
        result = runner.invoke(app, ["study", str(tmp_path / "s.toml"), "--out", str(out)])
        assert_one_line_error(result, "--out")
    assert (tmp_path / "sc" / "mine.toml").read_bytes() == before and not (tmp_path / "sc" / "datasets").exists()


def test_budget_lists_make_cells_with_their_own_seeds_and_checkpoints() -> None:
    from nodulab.studies.driver import plan

    study = study_from_dict(
        {
            **BASE,
            "seeds": 2,
            "data": {"n": {"train": [200, 100]}},
            "train": {"epochs": [3, 6], "checkpoints": [1, 4]},
        }
    )
    assert [(c.n_train, c.epochs) for c in study.cells()] == [(200, 3), (200, 6), (100, 3), (100, 6)]
    assert study.scenario("clean", study.cells()[2]).splits["train"].n == 100
    manifests = {study.data_name(s, n): "m" * 64 for s in study.scenarios for n in (200, 100)}
    specs = plan(study, manifests)
    assert len(specs) == study.planned_runs() == 4 * 2 * sum(len(study.losses(s)) for s in study.scenarios)
    per_cell = {}
    for spec in specs:
        per_cell.setdefault(spec.budget, set()).add(spec.seed)
        assert spec.config["checkpoints"] == sorted(
            {k for k in (1, 4) if k <= spec.config["epochs"]} | {spec.config["epochs"]}
        )
    assert all(seeds == {0, 1} for seeds in per_cell.values()) and len(per_cell) == 4
    assert len({s.run_id for s in specs}) == len(specs)


def test_hypotheses_are_recorded_and_a_study_without_them_keeps_its_hash() -> None:
    plain = study_from_dict(BASE)
    assert "hypotheses" not in plain.record() and "hypotheses" not in plain.record()["study"]
    declared = study_from_dict({**BASE, "hypotheses": {"comparisons": ["size-confound/test_conflict"]}})
    assert declared.record()["hypotheses"] == {
        "comparisons": ["size-confound/test_conflict"],
        "reference": "ce",
        "readout": "own",
    }
    assert declared.sha256 != plain.sha256 and declared.identity != plain.identity
    for name in preset_names():  # every preset declares its primary comparisons
        assert load_study(name).model.hypotheses.comparisons, name
