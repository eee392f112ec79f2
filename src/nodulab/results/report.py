"""``nodulab report DIR``: one self-contained HTML page from a study's results store (design.md "Study, store, report").

It reads only ``DIR/results.sqlite`` (read-only) and writes ``DIR/report.html`` atomically: CSS
inline, every figure an inline base64 PNG, no JavaScript and no external URL, so the page can be
mailed or archived as one file. Sections: the study (grid, runs done and failed, the tuning
rule), the findings (``findings.findings``), the dataset galleries, per scenario the loss × split
table beside the matched ceiling with the controls and oracles apart, the paired differences to
ce, the sim-to-real comparison (each loss on real nodules, when the study has ``[real]``; else how
to add them), what each model relies on (reliance heatmap, diameter sweep, cue index, probes), Grad-CAM
and embedding maps, and training curves. A missing piece (no explain tables, no clean scenario,
one seed, failed runs) becomes a short sentence, never an error or an empty image.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

from nodulab.common.seedstats import seed_summary
from nodulab.common.writing import check_out, write_atomically
from nodulab.results.comparisons import gaps_with_test_noise
from nodulab.results.findings import findings
from nodulab.results.sections import (
    comparisons_section,
    dynamics_section,
    explain_section,
    figure_html,
    figures_section,
    missing,
    page,
    scores_section,
    section,
    sim_to_real_section,
)
from nodulab.results.seed_tables import (
    MIN_SEEDS,
    ceiling_gaps,
    conflict_cells,
    ood_gaps,
    reliance_summary,
)
from nodulab.results.store import STORE_FILE, Store
from nodulab.results.view import StudyResults, read_results

REPORT_FILE = "report.html"
SELECTION_RULE = (
    "per seed, the draw with the best kNN balanced accuracy on val; budget {budget} draw{s} per loss; "
    "the same score for every loss"
)
"""The tuning rule the study applies (``store.Store`` marks the chosen draw ``selected``)."""


def _span(values: list[Any]) -> str:
    return ", ".join(html.escape(str(v)) for v in values)


def header_section(study: StudyResults) -> str:
    """The study: its name, the grid, runs done and failed (with reasons), the tuning rule, the config."""
    runs = study.runs
    scenarios, losses, seeds = (sorted(set(runs[c])) for c in ("scenario", "loss", "seed"))
    planned = study.config.get("planned_runs")
    if not isinstance(planned, int) or isinstance(planned, bool) or planned < len(runs):
        planned = len(scenarios) * len(losses) * len(seeds) * study.budget
    done, failed = runs[runs["status"] == "done"], runs[runs["status"] == "failed"]
    parts = [
        f"<p>Grid: {len(scenarios)} scenario(s) ({_span(scenarios)}) × {len(losses)} loss(es) ({_span(losses)}) × "
        f"{len(seeds)} seed(s) ({_span(seeds)}) × {study.budget} tuning draw(s): {planned} runs. "
        f"Recorded: {len(done)} done, {len(failed)} failed, {max(planned - len(runs), 0)} not run yet.</p>",
        "<p><b>Tuning rule:</b> "
        + html.escape(SELECTION_RULE.format(budget=study.budget, s="s" * (study.budget != 1)))
        + ". <code>val</code> shares the training distribution, so selecting on it favours shortcuts; test splits "
        "never choose anything"
        + (" (the test-selected oracle is an upper bound, not a result)" * (study.budget > 1))
        + ".</p>",
    ]
    if len(failed):
        items = "".join(
            f"<li><code>{html.escape(r.run_id)}</code> ({html.escape(r.scenario)}, {html.escape(r.loss)}, "
            f"seed {r.seed}, draw {r.draw}): {html.escape(_one_line(r.reason))}</li>"
            for r in failed.itertuples()
        )
        parts.append(f"<p>Failed runs:</p><ul>{items}</ul>")
    if not len(runs):
        parts.append(missing("No run is recorded in the store yet."))
    config = html.escape(json.dumps(study.config, indent=2, sort_keys=True))
    parts.append(f"<details><summary>Study configuration</summary><pre>{config}</pre></details>")
    return section("study", f"Study {html.escape(study.meta.get('name', ''))}", "".join(parts))


def _one_line(text: str) -> str:
    line = " ".join(str(text or "no reason recorded").split())
    return line if len(line) <= 240 else line[:237] + "..."


def findings_section(study: StudyResults, suffix: str = "", title: str = "") -> str:
    tables = study.tables
    sentences = findings(
        tables["metrics"],
        study.manifests,
        tables["reliance"],
        predictions=tables.get("predictions"),
        hypotheses=study.hypotheses,
        compared=study.compared,
        ceilings=study.ceiling,
        dynamics=tables.get("dynamics"),
        history=tables.get("history"),
    )
    items = "".join(f"<li>{html.escape(s)}</li>" for s in sentences)
    return section("findings" + suffix, "Findings" + title, f"<ul class='findings'>{items}</ul>")


def gallery_section(study: StudyResults) -> str:
    """Each scenario's dataset gallery (``datasets.gallery``) with its confounds."""
    datasets = study.store.datasets().drop_duplicates("scenario")  # budget cells resize train only
    if datasets.empty:
        return section("datasets", "Datasets", missing("The store records no dataset."))
    parts = []
    for row in datasets.itertuples():
        scenario = study.manifests.get(row.scenario, {}).get("scenario", {})
        confounds = [c["factor"] for c in scenario.get("confounds", [])]
        what = [f"confounds: {', '.join(confounds)}" if confounds else "no confound", scenario.get("description")]
        parts.append(
            f"<h3>{html.escape(row.scenario)}</h3><p class='note'>{html.escape('. '.join(filter(None, what)))}"
            "</p>" + figure_html(row.gallery, f"dataset gallery of {row.scenario}")
        )
    return section("datasets", "Datasets", "".join(parts))


def cell_sections(study: StudyResults, suffix: str = "", title: str = "") -> list[str]:
    """Findings, scores, differences, reliance, dynamics and figures of one budget cell."""
    gaps = gaps_with_test_noise(ceiling_gaps(study.scores, study.matched), study.tables["predictions"], study.readouts)
    ood = ood_gaps(study.scores)
    pairs = sorted(f"{c} for {s}" for s, c in study.ceiling.items())
    ceiling = (
        f"Matched ceilings: {html.escape(', '.join(pairs))}. Each ceiling differs from its confounded "
        "scenario only in the confounds; its runs are scored on the confounded scenario's own test splits "
        "(the same images), the same loss there (else ce)."
        if pairs
        else "The study has no clean scenario (no confound), so no split is read against a ceiling."
    )
    scores = "".join(scores_section(study, scenario, gaps, ood) for scenario in study.scenarios)
    paired = comparisons_section(study)
    if suffix:
        paired = paired.replace("<section id='differences'>", f"<section id='differences{suffix}'>", 1)
        paired = paired.replace("<h2>", f"<h2>{title[3:]} · " if title else "<h2>", 1)
    return [
        findings_section(study, suffix, title),
        section(
            "scores" + suffix,
            "Balanced accuracy per loss and split" + title,
            f"<p>{ceiling}</p>{scores or missing('No scores yet.')}",
        ),
        paired,
        sim_to_real_section(study, suffix, title),
        section(
            "reliance" + suffix,
            "What each model relies on" + title,
            "".join(explain_section(study, s) for s in study.scenarios) or missing("No scenario yet."),
        ),
        section(
            "dynamics" + suffix,
            "Learning dynamics" + title,
            "".join(dynamics_section(study, s) for s in study.scenarios) or missing("No scenario yet."),
        ),
        section(
            "figures" + suffix,
            "Grad-CAM, embeddings and training curves" + title,
            "".join(figures_section(study, s) for s in study.scenarios) or missing("No scenario yet."),
        ),
    ]


def budget_section(study: StudyResults) -> str:
    """Across budget cells: each loss's conflict-split score and reliance verdict per cell, and
    where the ranking or a verdict changes between cells."""
    cells = study.cells
    rows, rankings, verdicts = [], {}, {}
    for cell in cells:
        part = study.for_cell(cell)
        for scenario, split in conflict_cells(part.scores, part.manifests):
            found = part.scores[(part.scores["scenario"] == scenario) & (part.scores["split"] == split)]
            means = found.groupby("loss")["value"].mean().sort_values(ascending=False)
            rankings.setdefault((scenario, split), {})[cell] = list(means.index)
            relied = reliance_summary(part.tables["reliance"], part.readouts, {scenario: [split]})
            for loss, mean in means.items():
                summary = seed_summary(found.loc[found["loss"] == loss, "value"])
                r = relied[relied["loss"] == loss]
                verdict = str(r["verdict"].iloc[0]) if len(r) else "n/a"
                verdicts.setdefault((scenario, split, loss), {})[cell] = verdict
                interval = f" [{summary.low:.2f}, {summary.high:.2f}]" if math.isfinite(summary.low) else ""
                rows.append(
                    f"<tr><td class='name'>{html.escape(cell)}</td><td class='name'>{html.escape(scenario)}/"
                    f"{html.escape(split)}</td><td class='name'>{html.escape(study.label(loss))}</td>"
                    f"<td>{mean:.2f}{interval}</td><td>{summary.n}</td><td class='name'>{verdict}</td></tr>"
                )
    changes = []
    for (scenario, split), ranked in rankings.items():
        orders = {tuple(v) for v in ranked.values()}
        changes.append(
            f"{scenario}/{split}: the ranking "
            + (
                "changes between cells (" + "; ".join(f"{c}: {' > '.join(v)}" for c, v in ranked.items()) + ")"
                if len(orders) > 1
                else "is the same in every cell"
            )
        )
    for (scenario, split, loss), by_cell in verdicts.items():
        if len(set(by_cell.values()) & {"confound", "cue"}) > 1:
            changes.append(
                f"{scenario}/{split}: what {loss} relies on changes between cells ("
                + "; ".join(f"{c}: {v}" for c, v in by_cell.items())
                + ")"
            )
    table = (
        "<table><tr><th class='name'>budget cell</th><th class='name'>conflict split</th>"
        "<th class='name'>loss (readout)</th><th>balanced accuracy, mean [95% CI]</th><th>seeds</th>"
        "<th class='name'>relies on</th></tr>" + "".join(rows) + "</table>"
    )
    items = "".join(f"<li>{html.escape(c)}</li>" for c in changes)
    note = (
        "<p class='note'>Each budget cell (training rows × epochs) has its own datasets, seeds and ceiling; "
        "losses are compared within a cell. Relies on: confound or cue when the seed-level interval of the "
        "confound's minus the cue's excess flip rate (beyond the null switches) excludes 0 with at least "
        f"{MIN_SEEDS} seeds; not resolved otherwise; degenerate: one class on >= 95% of the rows.</p>"
    )
    return section(
        "budget", "Budget cells", note + (table if rows else missing("No scores yet.")) + f"<ul>{items}</ul>"
    )


def build_page(study: StudyResults) -> str:
    """The whole HTML page of a study: one block of sections per budget cell, and a comparison of the cells."""
    cells = study.cells
    if len(cells) <= 1:
        body = cell_sections(study.for_cell(cells[0]) if cells else study)
        sections = [header_section(study), body[0], gallery_section(study), *body[1:]]
    else:
        sections = [header_section(study), budget_section(study), gallery_section(study)]
        for i, cell in enumerate(cells):
            sections += cell_sections(study.for_cell(cell), f"-{i}", f" · {html.escape(cell)}")
    return page(f"nodulab study {study.meta.get('name', '')}", sections)


def write_report(study_dir: Path | str, out: Path | str | None = None) -> Path:
    """Write the study's report page.

    Args:
        study_dir: the study folder holding ``results.sqlite``.
        out: the HTML file to write (default ``study_dir/report.html``); replaced atomically.

    Returns:
        The path written.

    Raises:
        StoreError: ``study_dir`` holds no readable results store.
        DatasetError: ``out`` would replace the store (or its WAL files) or the study folder.
    """
    store_path = Path(study_dir) / STORE_FILE
    target = Path(out) if out is not None else Path(study_dir) / REPORT_FILE
    check_out(target, [store_path, *(store_path.with_name(store_path.name + s) for s in ("-wal", "-shm"))])
    with Store(store_path) as store:
        text = build_page(read_results(store))
    write_atomically(target, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return target
