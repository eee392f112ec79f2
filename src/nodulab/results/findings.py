"""The sentences a study report opens with, built from its seed-level numbers only (design.md
"Evaluation and explanation", "Findings").

First the budget regime (whether the matched ceiling is learnt and had plateaued) and convergence,
then: (a) ce's gap to the matched ceiling on each confounded scenario's conflict splits, with a
Welch interval over seeds; (b) which cue each loss relies on there: the seed-level interval of the
confound's minus the label cue's excess flip rate (over the null switches) must exclude 0, with at
least ``MIN_SEEDS`` seeds, else "not resolved"; a degenerate readout is named as such; (c) the
declared hypotheses (``comparisons.Hypotheses``) and what became of them; (d) per conflict split,
which loss keeps the most by the declared readout, over the same seeds as its test.

Only a declared (primary) comparison may be called significant: Holm's correction runs over that
family, and the interval carries both the seeds' and the fixed test set's noise
(``results.comparisons``). A comparison that is not resolved says what the study could have
detected and about how many seeds would resolve it. Every number in a sentence is in a table of
the same page.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import pandas as pd

from nodulab.common.seedstats import holm, seed_summary
from nodulab.results.comparisons import Hypotheses, comparisons, gaps_with_test_noise
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
    iid_split,
    implied_ceilings,
    matched_scores,
    ood_gaps,
    own_scores,
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
    scores: pd.DataFrame,
    ceilings: Mapping[str, str],
    matched: pd.DataFrame,
    cells: list[Cell],
    predictions: pd.DataFrame | None = None,
    readouts: Mapping[str, str] | None = None,
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
    gaps = gaps_with_test_noise(ceiling_gaps(scores, matched), predictions, readouts or {})
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
            f"images): a gap of {_num(r['gap'])} "
            f"({_gap_interval(r['gap_low'], r['gap_high'], _GAP_LEVEL[bool(r['gap_test_noise'])])})."
        )
    where = ", ".join(sorted(set(ceilings.values())))
    return sentences or [
        f"{REFERENCE} has no score of its matched ceiling ({where}) on the same images to read its conflict "
        "splits against."
    ]


_GAP_LEVEL = {True: "95% CI with the test set's noise", False: "95% CI"}

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


def _pair(row: Mapping[str, Any], a: str, b: str) -> bool:
    return math.isfinite(row.get(a, math.nan)) and math.isfinite(row.get(b, math.nan))


def _reliance_words(row: Mapping[str, Any]) -> str:
    """``ce (head; excess flip rate confound 0.85 vs cue 0.12 over null 0.04; confound − cue +0.73,
    95% CI 0.60 to 0.86 over 3 seeds)``."""
    null = row.get("null", math.nan)
    over = f" over null {_num(null)}" if math.isfinite(null) else ""
    kind = "excess flip rate" if math.isfinite(null) else "flip rate"
    return (
        f"{row['loss']} ({row['readout']}; {kind} confound {_num(row['confound'])} vs cue {_num(row['cue'])}{over}; "
        f"confound − cue {row['difference']:+.2f}, "
        f"{_gap_interval(row['difference_low'], row['difference_high'])} over {_seeds(row['seeds'])})"
    )


def reliance_sentences(relied: pd.DataFrame | None) -> list[str]:
    """(b) per scenario, which losses rely on the confound or on the label cue: claimed only with at
    least ``MIN_SEEDS`` seeds and a seed-level interval of (confound − cue) excess flip rates that
    excludes 0; otherwise "not resolved". A degenerate readout is named as such."""
    if relied is None:
        return ["The store has no explain tables, so which cue each loss relies on was not measured."]
    if relied.empty:
        return ["The explain tables have no label-cue or confound switch on a conflict split."]
    sentences = []
    for scenario, part in relied.groupby("scenario", sort=True):
        rows = part.to_dict("records")
        said = []
        for verdict, one, many in (
            ("confound", "relies on the confound", "rely on the confound"),
            ("cue", "relies on the label cue", "rely on the label cue"),
            ("not resolved", "is not resolved (the interval includes 0)", "are not resolved (the interval includes 0)"),
        ):
            group = [_reliance_words(r) for r in rows if r["verdict"] == verdict and _pair(r, "cue", "confound")]
            if group:
                said.append(f"{', '.join(group)} {one if len(group) == 1 else many}")
        stuck = [f"{r['loss']} ({r['readout']})" for r in rows if r["verdict"] == "degenerate"]
        if stuck:
            said.append(
                f"{', '.join(stuck)} {'is' if len(stuck) == 1 else 'are'} degenerate (one class on >= 95% of the "
                "rows), so not read as relying on anything"
            )
        few = [f"{r['loss']} ({r['readout']}, {_seeds(r['seeds'])})" for r in rows if r["verdict"] == "cannot tell"]
        if few:
            said.append(f"with fewer than {MIN_SEEDS} seeds the study cannot tell for {', '.join(few)}")
        if said:
            sentences.append(f"On {scenario}'s conflict splits, {'; '.join(said)}.")
    return sentences


def _verdict(row: Mapping[str, Any]) -> str:
    """What a comparison supports, in words (see ``comparisons``)."""
    if row["n"] < MIN_SEEDS:
        return f"with {_seeds(row['n'])} the study cannot tell"
    if not row["primary"]:
        excludes = row["low"] > 0 or row["high"] < 0
        return (
            "exploratory (not a declared hypothesis; its uncorrected interval "
            f"{'excludes' if excludes else 'includes'} 0), never claimed"
        )
    if row["significant"]:
        return "significant after Holm correction over the declared family"
    if row["test_noise"] and abs(row["mean"]) <= row["smallest"]:
        return "at most one test sample, never claimed"
    needed = row["seeds_needed"]
    more = (
        f"about {int(needed)} seeds would resolve the observed difference"
        if isinstance(needed, (int, float)) and math.isfinite(needed) and needed > row["n"]
        else "more seeds alone would not resolve it (the test set's noise is too large for it)"
    )
    return f"not resolved: detectable ≥ {_num(row['detectable'])} with {_seeds(row['n'])}; {more}"


def _difference_words(row: Mapping[str, Any]) -> str:
    """``+0.11 (95% CI with the test set's noise 0.05 to 0.17; Holm-corrected 0.03 to 0.19, adjusted p = 0.003)``."""
    noise = "95% CI with the test set's noise" if row["test_noise"] else "95% CI over seeds (no per-sample predictions)"
    text = f"{row['mean']:+.2f} ({_gap_interval(row['low'], row['high'], noise)}"
    if row["primary"] and math.isfinite(row["p_holm"]):
        corrected = _gap_interval(row["holm_low"], row["holm_high"], "95% CI")
        text += f"; Holm-corrected {corrected}, adjusted {_p(row['p_holm'])}"
    elif math.isfinite(row["p"]):
        text += f"; {_p(row['p'])}"
    return text + ")"


def best_sentences(compared: pd.DataFrame, cells: list[Cell], readout: str) -> list[str]:
    """(c) per conflict split, the loss that keeps the most by the ``readout`` comparison, over the
    same seeds as its test against the reference."""
    sentences = []
    for scenario, split in cells:
        rows = compared[
            (compared["scenario"] == scenario) & (compared["split"] == split) & (compared["readout_mode"] == readout)
        ]
        if rows.empty:
            continue
        top = rows.loc[rows["mean"].idxmax()].to_dict()
        how = f"On {scenario}/{split} ({_READOUT_WORDS[readout]})"
        reference = f"{top['reference']} ({top['reference_readout']})"
        if top["mean"] > 0:
            sentences.append(
                f"{how}, {top['loss']} ({top['readout']}) keeps the most: balanced accuracy {_num(top['loss_mean'])} "
                f"against {_num(top['reference_mean'])} for {reference} over the same {_seeds(top['n'])}, a "
                f"difference of {_difference_words(top)}: {_verdict(top)}."
            )
        else:
            sentences.append(
                f"{how}, {reference} keeps the most; the next, {top['loss']} ({top['readout']}), has "
                f"{_num(top['loss_mean'])} against {_num(top['reference_mean'])} over the same {_seeds(top['n'])}, "
                f"a difference of {_difference_words(top)}: {_verdict(top)}."
            )
    return sentences


_READOUT_WORDS = {
    "own": "each loss's own readout",
    "probe": "every loss by its linear probe",
    "dfr": "every loss by DFR",
}


def hypotheses_sentences(hypotheses: Hypotheses, compared: pd.DataFrame) -> list[str]:
    """Which comparisons are primary (declared), how many were tested, and what became of them."""
    if not hypotheses.declared:
        return [
            "The study declares no hypotheses ([hypotheses] in the study file), so every comparison is "
            "exploratory: uncorrected 95% intervals, none called significant."
        ]
    family = compared[compared["primary"] & (compared["n"] >= MIN_SEEDS)]
    where = ", ".join(hypotheses.comparisons)
    lead = (
        f"Declared hypotheses: {_READOUT_WORDS.get(hypotheses.readout, hypotheses.readout)} against "
        f"{hypotheses.reference} on {where}; Holm's correction runs over "
        f"{'this comparison' if len(family) == 1 else f'these {len(family)} comparisons'} only, and every other "
        "comparison is exploratory."
    )
    if family.empty:
        return [f"{lead} None has {MIN_SEEDS} paired seeds yet, so none is tested."]
    claimed = family[family["significant"]]
    open_ = family[~family["significant"]]
    sentences = [lead]
    if len(claimed):
        sentences.append(
            "Significant: "
            + "; ".join(
                f"{r.loss} ({r.readout}) on {r.scenario}/{r.split} ({r.mean:+.2f})" for r in claimed.itertuples()
            )
            + "."
        )
    if len(open_):
        sentences.append(
            "Not resolved: "
            + "; ".join(
                f"{r['loss']} ({r['readout']}) on {r['scenario']}/{r['split']} "
                f"({r['mean']:+.2f}; {_verdict(r).removeprefix('not resolved: ')})"
                for r in open_.to_dict("records")
            )
            + "."
        )
    return sentences


def findings(
    metrics: pd.DataFrame,
    manifests: Manifests,
    reliance: pd.DataFrame | None = None,
    *,
    predictions: pd.DataFrame | None = None,
    hypotheses: Hypotheses | None = None,
    compared: pd.DataFrame | None = None,
    ceilings: Mapping[str, str] | None = None,
    dynamics: pd.DataFrame | None = None,
    history: pd.DataFrame | None = None,
    alpha: float = ALPHA,
) -> list[str]:
    """The report's opening sentences, built from the numbers only.

    Args:
        metrics: the store's ``metrics`` table (``Store.table("metrics")``).
        manifests: scenario -> its dataset manifest (``dataset.json``), for confounds and splits.
        reliance: the store's ``reliance`` table (``None`` or empty when not measured).
        predictions: the store's ``predictions`` table (per-sample; without it the intervals are the
            seeds' only, and say so).
        hypotheses: the study's declared hypotheses (``comparisons.hypotheses_of``; none: every
            comparison is exploratory).
        compared: ``comparisons`` of these tables, when the caller has them already.
        ceilings: each confounded scenario's matched ceiling (the study's ``ceilings``; default
            ``implied_ceilings``).
        dynamics: the store's ``dynamics`` table, for the regime sentence (``regime_sentences``).
        history: the store's ``history`` table, for the convergence sentence (``convergence_sentences``).
        alpha: the family-wise error rate of the claims.

    Returns:
        The budget regime and convergence; (a) ce's gap to the matched ceiling on each confounded
        scenario's conflict splits; (b) which cue each loss relies on there; (c) the declared
        hypotheses and their verdicts; (d) which loss keeps the most on each conflict split.
    """
    readouts = readout_map(metrics)
    scores = own_scores(metrics, readouts)
    ceilings = implied_ceilings(manifests) if ceilings is None else ceilings
    if scores.empty:
        return ["The store holds no finished run with scores yet: nothing to report."]
    hypotheses = hypotheses or Hypotheses()
    if compared is None:
        compared = comparisons(metrics, predictions, readouts, hypotheses, alpha=alpha)
    cells = conflict_cells(scores, manifests)
    on = {scenario: [split for s, split in cells if s == scenario] for scenario, _ in cells}
    relied = reliance_summary(reliance, readouts, on) if reliance is not None and len(reliance) else None
    matched = matched_scores(metrics, ceilings, readouts)
    return [
        *regime_sentences(matched, dynamics, readouts, cells),
        *convergence_sentences(history),
        *ceiling_sentences(scores, ceilings, matched, cells, predictions, readouts),
        *reliance_sentences(relied),
        *hypotheses_sentences(hypotheses, compared),
        *best_sentences(compared, cells, hypotheses.readout),
    ]
