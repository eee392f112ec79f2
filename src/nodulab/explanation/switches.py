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
  diameter, margin, noise, kernel, vessels, rotation, offset), both directions as separate rows;
  where the rows carry the opt-in shape columns also elongation <0.2 -> 0.4, >=0.2 -> 0;
  irregularity <0.08 -> 0.15, >=0.08 -> 0; spicule_grade (spiculated rows with spicules)
  <0.6 -> 1, >=0.6 -> 0.25.
- ``robustness``: any switch whose new values lie outside the training split's distribution
  (read from the resolved scenario in ``dataset.json``), e.g. vessels 0 -> 3 when training had
  none, or noise beyond the training range: what the model does off its training support, not
  what it relies on.

A switched lesion must still fit the patch (design.md "Scenarios": radius x (body_reach + spicule length) +
largest offset <= half the field of view; body_reach is 1 without elongation and irregularity);
rows that would not are left out and counted (``skipped``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from nodulab.synth.factors import FACTORS, OPTIONAL
from nodulab.synth.sampling import _draw, _stream
from nodulab.synth.scenario import Choice, Normal, Scenario, Uniform, normal_bounds
from nodulab.synth.scenarios import split_distributions
from nodulab.synth.shapes import GRADE_LENGTH_FLOOR, body_reach

KINDS = ("cue", "confound", "nuisance", "robustness")
TRAIN_SPLIT = "train"

Change = Callable[[pd.DataFrame], tuple[np.ndarray, pd.DataFrame]]
"""Rows -> (positions of the rows it applies to, those rows switched)."""


@dataclass(frozen=True)
class Switch:
    """One counterfactual switch.

    Attributes:
        factor: the factor it changes (``reliance.csv``'s ``factor``).
        kind: ``cue``, ``confound``, ``nuisance`` or ``robustness``.
        value_from: the values of the rows it applies to, in words.
        value_to: the values they get.
        columns: every column it may change (the cue switch sets two or three).
        change: the function doing it (rows it does not apply to are left out).
    """

    factor: str
    kind: str
    value_from: str
    value_to: str
    columns: tuple[str, ...]
    change: Change


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


def in_support(s: Scenario, name: str, values: np.ndarray) -> bool:
    """Whether every value lies in what the training split could draw for factor ``name``."""
    factor, found = FACTORS[name], []
    for dist in split_distributions(s, TRAIN_SPLIT, name):
        if factor.kind == "category":
            found.append(np.isin(values, list(dist.choice if isinstance(dist, Choice) else [dist])))
            continue
        if isinstance(dist, Uniform):
            lo, hi = dist.uniform
        elif isinstance(dist, Normal):
            lo, hi = normal_bounds(dist, factor)
        else:
            choices = np.asarray(dist.choice if isinstance(dist, Choice) else [dist], dtype=float)
            found.append(np.isin(values.astype(float), choices))
            continue
        found.append((values.astype(float) >= lo - 1e-9) & (values.astype(float) <= hi + 1e-9))
    return bool(np.logical_or.reduce(found).all()) if len(values) else True


def _set(name: str, select: Callable[[np.ndarray], np.ndarray], new: Callable[[np.ndarray], np.ndarray]) -> Change:
    """A change of one column: rows where ``select(values)``, given ``new(values)``."""

    def change(rows: pd.DataFrame) -> tuple[np.ndarray, pd.DataFrame]:
        values = rows[name].to_numpy()
        where = np.flatnonzero(select(values))
        switched = rows.iloc[where].copy()
        switched[name] = new(values[where])
        return where, switched

    return change


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
    gets the same value whatever ``--n`` is.
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
                switched = rows.iloc[where].copy()
                index = rows["index"].to_numpy() if "index" in rows else np.arange(len(rows))  # a fresh table: 0..n-1
                switched[c.factor] = draws[target][index[where]]
                return where, switched

            out.append(
                Switch(
                    c.factor, "confound", describe(branches[source]), describe(branches[target]), (c.factor,), change
                )
            )
    return out


# ----------------------------------------------------------------------------- the rest
def _pair(name: str, low: float, high: float) -> list[tuple[str, str, str, Change]]:
    """``low <-> high``: rows below the midpoint go to ``high``, the others to ``low``."""
    mid = (low + high) / 2
    return [
        (name, f"<{mid:g}", f"{high:g}", _set(name, lambda v: v < mid, lambda v: np.full(len(v), high))),
        (name, f">={mid:g}", f"{low:g}", _set(name, lambda v: v >= mid, lambda v: np.full(len(v), low))),
    ]


def _fixed_changes(dim: int) -> list[tuple[str, str, str, Change]]:
    """The fixed switches: (factor, value_from, value_to, change)."""
    out: list[tuple[str, str, str, Change]] = []
    for a, b in (("solid", "ground_glass"), ("ground_glass", "solid")):
        out.append(
            (
                "attenuation",
                a,
                b,
                _set("attenuation", lambda v, a=a: v == a, lambda v, b=b: np.full(len(v), b, dtype=object)),
            )
        )
    out += _pair("diameter_mm", 8.0, 16.0)
    out += _pair("margin_sigma_mm", 0.2, 0.8)
    out += _pair("noise_hu", 10.0, 30.0)
    out.append(("noise_hu", "<60", "60", _set("noise_hu", lambda v: v < 60, lambda v: np.full(len(v), 60.0))))
    out += _pair("kernel_fwhm_mm", 0.6, 1.2)
    out.append(("vessels", "0", "3", _set("vessels", lambda v: v == 0, lambda v: np.full(len(v), 3))))
    out.append(("vessels", ">0", "0", _set("vessels", lambda v: v > 0, lambda v: np.zeros(len(v), dtype=np.int64))))
    out.append(
        (
            "rotation_deg",
            "r",
            "r+90",
            _set("rotation_deg", lambda v: np.ones(len(v), bool), lambda v: np.mod(v.astype(float) + 90.0, 360.0)),
        )
    )
    for axis in ("offset_x_mm", "offset_y_mm", "offset_z_mm")[: 3 if dim == 3 else 2]:
        letter = axis.split("_")[1]  # mirror the centre about the patch centre: same distance
        out.append((axis, letter, f"-{letter}", _set(axis, lambda v: v != 0, lambda v: -v.astype(float))))
    return out


def _shape_changes(rows: pd.DataFrame) -> list[tuple[str, str, str, Change]]:
    """Switches of the opt-in shape factors, for the columns the rows carry."""
    out: list[tuple[str, str, str, Change]] = []
    for name, mid, high in (("elongation", 0.2, 0.4), ("irregularity", 0.08, 0.15)):
        if name in rows:
            up = _set(name, lambda v, m=mid: v < m, lambda v, h=high: np.full(len(v), h))
            out.append((name, f"<{mid:g}", f"{high:g}", up))
            out.append((name, f">={mid:g}", "0", _set(name, lambda v, m=mid: v >= m, lambda v: np.zeros(len(v)))))
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
                out.append(("spicule_grade", value_from, f"{value_to:g}", change))
    return out


def build_switches(s: Scenario, split: str, dataset_seed: int, split_n: int, rows: pd.DataFrame) -> list[Switch]:
    """The documented switch list for one split (README), kinds judged against ``train``.

    Args:
        s: the resolved scenario of the dataset (``dataset.json``).
        split: the split explained (names the confound draws' stream).
        dataset_seed: the dataset's seed.
        split_n: the split's full row count (confound draws do not depend on ``--n``).
        rows: the rows explained; a fixed switch is ``robustness`` when any value it gives them
            lies outside the training split's distribution.

    Returns:
        Cue switches, then confound switches, then the fixed ones (label factor and confounds
        excluded; offset z only in 3D).
    """
    switches = cue_switches(s) + confound_switches(s, split, dataset_seed, split_n)
    taken = {s.label.factor, *(c.factor for c in s.confounds)}
    for name, value_from, value_to, change in _fixed_changes(s.image.dim) + _shape_changes(rows):
        if name in taken:
            continue
        _, switched = change(rows)
        kind = "nuisance" if in_support(s, name, switched[name].to_numpy()) else "robustness"
        switches.append(Switch(name, kind, value_from, value_to, (name,), change))
    return switches
