"""The counterfactual switches of ``nodulab explain`` (design.md "Evaluation and explanation"):
which factor changes, how.

A switch takes a split's factor rows and returns the rows it applies to, each with one factor
changed and everything else (the render seed included) kept, so the re-rendered image differs
from the stored one only where that factor acts. The table (README, "What each model learned"):

- ``cue``: the label cue. For the presets (malignant = spiculated, benign = round) the spicules
  are removed or added with the body unchanged: spiculated rows get ``n_spicules`` 0 (shape stays
  spiculated, so the body keeps its x0.3 lobulation), round rows become spiculated with
  ``lobulation`` 0 (a round body expresses none) and their latent ``n_spicules``. Other label
  rules set the label factor to the other class's value.
- ``confound``: each confound of the scenario to its other branch, a seeded draw from that
  branch's distribution (the sampler's machinery, its own stream per split and branch).
- ``nuisance``: fixed switches of the remaining factors (attenuation solid <-> ground glass,
  diameter, margin, noise, kernel, vessels), both directions as separate rows; where the rows
  carry the opt-in shape columns also elongation <0.2 -> 0.4, >=0.2 -> 0; irregularity <0.08 ->
  0.15, >=0.08 -> 0; spicule_grade (spiculated rows with spicules) <0.6 -> 1, >=0.6 -> 0.25.
- ``robustness``: a fixed switch whose output lies outside the training split's support
  (``rows_in_support``, read from the resolved scenario in ``dataset.json``), e.g. vessels 0 -> 3
  when training had none, or noise beyond the training range: what the model does off its
  training support, not what it relies on.
- ``null``: switches that should change no prediction, each applied to every row: ``rerender``
  (the same lesion rendered again with a fresh nuisance draw, texture, vessels and noise, through
  the renderer's ``view`` as training's re-rendered views do: ``Switch.view`` = ``NULL_VIEW``, no
  column changes), ``rotation_deg`` r -> r+90 and ``offset_mm`` (the centre mirrored about the
  patch centre on every axis at once: x and y, and z in 3D; rows exactly at the centre are left
  out). Their flips are the floor a classifier flips at anyway (``counterfactual``'s
  ``null_flip_rate``, ``excess_flip_rate``).

Every switch that changes ``diameter_mm`` (the fixed one, a size confound's, the sweep) keeps the
spicules in millimetres (``with_diameter``): the renderer draws a spicule's length as
``spicule_length_rel x diameter / 2``, so ``spicule_length_rel`` is rescaled by old / new diameter
and each spicule keeps its length beyond the body and its width (``spicule_width_mm``), and the
switch changes size only.

Support (``rows_in_support``; ``Switch.in_support``): a switch is in the training support when
every column it touches, on every row it applies to, lies in what the ``train`` split could draw
(the union over confound branches); ``spicule_length_rel`` is judged in millimetres, the row's
``spicule_length_rel x diameter_mm / 2`` against ``[rel_lo x d_lo / 2, rel_hi x d_hi / 2]`` of
the training distributions. The same check decides ``nuisance`` vs ``robustness``; a null switch
off the support keeps kind ``null``, is recorded with ``in_support`` 0 and does not count toward
the null rate. The label factor and the confounds get no fixed or null switch (a switch touching
either column is left out).

A switched lesion must still fit the patch (design.md "Scenarios": radius x (body_reach + spicule length) +
largest offset <= half the field of view; body_reach is 1 without elongation and irregularity);
rows that would not are left out and counted (``skipped``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

from nodulab.synth.factors import FACTORS, OPTIONAL
from nodulab.synth.sampling import _draw, _stream
from nodulab.synth.scenario import Choice, Normal, Scenario, Uniform, dist_support, dist_values
from nodulab.synth.scenarios import split_distributions
from nodulab.synth.shapes import GRADE_LENGTH_FLOOR, body_reach

KINDS = ("cue", "confound", "nuisance", "robustness", "null")
TRAIN_SPLIT = "train"
NULL_VIEW = 0x9E3779B9
"""The render ``view`` of the ``rerender`` null switch: a fixed non-zero id (0 is the stored image),
so the fresh nuisance draw is the same on every run (each row's draw still comes from its seed)."""
OFFSET_AXES = ("offset_x_mm", "offset_y_mm", "offset_z_mm")

Change = Callable[[pd.DataFrame], tuple[np.ndarray, pd.DataFrame]]
"""Rows -> (positions of the rows it applies to, those rows switched)."""


@dataclass(frozen=True)
class Switch:
    """One counterfactual switch.

    Attributes:
        factor: the factor it changes (``reliance.csv``'s ``factor``; ``rerender`` and
            ``offset_mm`` for two null switches).
        kind: ``cue``, ``confound``, ``nuisance``, ``robustness`` or ``null`` (``KINDS``).
        value_from: the values of the rows it applies to, in words.
        value_to: the values they get.
        columns: every column it may change (the cue switch sets two or three, a diameter switch
            also ``spicule_length_rel``, the re-render none).
        change: the function doing it (rows it does not apply to are left out).
        view: the render view of the switched rows (0: as stored; ``NULL_VIEW``: fresh nuisance).
        in_support: whether every touched column of every row it applies to (the rows given to
            ``build_switches``) lies in the training support (``rows_in_support``).
    """

    factor: str
    kind: str
    value_from: str
    value_to: str
    columns: tuple[str, ...]
    change: Change
    view: int = 0
    in_support: bool = True


# ----------------------------------------------------------------------------- helpers
def describe(dist: object) -> str:
    """A distribution in a few characters: ``13..18``, ``solid|part_solid``, ``0``."""
    if isinstance(dist, Uniform):
        return f"{dist.uniform[0]:g}..{dist.uniform[1]:g}"
    if isinstance(dist, Normal):
        return f"N({dist.normal[0]:g},{dist.normal[1]:g})"
    if isinstance(dist, Choice):
        return "|".join(str(v) for v in dist.choice)
    return f"{dist:g}" if isinstance(dist, (int, float)) else str(dist)


def _column(rows: pd.DataFrame, name: str) -> np.ndarray:
    """An opt-in factor's values, or its neutral value where the rows lack the column."""
    return rows[name].to_numpy(dtype=float) if name in rows else np.full(len(rows), OPTIONAL[name])


def fits(rows: pd.DataFrame, size: int, dim: int) -> np.ndarray:
    """Which rows' lesions fit the patch (the scenario rule of design.md "Scenarios", per row).

    The body radius is ``diameter / 2 x body_reach`` (elongation and irregularity stretch it; 1
    without them) and a graded spicule's length is scaled as the renderer scales it.
    """
    grade = _column(rows, "spicule_grade")
    count = np.where(grade != 1.0, np.ceil(rows["n_spicules"].to_numpy() * grade - 1e-9), rows["n_spicules"].to_numpy())
    spiculated = (rows["shape"].to_numpy() == "spiculated") & (count > 0)
    length = np.where(grade != 1.0, GRADE_LENGTH_FLOOR + (1 - GRADE_LENGTH_FLOOR) * grade, 1.0)
    spicule = np.where(spiculated, rows["spicule_length_rel"].to_numpy(dtype=float) * length, 0.0)
    reach = body_reach(_column(rows, "elongation"), _column(rows, "irregularity"), dim)
    axes = ("offset_z_mm", "offset_y_mm", "offset_x_mm")[3 - dim :]
    offset = np.max(np.abs(rows[list(axes)].to_numpy(dtype=float)), axis=1)
    need = rows["diameter_mm"].to_numpy(dtype=float) / 2 * (reach + spicule) + offset
    return need <= size * rows["pixel_mm"].to_numpy(dtype=float) / 2 + 1e-9


def with_diameter(rows: pd.DataFrame, diameter_mm: float | np.ndarray) -> pd.DataFrame:
    """A copy of ``rows`` at diameter ``diameter_mm`` with every spicule kept in millimetres.

    The renderer draws a spicule's length as ``spicule_length_rel x diameter / 2`` (times the
    row's own random factor and, when graded, the grade's) beyond the body radius ``diameter / 2``,
    and its width in mm (``spicule_width_mm``). Setting the diameter alone would lengthen the
    spicules with the body; here ``spicule_length_rel`` becomes ``rel x d_old / d_new``, so each
    spicule's tip minus the body radius and its width stay as they were: the switch changes size
    only. Every switch and sweep of ``diameter_mm`` goes through here.
    """
    out = rows.copy()
    old = rows["diameter_mm"].to_numpy(dtype=float)
    new = np.broadcast_to(np.asarray(diameter_mm, dtype=float), old.shape).copy()
    out["diameter_mm"] = new
    out["spicule_length_rel"] = rows["spicule_length_rel"].to_numpy(dtype=float) * old / new
    return out


# ----------------------------------------------------------------------------- training support
def _within(values: np.ndarray, intervals: list[tuple[float, float]]) -> np.ndarray:
    found = [(values >= lo - 1e-9) & (values <= hi + 1e-9) for lo, hi in intervals]
    return np.logical_or.reduce(found) if found else np.zeros(len(values), bool)


def _intervals(s: Scenario, name: str) -> list[tuple[float, float]]:
    """Closed intervals covering every value ``train`` could draw for numeric factor ``name``."""
    factor = FACTORS[name]
    return [iv for dist in split_distributions(s, TRAIN_SPLIT, name) for iv in dist_support(dist, factor)]


def support(s: Scenario, name: str, values: np.ndarray) -> np.ndarray:
    """Per value: whether the training split could draw it for factor ``name`` (any confound branch)."""
    values = np.asarray(values)
    if FACTORS[name].kind == "category":
        allowed = set().union(*(dist_values(d) for d in split_distributions(s, TRAIN_SPLIT, name)))
        return np.isin(values.astype(object), list(allowed))
    return _within(values.astype(float), _intervals(s, name))


def spicule_mm_support(s: Scenario) -> list[tuple[float, float]]:
    """Intervals of spicule length in mm (``spicule_length_rel x diameter_mm / 2``) the training
    split could draw: ``[rel_lo x d_lo / 2, rel_hi x d_hi / 2]`` for every pair of their intervals."""
    return [
        (rel_lo * d_lo / 2, rel_hi * d_hi / 2)
        for rel_lo, rel_hi in _intervals(s, "spicule_length_rel")
        for d_lo, d_hi in _intervals(s, "diameter_mm")
    ]


def rows_in_support(s: Scenario, rows: pd.DataFrame, columns: tuple[str, ...] | list[str]) -> np.ndarray:
    """Per row: whether every one of ``columns`` lies in the training split's support.

    ``spicule_length_rel`` is judged in mm with the row's own diameter (``spicule_mm_support``);
    every other factor on its own (``support``). Columns that are not factors are not judged.
    """
    ok = np.ones(len(rows), bool)
    for name in columns:
        if name not in FACTORS:
            continue
        if name == "spicule_length_rel":
            mm = rows[name].to_numpy(dtype=float) * rows["diameter_mm"].to_numpy(dtype=float) / 2
            ok &= _within(mm, spicule_mm_support(s))
        else:
            ok &= support(s, name, rows[name].to_numpy())
    return ok


def in_support(s: Scenario, name: str, values: np.ndarray) -> bool:
    """Whether every value lies in what the training split could draw for factor ``name``."""
    return bool(support(s, name, values).all()) if len(values) else True


def switch_in_support(s: Scenario, switch: Switch, rows: pd.DataFrame) -> bool:
    """Whether every column ``switch`` touches, on every row of ``rows`` it applies to, is in support."""
    _, switched = switch.change(rows)
    return bool(rows_in_support(s, switched, switch.columns).all())


def _set(name: str, select: Callable[[np.ndarray], np.ndarray], new: Callable[[np.ndarray], np.ndarray]) -> Change:
    """A change of one column: rows where ``select(values)``, given ``new(values)``."""

    def change(rows: pd.DataFrame) -> tuple[np.ndarray, pd.DataFrame]:
        values = rows[name].to_numpy()
        where = np.flatnonzero(select(values))
        switched = rows.iloc[where].copy()
        switched[name] = new(values[where])
        return where, switched

    return change


def _set_diameter(select: Callable[[np.ndarray], np.ndarray], new: Callable[[np.ndarray], np.ndarray]) -> Change:
    """A change of ``diameter_mm`` keeping the spicules in mm (``with_diameter``)."""

    def change(rows: pd.DataFrame) -> tuple[np.ndarray, pd.DataFrame]:
        values = rows["diameter_mm"].to_numpy(dtype=float)
        where = np.flatnonzero(select(values))
        return where, with_diameter(rows.iloc[where], new(values[where]))

    return change


DIAMETER_COLUMNS = ("diameter_mm", "spicule_length_rel")
"""The columns a switch of ``diameter_mm`` touches (``with_diameter``)."""


def _columns_of(name: str) -> tuple[str, ...]:
    return DIAMETER_COLUMNS if name == "diameter_mm" else (name,)


# ----------------------------------------------------------------------------- the label cue
def _spicule_switches() -> list[Switch]:
    """Spicules removed or added, the body (region 1 of the mask) bit-identical."""

    def remove(rows: pd.DataFrame) -> tuple[np.ndarray, pd.DataFrame]:
        where = np.flatnonzero((rows["shape"].to_numpy() == "spiculated") & (rows["n_spicules"].to_numpy() > 0))
        switched = rows.iloc[where].copy()
        switched["n_spicules"] = 0  # shape stays spiculated: the body keeps its x0.3 lobulation
        return where, switched

    def add(rows: pd.DataFrame) -> tuple[np.ndarray, pd.DataFrame]:
        # Only round bodies: they express no lobulation, and spiculated with lobulation 0 expresses
        # none either, so the body is the same. Lobulated rows would change body: left out.
        where = np.flatnonzero((rows["shape"].to_numpy() == "round") & (rows["n_spicules"].to_numpy() > 0))
        switched = rows.iloc[where].copy()
        switched["shape"], switched["lobulation"] = "spiculated", 0.0
        return where, switched

    return [
        Switch("shape", "cue", "spiculated", "spicules_removed", ("n_spicules",), remove),
        Switch("shape", "cue", "round", "spicules_added", ("shape", "lobulation"), add),
    ]


def cue_switches(s: Scenario) -> list[Switch]:
    """The label cue's switches, both directions."""
    label = s.label
    if label.factor == "shape" and label.malignant == "spiculated":
        return _spicule_switches()
    out = []
    for benign in label.benign:
        for a, b in ((label.malignant, benign), (benign, label.malignant)):
            change = _set(label.factor, lambda v, a=a: v == a, lambda v, b=b: np.full(len(v), b, dtype=object))
            out.append(Switch(label.factor, "cue", a, b, (label.factor,), change))
    return out


# ----------------------------------------------------------------------------- confounds
def confound_switches(s: Scenario, split: str, dataset_seed: int, split_n: int) -> list[Switch]:
    """Each confound to its other branch: a seeded draw from that branch, per row.

    The draws come from the sampler's own machinery on a stream keyed by (dataset seed, split,
    ``explain/<factor>/<branch>``), ``split_n`` of them indexed by the row's ``index``, so a row
    gets the same value whatever ``--n`` is. A ``diameter_mm`` confound keeps the spicules in mm
    (``with_diameter``): the switch changes size only.
    """
    out = []
    for c in s.confounds:
        factor = FACTORS[c.factor]
        branches = {"malignant": c.malignant, "benign": c.benign}
        draws = {
            b: _draw(d, factor, split_n, _stream(dataset_seed, split, f"explain/{c.factor}/{b}"))
            for b, d in branches.items()
        }
        for source, target in (("malignant", "benign"), ("benign", "malignant")):

            def change(
                rows: pd.DataFrame, c=c, source=source, target=target, draws=draws
            ) -> tuple[np.ndarray, pd.DataFrame]:
                # A row is in the malignant branch when its confound agreed with a malignant label
                # or disagreed with a benign one.
                in_malignant = (rows["label"].to_numpy() == 1) == (rows[f"agrees_{c.factor}"].to_numpy() == 1)
                where = np.flatnonzero(in_malignant == (source == "malignant"))
                index = rows["index"].to_numpy() if "index" in rows else np.arange(len(rows))  # a fresh table: 0..n-1
                new = draws[target][index[where]]
                if c.factor == "diameter_mm":
                    return where, with_diameter(rows.iloc[where], new)
                switched = rows.iloc[where].copy()
                switched[c.factor] = new
                return where, switched

            out.append(
                Switch(
                    c.factor,
                    "confound",
                    describe(branches[source]),
                    describe(branches[target]),
                    _columns_of(c.factor),
                    change,
                )
            )
    return out


# ----------------------------------------------------------------------------- the rest
def _pair(name: str, low: float, high: float) -> list[Switch]:
    """``low <-> high``: rows below the midpoint go to ``high``, the others to ``low``."""
    mid = (low + high) / 2
    out = []
    for value_from, select, value in ((f"<{mid:g}", lambda v: v < mid, high), (f">={mid:g}", lambda v: v >= mid, low)):
        new = lambda v, value=value: np.full(len(v), value)  # noqa: E731
        change = _set_diameter(select, new) if name == "diameter_mm" else _set(name, select, new)
        out.append(Switch(name, "nuisance", value_from, f"{value:g}", _columns_of(name), change))
    return out


def _fixed_switches() -> list[Switch]:
    """The fixed switches (kind ``nuisance`` until ``build_switches`` judges their support)."""
    out: list[Switch] = []
    for a, b in (("solid", "ground_glass"), ("ground_glass", "solid")):
        change = _set("attenuation", lambda v, a=a: v == a, lambda v, b=b: np.full(len(v), b, dtype=object))
        out.append(Switch("attenuation", "nuisance", a, b, ("attenuation",), change))
    out += _pair("diameter_mm", 8.0, 16.0)
    out += _pair("margin_sigma_mm", 0.2, 0.8)
    out += _pair("noise_hu", 10.0, 30.0)
    out.append(
        Switch(
            "noise_hu",
            "nuisance",
            "<60",
            "60",
            ("noise_hu",),
            _set("noise_hu", lambda v: v < 60, lambda v: np.full(len(v), 60.0)),
        )
    )
    out += _pair("kernel_fwhm_mm", 0.6, 1.2)
    out.append(
        Switch(
            "vessels",
            "nuisance",
            "0",
            "3",
            ("vessels",),
            _set("vessels", lambda v: v == 0, lambda v: np.full(len(v), 3)),
        )
    )
    out.append(
        Switch(
            "vessels",
            "nuisance",
            ">0",
            "0",
            ("vessels",),
            _set("vessels", lambda v: v > 0, lambda v: np.zeros(len(v), dtype=np.int64)),
        )
    )
    return out


def _shape_switches(rows: pd.DataFrame) -> list[Switch]:
    """Switches of the opt-in shape factors, for the columns the rows carry."""
    out: list[Switch] = []
    for name, mid, high in (("elongation", 0.2, 0.4), ("irregularity", 0.08, 0.15)):
        if name in rows:
            up = _set(name, lambda v, m=mid: v < m, lambda v, h=high: np.full(len(v), h))
            down = _set(name, lambda v, m=mid: v >= m, lambda v: np.zeros(len(v)))
            out.append(Switch(name, "nuisance", f"<{mid:g}", f"{high:g}", (name,), up))
            out.append(Switch(name, "nuisance", f">={mid:g}", "0", (name,), down))
    if "spicule_grade" in rows:
        spiculated = (rows["shape"].to_numpy() == "spiculated") & (rows["n_spicules"].to_numpy() > 0)
        for value_from, value_to, select in (("<0.6", 1.0, lambda v: v < 0.6), (">=0.6", 0.25, lambda v: v >= 0.6)):

            def change(r: pd.DataFrame, select=select, value_to=value_to) -> tuple[np.ndarray, pd.DataFrame]:
                spiky = (r["shape"].to_numpy() == "spiculated") & (r["n_spicules"].to_numpy() > 0)
                where = np.flatnonzero(spiky & select(r["spicule_grade"].to_numpy(dtype=float)))
                switched = r.iloc[where].copy()
                switched["spicule_grade"] = value_to
                return where, switched

            if spiculated.any():
                out.append(Switch("spicule_grade", "nuisance", value_from, f"{value_to:g}", ("spicule_grade",), change))
    return out


# ----------------------------------------------------------------------------- null switches
def _rerender(rows: pd.DataFrame) -> tuple[np.ndarray, pd.DataFrame]:
    """Every row as it is: the switch is the render view (``NULL_VIEW``), not a column."""
    return np.arange(len(rows)), rows.copy()


def null_switches(dim: int) -> list[Switch]:
    """The switches that should change no prediction, each for every row (module docstring).

    ``rerender``: the same rows rendered at ``NULL_VIEW`` (fresh texture, vessels and noise; the
    lesion identical, as training's ``rerender_views``); ``rotation_deg`` r -> r+90 (mod 360);
    ``offset_mm``: the centre mirrored about the patch centre on every axis at once (rows exactly
    at the centre left out: the mirror would be the row itself).
    """
    axes = OFFSET_AXES[:dim]

    def mirror(rows: pd.DataFrame) -> tuple[np.ndarray, pd.DataFrame]:
        values = rows[list(axes)].to_numpy(dtype=float)
        where = np.flatnonzero((values != 0).any(axis=1))
        switched = rows.iloc[where].copy()
        for a, axis in enumerate(axes):
            switched[axis] = -values[where, a]
        return where, switched

    letters = "".join(axis.split("_")[1] for axis in axes)
    rotate = _set("rotation_deg", lambda v: np.ones(len(v), bool), lambda v: np.mod(v.astype(float) + 90.0, 360.0))
    return [
        Switch("rerender", "null", "stored", "redrawn", (), _rerender, view=NULL_VIEW),
        Switch("rotation_deg", "null", "r", "r+90", ("rotation_deg",), rotate),
        Switch("offset_mm", "null", letters, f"-{letters}", axes, mirror),
    ]


def build_switches(s: Scenario, split: str, dataset_seed: int, split_n: int, rows: pd.DataFrame) -> list[Switch]:
    """The documented switch list for one split (README), support judged against ``train``.

    Args:
        s: the resolved scenario of the dataset (``dataset.json``).
        split: the split explained (names the confound draws' stream).
        dataset_seed: the dataset's seed.
        split_n: the split's full row count (confound draws do not depend on ``--n``).
        rows: the rows explained; each switch's ``in_support`` is judged on what it gives them
            (``rows_in_support``), and a fixed switch off the support is ``robustness``.

    Returns:
        Cue switches, then confound switches, then the fixed ones, then the null ones (a fixed or
        null switch touching the label factor or a confound is left out; offset z only in 3D).
    """
    switches = [
        replace(w, in_support=switch_in_support(s, w, rows))
        for w in cue_switches(s) + confound_switches(s, split, dataset_seed, split_n)
    ]
    taken = {s.label.factor, *(c.factor for c in s.confounds)}
    for w in _fixed_switches() + _shape_switches(rows) + null_switches(s.image.dim):
        if taken & {w.factor, *w.columns}:
            continue
        ok = switch_in_support(s, w, rows)
        kind = w.kind if w.kind == "null" else ("nuisance" if ok else "robustness")
        switches.append(replace(w, kind=kind, in_support=ok))
    return switches
