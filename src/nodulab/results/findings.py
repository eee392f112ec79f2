"""The sentences a study report opens with, built from its seed-level numbers only (design.md
"Evaluation and explanation", "Expected behaviour").

First the budget regime (whether the matched ceiling is learnt and had plateaued), then four
kinds, in order: (a) ce's gap to the matched ceiling on each confounded scenario's conflict
splits (the ceiling's runs scored on the same images), with a Welch interval over seeds; (b)
which cue each loss relies on there (counterfactual flip rates of the label-cue vs the confound
switches, and the cue-reliance index); (c) which loss keeps the most balanced accuracy there,
and whether its lead over ce is claimed; (d) which differences to ce are within noise. Every
sentence names the readout it reads (a loss's own behaviour: ``head`` where it has one, else
``probe``; see ``seed_tables``).

A difference is claimed only when its Holm-corrected interval excludes 0, which needs at least
``MIN_SEEDS`` paired seeds; with fewer the sentences say the study cannot tell.
``seed_summary`` and ``holm`` (from ``seedstats``) are the statistics underneath.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import pandas as pd

from nodulab.common.seedstats import holm, seed_summary
from nodulab.results.seed_tables import (
    ALPHA,
    CONVERGED_SHARE,
    LAST_SHARE,
    MIN_SEEDS,
    REFERENCE,
    Manifests,
    ceiling_gaps,
    conflict_cells,
    convergence,
    cue_summary,
    iid_split,
    implied_ceilings,
    matched_scores,
    ood_gaps,
    own_scores,
    paired_differences,
    readout_map,
    reliance_summary,
)

__all__ = ["findings", "holm", "seed_summary"]

Cell = tuple[str, str]


def _num(x: float) -> str:
    return "n/a" if not math.isfinite(x) else f"{x:.2f}"


def _bracket(low: float, high: float) -> str:
    """`` [low, high]`` or nothing when the interval is undefined (one seed)."""
    return f" [{low:.2f}, {high:.2f}]" if math.isfinite(low) and math.isfinite(high) else ""


def _p(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def _seeds(n: int) -> str:
    return f"{int(n)} seed{'s' * (int(n) != 1)}"


def _gap_interval(low: float, high: float, what: str = "95% CI") -> str:
    if math.isfinite(low) and math.isfinite(high):
        return f"{what} {low:.2f} to {high:.2f}"
    return "no interval: it needs two seeds on each side"


def _cell_values(scores: pd.DataFrame, scenario: str, loss: str, split: str) -> tuple[str, pd.Series]:
    """(readout, per-seed values) of one loss on one split."""
    cell = scores[(scores["scenario"] == scenario) & (scores["loss"] == loss) & (scores["split"] == split)]
    return (cell["readout"].iloc[0] if len(cell) else ""), cell["value"]


def ceiling_sentences(
    scores: pd.DataFrame, ceilings: Mapping[str, str], matched: pd.DataFrame, cells: list[Cell]
) -> list[str]:
    """(a) ce on every conflict split against its matched ceiling on the same images (or, without
    one, against the IID split)."""
    if not cells:
        return []
    if REFERENCE not in set(scores["loss"]):
        return [f"The study has no {REFERENCE} runs, so no loss can be read against {REFERENCE}."]
    if not ceilings:
        return [
            "The study has no clean scenario (no confound), so there is no ceiling: "
            f"{REFERENCE}'s conflict-split scores are read against the IID split "
            "(test_iid, else val: the training distribution).",
            *_val_sentences(scores, cells),
        ]
    gaps = ceiling_gaps(scores, matched)
    sentences = []
    for scenario, split in cells:
        row = gaps[(gaps["scenario"] == scenario) & (gaps["split"] == split) & (gaps["loss"] == REFERENCE)]
        if row.empty:
            continue
        r = row.iloc[0]
        sentences.append(
            f"On {scenario}/{split}, {REFERENCE} ({r['readout']}) reaches balanced accuracy {_num(r['mean'])}"
            f"{_bracket(r['low'], r['high'])} against its matched ceiling {_num(r['ceiling_mean'])}"
            f"{_bracket(r['ceiling_low'], r['ceiling_high'])} ({r['ceiling']}'s {r['ceiling_loss']} on the same "
            f"images): a gap of {_num(r['gap'])} ({_gap_interval(r['gap_low'], r['gap_high'])})."
        )
    where = ", ".join(sorted(set(ceilings.values())))
    return sentences or [
        f"{REFERENCE} has no score of its matched ceiling ({where}) on the same images to read its conflict "
        "splits against."
    ]


PLATEAU_RISE = 0.01
"""The ceiling has plateaued when its val balanced accuracy rose by less than this between its last two checkpoints."""
LEARNT = 0.90
"""A matched ceiling below this balanced accuracy means the cue is not yet learnt at the study's budget."""


def regime_sentences(
    matched: pd.DataFrame, dynamics: pd.DataFrame | None, readouts: Mapping[str, str], cells: list[Cell]
) -> list[str]:
    """The budget regime, first: whether the matched ceiling is learnt and had plateaued (from its
    checkpoints' val scores), so that a reader knows whether the verdicts measure learning speed."""
    sentences = []
    for scenario, split in cells:
        top = matched[(matched["scenario"] == scenario) & (matched["split"] == split) & (matched["loss"] == REFERENCE)]
        if top.empty:
            continue
        ceiling, summary = top["ceiling"].iloc[0], seed_summary(top["value"])
        rise = _val_rise(dynamics, ceiling, readouts)
        trend = (
            f"its val balanced accuracy {rise[1]:.2f} → {rise[2]:.2f} from epoch {rise[3]} to {rise[4]}"
            if rise is not None
            else "no checkpoints to tell whether it had plateaued"
        )
        where = (
            f"matched ceiling {_num(summary.mean)}{_bracket(summary.low, summary.high)} ({ceiling}'s "
            f"{REFERENCE} on {scenario}/{split}), {trend}"
        )
        if summary.mean < LEARNT:
            sentences.append(
                f"At this budget the cue is not yet learnt: {where}. Read the verdicts below as what is "
                "learnt first at this budget, not as what a trained model uses."
            )
        elif rise is None or rise[0] >= PLATEAU_RISE:
            sentences.append(
                f"At this budget the cue is learnt, but training had not been shown to plateau: {where}. "
                "A longer budget may still change the verdicts below."
            )
        else:
            sentences.append(f"At this budget the cue is learnt and the ceiling had plateaued: {where}.")
    return sentences


def convergence_sentences(history: pd.DataFrame | None) -> list[str]:
    """Which losses' training curves are flat at the end (``seed_tables.convergence``), per scenario."""
    if history is None or history.empty:
        return []
    found = convergence(history)
    if found.empty:
        return []
    parts = []
    for scenario, part in found.groupby("scenario", sort=True):
        flat = part.groupby("loss")["converged"].agg(["sum", "size"])
        parts.append(f"on {scenario}, " + ", ".join(f"{loss} {r['sum']}/{r['size']}" for loss, r in flat.iterrows()))
    return [
        f"Converged seeds per loss (the training loss, for triplet the mined count, moved by less than "
        f"{CONVERGED_SHARE:.0%} of its total decrease over the last {LAST_SHARE:.0%} of epochs): "
        + "; ".join(parts)
        + "."
    ]


def _val_rise(
    dynamics: pd.DataFrame | None, scenario: str, readouts: Mapping[str, str]
) -> tuple[float, float, float, int, int] | None:
    """(rise, before, after, epoch before, last epoch): ce's val balanced accuracy (mean over selected
    seeds) between its last two checkpoints on ``scenario``; None without two checkpoints."""
    if dynamics is None or dynamics.empty:
        return None
    cheap = "head" if readouts.get(REFERENCE) == "head" else "knn"
    rows = dynamics[
        (dynamics["scenario"] == scenario)
        & (dynamics["loss"] == REFERENCE)
        & (dynamics["selected"] == 1)
        & (dynamics["split"] == "val")
        & (dynamics["classifier"] == cheap)
        & (dynamics["measure"] == "balanced_accuracy")
    ]
    curve = rows.groupby("epoch")["value"].mean().sort_index()
    if len(curve) < 2:
        return None
    (e0, before), (e1, after) = curve.iloc[-2:].items()
    return float(after - before), float(before), float(after), int(e0), int(e1)


def _val_sentences(scores: pd.DataFrame, cells: list[Cell]) -> list[str]:
    gaps = ood_gaps(scores)
    sentences = []
    for scenario, split in cells:
        readout, values = _cell_values(scores, scenario, REFERENCE, split)
        iid_name = iid_split(scores.loc[scores["scenario"] == scenario, "split"])
        _, iid = _cell_values(scores, scenario, REFERENCE, iid_name)
        gap = gaps[(gaps["scenario"] == scenario) & (gaps["loss"] == REFERENCE) & (gaps["split"] == split)]
        if values.empty or iid.empty or gap.empty:
            continue
        own, top, g = seed_summary(values), seed_summary(iid), gap.iloc[0]
        sentences.append(
            f"On {scenario}/{split}, {REFERENCE} ({readout}) reaches balanced accuracy {_num(own.mean)}"
            f"{_bracket(own.low, own.high)} against {_num(top.mean)}{_bracket(top.low, top.high)} on {iid_name}: "
            f"an OOD gap of {_num(g['mean'])} ({_gap_interval(g['low'], g['high'])})."
        )
    return sentences


def _reliance_words(row: Mapping[str, float]) -> str:
    """``ce (head; excess flip rate cue 0.12 vs confound 0.85 over null 0.04; cue index label-only 0.05 vs
    confound-only 0.80)``."""
    parts = [str(row["readout"])]
    if _pair(row, "cue", "confound"):
        null = row.get("null", math.nan)
        if math.isfinite(null):
            parts.append(
                f"excess flip rate cue {_num(row['cue'])} vs confound {_num(row['confound'])} over null {_num(null)}"
            )
        else:
            parts.append(f"flip rate cue {_num(row['cue'])} vs confound {_num(row['confound'])}")
    if _pair(row, "label_only", "confound_only"):
        parts.append(f"cue index label-only {_num(row['label_only'])} vs confound-only {_num(row['confound_only'])}")
    return f"{row['loss']} ({'; '.join(parts)})"


def _pair(row: Mapping[str, float], a: str, b: str) -> bool:
    return math.isfinite(row.get(a, math.nan)) and math.isfinite(row.get(b, math.nan))


def _on_confound(row: Mapping[str, float]) -> bool:
    """Whether the confound moves a loss's predictions more than the label cue does (flip rates first)."""
    if _pair(row, "cue", "confound"):
        return row["confound"] > row["cue"]
    return row["confound_only"] > row["label_only"]


def reliance_sentences(relied: pd.DataFrame | None, indexed: pd.DataFrame | None) -> list[str]:
    """(b) per scenario, which losses rely mostly on the confound and which on the label cue."""
    if relied is None and indexed is None:
        return ["The store has no explain tables, so which cue each loss relies on was not measured."]
    keys = ["scenario", "loss", "readout"]
    frames = []
    degenerate = []
    if relied is not None and not relied.empty:
        stuck = relied["degenerate"].fillna(0) > 0.5
        degenerate = [f"{r.loss} ({r.readout}) on {r.scenario}" for r in relied[stuck].itertuples()]
        relied = relied[~stuck]
        frames.append(relied[[*keys, "cue", "confound", "null"]])
    if indexed is not None and not indexed.empty:
        frames.append(indexed.groupby(keys)[["label_only", "confound_only"]].mean().reset_index())
    note = (
        [
            f"Degenerate (one class predicted on >= 95% of the rows in most seeds), so not read as relying on "
            f"anything: {', '.join(degenerate)}."
        ]
        if degenerate
        else []
    )
    if not frames:
        return [*note, "The explain tables have no label-cue or confound switch on a conflict split."]
    table = frames[0] if len(frames) == 1 else frames[0].merge(frames[1], on=keys, how="outer")
    if indexed is not None and degenerate:
        table = table[
            [f"{r['loss']} ({r['readout']}) on {r['scenario']}" not in degenerate for _, r in table.iterrows()]
        ]
    sentences = note
    for scenario, part in table.groupby("scenario", sort=True):
        rows = [
            r for r in part.to_dict("records") if _pair(r, "cue", "confound") or _pair(r, "label_only", "confound_only")
        ]
        confound = [_reliance_words(r) for r in rows if _on_confound(r)]
        cue = [_reliance_words(r) for r in rows if not _on_confound(r)]
        said = [
            f"{', '.join(group)} {'rely' if len(group) > 1 else 'relies'} mostly on the {what}"
            for group, what in ((confound, "confound"), (cue, "label cue"))
            if group
        ]
        if said:
            sentences.append(f"On {scenario}'s conflict splits (mean over seeds), {'; '.join(said)}.")
    return sentences


def _verdict(row: pd.Series) -> str:
    if row["n"] < MIN_SEEDS:
        return f"with {_seeds(row['n'])} the study cannot tell differences apart"
    return "significant after Holm correction" if row["significant"] else "within noise"


def _difference_words(row: pd.Series) -> str:
    """``+0.11 over 5 seeds (Holm-corrected 95% CI 0.05 to 0.17, adjusted p = 0.003)``."""
    text = f"{row['mean']:+.2f} over {_seeds(row['n'])}"
    if math.isfinite(row["p_holm"]):
        interval = _gap_interval(row["holm_low"], row["holm_high"], "Holm-corrected 95% CI")
        text += f" ({interval}, adjusted {_p(row['p_holm'])})"
    return text


def best_sentences(scores: pd.DataFrame, paired: pd.DataFrame, cells: list[Cell]) -> list[str]:
    """(c) per conflict split, the loss that keeps the most, and its difference to ce."""
    sentences = []
    for scenario, split in cells:
        cell = scores[(scores["scenario"] == scenario) & (scores["split"] == split)]
        means = cell.groupby(["loss", "readout"])["value"].mean().sort_values(ascending=False, kind="stable")
        if len(means) < 2:
            continue
        (best, readout), top = means.index[0], means.iloc[0]
        lead = f"On {scenario}/{split}, {best} ({readout}) keeps the most: balanced accuracy {_num(top)}"
        if REFERENCE not in set(cell["loss"]):
            sentences.append(f"{lead}; without {REFERENCE} there is no reference to test it against.")
            continue
        other = best if best != REFERENCE else means.index[1][0]
        found = paired[(paired["scenario"] == scenario) & (paired["split"] == split) & (paired["loss"] == other)]
        r = found.iloc[0]
        if best != REFERENCE:
            ce_mean = means[REFERENCE].iloc[0]
            sentences.append(
                f"{lead} against {_num(ce_mean)} for {REFERENCE} ({r['reference_readout']}), "
                f"a paired difference of {_difference_words(r)}: {_verdict(r)}."
            )
        else:
            sentences.append(
                f"{lead}; the next, {other} ({r['readout']}), differs from it by {_difference_words(r)}: {_verdict(r)}."
            )
    return sentences


def _listing(rows: pd.DataFrame) -> str:
    """``size-confound/test_iid: supcon (probe), simclr (probe); clean/test_iid: ...``."""
    groups = [
        f"{scenario}/{split}: " + ", ".join(f"{r.loss} ({r.readout})" for r in part.itertuples())
        for (scenario, split), part in rows.groupby(["scenario", "split"], sort=True)
    ]
    return "; ".join(groups)


def noise_sentences(paired: pd.DataFrame) -> list[str]:
    """(d) the claimed differences to ce, those within noise, and those the seeds cannot tell."""
    if paired.empty:
        return []
    tested, untested = paired[paired["n"] >= MIN_SEEDS], paired[paired["n"] < MIN_SEEDS]
    reference = f"{REFERENCE} ({paired['reference_readout'].iloc[0]})"
    rule = (
        f"a difference is claimed only with at least {MIN_SEEDS} paired seeds and a Holm-corrected 95% "
        "interval that excludes 0"
    )
    if tested.empty:
        return [f"With {_seeds(paired['n'].max())} the study cannot tell differences apart: {rule}."]
    significant, noise = tested[tested["significant"]], tested[~tested["significant"]]
    m = len(tested)
    family = f"Holm-corrected over all {m} differences to {reference}"
    if significant.empty:
        sentences = [f"{family}, none is significant."]
    else:
        claims = "; ".join(
            f"{r.loss} ({r.readout}) on {r.scenario}/{r.split} ({r.mean:+.2f})" for r in significant.itertuples()
        )
        count = "1 is" if len(significant) == 1 else f"{len(significant)} are"
        sentences = [f"{family}, {count} significant: {claims}."]
    if not noise.empty:
        sentences.append(f"Within noise against {reference} (the corrected interval includes 0): {_listing(noise)}.")
    if not untested.empty:
        sentences.append(
            f"With fewer than {MIN_SEEDS} paired seeds the study cannot tell these apart from "
            f"{reference}: {_listing(untested)}."
        )
    return sentences


def findings(
    metrics: pd.DataFrame,
    manifests: Manifests,
    reliance: pd.DataFrame | None = None,
    cue: pd.DataFrame | None = None,
    *,
    ceilings: Mapping[str, str] | None = None,
    dynamics: pd.DataFrame | None = None,
    history: pd.DataFrame | None = None,
    alpha: float = ALPHA,
) -> list[str]:
    """The report's opening sentences, built from the numbers only.

    Args:
        metrics: the store's ``metrics`` table (``Store.table("metrics")``).
        manifests: scenario -> its dataset manifest (``dataset.json``), for confounds and splits.
        reliance, cue: the store's explain tables (``None`` or empty when not measured).
        ceilings: each confounded scenario's matched ceiling (the study's ``ceilings``; default
            ``implied_ceilings``).
        dynamics: the store's ``dynamics`` table, for the regime sentence (``regime_sentences``).
        history: the store's ``history`` table, for the convergence sentence (``convergence_sentences``).
        alpha: the family-wise error rate of the claims.

    Returns:
        The budget regime and convergence; (a) ce's gap to the matched ceiling on each confounded
        scenario's conflict splits; (b) which cue each loss relies on there; (c) which loss keeps
        the most there and whether its lead over ce is claimed; (d) what is within noise, or that
        the seeds cannot tell.
    """
    readouts = readout_map(metrics)
    scores = own_scores(metrics, readouts)
    ceilings = implied_ceilings(manifests) if ceilings is None else ceilings
    if scores.empty:
        return ["The store holds no finished run with scores yet: nothing to report."]
    paired = paired_differences(scores, alpha=alpha)
    cells = conflict_cells(scores, manifests)
    on = {scenario: [split for s, split in cells if s == scenario] for scenario, _ in cells}
    relied = reliance_summary(reliance, readouts, on) if reliance is not None and len(reliance) else None
    indexed = cue_summary(cue, readouts, on) if cue is not None and len(cue) else None
    matched = matched_scores(metrics, ceilings, readouts)
    return [
        *regime_sentences(matched, dynamics, readouts, cells),
        *convergence_sentences(history),
        *ceiling_sentences(scores, ceilings, matched, cells),
        *reliance_sentences(relied, indexed),
        *best_sentences(scores, paired, cells),
        *noise_sentences(paired),
    ]
