"""The quick preset at its real size answers (`slow`: run by `make test-slow` and CI after `make test`).

At `quick`'s budget (2,000 rows x 6 epochs) the matched ceiling is learnt (README "Studies": 0.97
+- 0.01 over 3 seeds), so the report must say so first (whether or not it had plateaued), and every
run must carry its dynamics.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from nodulab.results.seed_tables import matched_scores
from nodulab.results.store import STORE_FILE, Store
from nodulab.studies.config import load_study
from nodulab.studies.driver import run_study


@pytest.mark.slow
def test_quick_at_its_real_size_learns_the_ceiling_and_says_so(tmp_path: Path) -> None:
    study = load_study("quick")
    summary = run_study(study, tmp_path / "quick")
    assert (summary.done, summary.failed) == (study.planned_runs(), 0)
    with Store(tmp_path / "quick" / STORE_FILE) as store:
        metrics, dynamics, runs = store.table("metrics"), store.table("dynamics"), store.runs()
    matched = matched_scores(metrics, study.ceilings)
    ceiling = matched[(matched["split"] == "test_conflict") & (matched["loss"] == "ce")]["value"]
    assert len(ceiling) == study.model.seeds and ceiling.mean() >= 0.90
    assert set(dynamics["run_id"]) == set(runs["run_id"])
    page = (tmp_path / "quick" / "report.html").read_text()
    first = page.split("<ul class='findings'><li>", 1)[1]
    assert first.startswith("At this budget the cue is learnt"), first[:300]
