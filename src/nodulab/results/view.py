"""A study's results as the report reads them: the store's tables and the seed-level tables built from them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd

from nodulab.common.tables import RESULT_TABLES
from nodulab.results.comparisons import Hypotheses, comparisons, hypotheses_of
from nodulab.results.seed_tables import implied_ceilings, matched_scores, own_scores, readout_map
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
    ceiling: dict[str, str]  # each confounded scenario's matched ceiling (the study's ``ceilings``)
    matched: pd.DataFrame  # the ceilings' scores on the confounded scenarios' images (``matched_scores``)
    budget: int
    hypotheses: Hypotheses  # the study's declared primary comparisons (``[hypotheses]``)
    compared: pd.DataFrame  # every comparison with the reference (``comparisons.comparisons``)
    cell: str = ""  # the budget cell these results are restricted to ("": every run)

    @property
    def cells(self) -> list[str]:
        """The budget cells of the runs (``runs.budget``), in the study's order."""
        order = self.config.get("cells") or []
        found = list(dict.fromkeys(self.runs["budget"])) if "budget" in self.runs else []
        return [c for c in order if c in found] + [c for c in found if c not in order]

    def for_cell(self, cell: str) -> StudyResults:
        """These results restricted to the runs of one budget cell."""
        ids = set(self.runs.loc[self.runs["budget"] == cell, "run_id"])
        return _build(
            self.store,
            self.meta,
            self.config,
            self.runs[self.runs["run_id"].isin(ids)].reset_index(drop=True),
            {name: t[t["run_id"].isin(ids)].reset_index(drop=True) for name, t in self.tables.items()},
            self.manifests,
            cell,
        )

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
    """Read the store's tables and build the seed-level tables every section shares (every cell)."""
    tables = {name: store.table(name) for name in RESULT_TABLES}
    return _build(store, store.meta(), store.study_config(), store.runs(), tables, store.manifests(), "")


def _build(
    store: Store,
    meta: dict[str, str],
    config: dict[str, Any],
    runs: pd.DataFrame,
    tables: dict[str, pd.DataFrame],
    manifests: dict[str, dict[str, Any]],
    cell: str,
) -> StudyResults:
    metrics = tables["metrics"]
    readouts = readout_map(metrics)
    hypotheses = hypotheses_of(config)
    named = config.get("ceilings")
    ceilings = {str(k): str(v) for k, v in named.items()} if isinstance(named, dict) else implied_ceilings(manifests)
    return StudyResults(
        store,
        meta,
        config,
        runs,
        tables,
        manifests,
        readouts,
        own_scores(metrics, readouts),
        ceilings,
        matched_scores(metrics, ceilings, readouts),
        _budget(config, runs),
        hypotheses,
        comparisons(metrics, tables.get("predictions"), readouts, hypotheses),
        cell,
    )


def _budget(config: dict[str, Any], runs: pd.DataFrame) -> int:
    """Tuning draws per (scenario, loss, seed): the study config's ``budget``, else the most draws recorded."""
    budget = config.get("budget")
    if isinstance(budget, int) and not isinstance(budget, bool) and budget > 0:
        return budget
    return int(runs["draw"].max()) + 1 if len(runs) else 1
