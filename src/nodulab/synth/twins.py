"""Rows drawn from real annotations (a scenario's ``[source]``): each synthetic nodule has a real twin.

The table is LIDC-IDRI's radiologist annotations (Armato et al. 2011, CC BY 3.0; see
``nodulab.synth.lidc``): one row per annotation with its nine ratings and the measures of its largest
traced slice. A split draws, for each row, one annotation of the row's label class (malignancy
in ``source.malignant`` -> 1, in ``source.benign`` -> 0, other ratings left out; labels stay
stratified as in every scenario) and maps its ratings to factors:

============================  ==========================================================
LIDC rating                   nodulab factor
============================  ==========================================================
spiculation 2..5              shape ``spiculated``, ``spicule_grade`` ``GRADE[s]``
spiculation 1, lobulation >1  shape ``lobulated``; otherwise ``round``
lobulation 1..5               ``lobulation`` ``LOBULATION[l]``
sphericity 1..5               ``elongation`` uniform in ``ELONGATION[s]`` (own stream)
margin 1..5                   ``margin_sigma_mm`` ``MARGIN_MM[m]`` (1 poorly defined, 5 sharp)
texture 1..5                  ``attenuation`` ``ATTENUATION[t]``; part-solid ``solid_fraction``
calcification 1..5            ``attenuation`` ``calcified`` (6 = absent)
measured diameter             ``diameter_mm`` (area-equivalent, largest traced slice, >= 3 mm)
============================  ==========================================================

Every other factor (spicule count, length and width, irregularity, noise, kernel, vessels,
offsets, rotation) comes from the scenario's distributions as usual. With ``confounds =
"broken"`` (a split's or the source's) the cue factors (shape, grade, lobulation: spiculation and
lobulation ratings) still come from the row's twin, while the rest (diameter, sphericity, margin,
texture, calcification) come from a second annotation drawn from the whole pool whatever its
label: same marginals, the confounds broken. Rows carry their twins as ``lidc_*`` columns.

Patients are split once for all datasets: about 30% of them (a fixed hash of the patient number)
feed the ``test_*`` splits and the rest the others, so no real nodule is twinned in both.
"""

from __future__ import annotations

import functools
import hashlib

import numpy as np
import pandas as pd

from nodulab.synth.factors import ATTENUATIONS, FACTORS, SHAPES
from nodulab.synth.scenario import (
    SOURCE_CONFOUNDS,
    SOURCE_LABEL,
    SOURCE_MAPPED,
    Choice,
    Scenario,
    Uniform,
    declared_distributions,
    normal_bounds,
    source_mode,
)
from nodulab.synth.shapes import GRADE_LENGTH_FLOOR, LOBULATION_EXPRESSION, body_reach

TABLES = ("lidc",)
GRADE = {1: 0.2, 2: 0.4, 3: 0.6, 4: 0.8, 5: 1.0}  # rating / 5 (1: latent, for the spicules-added switch)
LOBULATION = {1: 0.0, 2: 0.06, 3: 0.12, 4: 0.18, 5: 0.24}
ELONGATION = {1: (0.5, 0.65), 2: (0.4, 0.55), 3: (0.3, 0.45), 4: (0.15, 0.3), 5: (0.05, 0.2)}
MARGIN_MM = {1: 1.2, 2: 0.9, 3: 0.6, 4: 0.4, 5: 0.25}
ATTENUATION = {1: "ground_glass", 2: "ground_glass", 3: "part_solid", 4: "part_solid", 5: "solid"}
SOLID_FRACTION = {3: 0.35, 4: 0.65}
NO_CALCIFICATION = 6
TEST_PATIENT_SHARE = 0.3
TWIN_COLUMNS = (
    "lidc_annotation_id",
    "lidc_nuisance_id",
    "lidc_patient",
    "lidc_subtlety",
    "lidc_spiculation",
    "lidc_lobulation",
    "lidc_malignancy",
    "lidc_sphericity",
    "lidc_margin",
    "lidc_texture",
    "lidc_calcification",
    "lidc_diameter_mm",
)
_FROM_TWIN = ("annotation_id", "patient", "subtlety", "spiculation", "lobulation", "malignancy")
_FROM_NUISANCE = ("sphericity", "margin", "texture", "calcification", "diameter_mm")


@functools.cache
def _table(name: str) -> pd.DataFrame:
    """The table, with ``test_side``: whether the annotation's patient feeds the ``test_*`` splits."""
    from nodulab.synth import lidc

    t = lidc.load_table()
    return t.assign(test_side=is_test_patient(t["patient"].to_numpy()))


def table_sha256(name: str) -> str:
    """sha256 of the shipped table's bytes (recorded in ``dataset.json``)."""
    from nodulab.synth import lidc

    return lidc.table_sha256()


def is_test_patient(patients: np.ndarray) -> np.ndarray:
    """Whether each patient number feeds the ``test_*`` splits (a fixed hash, same for all)."""
    digest = [hashlib.blake2b(f"nodulab/lidc-patient/{int(p)}".encode(), digest_size=4).digest() for p in patients]
    return np.array([int.from_bytes(d, "little") % 1000 < TEST_PATIENT_SHARE * 1000 for d in digest], dtype=bool)


def split_mode(s: Scenario, split: str) -> str:
    """``real`` or ``broken`` for one split (``val_balanced`` defaults to broken)."""
    return source_mode(s.source.confounds, split, s.splits[split].confounds)


def pool(s: Scenario, split: str) -> pd.DataFrame:
    """The annotations a split draws from: ``label`` and ``fits`` columns added.

    ``fits`` says whether the annotation's body (its diameter and sphericity) fits the patch with
    the largest profile it can get: its own (lobulation, spicules, the scenario's largest
    irregularity and spicule length) when the confounds are real, the pool's largest when they are
    broken (the body then meets any twin's cue). Rows are drawn only from annotations that fit.
    """
    src = s.source
    t = _table(src.table)
    rated = t["malignancy"].isin([*src.malignant, *src.benign])
    keep = rated & (t["diameter_mm"] <= src.max_diameter_mm)
    keep &= t["test_side"] == split.startswith("test_")
    p = t[keep].reset_index(drop=True)
    p = p.assign(label=p["malignancy"].isin(src.malignant).astype(np.int64))
    grade = p["spiculation"].map(GRADE).to_numpy(dtype=float)
    spiculated = p["spiculation"].to_numpy() >= 2
    expressed = p["lobulation"].map(LOBULATION).to_numpy(dtype=float) * [LOBULATION_EXPRESSION[s] for s in _shape(p)]
    elong = np.array([ELONGATION[v][1] for v in p["sphericity"]])
    # body_reach(e, irr, lob) = stretch(e) x profile(irr, lob): the stretch comes with the body's
    # annotation, the profile with the cue's (the twin), the same one unless the confounds are broken.
    dim = s.image.dim
    stretched = p["diameter_mm"].clip(lower=FACTORS["diameter_mm"].low).to_numpy() / 2 * body_reach(elong, 0.0, dim)
    profile = body_reach(0.0, _max(s, split, "irregularity"), dim, expressed)
    profile = profile * _spicule_reach(grade, spiculated, _max(s, split, "spicule_length_rel"))
    if split_mode(s, split) == "broken" and len(p):
        profile = np.full(len(p), profile.max())
    axes = ("offset_x_mm", "offset_y_mm", "offset_z_mm")[:dim]
    room = s.image.size * s.image.pixel_mm / 2 - max(_max(s, split, a) for a in axes)
    return p.assign(fits=stretched * profile <= room + 1e-9)


def _shape(annotations: pd.DataFrame) -> np.ndarray:
    """spiculation >= 2: spiculated; else lobulation >= 2: lobulated; else round."""
    spic, lob = annotations["spiculation"].to_numpy(), annotations["lobulation"].to_numpy()
    return np.where(spic >= 2, "spiculated", np.where(lob >= 2, "lobulated", "round")).astype(object)


def support(s: Scenario, name: str) -> list[object]:
    """What a mapped factor can take in a ``[source]`` scenario, as distributions (for the
    support checks of ``explain``): the mapping's values, and 3..max_diameter_mm for diameter."""
    ranges = {
        "lobulation": LOBULATION.values(),
        "spicule_grade": GRADE.values(),
        "margin_sigma_mm": MARGIN_MM.values(),
        "elongation": [v for pair in ELONGATION.values() for v in pair],
        "diameter_mm": [FACTORS["diameter_mm"].low, s.source.max_diameter_mm],
    }
    if name in ranges:
        return [Uniform(uniform=(min(ranges[name]), max(ranges[name])))]
    return [Choice(choice=SHAPES if name == "shape" else ATTENUATIONS)]


def _max(s: Scenario, split: str, name: str) -> float:
    dist = declared_distributions(s, split, name)[0]  # never a mapped factor
    factor = FACTORS[name]
    if isinstance(dist, Uniform):
        return float(max(abs(v) for v in dist.uniform))
    if hasattr(dist, "normal"):
        return float(max(abs(v) for v in normal_bounds(dist, factor)))
    if hasattr(dist, "choice"):
        return float(max(abs(float(v)) for v in dist.choice))
    return abs(float(dist))


def _spicule_reach(grade: np.ndarray, spiculated: np.ndarray, length_max: float) -> np.ndarray:
    return np.where(spiculated, 1.0 + length_max * (GRADE_LENGTH_FLOOR + (1.0 - GRADE_LENGTH_FLOOR) * grade), 1.0)


def check_source(s: Scenario) -> None:
    """The ``[source]`` checks (raises ``ValueError`` naming the key); called by ``Scenario``."""
    src = s.source
    if src.table not in TABLES:
        raise ValueError(f"source.table: unknown table {src.table!r} (tables: {', '.join(TABLES)})")
    if src.confounds not in SOURCE_CONFOUNDS:
        raise ValueError(f"source.confounds: {src.confounds!r} is not real or broken")
    for key, ratings in (("malignant", src.malignant), ("benign", src.benign)):
        if not ratings or any(isinstance(r, bool) or r not in range(1, 6) for r in ratings):
            raise ValueError(f"source.{key}: malignancy ratings 1..5, at least one (got {ratings})")
    if set(src.malignant) & set(src.benign):
        raise ValueError("source.benign: shares a rating with source.malignant")
    if not 3.0 <= src.max_diameter_mm <= FACTORS["diameter_mm"].high:
        raise ValueError(f"source.max_diameter_mm: {src.max_diameter_mm:g} is outside [3, 30] mm")
    if src.sha256 is not None and src.sha256 != table_sha256(src.table):
        raise ValueError(f"source.sha256: the data was drawn from another version of the {src.table} table")
    if s.label.model_dump() != SOURCE_LABEL:
        raise ValueError("label: with [source] the label is the annotation's malignancy; leave [label] out")
    if s.confounds:
        raise ValueError("confounds: a [source] scenario takes its confounds from the table")
    for where, table in [("factors", s.factors)] + [(f"splits.{k}.factors", v.factors) for k, v in s.splits.items()]:
        for name in table:
            if name in SOURCE_MAPPED:
                raise ValueError(f"{where}.{name}: drawn from the source table ({src.table})")
    for split in s.splits:
        _check_split(s, split)


MAX_LEFT_OUT = 0.05
"""Largest share of a split's annotations that may be left out for not fitting the patch."""


def _check_split(s: Scenario, split: str) -> None:
    p = pool(s, split)
    for label, what in ((1, "malignant"), (0, "benign")):
        if not (p["fits"] & (p["label"] == label)).any():
            raise ValueError(f"splits.{split}: no {what} annotation in the source pool fits the patch")
    out = float(1.0 - p["fits"].mean())
    if out > MAX_LEFT_OUT:
        half = s.image.size * s.image.pixel_mm / 2
        raise ValueError(
            f"splits.{split}: {out:.0%} of the source annotations do not fit the field of view"
            f" ({half:g} mm = image.size {s.image.size} * image.pixel_mm {s.image.pixel_mm:g} / 2;"
            f" at most {MAX_LEFT_OUT:.0%} may be left out); raise image.size or lower source.max_diameter_mm"
        )


def left_out(s: Scenario) -> dict[str, tuple[int, int]]:
    """Per split: (annotations left out for not fitting the patch, annotations in the pool)."""
    return {split: (int((~p["fits"]).sum()), len(p)) for split in s.splits for p in [pool(s, split)]}


def draw(s: Scenario, split: str, frame: pd.DataFrame, streams) -> pd.DataFrame:
    """Replace the mapped factors of a sampled split by its rows' twins' and add ``lidc_*`` columns.

    Args:
        s: a validated ``[source]`` scenario.
        split: the split.
        frame: the split's factor table from ``sampling.sample_split`` (labels already drawn).
        streams: ``key -> numpy Generator`` for this dataset seed and split.
    """
    p = pool(s, split)
    label, fits = frame["label"].to_numpy(), p["fits"].to_numpy()
    real = split_mode(s, split) == "real"
    twin = np.empty(len(frame), dtype=np.int64)
    u = streams("lidc/twin").random(len(frame))
    for value in (0, 1):
        members = np.flatnonzero((p["label"].to_numpy() == value) & (fits | (not real)))
        rows = label == value
        twin[rows] = members[np.minimum((u[rows] * len(members)).astype(np.int64), len(members) - 1)]
    if real:
        other = twin
    else:
        members = np.flatnonzero(fits)
        v = streams("lidc/nuisance").random(len(frame))
        other = members[np.minimum((v * len(members)).astype(np.int64), len(members) - 1)]
    a, b = p.iloc[twin].reset_index(drop=True), p.iloc[other].reset_index(drop=True)
    out = frame.copy()
    out["shape"] = _shape(a)
    out["spicule_grade"] = a["spiculation"].map(GRADE).to_numpy(dtype=float)
    out["lobulation"] = a["lobulation"].map(LOBULATION).to_numpy(dtype=float)
    lo, hi = (np.array([ELONGATION[v][i] for v in b["sphericity"]]) for i in (0, 1))
    out["elongation"] = lo + streams("lidc/elongation").random(len(frame)) * (hi - lo)
    out["margin_sigma_mm"] = b["margin"].map(MARGIN_MM).to_numpy(dtype=float)
    texture, calcified = b["texture"].to_numpy(), b["calcification"].to_numpy() != NO_CALCIFICATION
    out["attenuation"] = np.where(calcified, "calcified", b["texture"].map(ATTENUATION).to_numpy()).astype(object)
    part = ~calcified & np.isin(texture, list(SOLID_FRACTION))
    out["solid_fraction"] = np.where(
        part, b["texture"].map(SOLID_FRACTION).fillna(0.0).to_numpy(), out["solid_fraction"].to_numpy(dtype=float)
    )
    low, high = FACTORS["diameter_mm"].low, FACTORS["diameter_mm"].high
    out["diameter_mm"] = b["diameter_mm"].clip(low, high).to_numpy(dtype=float)
    for column in _FROM_TWIN:
        out[f"lidc_{column}"] = a[column].to_numpy()
    out["lidc_nuisance_id"] = b["annotation_id"].to_numpy()
    for column in _FROM_NUISANCE:
        out[f"lidc_{column}"] = b[column].to_numpy()
    return out[[*frame.columns, *TWIN_COLUMNS]]
