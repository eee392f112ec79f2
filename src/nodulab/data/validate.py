"""Re-check a dataset folder (Morpho-MNIST habit: re-measure what was written).

Hashes against the manifest, a byte-exact re-render of a sample of rows, label balance, each
confound's agreement inside an exact binomial 99% interval, and the measured vs requested body
diameter. A real dataset (``nodulab import-lidc``) cannot be re-rendered: its files, ratings,
masks, recorded diameters, labels and patient split are re-checked instead (:func:`validate_real`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from nodulab.data import traced
from nodulab.data.dataset import (
    ARRAYS,
    DatasetError,
    cell_columns,
    cell_counts,
    check_manifest,
    is_real,
    load_split,
    read_manifest,
    sha256_file,
)
from nodulab.synth.renderer import render
from nodulab.synth.rng import RNG_SCHEME
from nodulab.synth.scenario import ScenarioError
from nodulab.synth.scenarios import load_scenario_dict


@dataclass(frozen=True)
class Check:
    """One validation result."""

    name: str
    ok: bool
    detail: str


@dataclass
class ValidationReport:
    """All checks of ``validate``; ``ok`` when every check passed."""

    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def add(self, name: str, ok: bool, detail: str) -> None:
        self.checks.append(Check(name, bool(ok), detail))


def binomial_interval(n: int, p: float, level: float = 0.99) -> tuple[int, int]:
    """Exact central acceptance region ``[lo, hi]`` of Binomial(n, p).

    Computed from the log-space pmf (no scipy): ``P(X < lo) <= a/2`` and ``P(X > hi) <= a/2``
    with ``a = 1 - level``, each bound as tight as the discrete distribution allows.

    Returns:
        ``(lo, hi)`` success counts.
    """
    if n == 0 or p <= 0.0:
        return 0, 0
    if p >= 1.0:
        return n, n
    k = np.arange(n + 1, dtype=np.float64)
    log_comb = np.concatenate([[0.0], np.cumsum(np.log(n - k[1:] + 1.0) - np.log(k[1:]))])
    log_pmf = log_comb + k * math.log(p) + (n - k) * math.log1p(-p)
    pmf = np.exp(log_pmf - log_pmf.max())
    pmf /= pmf.sum()
    tail = (1.0 - level) / 2.0
    at_most = np.cumsum(pmf)  # P(X <= k)
    at_least = np.cumsum(pmf[::-1])  # P(X >= n - j)
    return int(np.argmax(at_most > tail)), int(n - np.argmax(at_least > tail))


def measured_diameter_mm(masks: np.ndarray, pixel_mm: np.ndarray) -> np.ndarray:
    """Equivalent diameter of each sample's body region (mask == 1).

    2D: ``2·sqrt(area/π)``; 3D: ``(6V/π)^(1/3)``, in mm. Reads the masks in bounded chunks.
    """
    dim = masks.ndim - 1
    step = max(1, (1 << 24) // max(1, int(np.prod(masks.shape[1:]))))
    counts = []
    for start in range(0, len(masks), step):
        block = np.asarray(masks[start : start + step])
        counts.append(np.count_nonzero(block.reshape(len(block), -1) == 1, axis=1))
    voxels = np.concatenate(counts) if counts else np.zeros(0)
    measure = voxels * np.asarray(pixel_mm, dtype=np.float64) ** dim
    return 2.0 * np.sqrt(measure / math.pi) if dim == 2 else np.cbrt(6.0 * measure / math.pi)


def _agreement(split: Any, factor: str) -> float:
    value = split.agreement
    return float(value[factor] if isinstance(value, Mapping) else value)


def _check_files(report: ValidationReport, root: Path, split: str, entry: dict[str, Any]) -> bool:
    """Re-hash every file of a split; return whether all of them exist."""
    present = True
    for key in (*ARRAYS, "factors"):
        rel, expected = entry[key]["file"], entry[key]["sha256"]
        if not (Path(root) / rel).is_file():
            report.add(f"{split}: sha256 {rel}", False, "file missing")
            present = False
            continue
        digest = sha256_file(Path(root) / rel)
        detail = "matches manifest" if digest == expected else f"{digest[:12]}… ≠ {expected[:12]}…"
        report.add(f"{split}: sha256 {rel}", digest == expected, detail)
    return present


def _check_rerender(
    report: ValidationReport,
    split: str,
    stored: tuple[np.ndarray, np.ndarray],
    frame: pd.DataFrame,
    image: dict[str, Any],
    n_rerender: int,
) -> None:
    """Render evenly spaced rows (first and last included) again; compare bytes."""
    idx = np.unique(np.linspace(0, len(frame) - 1, min(len(frame), n_rerender)).round().astype(int))
    if len(idx) == 0:
        return
    images, masks = render(frame.iloc[idx], size=image["size"], dim=image["dim"])
    bad = [
        int(i)
        for j, i in enumerate(idx)
        if not (np.array_equal(images[j], stored[0][i]) and np.array_equal(masks[j], stored[1][i]))
    ]
    report.add(
        f"{split}: re-render", not bad, f"{len(idx)} rows byte-identical" if not bad else f"rows differ: {bad[:8]}"
    )


def _check_labels(report: ValidationReport, split: str, frame: pd.DataFrame, spec: Any) -> None:
    n, malignant = len(frame), int((frame["label"] == 1).sum())
    rate = getattr(spec, "malignant_rate", None)
    if rate is None:
        ok = malignant == n - n // 2 and int((frame["label"] == 0).sum()) == n // 2
        report.add(
            f"{split}: label balance",
            ok,
            f"{n - malignant} benign / {malignant} malignant (stratified: {n // 2} / {n - n // 2})",
        )
        return
    lo, hi = binomial_interval(n, float(rate))
    report.add(
        f"{split}: malignant rate",
        lo <= malignant <= hi,
        f"{malignant}/{n} malignant; 99% exact binomial range [{lo}, {hi}] for p={rate:g}",
    )


def _check_agreement(report: ValidationReport, split: str, frame: pd.DataFrame, spec: Any) -> None:
    for column in cell_columns(frame):
        factor = column.removeprefix("agrees_")
        p, n, k = _agreement(spec, factor), len(frame), int(frame[column].sum())
        lo, hi = binomial_interval(n, p)
        report.add(
            f"{split}: agreement {factor}",
            lo <= k <= hi,
            f"{k}/{n} agree; 99% exact binomial range [{lo}, {hi}] for p={p:g}",
        )


def _check_diameter(report: ValidationReport, split: str, masks: np.ndarray, frame: pd.DataFrame) -> None:
    requested = frame["diameter_mm"].to_numpy(dtype=np.float64)
    keep = requested >= 6.0
    if not keep.any():
        report.add(f"{split}: diameter", True, "no sample with diameter >= 6 mm")
        return
    measured = measured_diameter_mm(masks, frame["pixel_mm"].to_numpy(dtype=np.float64))
    error = float(np.median(np.abs(measured[keep] - requested[keep]) / requested[keep]))
    detail = f"median relative error {error:.1%} over {int(keep.sum())} samples >= 6 mm (limit 10%)"
    report.add(f"{split}: diameter", error <= 0.10, detail)


def _check_cells(report: ValidationReport, split: str, frame: pd.DataFrame, entry: dict[str, Any]) -> None:
    ok = cell_counts(frame) == entry["cells"] and len(frame) == entry["n"]
    report.add(f"{split}: cell counts", ok, f"factors.csv {'matches' if ok else 'differs from'} manifest")


def validate(root: Path, *, n_rerender: int = 16) -> ValidationReport:
    """Re-check a dataset folder against its manifest and its scenario.

    Per split: sha256 of every file; byte-identical re-render of ``n_rerender`` evenly spaced
    rows; label balance (exact stratification, or a 99% exact binomial range for
    ``malignant_rate``); each confound's agreement inside its 99% exact binomial range; the
    median relative error of the measured body diameter (samples >= 6 mm) at most 10%.

    A real dataset (``kind`` ``real``) is checked by :func:`validate_real` (no re-render).

    Args:
        root: dataset folder.
        n_rerender: rows re-rendered per split (0 skips the re-render; ignored for a real dataset).

    Returns:
        A ``ValidationReport``.

    A malformed manifest, scenario, array or factor table is reported as a failed check, never
    raised.

    Raises:
        DatasetError: ``root`` is not a dataset folder (no readable ``dataset.json``).
    """
    manifest = read_manifest(root)
    report = ValidationReport()
    try:
        check_manifest(manifest)
    except DatasetError as error:
        report.add("manifest", False, str(error))
        return report
    if is_real(manifest):
        return validate_real(root, manifest, report)
    try:
        scenario = load_scenario_dict(manifest["scenario"])
        specs = {name: scenario.splits.get(name) for name in manifest["splits"]}
    except ScenarioError as error:
        report.add("scenario", False, str(error))
        specs = dict.fromkeys(manifest["splits"])
    scheme = manifest.get("rng_scheme")
    report.add("rng scheme", scheme == RNG_SCHEME, f"dataset {scheme}, installed {RNG_SCHEME}")
    for split, entry in manifest["splits"].items():
        if not _check_files(report, root, split, entry):
            continue
        try:
            images, masks, frame = load_split(root, split)
        except DatasetError as error:
            report.add(f"{split}: readable", False, str(error))
            continue
        expected = entry["images"]["shape"]
        shape_ok = list(images.shape) == expected == list(masks.shape) and len(frame) == expected[0]
        report.add(f"{split}: shapes", shape_ok, f"images {tuple(images.shape)}, {len(frame)} factor rows")
        if not shape_ok:
            continue
        _check_cells(report, split, frame, entry)
        _check_rerender(report, split, (images, masks), frame, manifest["image"], n_rerender)
        if specs[split] is None:
            report.add(f"{split}: scenario", False, "split not in the manifest's scenario")
        else:
            _check_labels(report, split, frame, specs[split])
            _check_agreement(report, split, frame, specs[split])
        _check_diameter(report, split, masks, frame)
    return report


# ----------------------------------------------------------------------------- real datasets
DIAMETER_RTOL = 1e-6
"""Relative tolerance between a real row's ``diameter_mm`` and the diameter measured on its mask."""
LABEL_RULE = {"malignant_from": 4, "benign_to": 2}
"""The importer's default label rule (``nodulab import-lidc --malignant 4 --benign 2``)."""


def mask_diameter_mm(mask: np.ndarray, pixel_mm: float) -> float:
    """Area-equivalent diameter of a real mask's body (2D: the mask; 3D: its largest axial slice).

    The importer records ``diameter_mm`` this way (:func:`nodulab.data.traced.measure`); 0 when empty.
    """
    body = np.asarray(mask) == 1
    if body.ndim == 3:
        body = traced.largest_slice(body)
    return float(traced.measure(body, pixel_mm)["diameter_mm"]) if body.any() else 0.0


def _check_real_masks(report: ValidationReport, split: str, masks: np.ndarray) -> bool:
    """Masks hold only 0 (background) and 1 (the readers' outline), and no row's outline is empty."""
    bad_values, empty = [], []
    for i in range(len(masks)):
        mask = np.asarray(masks[i])
        if not np.isin(mask, (0, 1)).all():
            bad_values.append(i)
        elif not mask.any():
            empty.append(i)
    ok = not bad_values and not empty
    if ok:
        detail = f"{len(masks)} masks of 0/1, none empty"
    elif bad_values:
        detail = f"values other than 0/1 in rows {bad_values[:8]}"
    else:
        detail = f"empty outline in rows {empty[:8]}"
    report.add(f"{split}: masks", ok, detail)
    return ok


def _check_real_diameter(report: ValidationReport, split: str, masks: np.ndarray, frame: pd.DataFrame) -> None:
    recorded = frame["diameter_mm"].to_numpy(dtype=np.float64)
    spacing = frame["pixel_mm"].to_numpy(dtype=np.float64)
    measured = np.array([mask_diameter_mm(masks[i], float(spacing[i])) for i in range(len(frame))])
    bad = np.flatnonzero(~np.isclose(measured, recorded, rtol=DIAMETER_RTOL, atol=0.0))
    where = "largest axial slice" if masks.ndim == 4 else "mask"
    if not len(bad):
        detail = (
            f"diameter_mm equals the {where}'s area-equivalent diameter in {len(frame)} rows (rtol {DIAMETER_RTOL:g})"
        )
    else:
        i = int(bad[0])
        detail = (
            f"{len(bad)} rows differ from the {where}'s diameter, first row {i}: "
            f"{recorded[i]:.6g} mm recorded, {measured[i]:.6g} mm measured"
        )
    report.add(f"{split}: diameter", not len(bad), detail)


def _check_real_labels(report: ValidationReport, split: str, frame: pd.DataFrame, rule: dict[str, Any]) -> None:
    high, low = float(rule["malignant_from"]), float(rule["benign_to"])
    malignancy = frame["lidc_malignancy"].to_numpy(dtype=np.float64)
    label = frame["label"].to_numpy()
    bad = np.flatnonzero(((label == 1) & (malignancy < high)) | ((label == 0) & (malignancy > low)))
    n1 = int((label == 1).sum())
    if not len(bad):
        detail = f"{len(frame) - n1} benign (malignancy <= {low:g}) / {n1} malignant (>= {high:g})"
    else:
        i = int(bad[0])
        detail = (
            f"{len(bad)} rows break the rule (label 1: malignancy >= {high:g}; 0: <= {low:g}), "
            f"first row {i}: label {int(label[i])}, malignancy {malignancy[i]:g}"
        )
    report.add(f"{split}: labels", not len(bad), detail)


def _check_patients(report: ValidationReport, patients: dict[str, set[int]]) -> None:
    """No patient's nodules in two splits."""
    names = list(patients)
    shared = [
        (a, b, sorted(patients[a] & patients[b]))
        for i, a in enumerate(names)
        for b in names[i + 1 :]
        if patients[a] & patients[b]
    ]
    total = len(set().union(*patients.values())) if patients else 0
    if not shared:
        report.add("patients", True, f"{total} patients, none in two splits")
        return
    a, b, ids = shared[0]
    report.add("patients", False, f"patient {ids[0]} in {a} and {b} ({sum(len(s[2]) for s in shared)} shared in all)")


def _check_split_sizes(report: ValidationReport, manifest: dict[str, Any], rows: dict[str, int]) -> None:
    """Split sizes: rows read per split, and their total against the rows the manifest's series list."""
    sizes = ", ".join(f"{split} {n}" for split, n in rows.items())
    series = manifest["real"].get("series")
    counted = [s.get("rows") for s in series] if isinstance(series, list) and series else []
    if counted and all(isinstance(k, int) and not isinstance(k, bool) for k in counted):
        ok = sum(counted) == sum(rows.values())
        report.add("split sizes", ok, f"{sizes}; {sum(counted)} rows from {len(counted)} series in real.series")
    else:
        report.add("split sizes", True, f"{sizes} (real.series lists no row counts)")


def validate_real(root: Path, manifest: dict[str, Any], report: ValidationReport | None = None) -> ValidationReport:
    """Re-check a real dataset (``nodulab import-lidc``) against its manifest; nothing is re-rendered.

    Per split: sha256 of every file; array shapes and dtypes and the factor table (the ratings on
    their scales: :func:`nodulab.data.dataset.check_real_factors`); ``pixel_mm`` equal to the
    manifest's; masks of 0/1 with no empty outline; ``diameter_mm`` equal to the mask's
    area-equivalent diameter (3D: its largest axial slice) within :data:`DIAMETER_RTOL`; labels
    following ``real.label`` (default :data:`LABEL_RULE`); cell counts. Over the dataset: no patient
    in two splits, and the split sizes against the rows ``real.series`` lists.
    """
    report = report if report is not None else ValidationReport()
    real = manifest["real"]
    rule = real.get("label") if isinstance(real.get("label"), dict) else {}
    rule = {key: rule.get(key, default) for key, default in LABEL_RULE.items()}
    series = real.get("series") if isinstance(real.get("series"), list) else []
    report.add(
        "re-render",
        True,
        f"no re-render: real CT ({real.get('source', 'real')}, readers {real.get('readers', '?')}, "
        f"{len(series)} series read)",
    )
    pixel_mm = float(manifest["image"]["pixel_mm"])
    patients: dict[str, set[int]] = {}
    rows: dict[str, int] = {}
    for split, entry in manifest["splits"].items():
        if not _check_files(report, root, split, entry):
            continue
        try:
            images, masks, frame = load_split(root, split)
        except DatasetError as error:
            name = "ratings" if "column 'lidc_" in str(error) else "readable"  # a rating off its scale
            report.add(f"{split}: {name}", False, str(error))
            continue
        ratings = [c for c in frame.columns if c.startswith("lidc_")]
        report.add(f"{split}: ratings", True, f"{len(ratings)} rating columns on their scales")
        expected = entry["images"]["shape"]
        shape_ok = list(images.shape) == expected == list(masks.shape) and len(frame) == expected[0]
        report.add(
            f"{split}: shapes",
            shape_ok,
            f"images {tuple(images.shape)} {images.dtype}, masks {masks.dtype}, {len(frame)} factor rows",
        )
        if not shape_ok:
            continue
        rows[split] = len(frame)
        patients[split] = set(frame["patient"].astype(int).tolist())
        _check_cells(report, split, frame, entry)
        spacing = frame["pixel_mm"].to_numpy(dtype=np.float64)
        same = np.flatnonzero(spacing != pixel_mm)
        report.add(
            f"{split}: pixel_mm",
            not len(same),
            f"every row at the manifest's {pixel_mm:g} mm"
            if not len(same)
            else f"row {int(same[0])}: {spacing[same[0]]:g} mm, the manifest says {pixel_mm:g}",
        )
        if _check_real_masks(report, split, masks):
            _check_real_diameter(report, split, masks, frame)
        _check_real_labels(report, split, frame, rule)
    _check_patients(report, patients)
    _check_split_sizes(report, manifest, rows)
    return report
