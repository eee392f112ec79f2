"""``nodulab report DIR``: one self-contained HTML page from a study's results store (design.md "Study, store, report").

It reads only ``DIR/results.sqlite`` (read-only) and writes ``DIR/report.html`` atomically: CSS
inline, every figure an inline base64 PNG, no JavaScript and no external URL, so the page can be
mailed or archived as one file. Sections: the study (grid, runs done and failed, the tuning
rule), the findings (``findings.findings``), the dataset galleries, per scenario the loss × split
table beside the clean ceiling with the controls and oracles apart, the paired differences to
ce, what each model relies on (reliance heatmap, diameter sweep, cue index, probes), Grad-CAM
and embedding maps, and training curves. A missing piece (no explain tables, no clean scenario,
one seed, failed runs) becomes a short sentence, never an error or an empty image.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from nodulab.common.writing import check_out, write_atomically
from nodulab.results.findings import findings
from nodulab.results.sections import (
    explain_section,
    figure_html,
    figures_section,
    missing,
    page,
    paired_section,
    scores_section,
    section,
)
from nodulab.results.seed_tables import (
    ceiling_gaps,
    ood_gaps,
    paired_differences,
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


def findings_section(study: StudyResults) -> str:
    tables = study.tables
    sentences = findings(tables["metrics"], study.manifests, tables["reliance"], tables["cue"])
    items = "".join(f"<li>{html.escape(s)}</li>" for s in sentences)
    return section("findings", "Findings", f"<ul class='findings'>{items}</ul>")


def gallery_section(study: StudyResults) -> str:
    """Each scenario's dataset gallery (``datasets.gallery``) with its confounds."""
    datasets = study.store.datasets()
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


def build_page(study: StudyResults) -> str:
    """The whole HTML page of a study."""
    gaps, ood = ceiling_gaps(study.scores, study.ceiling), ood_gaps(study.scores)
    tops = sorted({str(c) for c in study.ceiling.values()})
    ceiling = (
        f"The clean ceiling is {html.escape(', '.join(tops))}: the same loss there (else ce), a "
        "scenario without confounds (a [source] scenario's: the same table, confounds broken)."
        if tops
        else "The study has no clean scenario (no confound), so no split is read against a ceiling."
    )
    scores = "".join(scores_section(study, scenario, gaps, ood) for scenario in study.scenarios)
    sections = [
        header_section(study),
        findings_section(study),
        gallery_section(study),
        section(
            "scores", "Balanced accuracy per loss and split", f"<p>{ceiling}</p>{scores or missing('No scores yet.')}"
        ),
        paired_section(study, paired_differences(study.scores)),
        section(
            "reliance",
            "What each model relies on",
            "".join(explain_section(study, s) for s in study.scenarios) or missing("No scenario yet."),
        ),
        section(
            "figures",
            "Grad-CAM, embeddings and training curves",
            "".join(figures_section(study, s) for s in study.scenarios) or missing("No scenario yet."),
        ),
    ]
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
