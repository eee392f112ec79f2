"""The report's HTML: the page frame and the per-scenario sections (scores, differences, sim-to-real, reliance,
figures).

Every section reads the shared ``view.StudyResults`` and turns what is missing into a sentence. Cells
show seed-level numbers: mean ± SD over seeds, and the 95% t-interval of the mean below.
"""

from __future__ import annotations

import base64
import html
import math
from typing import TYPE_CHECKING, Any

import pandas as pd

from nodulab.results.figures import DYNAMICS_LINES, dynamics_figure, heatmap, history_figure, sweep_figure
from nodulab.results.seed_tables import (
    METRIC,
    MIN_SEEDS,
    confounds_of,
    cue_summary,
    iid_split,
    own_rows,
    own_scores,
    read_splits,
    reliance_summary,
    summarise,
)
from nodulab.results.sim_to_real import (
    MIN_LOSSES,
    REAL_METRICS,
    RHO_DRAWS,
    TARGETS,
    Level,
    RankCorrelation,
    SimToReal,
    ranking_text,
    sim_to_real,
)

if TYPE_CHECKING:
    from nodulab.results.view import StudyResults

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; color: #222; line-height: 1.45;
       max-width: 1360px; margin: 24px auto; padding: 0 16px; }
h1 { font-size: 1.6em; } h2 { border-bottom: 2px solid #ddd; padding-bottom: 4px; margin-top: 2em; }
table { border-collapse: collapse; margin: 8px 0 18px; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 4px 8px; vertical-align: top; text-align: right; }
th { background: #f2f2f2; } td.name, th.name { text-align: left; }
small, .note { color: #666; } .missing { color: #8a5a00; font-style: italic; }
.significant { color: #0a6b2c; font-weight: bold; } ul.findings li { margin-bottom: 6px; }
figure { display: inline-block; margin: 6px 10px 6px 0; vertical-align: top; }
figcaption { font-size: 12px; color: #555; } img { max-width: 100%; height: auto; }
nav a { margin-right: 12px; } pre { background: #f7f7f7; padding: 8px; overflow-x: auto; }
"""
CONTENTS = (
    ("study", "Study"),
    ("findings", "Findings"),
    ("datasets", "Datasets"),
    ("scores", "Scores"),
    ("differences", "Differences to ce"),
    ("sim-to-real", "Sim-to-real"),
    ("reliance", "Reliance"),
    ("dynamics", "Dynamics"),
    ("figures", "Figures"),
)


def page(title: str, sections: list[str]) -> str:
    """The whole document: inline CSS, a contents line of in-page links, the sections."""
    links = "".join(f"<a href='#{anchor}'>{name}</a>" for anchor, name in CONTENTS)
    return (
        f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1><nav>{links}</nav>"
        + "".join(sections)
        + "</body></html>\n"
    )


def section(anchor: str, title: str, body: str) -> str:
    return f"<section id='{anchor}'><h2>{title}</h2>{body}</section>"


def missing(sentence: str) -> str:
    """A short sentence standing in for something the store does not have."""
    return f"<p class='missing'>{html.escape(sentence)}</p>"


def figure_html(png: bytes | None, caption: str) -> str:
    """An inline base64 PNG with its caption, or a sentence when there is no valid PNG."""
    if not png:
        return missing(f"{caption}: not in the store.")
    if not bytes(png).startswith(PNG_SIGNATURE):
        return missing(f"{caption}: what the store holds is not a PNG image.")
    data = base64.b64encode(bytes(png)).decode("ascii")
    text = html.escape(caption)
    return f"<figure><img src='data:image/png;base64,{data}' alt='{text}'><figcaption>{text}</figcaption></figure>"


def table(header: list[str], rows: list[list[str]]) -> str:
    """An HTML table; cells are HTML already (the first column is the row's name)."""
    head = "".join(f"<th{' class=name' if i == 0 else ''}>{h}</th>" for i, h in enumerate(header))
    body = "".join(
        "<tr>" + "".join(f"<td{' class=name' if i == 0 else ''}>{c}</td>" for i, c in enumerate(row)) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _num(x: float) -> str:
    return f"{x:.2f}" if math.isfinite(x) else "—"


def _signed(x: float) -> str:
    """``+0.21``, ``-0.04``, and ``0.00`` for what rounds to zero (no ``-0.00``)."""
    if not math.isfinite(x):
        return "—"
    return "0.00" if abs(x) < 0.005 else f"{x:+.2f}"


def _p(p: float) -> str:
    if not math.isfinite(p):
        return "—"
    return "&lt; 0.001" if p < 0.001 else f"{p:.3f}"


def _interval(low: float, high: float) -> str:
    return f"[{low:.2f}, {high:.2f}]" if math.isfinite(low) and math.isfinite(high) else ""


def _summary_cell(row: pd.Series | None, *, strong: bool = False) -> str:
    """``0.74 ± 0.02`` and below it ``[0.70, 0.78]``; ``(1 seed)`` when there is no spread."""
    if row is None or row["n"] == 0:
        return "—"
    text = _num(row["mean"]) + (f" ± {row['sd']:.2f}" if math.isfinite(row["sd"]) else "")
    text = f"<b>{text}</b>" if strong else text
    if not math.isfinite(row["sd"]):
        return text + " <small>(1 seed)</small>"
    interval = _interval(row["low"], row["high"])
    return text + (f"<br><small>{interval}</small>" if interval else "")


def _lookup(frame: pd.DataFrame, keys: list[str]) -> dict[tuple, pd.Series]:
    return {tuple(row[k] for k in keys): row for _, row in frame.iterrows()}


def _of(frame: pd.DataFrame, scenario: str) -> pd.DataFrame:
    return frame[frame["scenario"] == scenario]


def _score_cell(loss: str, split: str, ba: dict, ood: dict, worst: dict, gaps: dict) -> str:
    lines = [_summary_cell(ba.get((loss, split)), strong=True)]
    if (loss, split) in ood:
        g = ood[(loss, split)]
        lines.append(f"<small>OOD gap {_num(g['mean'])} {_interval(g['low'], g['high'])}</small>")
    if (loss, split) in worst:
        w = worst[(loss, split)]
        lines.append(
            f"<small>worst group {_num(w['mean'])}"
            + (f" ± {w['sd']:.2f}" if math.isfinite(w["sd"]) else "")
            + "</small>"
        )
    if (loss, split) in gaps:
        c = gaps[(loss, split)]
        whose = "" if c["ceiling_loss"] == loss else f" ({html.escape(c['ceiling_loss'])})"
        lines.append(
            f"<small>ceiling{whose} {_num(c['ceiling_mean'])}: gap {_num(c['gap'])} "
            f"{_interval(c['gap_low'], c['gap_high'])}</small>"
        )
    return "<br>".join(lines)


def scores_section(study: StudyResults, scenario: str, gaps: pd.DataFrame, ood: pd.DataFrame) -> str:
    """The loss × split table (own readout) with OOD gap, worst group and ceiling, then controls and oracles."""
    part = _of(study.scores, scenario)
    title = f"<h3>{html.escape(scenario)}</h3>"
    if part.empty:
        return title + missing("No finished run of this scenario has scores.")
    iid_name = iid_split(part["split"])
    splits = sorted(set(part["split"]), key=lambda s: (s != iid_name, s != "val", s))
    ba = _lookup(summarise(part, ["loss", "split"]), ["loss", "split"])
    groups = study.tables["groups"]
    worst_rows = own_rows(groups[(groups["scenario"] == scenario) & (groups["label"] == "any")], study.readouts)
    worst = _lookup(summarise(worst_rows, ["loss", "split"], "accuracy"), ["loss", "split"])
    iid = "<br><small>IID: shares the training distribution</small>"
    header = ["loss<br><small>readout · seeds</small>", *(html.escape(s) + iid * (s == iid_name) for s in splits)]
    ood_at, gaps_at = (_lookup(_of(frame, scenario), ["loss", "split"]) for frame in (ood, gaps))
    rows = []
    for loss in study.losses(scenario):
        seeds = part.loc[part["loss"] == loss, "seed"].nunique()
        rows.append(
            [
                f"<b>{html.escape(loss)}</b><br><small>{study.readouts.get(loss)} · {seeds}</small>",
                *(_score_cell(loss, s, ba, ood_at, worst, gaps_at) for s in splits),
            ]
        )
    note = (
        "<p class='note'>Own behaviour (head where the loss has one, else probe), balanced accuracy: mean ± SD "
        f"over seeds, 95% t-interval below. OOD gap = {iid_name} − split per seed; worst group = the lowest "
        "(label × agrees) cell; ceiling gap = ceiling − split on the same images, its 95% interval carrying the "
        "seeds' noise (Welch: different runs) and the test set's (per-sample predictions; Welch alone without "
        "them).</p>"
    )
    return title + table(header, rows) + note + _controls_table(study, scenario, splits)


def _controls_table(study: StudyResults, scenario: str, splits: list[str]) -> str:
    """dfr (feature-quality oracle), probe_init (untrained control) and, with budget > 1, the test-selected oracle."""
    metrics = study.tables["metrics"]
    if "dataset" in metrics:  # the runs' scores on their own images (not a ceiling's of others', nor real ones)
        metrics = metrics[metrics["dataset"] == metrics["scenario"]]
    metrics = metrics[(metrics["scenario"] == scenario) & (metrics["metric"] == METRIC) & (metrics["selected"] == 1)]
    kinds: list[tuple[str, pd.DataFrame]] = []
    if study.budget > 1:
        every = own_scores(study.tables["metrics"], study.readouts, selected_only=False)
        best = _of(every, scenario).groupby(["loss", "seed", "split"], as_index=False)["value"].max()
        kinds.append(("test-selected oracle (upper bound)", best))
    kinds += [
        ("dfr (feature-quality oracle)", metrics[metrics["classifier"] == "dfr"]),
        ("probe_init (untrained control)", metrics[metrics["classifier"] == "probe_init"]),
    ]
    rows = []
    for loss in study.losses(scenario):
        for what, frame in kinds:
            found = _lookup(summarise(frame[frame["loss"] == loss], ["split"]), ["split"])
            if found:
                rows.append([f"{html.escape(loss)} · {what}", *(_summary_cell(found.get((s,))) for s in splits)])
    if not rows:
        return missing("No dfr or probe_init scores for this scenario.")
    note = (
        "<p class='note'>Apart from the results. dfr: a probe refitted on group-balanced val_balanced (what the "
        "features contain, not what the model does). probe_init: the probe on the untrained encoder of the same "
        "seed (what the input alone gives away)."
    )
    if study.budget > 1:
        note += " Test-selected oracle: per seed the draw with the best score on that test split: an upper bound."
    return table(["loss · readout", *map(html.escape, splits)], rows) + note + "</p>"


READOUT_TITLES = {
    "own": "Each loss's own readout against ce's",
    "probe": "Like for like: every loss by its linear probe (ce's probe too)",
    "dfr": "Like for like: every loss by DFR (feature quality)",
}


def _comparison_verdict(row: pd.Series) -> str:
    if row["n"] < MIN_SEEDS:
        return f"cannot tell ({row['n']} seed{'s' * (row['n'] != 1)})"
    if not row["primary"]:
        return "exploratory"
    if row["significant"]:
        return "<span class='significant'>significant</span>"
    return "not resolved"


def _seeds_needed(row: pd.Series) -> str:
    needed = row["seeds_needed"]
    if row["n"] < MIN_SEEDS or not row["primary"]:
        return "—"
    return str(int(needed)) if pd.notna(needed) and math.isfinite(needed) else "more seeds alone cannot"


def comparisons_section(study: StudyResults) -> str:
    """Per readout mode, (scenario, test split) and loss: the difference to ce over the seeds both
    have, with the test set's noise; Holm over the declared family only (``results.comparisons``)."""
    title = "Differences to ce"
    compared = study.compared
    if compared.empty:
        return section("differences", title, missing("No loss shares a test split and seeds with ce."))
    hypotheses = study.hypotheses
    declared = (
        f"Declared hypotheses: {html.escape(', '.join(hypotheses.comparisons))}, read with the "
        f"{html.escape(hypotheses.readout)} readout against {html.escape(hypotheses.reference)}; Holm's "
        "correction runs over those rows (<i>primary</i>) only."
        if hypotheses.declared
        else "The study declares no hypotheses: every row is exploratory and none is called significant."
    )
    parts = [
        f"<p class='note'>{declared} Each row uses the seeds both sides have (paired by number): the two "
        "means and the difference come from the same seeds. 95% CI: the seeds' and the fixed test set's noise "
        "(per-sample predictions, the same samples for both sides); seeds only: the plain seed-level "
        "t-interval, which misses the test set's noise. Detectable: the smallest difference found with 80% "
        "power at the row's level (Holm's strictest for primary rows). A difference of one test sample or less "
        "is never claimed.</p>"
    ]
    header = [
        "scenario/split",
        "difference",
        "family",
        "seeds",
        "loss",
        "ce",
        "mean",
        "95% CI",
        "seeds only",
        "p",
        "Holm 95% CI",
        "adjusted p",
        "detectable",
        "seeds to resolve",
        "",
    ]
    for mode, part in compared.groupby("readout_mode", sort=False):
        rows = [
            [
                f"{html.escape(r['scenario'])}/{html.escape(r['split'])}",
                f"{html.escape(r['loss'])} ({r['readout']}) − {html.escape(r['reference'])} ({r['reference_readout']})",
                "primary" if r["primary"] else "exploratory",
                str(r["n"]),
                _num(r["loss_mean"]),
                _num(r["reference_mean"]),
                _signed(r["mean"]),
                _interval(r["low"], r["high"]) + ("" if r["test_noise"] else " <small>(seeds only)</small>"),
                _interval(r["seeds_low"], r["seeds_high"]) or "—",
                _p(r["p"]),
                _interval(r["holm_low"], r["holm_high"]) or "—",
                _p(r["p_holm"]),
                _num(r["detectable"]),
                _seeds_needed(r),
                _comparison_verdict(r),
            ]
            for _, r in part.iterrows()
        ]
        parts.append(f"<h3>{READOUT_TITLES.get(mode, html.escape(mode))}</h3>" + table(header, rows))
    return section("differences", title, "".join(parts))


def reliance_table(relied: pd.DataFrame) -> str:
    """Per loss: excess flip rates of the cue and confound switches, their difference with its
    seed-level interval, and what that supports (``seed_tables.reliance_verdict``)."""
    rows = [
        [
            html.escape(f"{r['loss']} ({r['readout']})"),
            str(int(r["seeds"])),
            _num(r["cue"]),
            _num(r["confound"]),
            _num(r["null"]),
            _signed(r["difference"]),
            _interval(r["difference_low"], r["difference_high"]) or "—",
            html.escape(str(r["verdict"])),
        ]
        for _, r in relied.iterrows()
    ]
    header = ["loss", "seeds", "cue", "confound", "null", "confound − cue", "95% CI (seeds)", "supports"]
    note = (
        "<p class='note'>Excess flip rate: a switch's flip rate minus the null switches' (a fresh "
        f"nuisance render, a rotation, a mirrored offset) on the same rows, mean over switches then seeds. "
        f"A loss relies on the confound (or the cue) only when the interval of confound − cue, over at least "
        f"{MIN_SEEDS} seeds, excludes 0; degenerate: one class on >= 95% of the rows.</p>"
    )
    return table(header, rows) + note


def _switch(row: pd.Series) -> str:
    return f"{row['factor']}: {row['value_from']}→{row['value_to']} ({row['kind']})"


def _reliance_heatmap(study: StudyResults, scenario: str, reliance: pd.DataFrame, splits: list[str]) -> str:
    own = own_rows(reliance, study.readouts)
    own = own[own["split"].isin(splits)]
    if own.empty:
        return missing("No reliance rows of the losses' own readouts on these splits.")
    kinds = {"cue": 0, "confound": 1, "null": 2, "nuisance": 3, "robustness": 4}
    own = own.assign(switch=own.apply(_switch, axis=1), order=own["kind"].map(kinds).fillna(4))
    per_seed = own.groupby(["loss", "switch", "seed"])["flip_rate"].mean().groupby(["loss", "switch"]).mean()
    matrix = per_seed.unstack("switch")
    matrix = matrix[sorted(matrix.columns, key=lambda s: (own.loc[own["switch"] == s, "order"].iloc[0], s))]
    matrix = matrix.reindex([loss for loss in study.losses(scenario) if loss in matrix.index] or list(matrix.index))
    matrix.index = [study.label(loss) for loss in matrix.index]
    return figure_html(
        heatmap(matrix, title=f"{scenario}: flip rate on {', '.join(splits)}", colorbar="flip rate"),
        f"reliance heatmap of {scenario}: share of predictions that flip under each switch",
    )


def _sweep(study: StudyResults, scenario: str, sweep: pd.DataFrame, splits: list[str]) -> str:
    own = own_rows(sweep[sweep["factor"] == "diameter_mm"], study.readouts)
    if own.empty:
        return missing("No diameter sweep for this scenario.")
    split = next((s for s in splits if s in set(own["split"])), sorted(set(own["split"]))[0])
    curves = own[own["split"] == split].groupby(["loss", "value"], as_index=False)["mean_p"].mean()
    curves["label"] = curves["loss"].map(study.label)
    return figure_html(
        sweep_figure(curves, title=f"{scenario}/{split}: diameter sweep (mean over seeds)"),
        f"diameter sweep of {scenario}",
    )


def _cue_table(study: StudyResults, scenario: str, cue: pd.DataFrame, splits: list[str]) -> str:
    summary = cue_summary(cue, study.readouts, {scenario: splits})
    if summary.empty:
        return missing("No cue-reliance index of the losses' own readouts on these splits.")
    shares = ["label_only", "confound_only", "both", "neither"]
    rows = [
        [
            html.escape(study.label(r["loss"])),
            html.escape(r["confound"]),
            str(r["seeds"]),
            *(_num(r[s]) for s in shares),
        ]
        for _, r in summary.iterrows()
    ]
    return table(["loss (readout)", "confound", "seeds", "label only", "confound only", "both", "neither"], rows)


def _probe_heatmap(study: StudyResults, scenario: str, probes: pd.DataFrame) -> str:
    chosen = probes[probes["selected"] == 1]
    if chosen.empty:
        return missing("No probe table for this scenario.")
    chosen = chosen.assign(row=chosen["factor"] + " (" + chosen["metric"] + ")")
    trained = chosen[chosen["control"] == "trained"].groupby(["row", "loss", "seed"])["score"].mean()
    matrix = trained.groupby(["row", "loss"]).mean().unstack("loss")
    matrix = matrix[[loss for loss in study.losses(scenario) if loss in matrix.columns] or list(matrix.columns)]
    for control in sorted(set(chosen["control"]) - {"trained"}):
        matrix[control] = chosen[chosen["control"] == control].groupby("row")["score"].mean()
    return figure_html(
        heatmap(matrix, title=f"{scenario}: linear decodability (mean over seeds)", colorbar="score", cmap="magma"),
        f"probe heatmap of {scenario}: balanced accuracy (categorical) or R² (numeric)",
    )


def explain_section(study: StudyResults, scenario: str) -> str:
    """Reliance heatmap, diameter sweep, cue index and probe heatmap of one scenario."""
    tables = {name: _of(study.tables[name], scenario) for name in ("reliance", "sweep", "cue", "probes")}
    title = f"<h3>{html.escape(scenario)}</h3>"
    if all(t.empty for t in tables.values()):
        return title + missing(
            "No explain tables for this scenario: reliance, sweep, cue index and probes were not measured."
        )
    present = pd.concat([t[["scenario", "split"]] for n, t in tables.items() if n != "probes"])
    splits = read_splits(present, study.manifests).get(scenario, []) if len(present) else []
    kind = "conflict splits" if confounds_of(study.manifests.get(scenario)) else "test splits"
    where = f"{kind} ({', '.join(splits)})" if splits else "no split"
    parts = [f"<p class='note'>Own readouts, selected draws, {html.escape(where)}; mean over seeds.</p>"]
    relied = (
        reliance_summary(tables["reliance"], study.readouts, {scenario: splits}) if len(tables["reliance"]) else None
    )
    parts.append(
        _reliance_heatmap(study, scenario, tables["reliance"], splits)
        + (reliance_table(relied) if relied is not None and len(relied) else "")
        if len(tables["reliance"])
        else missing("No reliance table for this scenario.")
    )
    parts.append(
        _sweep(study, scenario, tables["sweep"], splits)
        if len(tables["sweep"])
        else missing("No sweep table for this scenario.")
    )
    parts.append(
        _cue_table(study, scenario, tables["cue"], splits)
        if len(tables["cue"])
        else missing("No cue-reliance index for this scenario.")
    )
    parts.append(_probe_heatmap(study, scenario, tables["probes"]))
    return title + "".join(parts)


def _chosen_runs(study: StudyResults, scenario: str) -> pd.DataFrame:
    """Per loss, the selected run of the lowest seed that finished."""
    runs = study.runs
    runs = runs[(runs["scenario"] == scenario) & (runs["status"] == "done") & (runs["selected"] == 1)]
    return runs.sort_values(["loss", "seed"]).groupby("loss", sort=True).head(1)


def figures_section(study: StudyResults, scenario: str) -> str:
    """Grad-CAM overlays, embedding maps and training curves of one seed per loss."""
    title = f"<h3>{html.escape(scenario)}</h3>"
    chosen = _chosen_runs(study, scenario)
    if chosen.empty:
        return title + missing("No finished run of this scenario.")
    parts = []
    for name, what in (("cam", "Grad-CAM"), ("embedding", "embedding map")):
        found = [(r, study.store.figure(r.run_id, name)) for r in chosen.itertuples()]
        if not any(png for _, png in found):
            parts.append(missing(f"No {what} stored for this scenario."))
            continue
        parts.append(
            "<div>"
            + "".join(figure_html(png, f"{what} · {r.loss} (seed {r.seed}, draw {r.draw})") for r, png in found)
            + "</div>"
        )
    return title + "".join(parts) + f"<div>{_history(study, scenario, chosen)}</div>"


def _history(study: StudyResults, scenario: str, chosen: pd.DataFrame) -> str:
    """Stored ``history`` figures; runs without one are plotted from the ``history`` table."""
    parts, unplotted = [], []
    for r in chosen.itertuples():
        png = study.store.figure(r.run_id, "history")
        if png:
            parts.append(figure_html(png, f"training curves · {r.loss} (seed {r.seed}, draw {r.draw})"))
        else:
            unplotted.append(r.run_id)
    history = study.tables["history"]
    history = history[history["run_id"].isin(unplotted)]
    if len(history):
        names = [n for n in ("train_loss", "val_knn_balanced_accuracy") if n in set(history["name"])]
        names = names or sorted(set(history["name"]))[:2]
        history = history.assign(label=history["loss"] + " (seed " + history["seed"].astype(str) + ")")
        curves = history_figure(history, names, title=f"{scenario}: training curves")
        parts.append(figure_html(curves, f"training curves of {scenario}"))
    elif unplotted:
        parts.append(missing("No training history stored for " + ", ".join(unplotted) + "."))
    return "".join(parts)


def dynamics_rows(study: StudyResults, scenario: str) -> pd.DataFrame:
    """The dynamics of each loss's cheap readout (``head`` where it has one, else ``knn``; the probe
    exists only at the last epoch) on the scenario's conflict splits, selected draws: columns of
    the store's ``dynamics`` table plus ``label``."""
    frame = study.tables.get("dynamics")
    if frame is None or frame.empty:
        return pd.DataFrame(columns=["label", "loss", "seed", "epoch", "split", "measure", "value"])
    frame = frame[(frame["scenario"] == scenario) & (frame["selected"] == 1)]
    cheap = frame["loss"].map(lambda loss: "head" if study.readouts.get(loss) == "head" else "knn")
    frame = frame[frame["classifier"] == cheap]
    splits = read_splits(frame[["scenario", "split"]], study.manifests).get(scenario, [])
    frame = frame[frame["split"].isin(splits) & frame["measure"].isin(list(DYNAMICS_LINES))]
    return frame.assign(label=frame["loss"] + " (" + frame["classifier"] + ")")


def dynamics_section(study: StudyResults, scenario: str) -> str:
    """Per loss, the conflict score and the cue / confound / null flip rates against epoch (seed bands)."""
    title = f"<h3>{html.escape(scenario)}</h3>"
    frame = dynamics_rows(study, scenario)
    if frame.empty:
        return title + missing("No dynamics for this scenario (no checkpoints, or no conflict split).")
    note = (
        "<p class='note'>Learning dynamics, read from checkpoints after training: they never select "
        "anything. Balanced accuracy on the conflict split and the flip rates of the cue, confound and "
        "null switches on a fixed subset of it, per epoch; line = mean over seeds, band = the seeds' range. "
        "The cheap readout of each loss: its head, else kNN.</p>"
    )
    crossing = []
    for label, part in frame.groupby("label", sort=True):
        epoch = cue_overtakes(part)
        crossing.append(
            f"{html.escape(label)}: "
            + (f"epoch {epoch}" if epoch is not None else "never within the run (at the checkpoints)")
        )
    figure = dynamics_figure(frame, title=f"{scenario}: learning dynamics")
    return (
        title
        + note
        + figure_html(figure, f"dynamics of {scenario}")
        + "<p class='note'>First checkpoint at which the mean cue flip rate exceeds the confound flip rate: "
        + "; ".join(crossing)
        + ".</p>"
    )


def cue_overtakes(frame: pd.DataFrame) -> int | None:
    """The first epoch whose mean (over seeds) cue flip rate exceeds the confound flip rate, if any."""
    means = frame.groupby(["epoch", "measure"])["value"].mean().unstack("measure")
    if not {"cue_flip_rate", "confound_flip_rate"} <= set(means.columns):
        return None
    ahead = means.index[(means["cue_flip_rate"] > means["confound_flip_rate"]).to_numpy()]
    return int(ahead[0]) if len(ahead) else None


# ----------------------------------------------------------------------------- sim-to-real
TARGET_TITLES = {"malignancy": "malignancy (the readers' rating)", "spiculation": "spiculation (rating ≥ 4 vs 1)"}


def malignancy_rule(real: dict[str, Any] | None) -> str:
    """The real dataset's label rule in words (``dataset.json``'s ``real.label``; 4 and 2 by default)."""
    label = (real or {}).get("label") or {}
    try:
        high, low = float(label.get("malignant_from", 4)), float(label.get("benign_to", 2))
    except (TypeError, ValueError):
        high, low = 4.0, 2.0
    return f"the readers' median rating ≥ {high:g} vs ≤ {low:g}"


def _level_cell(found: Level | None) -> str:
    """``0.74`` and below it ``[0.70, 0.78]`` (``seeds only`` without the test set's noise)."""
    if found is None or not math.isfinite(found.mean):
        return "—"
    if found.n < 2:
        return _num(found.mean) + " <small>(1 seed)</small>"
    what = "" if found.test_noise else " <small>(seeds only)</small>"
    return _num(found.mean) + f"<br><small>{_interval(found.low, found.high)}</small>{what}"


def _rank_cell(ranking: dict[str, int] | None, loss: str) -> str:
    return str(ranking[loss]) if ranking and loss in ranking else "—"


def _correlation_table(correlations: dict[str, RankCorrelation]) -> str:
    rows = [
        [
            html.escape(TARGET_TITLES.get(target, target)),
            str(c.losses),
            _signed(c.rho) if math.isfinite(c.rho) else "—",
            _interval(c.low, c.high) or "—",
            f"{c.defined:,} of {c.draws:,}" + ("" if c.rows else " <small>(seeds only)</small>"),
        ]
        for target, c in correlations.items()
    ]
    return table(["real target", "losses", "Spearman ρ", "95% bootstrap interval", "draws with a ρ"], rows)


def _ranking_line(name: str, ranking: dict[str, int]) -> str:
    return f"{name}: {ranking_text(ranking)}"


def sim_to_real_block(result: SimToReal, targets: list[str]) -> str:
    """One training scenario: the per-loss table, the rankings side by side, and rho (>= 4 losses)."""
    where = ", ".join(result.splits)
    synthetic = f"synthetic BA<br><small>{html.escape(where)}</small>" if result.splits else "synthetic BA"
    header = ["loss<br><small>readout · seeds</small>", synthetic, "rank"]
    for target in targets:
        header += [f"{html.escape(target)} BA", f"{html.escape(target)} AUC", "rank"]
    rows = []
    for row in result.rows:
        cells = [
            f"<b>{html.escape(row['loss'])}</b><br><small>{html.escape(row['readout'])} · {row['seeds']}</small>",
            _summary_cell(pd.Series(vars(row["synthetic"]))) if row["synthetic"] is not None else "—",
            _rank_cell(result.rankings.get("synthetic"), row["loss"]),
        ]
        for target in targets:
            cells += [_level_cell(row.get((target, metric))) for metric in REAL_METRICS]
            cells.append(_rank_cell(result.rankings.get(target), row["loss"]))
        rows.append(cells)
    parts = [f"<h3>{html.escape(result.scenario)}</h3>", table(header, rows)]
    if not result.splits:
        parts.append(
            missing(f"{result.scenario} has no conflict split: no synthetic ranking to set beside the real one.")
        )
        return "".join(parts)
    lines = [_ranking_line(f"synthetic ({where})", result.rankings.get("synthetic", {}))]
    lines += [_ranking_line(f"real, {t}", result.rankings[t]) for t in targets if t in result.rankings]
    parts.append("<p>Rankings, best first: " + html.escape("; ".join(lines)) + ".</p>")
    ranked = max((len(result.rankings[t]) for t in targets if t in result.rankings), default=0)
    if result.correlations:
        parts.append(_correlation_table(result.correlations))
        said = [
            f"{t}: ρ {_signed(c.rho)} {_interval(c.low, c.high)}"
            for t, c in result.correlations.items()
            if math.isfinite(c.rho)
        ]
        if said:
            parts.append(
                "<p>Spearman's rank correlation between the synthetic and the real ranking, "
                + html.escape("; ".join(said))
                + ". A ρ near 1 says the synthetic conflict split ranks the losses as real nodules do.</p>"
            )
    else:
        parts.append(
            f"<p>{ranked} loss(es) ranked on both sides, fewer than {MIN_LOSSES}: no rank correlation is "
            "computed; the rankings stand side by side.</p>"
        )
    return "".join(parts)


def sim_to_real_section(study: StudyResults, suffix: str = "", title: str = "") -> str:
    """Per training scenario, each loss's balanced accuracy and AUC on the real dataset's ``test_lidc``
    (malignancy and spiculation) with intervals, the synthetic conflict-split ranking beside the real
    ones, and their rank correlation (``results.sim_to_real``); without ``[real]``, how to add it."""
    anchor, heading = "sim-to-real" + suffix, "Sim-to-real: real nodules" + title
    real = study.store.real()
    metrics = study.tables["metrics"]
    results = [
        found
        for scenario in study.scenarios
        if (
            found := sim_to_real(
                metrics,
                study.tables.get("predictions"),
                study.readouts,
                study.hypotheses,
                study.manifests,
                scenario,
                study.losses(scenario),
            )
        )
        is not None
    ]
    if not results:
        if real is None:
            return section(anchor, heading, _how_to_add_real(study))
        return section(
            anchor,
            heading,
            missing(f"No run is scored on the real dataset {real.get('dataset')} yet; resume the study to score them."),
        )
    mode = study.hypotheses.readout
    readout = (
        "each loss's own readout (its head where it has one, else its probe), as the comparisons read it"
        if mode == "own"
        else f"every loss by its {mode}, as the declared comparisons read it"
    )
    source = ""
    if real is not None:
        about = [str(real[k]) for k in ("source",) if real.get(k)]
        about += [f"readers: {real['readers']}"] if real.get("readers") else []
        n = (real.get("splits") or {}).get("test_lidc")
        source = (
            f"Real dataset {real.get('dataset')}"
            + (f" ({', '.join(about)})" if about else "")
            + (f", {int(n)} test_lidc nodules" if isinstance(n, int) else "")
            + ". "
        )
        source = html.escape(source)
    note = (
        f"<p class='note'>{source}Every run of the study, trained on synthetic nodules, scored on the real "
        "dataset's held-out patients (test_lidc; no run saw a real image): malignancy "
        f"({html.escape(malignancy_rule(real))}) and spiculation (rating ≥ 4 vs 1: the synthetic studies' cue). "
        f"Read by {readout}; selected draws, one value per seed. BA = balanced accuracy. Interval (95%): the seeds' "
        "t half-width and the fixed test set's (delta method over the per-sample predictions, averaged over "
        "seeds, less the seed-by-sample interaction; DeLong's components for AUC) added in quadrature; "
        "<i>seeds only</i> where no per-sample predictions are stored. Synthetic BA: on the scenario's declared "
        "comparison split(s), else its conflict split(s) (mean over them per seed), 95% t-interval over seeds. "
        "Rankings by mean BA over the seeds both sides have. "
        f"With at least {MIN_LOSSES} losses, Spearman's ρ between the synthetic and each real ranking, with a "
        f"percentile bootstrap interval ({RHO_DRAWS:,} draws, each resampling every loss's seeds and the real "
        "test rows within each class, then ranking again; draws where one side ties every loss are left out).</p>"
    )
    return section(anchor, heading, note + "".join(sim_to_real_block(r, list(TARGETS)) for r in results))


def _how_to_add_real(study: StudyResults) -> str:
    """The paragraph of a study without ``[real]``: how to score its runs on real nodules."""
    images = [m["image"] for m in study.manifests.values() if isinstance(m.get("image"), dict)]
    flags = ""
    if images and all(image == images[0] for image in images):
        image = images[0]
        flags = f" --dim {image.get('dim')} --size {image.get('size')} --pixel-mm {image.get('pixel_mm')}"
    return (
        "<p>This study is not scored on real nodules. With your own copy of LIDC-IDRI (The Cancer Imaging "
        f"Archive), run <code>nodulab import-lidc DICOM_ROOT --out DIR{html.escape(flags)}</code> (the study's "
        'image geometry), add <code>[real] dataset = "DIR"</code> to the study file and run the same '
        "<code>nodulab study</code> command again: every finished run is scored on DIR's test_lidc nodules "
        "and nothing is retrained ([real] is outside the study's hash, so the store is kept).</p>"
    )
