"""How real do the synthetic nodules look? Trace them as a reader would and compare with LIDC-IDRI.

Every synthetic nodule is outlined the way a reader traces one: the image is thresholded midway
between the parenchyma (``renderer.PARENCHYMA_HU``, -860 HU) and the row's body attenuation
(``renderer.BODY_HU[attenuation]``), vessel pixels (region 3 of the dataset's mask) are left out
as a reader leaves vessels out, holes are filled, and the connected component at the nodule
centre is kept (``(size - 1) / 2 + offset / pixel_mm`` per axis); in 3D its largest axial slice.
The outline is measured with :func:`nodulab.data.traced.measure`, exactly like the LIDC-IDRI reader
contours of the shipped table (:mod:`nodulab.synth.lidc`), and the two are compared group by group:

* rows drawn from the LIDC table (a ``lidc_spiculation`` column) against the real annotations of
  the same spiculation rating 1..5 ("twins");
* otherwise by ``shape``: round against real spiculation 1, lobulated and spiculated against
  real spiculation >= 4.

On a real dataset (``nodulab import-lidc``) the same tracer outlines the real patches (the rows
carry their ``attenuation`` and zero offsets) and each traced outline is compared with the
readers' outline, the dataset's mask (:func:`compare_real`): Dice and the diameter error, a direct
check of the tracer against the readers.

LIDC-IDRI numbers are CC BY 3.0: cite :data:`nodulab.synth.lidc.CITATION` with them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from nodulab.common.progress import Progress, counter
from nodulab.data import traced
from nodulab.synth import lidc
from nodulab.synth.renderer import BODY_HU, PARENCHYMA_HU, REGIONS

MEASURES = ("solidity", "radial_cv", "aspect", "diameter_mm")
QUANTILES = (0.05, 0.5, 0.95)
THRESHOLD_RULE = (
    f"threshold midway between the parenchyma ({PARENCHYMA_HU:g} HU) and the row's body HU "
    f"({', '.join(f'{k} {v:g}' for k, v in BODY_HU.items())}); holes filled; the connected component "
    "at the nodule centre ((size-1)/2 + offset/pixel_mm per axis), vessel pixels (mask region 3) "
    "left out as a reader leaves vessels out; 3D: its largest axial slice"
)
GOALS = {  # the targets, checked only when the rows are LIDC twins
    "groups": (1, 3, 5),
    "solidity_auc": (0.72, 0.08),
    "diameter_quantile_rel": 0.15,
    "malignancy_auc": (0.86, 0.05),
}
AT_LEAST_4 = ">=4"


@dataclass
class Realism:
    """What :func:`compare` measured: per-nodule measures, the long table and the summary."""

    measures: pd.DataFrame  # one row per synthetic nodule
    table: pd.DataFrame  # source, group, measure, n, median, q25, q75, ks
    summary: dict[str, Any]


def threshold_hu(attenuation: str) -> float:
    """The reader's threshold for a nodule of this attenuation: midway between parenchyma and body."""
    return 0.5 * (PARENCHYMA_HU + BODY_HU[attenuation])


def trace_mask(image: np.ndarray, row: pd.Series, regions: np.ndarray | None = None) -> np.ndarray:
    """Outline one nodule (2D or 3D image in HU) as a reader would: a boolean mask of the image's shape.

    ``regions`` (the dataset's mask) takes the vessels out first: a reader follows a vessel
    through the slices and leaves it out of the outline, which a threshold alone cannot do.
    """
    size, px = image.shape[-1], float(row["pixel_mm"])
    offsets = [row["offset_z_mm"], row["offset_y_mm"], row["offset_x_mm"]][3 - image.ndim :]
    centre = [(size - 1) / 2 + float(o) / px for o in offsets]
    image = np.asarray(image, dtype=np.float32)
    if regions is not None:
        image = np.where(np.asarray(regions) == REGIONS["vessels"], PARENCHYMA_HU, image)
    return traced.trace(image, centre, threshold_hu(str(row["attenuation"])))


def trace_row(image: np.ndarray, row: pd.Series, regions: np.ndarray | None = None) -> dict[str, float]:
    """Trace one rendered nodule (2D or 3D image in HU) and measure its outline (3D: its largest axial slice).

    ``regions`` (the dataset's mask) takes the vessels out first (:func:`trace_mask`).
    """
    mask = trace_mask(image, row, regions)
    if mask.ndim == 3:
        mask = traced.largest_slice(mask)
    return traced.measure(mask, float(row["pixel_mm"]))


def _group_key(frame: pd.DataFrame) -> tuple[str, pd.Series]:
    if "lidc_spiculation" in frame.columns:
        return "lidc_spiculation", frame["lidc_spiculation"].astype(int).astype(str)
    return "shape", frame["shape"].astype(str)


def counterpart(group: str, by: str) -> str:
    """The real spiculation group a synthetic group is compared with."""
    if by == "lidc_spiculation":
        return group
    return "1" if group == "round" else AT_LEAST_4


def _real_groups(real: pd.DataFrame) -> dict[str, pd.DataFrame]:
    groups = {str(k): g for k, g in real.groupby("spiculation")}
    groups[AT_LEAST_4] = real[real["spiculation"] >= 4]
    return groups


def _stats(values: pd.Series) -> dict[str, float]:
    v = values.dropna()
    if v.empty:
        return {"n": 0, "median": math.nan, "q25": math.nan, "q75": math.nan}
    q25, median, q75 = np.quantile(v, [0.25, 0.5, 0.75])
    return {"n": int(len(v)), "median": float(median), "q25": float(q25), "q75": float(q75)}


def _ks(a: pd.Series, b: pd.Series) -> float:
    from scipy.stats import ks_2samp

    a, b = a.dropna(), b.dropna()
    return float(ks_2samp(a, b).statistic) if len(a) and len(b) else math.nan


def _auc(positive: np.ndarray, score: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    keep = np.isfinite(score)
    positive, score = positive[keep], score[keep]
    if positive.all() or not positive.any():
        return math.nan
    return float(roc_auc_score(positive, score))


def _aucs(real: pd.DataFrame, synth: pd.DataFrame, by: str) -> dict[str, Any]:
    spic = real[(real["spiculation"] >= 4) | (real["spiculation"] == 1)]
    mal = real[(real["malignancy"] >= 4) | (real["malignancy"] <= 2)]
    if by == "lidc_spiculation":
        rating = synth["lidc_spiculation"].astype(int)
        s = synth[(rating >= 4) | (rating == 1)]
        s_pos, rule = s["lidc_spiculation"].astype(int).to_numpy() >= 4, "lidc_spiculation >= 4 vs 1"
    else:
        s = synth[synth["shape"].isin(["spiculated", "round"])]
        s_pos, rule = (s["shape"] == "spiculated").to_numpy(), "shape spiculated vs round"
    return {
        "solidity": {
            "rule": "lower solidity = more spiculated",
            "real": _auc(spic["spiculation"].to_numpy() >= 4, -spic["solidity"].to_numpy()),
            "real_groups": "spiculation >= 4 vs 1",
            "synthetic": _auc(s_pos, -s["solidity"].to_numpy(dtype=float)),
            "synthetic_groups": rule,
        },
        "malignancy_by_diameter": {
            "real": _auc(mal["malignancy"].to_numpy() >= 4, mal["diameter_mm"].to_numpy()),
            "real_groups": "malignancy >= 4 vs <= 2",
            "synthetic": _auc(synth["label"].to_numpy() == 1, synth["diameter_mm"].to_numpy(dtype=float)),
            "synthetic_groups": "label 1 vs 0, by traced diameter",
        },
    }


def _quantiles(real: pd.DataFrame, synth: pd.DataFrame) -> list[dict[str, float]]:
    out = []
    syn = synth["diameter_mm"].dropna()
    for q in QUANTILES:
        r = float(real["diameter_mm"].quantile(q))
        s = float(syn.quantile(q)) if len(syn) else math.nan
        out.append({"q": q, "real": r, "synthetic": s, "rel_diff": (s - r) / r})
    return out


def _goals(table: pd.DataFrame, aucs: dict[str, Any], quantiles: list[dict[str, float]]) -> list[dict[str, Any]]:
    goals = []
    cell = table.set_index(["source", "group", "measure"])
    for g in GOALS["groups"]:
        for m in ("solidity", "radial_cv", "aspect"):
            key = ("synthetic", str(g), m)
            real = cell.loc[("real", str(g), m)]
            value = float(cell.loc[key, "median"]) if key in cell.index else math.nan
            goals.append(
                {
                    "goal": f"spiculation {g}: synthetic median {m} inside the real IQR",
                    "value": value,
                    "target": [float(real["q25"]), float(real["q75"])],
                    "pass": bool(real["q25"] <= value <= real["q75"]),
                }
            )
    centre, tol = GOALS["solidity_auc"]
    value = aucs["solidity"]["synthetic"]
    goals.append(
        {
            "goal": f"solidity AUC within {centre} ± {tol}",
            "value": value,
            "target": [centre - tol, centre + tol],
            "pass": bool(abs(value - centre) <= tol),
        }
    )
    rel = GOALS["diameter_quantile_rel"]
    for q in quantiles:
        goals.append(
            {
                "goal": f"diameter {q['q']:.0%} quantile within {rel:.0%} of real",
                "value": q["synthetic"],
                "target": [q["real"] * (1 - rel), q["real"] * (1 + rel)],
                "pass": bool(abs(q["rel_diff"]) <= rel),
            }
        )
    centre, tol = GOALS["malignancy_auc"]
    value = aucs["malignancy_by_diameter"]["synthetic"]
    goals.append(
        {
            "goal": f"malignancy-by-diameter AUC within {centre} ± {tol}",
            "value": value,
            "target": [centre - tol, centre + tol],
            "pass": bool(abs(value - centre) <= tol),
        }
    )
    return goals


def check_splits(root: Path, splits: Sequence[str] | None, n: int | None) -> list[str]:
    """The splits to read (default every split); raise ``DatasetError`` naming a bad one or a bad ``n``."""
    from nodulab.common.choices import MAX_N
    from nodulab.data.dataset import DatasetError, load_manifest

    manifest = load_manifest(root)
    if n is not None and not 1 <= n <= MAX_N:
        raise DatasetError(f"--n {n}: must be at least 1 and at most {MAX_N:,}")
    chosen = list(dict.fromkeys(splits)) if splits else list(manifest["splits"])
    unknown = [s for s in chosen if s not in manifest["splits"]]
    if unknown:
        raise DatasetError(f"--split {unknown[0]!r} not in dataset (have {', '.join(manifest['splits'])})")
    return chosen


def compare(
    root: Path | str,
    *,
    splits: Sequence[str] | None = None,
    n: int | None = None,
    progress: Progress | None = None,
) -> Realism:
    """Trace the nodules of a dataset folder and compare them with the LIDC-IDRI table.

    A real dataset (``nodulab import-lidc``) goes to :func:`compare_real` instead.

    Args:
        root: dataset folder (``nodulab generate``).
        splits: splits to read (default every split).
        n: at most the first ``n`` rows of each split.
        progress: ``(stage, done, total)``: nodules traced so far.
    """
    from nodulab.data.dataset import is_real, load_manifest, load_split

    root = Path(root)
    chosen = check_splits(root, splits, n)
    manifest = load_manifest(root)
    total = sum(min(int(manifest["splits"][s]["n"]), n or int(manifest["splits"][s]["n"])) for s in chosen)
    advance = counter(progress, "tracing", total)
    if is_real(manifest):
        return compare_real(root, manifest, chosen, n, advance)
    frames = []
    for split in chosen:
        images, regions, factors = load_split(root, split)
        count = len(factors) if n is None else min(n, len(factors))
        rows = []
        for i in range(count):
            rows.append(trace_row(images[i], factors.iloc[i], regions[i]))
            advance(1)
        measured = pd.DataFrame(rows, columns=["area_mm2", "diameter_mm", "solidity", "radial_cv", "aspect"])
        twins = [c for c in factors.columns if c.startswith("lidc_")]
        keep = ["index", "label", "shape", "attenuation", "diameter_mm", *twins]
        part = factors.iloc[:count][keep].reset_index(drop=True).rename(columns={"diameter_mm": "set_diameter_mm"})
        frames.append(pd.concat([pd.DataFrame({"split": [split] * count}), part, measured], axis=1))
    synth = pd.concat(frames, ignore_index=True)
    by, group = _group_key(synth)
    synth.insert(2, "group", group.to_numpy())
    real = lidc.load_table()
    real_groups = _real_groups(real)
    records = []
    for name, g in real_groups.items():
        for m in MEASURES:
            records.append({"source": "real", "group": name, "measure": m, **_stats(g[m]), "ks": math.nan})
    for name, g in synth.groupby("group", sort=True):
        twin = real_groups.get(counterpart(str(name), by), real.iloc[:0])
        for m in MEASURES:
            records.append(
                {"source": "synthetic", "group": str(name), "measure": m, **_stats(g[m]), "ks": _ks(g[m], twin[m])}
            )
    table = pd.DataFrame(records, columns=["source", "group", "measure", "n", "median", "q25", "q75", "ks"])
    aucs = _aucs(real, synth, by)
    quantiles = _quantiles(real, synth)
    summary: dict[str, Any] = {
        "grouping": by,
        "counterparts": {str(g): counterpart(str(g), by) for g in sorted(synth["group"].unique())},
        "aucs": aucs,
        "diameter_quantiles": quantiles,
        "settings": {
            "threshold_rule": THRESHOLD_RULE,
            "splits": chosen,
            "n_per_split": n,
            "rows": int(len(synth)),
            "untraced_rows": int(synth["solidity"].isna().sum()),
        },
        "lidc": {"rows": int(len(real)), "table_sha256": lidc.table_sha256(), "citation": lidc.CITATION},
    }
    if by == "lidc_spiculation":
        summary["goals"] = _goals(table, aucs, quantiles)
    return Realism(measures=synth, table=table, summary=summary)


# ----------------------------------------------------------------------------- real datasets
DICE_GOOD = 0.7
"""A traced outline with Dice at least this against the readers' outline counts as a match."""
SPICULATION_GROUPS = ("1", "1.5-3.5", ">=4")
"""The readers' spiculation rating groups of a real dataset (1 and >= 4: the spiculation target's classes)."""
ATTENUATIONS = ("ground_glass", "part_solid", "solid")
REAL_COLUMNS = (
    "split",
    "index",
    "label",
    "patient",
    "nodule",
    "annotation_id",
    "lidc_spiculation",
    "lidc_malignancy",
    "attenuation",
    "spiculation_group",
    "diameter_mm",
    "traced_diameter_mm",
    "diameter_error_mm",
    "dice",
    "dice_volume",
    "slice",
    "traced_slice",
    "traced_area_mm2",
    *(f"{prefix}{m}" for m in ("solidity", "radial_cv", "aspect") for prefix in ("", "traced_")),
)
"""``measures.csv`` of a real dataset: per nodule, the readers' outline beside the traced one."""
REAL_STATS = (
    "n",
    "dice_median",
    "dice_q25",
    "dice_q75",
    "dice_good_share",
    "diameter_error_median_mm",
    "diameter_error_q25_mm",
    "diameter_error_q75_mm",
    "abs_diameter_error_median_mm",
    "untraced",
)


def spiculation_group(rating: float) -> str:
    """The group of a readers' spiculation rating (a consensus median may end in .5)."""
    if rating >= 4:
        return ">=4"
    return "1" if rating <= 1 else "1.5-3.5"


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap 2|A∩B| / (|A| + |B|) of two boolean masks (NaN when both are empty)."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    total = int(a.sum()) + int(b.sum())
    return 2.0 * int((a & b).sum()) / total if total else math.nan


def trace_real(image: np.ndarray, mask: np.ndarray, row: pd.Series) -> dict[str, float]:
    """Trace one real patch with the synthetic tracer and compare the outline with the readers' (the mask).

    2D: Dice over the patch. 3D: Dice of the mask's largest axial slice against the traced
    outline's largest axial slice (each as the tracer and the importer measure them; their indices
    are ``slice`` and ``traced_slice``), and ``dice_volume`` over the whole volumes.
    """
    px = float(row["pixel_mm"])
    outline = trace_mask(image, row)
    readers = np.asarray(mask) == REGIONS["body"]
    nan = math.nan
    out: dict[str, float] = {"dice_volume": nan, "slice": nan, "traced_slice": nan}
    if outline.ndim == 3:
        z_readers, z_traced = (int(np.argmax(m.sum(axis=(1, 2)))) for m in (readers, outline))
        out.update(dice_volume=dice(outline, readers), slice=z_readers, traced_slice=z_traced)
        outline, readers = outline[z_traced], readers[z_readers]
    out["dice"] = dice(outline, readers)
    found, ref = traced.measure(outline, px), traced.measure(readers, px)
    out["traced_diameter_mm"] = found["diameter_mm"]
    out["traced_area_mm2"] = found["area_mm2"]
    for m in ("solidity", "radial_cv", "aspect"):
        out[m], out[f"traced_{m}"] = ref[m], found[m]
    return out


def _real_stats(rows: pd.DataFrame) -> dict[str, float]:
    d, e = _stats(rows["dice"]), _stats(rows["diameter_error_mm"])
    dices = rows["dice"].dropna()
    return {
        "n": int(len(rows)),
        "dice_median": d["median"],
        "dice_q25": d["q25"],
        "dice_q75": d["q75"],
        "dice_good_share": float((dices >= DICE_GOOD).mean()) if len(dices) else math.nan,
        "diameter_error_median_mm": e["median"],
        "diameter_error_q25_mm": e["q25"],
        "diameter_error_q75_mm": e["q75"],
        "abs_diameter_error_median_mm": _stats(rows["diameter_error_mm"].abs())["median"],
        "untraced": int((rows["traced_area_mm2"] == 0).sum()),
    }


def compare_real(
    root: Path, manifest: dict[str, Any], chosen: Sequence[str], n: int | None, advance: Callable[[int], None]
) -> Realism:
    """:func:`compare` on a real dataset: trace its patches with the synthetic tracer and compare each
    outline with the readers'.

    The tracer is :func:`trace_mask` unchanged (threshold midway between the parenchyma and the
    row's ``attenuation`` body HU, the component at the patch centre; the rows' offsets are 0).
    Per nodule: Dice against the mask (:func:`trace_real`) and the diameter error, traced
    area-equivalent diameter minus the row's ``diameter_mm``; summarised (median, IQR, share of
    Dice >= :data:`DICE_GOOD`) overall, by spiculation rating group and by attenuation.

    Args:
        root: a real dataset folder (``nodulab import-lidc``), its checked ``manifest`` and the
            splits ``chosen`` by :func:`check_splits`.
        n: at most the first ``n`` rows of each split.
        advance: the progress counter of :func:`compare` (one per nodule traced).
    """
    from nodulab.data.dataset import load_split

    frames = []
    for split in chosen:
        images, masks, factors = load_split(root, split)
        count = len(factors) if n is None else min(n, len(factors))
        rows = []
        for i in range(count):
            rows.append(trace_real(images[i], masks[i], factors.iloc[i]))
            advance(1)
        part = factors.iloc[:count].reset_index(drop=True)
        part = part.assign(
            split=split,
            spiculation_group=[spiculation_group(float(r)) for r in part["lidc_spiculation"]],
            **pd.DataFrame(rows, index=part.index),
        )
        frames.append(part)
    measures = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    measures["diameter_error_mm"] = measures["traced_diameter_mm"] - measures["diameter_mm"]
    measures = measures[list(REAL_COLUMNS)]
    groups: list[tuple[str, str, pd.DataFrame]] = [("all", "all", measures)]
    groups += [("lidc_spiculation", g, measures[measures["spiculation_group"] == g]) for g in SPICULATION_GROUPS]
    groups += [("attenuation", a, measures[measures["attenuation"] == a]) for a in ATTENUATIONS]
    records = [{"by": by, "group": g, **_real_stats(rows)} for by, g, rows in groups]
    table = pd.DataFrame(records, columns=["by", "group", *REAL_STATS])
    dim = int(manifest["image"]["dim"])
    real = manifest["real"]
    stats = {(r["by"], r["group"]): {k: r[k] for k in REAL_STATS} for r in records}
    summary: dict[str, Any] = {
        "kind": "real",
        "comparison": "the synthetic tracer's outline of each real patch vs the readers' outline (the mask)",
        "dice_on": "2D: the whole patch"
        if dim == 2
        else "3D: the mask's largest axial slice vs the traced outline's largest axial slice "
        "(dice_volume in measures.csv: the whole volumes)",
        "diameter_error": "traced area-equivalent diameter minus the row's diameter_mm (the mask's), mm",
        "dice_good": DICE_GOOD,
        "overall": stats[("all", "all")],
        "by_spiculation": {g: stats[("lidc_spiculation", g)] for g in SPICULATION_GROUPS},
        "by_attenuation": {a: stats[("attenuation", a)] for a in ATTENUATIONS},
        "settings": {
            "threshold_rule": THRESHOLD_RULE + " (a real mask has no vessel region; offsets are 0)",
            "splits": list(chosen),
            "n_per_split": n,
            "rows": int(len(measures)),
            "untraced_rows": int((measures["traced_area_mm2"] == 0).sum()),
            "dim": dim,
            "pixel_mm": float(manifest["image"]["pixel_mm"]),
        },
        "source": {"source": real.get("source"), "readers": real.get("readers"), "citation": lidc.CITATION},
    }
    if dim == 3:
        summary["overall"]["dice_volume_median"] = _stats(measures["dice_volume"])["median"]
    return Realism(measures=measures, table=table, summary=summary)


def is_real_result(result: Realism) -> bool:
    """Whether ``result`` came from a real dataset (:func:`compare_real`)."""
    return result.summary.get("kind") == "real"


def _real_figure(result: Realism, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = result.measures
    groups = [("all", m)]
    groups += [(f"spic {g}", m[m["spiculation_group"] == g]) for g in SPICULATION_GROUPS]
    groups += [(a.replace("_", " "), m[m["attenuation"] == a]) for a in ATTENUATIONS]
    labels = [f"{name}\n(n={len(rows)})" for name, rows in groups]
    fig, axes = plt.subplots(1, 3, figsize=(14.0, 4.2))
    for ax, column, title in (
        (axes[0], "dice", f"Dice, traced vs readers' outline ({result.summary['dice_on'].split(':')[0]})"),
        (axes[2], "diameter_error_mm", "diameter error, traced − readers (mm)"),
    ):
        data = [rows[column].dropna().to_numpy() for _, rows in groups]
        ax.boxplot([d if len(d) else [np.nan] for d in data], showfliers=True)
        ax.set_xticks(range(1, len(labels) + 1), labels, rotation=45, fontsize=7)
        ax.set_title(title, fontsize=9)
    axes[0].axhline(DICE_GOOD, color="#d95f02", lw=0.8, ls="--")
    axes[2].axhline(0.0, color="0.5", lw=0.8)
    top = float(np.nanmax([m["diameter_mm"].max(), m["traced_diameter_mm"].max(), 1.0]))
    axes[1].plot([0, top], [0, top], color="0.5", lw=0.8)
    for g, colour in zip(SPICULATION_GROUPS, ("#1b9e77", "#7570b3", "#d95f02")):
        rows = m[m["spiculation_group"] == g]
        axes[1].scatter(rows["diameter_mm"], rows["traced_diameter_mm"], s=10, color=colour, label=f"spiculation {g}")
    axes[1].set_xlabel("readers' outline diameter (mm)")
    axes[1].set_ylabel("traced diameter (mm)")
    axes[1].legend(fontsize=7)
    axes[1].set_title("area-equivalent diameter", fontsize=9)
    fig.suptitle("the synthetic tracer on real patches vs the readers' outlines", fontsize=10)
    fig.text(0.01, 0.005, "LIDC-IDRI (CC BY 3.0): Armato et al., Med Phys 2011, doi:10.1118/1.3528204", fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _group_text(by: str, group: str) -> str:
    if by == "lidc_spiculation":
        return f"spic. {group}"
    return group.replace("_", " ") if by == "attenuation" else group


def _real_tables(result: Realism) -> list[Any]:
    from rich.table import Table

    s = result.summary
    main = Table(
        title="the synthetic tracer vs the readers' outlines: Dice, and diameter error (traced − readers, mm)",
        caption=f"Dice on {s['dice_on']}; ≥{DICE_GOOD:g}: share of Dice >= {DICE_GOOD:g}; spic.: the readers' "
        "spiculation rating; empty: no pixel above the threshold; |error| and more: --out",
    )
    main.add_column("group")
    for column in ("n", "Dice", "IQR", f"≥{DICE_GOOD:g}", "error", "IQR", "empty"):
        main.add_column(column, justify="right")
    for r in result.table.to_dict("records"):
        group = _group_text(r["by"], r["group"])
        if not r["n"]:
            main.add_row(group, "0", *["-"] * 6)
            continue
        main.add_row(
            group,
            str(r["n"]),
            f"{r['dice_median']:.3f}",
            f"{r['dice_q25']:.2f}–{r['dice_q75']:.2f}",
            f"{r['dice_good_share']:.0%}",
            f"{r['diameter_error_median_mm']:+.2f}",
            f"{r['diameter_error_q25_mm']:+.2f}–{r['diameter_error_q75_mm']:+.2f}",
            str(r["untraced"]),
            end_section=r["by"] == "all" or r["group"] == SPICULATION_GROUPS[-1],
        )
    return [main]


def _clean(obj: Any) -> Any:
    if isinstance(obj, float):
        return None if not math.isfinite(obj) else round(obj, 6)
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    return obj


def _figure(result: Realism, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    real = lidc.load_table()
    by = result.summary["grouping"]
    synth = result.measures
    groups = sorted(synth["group"].unique())
    fig, axes = plt.subplots(1, len(MEASURES), figsize=(4.2 * len(MEASURES), 4.0))
    for ax, m in zip(axes, MEASURES):
        data, labels, colours = [], [], []
        for g in groups:
            twin = counterpart(g, by)
            ref = real[real["spiculation"] >= 4] if twin == AT_LEAST_4 else real[real["spiculation"] == int(twin)]
            data += [ref[m].dropna().to_numpy(), synth.loc[synth["group"] == g, m].dropna().to_numpy()]
            labels += [f"real {twin}", f"syn {g}"]
            colours += ["#8c8c8c", "#d95f02"]
        parts = ax.boxplot([d if len(d) else [np.nan] for d in data], showfliers=False, patch_artist=True)
        for box, colour in zip(parts["boxes"], colours):
            box.set_facecolor(colour)
        ax.set_xticks(range(1, len(labels) + 1), labels, rotation=60, fontsize=7)
        ax.set_title(m)
    fig.suptitle(
        f"traced outlines: LIDC-IDRI readers (grey, by spiculation) vs synthetic (orange, by {by})", fontsize=9
    )
    fig.text(0.01, 0.005, "LIDC-IDRI (CC BY 3.0): Armato et al., Med Phys 2011, doi:10.1118/1.3528204", fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(result: Realism, out: Path, *, force: bool = False) -> Path:
    """Write realism.csv, summary.json, measures.csv and realism.png into a new folder ``out``.

    A real dataset's realism.csv has one row per group (``by``, ``group``, Dice and diameter-error
    statistics) and its figure shows Dice, diameters and errors by group.
    """
    from nodulab.common.writing import staged

    with staged(out, force=force, owner="summary.json") as tmp:
        result.table.round(6).to_csv(tmp / "realism.csv", index=False)
        result.measures.round(6).to_csv(tmp / "measures.csv", index=False)
        text = json.dumps(_clean(result.summary), indent=2, sort_keys=True)
        (tmp / "summary.json").write_text(text + "\n", encoding="utf-8")
        (_real_figure if is_real_result(result) else _figure)(result, tmp / "realism.png")
    return out


def fmt(stats: pd.Series) -> str:
    if not stats["n"]:
        return "-"
    return f"{stats['median']:.3g} [{stats['q25']:.3g}, {stats['q75']:.3g}]"


def rich_tables(result: Realism) -> list[Any]:
    """The printed summary: per group real beside synthetic, AUCs, quantiles and (twins) the goals.

    A real dataset: one table of Dice and diameter error, overall and by group.
    """
    from rich.table import Table

    if is_real_result(result):
        return _real_tables(result)

    by = result.summary["grouping"]
    t = result.table.set_index(["source", "group", "measure"])
    main = Table(title=f"traced outlines: median [IQR], real LIDC-IDRI vs synthetic (by {by}); KS = distance")
    main.add_column("group")
    main.add_column("n", justify="right")
    for m in MEASURES:
        main.add_column(m)
        main.add_column("KS", justify="right")
    for g, twin in result.summary["counterparts"].items():
        real_n = int(t.loc[("real", twin, "solidity"), "n"])
        main.add_row(
            f"real spiculation {twin}", str(real_n), *(x for m in MEASURES for x in (fmt(t.loc[("real", twin, m)]), ""))
        )
        syn_n = int(t.loc[("synthetic", g, "solidity"), "n"])
        main.add_row(
            f"synthetic {g}",
            str(syn_n),
            *(
                x
                for m in MEASURES
                for x in (fmt(t.loc[("synthetic", g, m)]), f"{t.loc[('synthetic', g, m), 'ks']:.2f}")
            ),
            end_section=True,
        )
    aucs = Table(title="separability (AUC)")
    for column in ("what", "real", "synthetic", "synthetic groups"):
        aucs.add_column(column)
    for name, a in result.summary["aucs"].items():
        aucs.add_row(f"{name} ({a['real_groups']})", f"{a['real']:.3f}", f"{a['synthetic']:.3f}", a["synthetic_groups"])
    quant = Table(title="diameter_mm quantiles")
    for column in ("q", "real", "synthetic", "rel. diff"):
        quant.add_column(column, justify="right")
    for q in result.summary["diameter_quantiles"]:
        quant.add_row(f"{q['q']:.0%}", f"{q['real']:.2f}", f"{q['synthetic']:.2f}", f"{q['rel_diff']:+.1%}")
    tables = [main, aucs, quant]
    if "goals" in result.summary:
        goals = Table(title="goals (LIDC twins)")
        for column in ("goal", "value", "target", ""):
            goals.add_column(column)
        for g in result.summary["goals"]:
            mark = "[green]pass[/green]" if g["pass"] else "[red]fail[/red]"
            goals.add_row(g["goal"], f"{g['value']:.3f}", f"{g['target'][0]:.3f} – {g['target'][1]:.3f}", mark)
        tables.append(goals)
    return tables
