"""A study's results as the report reads them: the store's tables and the seed-level tables built from them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd

from nodulab.common.tables import RESULT_TABLES
from nodulab.results.seed_tables import Ceiling, find_ceilings, own_scores, readout_map
from nodulab.results.store import Store


@dataclass(frozen=True)
class StudyResults:
    """Everything the report reads from the store, and the seed-level tables built from it."""

    store: Store
    meta: dict[str, str]
    config: dict[str, Any]
    runs: pd.DataFrame
    tables: dict[str, pd.DataFrame]
    manifests: dict[str, dict[str, Any]]
    readouts: dict[str, str]
    scores: pd.DataFrame
    ceiling: dict[str, Ceiling]  # each scenario's clean ceiling (``find_ceilings``)
    budget: int

    @property
    def scenarios(self) -> list[str]:
        return sorted(set(self.runs["scenario"]) | set(self.manifests))

    def losses(self, scenario: str) -> list[str]:
        """The losses with scores in ``scenario``, ``ce`` first."""
        found = set(self.scores.loc[self.scores["scenario"] == scenario, "loss"])
        return sorted(found, key=lambda loss: (loss != "ce", loss))

    def label(self, loss: str) -> str:
        return f"{loss} ({self.readouts.get(loss, 'probe')})"


def read_results(store: Store) -> StudyResults:
    """Read the store's tables and build the seed-level tables every section shares."""
    tables = {name: store.table(name) for name in RESULT_TABLES}
    config = store.study_config()
    runs = store.runs()
    metrics = tables["metrics"]
    readouts = readout_map(metrics)
    scores = own_scores(metrics, readouts)
    manifests = store.manifests()
    return StudyResults(
        store,
        store.meta(),
        config,
        runs,
        tables,
        manifests,
        readouts,
        scores,
        find_ceilings(manifests, scores),
        _budget(config, runs),
    )


def _budget(config: dict[str, Any], runs: pd.DataFrame) -> int:
    """Tuning draws per (scenario, loss, seed): the study config's ``budget``, else the most draws recorded."""
    budget = config.get("budget")
    if isinstance(budget, int) and not isinstance(budget, bool) and budget > 0:
        return budget
    return int(runs["draw"].max()) + 1 if len(runs) else 1
