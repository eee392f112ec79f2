"""A study scored on real nodules (``[real]``): the file's checks, every run scored and stored, the report's
sim-to-real section, and the statistics behind it (levels with the test set's noise, the rank correlation)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from tests.conftest import assert_one_line_error
from tests.studies.test_driver import TINY
from typer.testing import CliRunner

from fake_study import make_study
from nodulab.cli import app
from nodulab.common.seedstats import shared_sample_difference
from nodulab.results import sim_to_real as s2r
from nodulab.results.report import write_report
from nodulab.results.store import REAL_DATASET, REAL_SPLITS, STORE_FILE, Store
from nodulab.results.view import read_results
from nodulab.studies import driver as studying
from nodulab.studies import executors
from nodulab.studies.config import StudyError, load_study
from nodulab.studies.runner import REAL_DIR
from real_dataset import make_real_dataset

runner = CliRunner()


def _study_file(tmp_path: Path, real: str | None = None, name: str = "tiny.toml") -> Path:
    path = tmp_path / name
    path.write_text(TINY + (f"[real]\n{real}\n" if real is not None else ""))
    return path


@pytest.fixture(scope="module")
def real_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real dataset of the tiny study's geometry (2D, 32 px at 1.4 mm)."""
    return make_real_dataset(tmp_path_factory.mktemp("real") / "lidc-32", size=32, pixel_mm=1.4)


# ----------------------------------------------------------------------------- the study file
def test_real_is_checked_and_outside_the_hashes(tmp_path: Path, real_dir: Path) -> None:
    plain = load_study(_study_file(tmp_path, name="plain.toml"))
    (tmp_path / "data").symlink_to(real_dir.parent)
    relative = load_study(_study_file(tmp_path, 'dataset = "data/lidc-32"'))
    absolute = load_study(_study_file(tmp_path, f'dataset = "{real_dir}"', "absolute.toml"))
    assert relative.real == absolute.real == real_dir.resolve() and plain.real is None
    # outside both hashes: the same store name and the same record with or without it
    assert relative.identity == absolute.identity == plain.identity
    assert relative.sha256 == plain.sha256 and relative.record() == plain.record()
    assert "real" not in relative.record()["study"]
    assert real_dir.resolve() in relative.sources  # an --out may not be, hold or lie inside it


def _refused(tmp_path: Path, body: str, *fragments: str) -> None:
    """The study is refused with one line naming what is wrong, by the library and the CLI, before any run."""
    path = _study_file(tmp_path, body)
    with pytest.raises(StudyError) as caught:
        load_study(path)
    assert "\n" not in str(caught.value)
    for fragment in fragments:
        assert fragment in str(caught.value)
    out = tmp_path / "out"
    assert_one_line_error(runner.invoke(app, ["study", str(path), "--out", str(out)]), *fragments)
    assert not out.exists()


def test_bad_real_tables_are_refused_with_one_line(tmp_path: Path, real_dir: Path) -> None:
    from nodulab.data.dataset import generate
    from nodulab.synth.scenarios import load_scenario

    _refused(tmp_path, f'dataset = "{real_dir}"\nreaders = "each"', "real.readers: unknown key")
    _refused(tmp_path, 'datset = "x"', "real.")
    _refused(tmp_path, 'dataset = ""', "real.dataset")
    _refused(tmp_path, 'dataset = "nowhere"', "real.dataset", "no such folder")
    (tmp_path / "empty").mkdir()
    _refused(tmp_path, 'dataset = "empty"', "real.dataset", "not a nodulab dataset")
    synthetic = generate(load_scenario("clean", n=4, size=32, pixel_mm=1.4), tmp_path / "synthetic", seed=0)
    _refused(tmp_path, f'dataset = "{synthetic}"', "real.dataset", "a synthetic dataset, not a real one")
    other = make_real_dataset(tmp_path / "lidc-07", n=4, size=32, pixel_mm=0.7)
    _refused(tmp_path, f'dataset = "{other}"', "image geometry differs from scenario 'size-confound'", "pixel_mm")
    assert "size 48 (the study's: dim 2, size 32" in str(
        _error(tmp_path, make_real_dataset(tmp_path / "lidc-48", n=4, size=48, pixel_mm=1.4))
    )
    held_out = make_real_dataset(tmp_path / "no-test", n=4, size=32, pixel_mm=1.4)
    manifest = json.loads((held_out / "dataset.json").read_text(encoding="utf-8"))
    del manifest["splits"]["test_lidc"]
    (held_out / "dataset.json").write_text(json.dumps(manifest), encoding="utf-8")
    _refused(tmp_path, f'dataset = "{held_out}"', "real.dataset", "has no test_lidc rows")


def _error(tmp_path: Path, folder: Path) -> StudyError:
    with pytest.raises(StudyError) as caught:
        load_study(_study_file(tmp_path, f'dataset = "{folder}"'))
    return caught.value


# ----------------------------------------------------------------------------- a study scored on it
def _section(text: str) -> str:
    found = re.search(r"<section id='sim-to-real'>.*?</section>", text, re.S)
    assert found is not None
    return found.group(0)


def test_a_study_scores_every_run_on_real_nodules_and_reports_it(
    tmp_path: Path, real_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without [real]: the study runs as before and its report says how to add it. With it: the recorded
    runs are scored (nothing reruns, the store is kept); a resume with another seed scores the new runs in
    their own worker; the report has the sim-to-real section with both targets and the rankings."""
    out = tmp_path / "out"
    plain = studying.run_study(load_study(_study_file(tmp_path)), out)
    assert (plain.done, plain.real_scored) == (4, 0)
    text = (out / "report.html").read_text(encoding="utf-8")
    assert "nodulab import-lidc DICOM_ROOT --out DIR --dim 2 --size 32 --pixel-mm 1.4" in _section(text)
    assert "[real] dataset = &quot;DIR&quot;" in _section(text) or '[real] dataset = "DIR"' in _section(text)
    with Store(out / STORE_FILE) as store:
        assert store.real() is None and not store.scored_on(REAL_DATASET)

    path = _study_file(tmp_path, f'dataset = "{real_dir}"')
    ran: list[int] = []
    real_execute = executors.execute

    def counting(spec, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        ran.append(spec.seed)
        return real_execute(spec, *args, **kwargs)

    monkeypatch.setattr(executors, "execute", counting)
    result = runner.invoke(app, ["study", str(path), "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "4 already recorded, 0 done" in result.output and "scored 4 run(s)" in result.output
    assert ran == []  # nothing retrained
    more = studying.run_study(load_study(path, seeds=3), out, jobs=2)  # in worker processes
    # the new seed's runs were scored on the real dataset in their own worker: none was left to the driver
    assert (more.done, more.skipped, more.real_scored, more.real_unscored) == (2, 4, 0, [])

    with Store(out / STORE_FILE) as store:
        runs, metrics, predictions = store.runs(), store.table("metrics"), store.table("predictions")
        assert store.real()["manifest_sha256"] and store.real()["dataset"] == str(real_dir.resolve())
    real_rows = metrics[metrics["dataset"] == REAL_DATASET]
    assert set(real_rows["run_id"]) == set(runs["run_id"]) and len(runs) == 6
    assert set(real_rows["split"]) <= set(REAL_SPLITS) and REAL_SPLITS[0] in set(real_rows["split"])
    assert set(real_rows["classifier"]) >= {"head", "probe"}
    assert set(predictions.loc[predictions["dataset"] == REAL_DATASET, "run_id"]) == set(runs["run_id"])
    for run_id in runs["run_id"]:
        assert (out / "runs" / run_id / REAL_DIR / "metrics.csv").is_file()
    # the run's own scores are untouched: no real split in them, and every comparison reads its own images
    study = read_results(Store(out / STORE_FILE))
    assert not study.scores["split"].isin(REAL_SPLITS).any()
    assert not study.compared["split"].isin(REAL_SPLITS).any()

    section = _section((out / "report.html").read_text(encoding="utf-8"))
    for fragment in ("malignancy BA", "malignancy AUC", "spiculation BA", "spiculation AUC", "test_conflict"):
        assert fragment in section
    assert "Rankings, best first: synthetic (test_conflict): " in section and "real, malignancy: " in section
    assert "fewer than 4: no rank correlation is computed" in section and "Spearman ρ" not in section
    assert re.search(r"<b>ce</b><br><small>head · 3</small>", section)
    assert re.search(r"<b>simclr</b><br><small>probe · 3</small>", section)
    assert "real, spiculation: " in section and REAL_SPLITS[1] in set(real_rows["split"])

    # another real dataset (another manifest): the old scores are dropped, every run is scored again
    other = make_real_dataset(tmp_path / "other", n=8, size=32, pixel_mm=1.4, seed=1)
    again = studying.run_study(load_study(_study_file(tmp_path, f'dataset = "{other}"', "other.toml"), seeds=3), out)
    assert (again.done, again.real_scored) == (0, 6) and ran == []
    with Store(out / STORE_FILE) as store:
        rescored = store.table("predictions")
        assert store.real()["dataset"] == str(other.resolve())
    rescored = rescored[rescored["dataset"] == REAL_DATASET]
    assert rescored.groupby(["run_id", "split", "classifier"]).size().max() == 8  # n = 8 rows, not 24


# ----------------------------------------------------------------------------- statistics
def _correct(rng: np.random.Generator, accuracy: float, seeds: int, rows: int) -> np.ndarray:
    return (rng.random((seeds, rows)) < accuracy).astype(float)


@pytest.mark.parametrize("sign", [1, -1])
def test_rank_correlation_of_agreeing_and_reversed_rankings(sign: int) -> None:
    """Five losses far apart on both sides: the same order gives rho 1 with an interval ending at 1; the
    reversed order -1 with an interval starting at -1; likewise from per-seed values alone."""
    rng = np.random.default_rng(0)
    labels = np.arange(200) % 2
    levels = [0.55, 0.65, 0.75, 0.85, 0.95]
    synthetic = {f"l{i}": a + rng.normal(0, 0.005, 4) for i, a in enumerate(levels)}
    real = {f"l{i}": _correct(rng, a if sign == 1 else 1.5 - a, 4, len(labels)) for i, a in enumerate(levels)}
    found = s2r.rank_correlation(synthetic, real, labels, draws=500, seed=3)
    assert (found.losses, found.draws, found.rows) == (5, 500, True)
    assert found.rho == pytest.approx(sign)
    assert (found.high if sign == 1 else found.low) == pytest.approx(sign)
    assert sign * found.low > 0.5 and found.defined == 500
    per_seed = {k: s2r.balanced_accuracy_parts(v, labels)[0] for k, v in real.items()}
    alone = s2r.rank_correlation(synthetic, per_seed, None, draws=500, seed=3)
    assert alone.rho == pytest.approx(sign) and not alone.rows
    again = s2r.rank_correlation(synthetic, real, labels, draws=500, seed=3)
    assert (again.low, again.high) == (found.low, found.high)  # seeded: the same interval each time


def test_rank_correlation_ties_every_loss_is_undefined() -> None:
    same = {f"l{i}": np.full(3, 0.7) for i in range(4)}
    found = s2r.rank_correlation(same, same, None, draws=50)
    assert np.isnan(found.rho) and found.defined == 0 and np.isnan(found.low)
    assert s2r.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert s2r.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)


def test_level_carries_the_seeds_and_the_test_sets_noise() -> None:
    """Balanced accuracy's interval is the comparisons' one (``shared_sample_difference`` against a classifier
    that is never right: the same parts); it is wider than the seeds' alone; AUC matches scikit-learn."""
    from sklearn.metrics import roc_auc_score

    from nodulab.common.seedstats import seed_summary

    rng = np.random.default_rng(1)
    labels = np.arange(60) % 2
    correct = _correct(rng, 0.7, 5, len(labels))
    per_seed, parts, weights = s2r.balanced_accuracy_parts(correct, labels)
    found = s2r.level(per_seed, parts, weights)
    reference = shared_sample_difference(correct, np.zeros_like(correct), labels)
    assert found.mean == pytest.approx(reference.mean)
    assert found.high - found.mean == pytest.approx(reference.half_width())
    seeds_only = seed_summary(per_seed)
    assert found.low < seeds_only.low and found.high > seeds_only.high and found.test_noise
    # identical seeds: the interval is the test set's alone, not a point
    same = np.repeat(correct[:1], 5, axis=0)
    one = s2r.level(*s2r.balanced_accuracy_parts(same, labels))
    assert one.high > one.mean > one.low
    p = np.clip(labels + rng.normal(0, 0.6, (3, len(labels))), 0, 1)
    auc, auc_components, auc_weights = s2r.auc_parts(p, labels)
    assert auc == pytest.approx([roc_auc_score(labels, row) for row in p])
    interval = s2r.level(auc, auc_components, auc_weights)
    assert interval.low < auc.mean() < interval.high <= 1.0


# ----------------------------------------------------------------------------- the report from made-up stores
LOSSES = ("ce", "supcon", "simclr", "triplet")
EDGE = {"ce": 0.0, "supcon": 0.3, "simclr": 0.2, "triplet": 0.1}


def _score(scenario: str, loss: str, seed: int, split: str) -> float:
    base = {"val": 0.97, "test_iid": 0.95, "test_conflict": 0.55}[split]
    return base + EDGE[loss] * (split == "test_conflict") + 0.01 * ((seed * 7 + len(loss)) % 3)


NUMBER = re.compile(r"(?<![\w.])[-+−]?(\d+\.\d+)")


def _numbers(fragment: str) -> set[str]:
    return set(NUMBER.findall(re.sub(r"<[^>]+>", " ", fragment)))


def test_the_section_ranks_and_correlates_with_four_losses_and_every_number_is_in_its_table(tmp_path: Path) -> None:
    root = make_study(
        tmp_path / "s",
        _score,
        seeds=(0, 1, 2),
        losses=LOSSES,
        explain=False,
        real_score=lambda scenario, loss, seed, target: 0.6 + EDGE[loss],
    )
    section = _section(write_report(root).read_text(encoding="utf-8"))
    assert "Real dataset /data/lidc-32, 40 test_lidc nodules." in section
    assert "synthetic (test_conflict): supcon &gt; simclr &gt; triplet &gt; ce" in section
    assert "real, malignancy: supcon &gt; simclr &gt; triplet &gt; ce" in section
    assert "Spearman ρ" in section and "2,000 of 2,000" in section and "no rank correlation" not in section
    tables = _numbers("".join(re.findall(r"<table>.*?</table>", section, re.S)))
    sentences = re.sub(r"<table>.*?</table>", " ", section, flags=re.S)
    assert _numbers(sentences) and _numbers(sentences) <= tables
    with Store(root / STORE_FILE) as store:
        study = read_results(store)
        found = s2r.sim_to_real(
            study.tables["metrics"],
            study.tables["predictions"],
            study.readouts,
            study.hypotheses,
            study.manifests,
            "size-confound",
            study.losses("size-confound"),
        )
    assert found is not None and found.correlations["malignancy"].rho == pytest.approx(1.0)
    assert found.correlations["malignancy"].high == pytest.approx(1.0)
    assert list(found.rankings["synthetic"]) == ["supcon", "simclr", "triplet", "ce"]
    assert found.splits == ["test_conflict"]  # the declared comparison


def test_fewer_than_four_losses_side_by_side_and_no_real_says_how(tmp_path: Path) -> None:
    two = make_study(
        tmp_path / "two",
        _score,
        seeds=(0, 1, 2),
        losses=("ce", "supcon"),
        explain=False,
        real_score=lambda scenario, loss, seed, target: 0.6 + EDGE[loss],
    )
    section = _section(write_report(two).read_text(encoding="utf-8"))
    assert "2 loss(es) ranked on both sides, fewer than 4: no rank correlation is computed" in section
    assert "Spearman ρ" not in section and "synthetic (test_conflict): supcon &gt; ce" in section
    none = make_study(tmp_path / "none", _score, seeds=(0, 1), losses=("ce",), explain=False)
    section = _section(write_report(none).read_text(encoding="utf-8"))
    assert "not scored on real nodules" in section and "nodulab import-lidc DICOM_ROOT --out DIR" in section
    assert "<table>" not in section


def test_real_rows_are_never_read_as_a_scenarios_own(tmp_path: Path) -> None:
    """The scores, comparisons, controls and findings of a store with real rows equal those without them."""
    kwargs = {"seeds": (0, 1, 2), "losses": ("ce", "supcon"), "explain": False}
    with_real = make_study(tmp_path / "a", _score, real_score=lambda *a: 0.8, **kwargs)
    without = make_study(tmp_path / "b", _score, **kwargs)
    a, b = (read_results(Store(p / STORE_FILE)) for p in (with_real, without))
    for name in ("scores", "compared", "matched"):
        left, right = (getattr(x, name).reset_index(drop=True) for x in (a, b))
        pd.testing.assert_frame_equal(left, right, obj=name)
    scores = [
        re.search(r"<section id='scores'>.*?</section>", write_report(p).read_text(encoding="utf-8"), re.S).group(0)
        for p in (with_real, without)
    ]
    assert scores[0] == scores[1] and "test_lidc" not in scores[0]


def test_a_study_on_nodules_imported_from_fabricated_dicom(tmp_path: Path) -> None:
    """The whole chain: fabricated LIDC-IDRI DICOM -> ``import-lidc`` at the study's geometry ->
    ``[real]`` -> every run scored on ``test_lidc`` -> the report's sim-to-real section."""
    import lidc_fabricate as fab
    from nodulab.data.dataset import load_manifest

    archive = fab.fabricate_archive(tmp_path / "dicom", tmp_path / "tables")
    real = tmp_path / "lidc-real"
    imported = runner.invoke(
        app,
        ["import-lidc", str(archive.root), "--out", str(real), "--size", "32", "--pixel-mm", "1.4"]
        + ["--tables", str(tmp_path / "tables")],
    )
    assert imported.exit_code == 0, imported.output
    path = tmp_path / "one.toml"
    path.write_text(TINY.replace('losses = ["ce", "simclr"]', 'losses = ["ce"]').replace("seeds = 2", "seeds = 1"))
    path.write_text(path.read_text() + f'[real]\ndataset = "{real}"\n')
    out = tmp_path / "out"
    result = studying.run_study(load_study(path), out)
    assert result.done == 1 and result.real_unscored == []
    with Store(out / STORE_FILE) as store:
        predictions = store.table("predictions")
    scored = predictions[(predictions["dataset"] == REAL_DATASET) & (predictions["split"] == REAL_SPLITS[0])]
    assert len(scored[scored["classifier"] == "head"]) == load_manifest(real)["splits"]["test_lidc"]["n"]
    section = _section((out / "report.html").read_text(encoding="utf-8"))
    assert "malignancy BA" in section and "real, malignancy: " in section
