"""The dataset gallery (design.md "Study, store, report"): one panel per split, one row per (label,
agrees) cell, as a PNG. A real dataset (``nodulab import-lidc``) has no agrees columns: its rows are
(label, spiculated) cells, spiculated meaning the readers' spiculation rating >= 4.

``nodulab gallery`` writes it to a file; a study stores ``gallery_png`` bytes in its results store
(``datasets.gallery``) and the report shows them. ``short_factor`` and ``axial_mip`` serve the
other figures (Grad-CAM overlays, probe tables).
"""

from __future__ import annotations

import io
import itertools
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from nodulab.common.choices import MAX_PER_CELL
from nodulab.common.plaintext import plain_text
from nodulab.data.dataset import (
    DatasetError,
    OutExists,
    cell_columns,
    check_out,
    is_real,
    load_manifest,
    load_split,
    lung_window,
    write_atomically,
)

LABEL_NAMES = ("benign", "malignant")
ATTENUATION_TEXT = {"ground_glass": "ground glass", "part_solid": "part-solid"}

Cell = tuple[int, tuple[int, ...]]
GALLERY_DPI = 110


def short_factor(factor: str) -> str:
    """Factor name without its unit suffix, for captions (``diameter_mm`` -> ``diameter``)."""
    factor = factor.removeprefix("agrees_")
    for unit in ("_mm", "_hu", "_deg", "_rel"):
        factor = factor.removesuffix(unit)
    return factor.replace("_", " ")


def cell_caption(cell: Cell, confounds: list[str], sep: str = " · ") -> str:
    """Human caption of a (label, agrees pattern) cell, e.g. ``malignant · conflicts``.

    With several confounds each is named: ``benign · diameter agrees · attenuation conflicts``.
    """
    label, agrees = cell
    words = ["agrees" if a else "conflicts" for a in agrees]
    if len(confounds) == 1:
        return f"{LABEL_NAMES[label]}{sep}{words[0]}"
    return sep.join([LABEL_NAMES[label], *(f"{short_factor(f)} {w}" for f, w in zip(confounds, words))])


def factor_caption(row: pd.Series) -> str:
    """Short per-image text: shape, diameter and attenuation."""
    attenuation = ATTENUATION_TEXT.get(str(row["attenuation"]), str(row["attenuation"]))
    return f"{row['shape']} · {float(row['diameter_mm']):.1f} mm\n{attenuation}"


SPICULATED_FROM = 4
"""A real row is drawn as spiculated when its ``lidc_spiculation`` rating is at least this."""
SPICULATED = "spiculated"
"""The cell column of a real dataset's gallery (``lidc_spiculation >= SPICULATED_FROM``)."""


def real_cell_caption(cell: Cell, sep: str = " · ") -> str:
    """Caption of a real dataset's (label, spiculated) cell, e.g. ``malignant · spiculation >= 4``."""
    label, (spiculated,) = cell
    return f"{LABEL_NAMES[label]}{sep}spiculation {'>=' if spiculated else '<'} {SPICULATED_FROM}"


def real_caption(row: pd.Series) -> str:
    """Short per-image text of a real nodule: the readers' malignancy and spiculation, and the diameter."""
    rating = f"mal {float(row['lidc_malignancy']):g} · spic {float(row['lidc_spiculation']):g}"
    return f"{rating}\n{float(row['diameter_mm']):.1f} mm"


def _with_spiculated(frame: pd.DataFrame) -> pd.DataFrame:
    """A real factor table with the 0/1 cell column ``spiculated`` added."""
    spiculated = (frame["lidc_spiculation"].to_numpy(dtype=np.float64) >= SPICULATED_FROM).astype(int)
    return frame.assign(**{SPICULATED: spiculated})


def _cells(frame: pd.DataFrame, confounds: list[str]) -> dict[Cell, np.ndarray]:
    """Row indices of every non-empty cell; agreeing patterns first, benign before malignant."""
    found: dict[Cell, np.ndarray] = {}
    for label in (0, 1):
        for agrees in itertools.product((1, 0), repeat=len(confounds)):
            hit = frame["label"].to_numpy() == label
            for column, a in zip(confounds, agrees):
                hit &= frame[column].to_numpy() == a
            if hit.any():
                found[(label, agrees)] = np.flatnonzero(hit)
    return found


MIP_SLAB_MM = 6.0
"""Thickness of the axial maximum-intensity slab that shows a 3D sample (as radiologists read)."""


def axial_mip(volume: np.ndarray, row: pd.Series) -> np.ndarray:
    """Maximum intensity over an axial slab of ``MIP_SLAB_MM`` centred on the nodule.

    A single slice shows only the spicules that lie in its plane; the slab shows the lesion.
    """
    centre = round(row["offset_z_mm"] / row["pixel_mm"] + (volume.shape[0] - 1) / 2)
    half = max(0, round(MIP_SLAB_MM / 2 / row["pixel_mm"]))
    low, high = max(centre - half, 0), min(centre + half + 1, volume.shape[0])
    return volume[low:high].max(axis=0)


def _draw_split(
    fig: Figure,
    title: str,
    rows: list[Cell],
    cells: dict[Cell, np.ndarray],
    images: np.ndarray,
    frame: pd.DataFrame,
    confounds: list[str],
    per_cell: int,
    rng: np.random.Generator,
    real: bool = False,
) -> None:
    """One split's panel: a row per cell, ``per_cell`` lung-windowed images each (``real``: LIDC captions)."""
    fig.suptitle(title, fontsize=11, fontweight="bold")
    axes = fig.subplots(len(rows), per_cell, squeeze=False)
    for r, cell in enumerate(rows):
        members = cells.get(cell, np.zeros(0, dtype=int))
        chosen = np.sort(rng.choice(members, size=min(per_cell, len(members)), replace=False))
        for c, ax in enumerate(axes[r]):
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                text = real_cell_caption(cell, sep="\n") if real else cell_caption(cell, confounds, sep="\n")
                ax.set_ylabel(text, fontsize=7.5)
            if c >= len(chosen):
                for spine in ax.spines.values():
                    spine.set_visible(False)
                if c == 0:
                    ax.text(0.5, 0.5, "no samples", ha="center", va="center", fontsize=7, color="0.5")
                continue
            image = np.asarray(images[chosen[c]])
            if image.ndim == 3:
                image = axial_mip(image, frame.iloc[chosen[c]])
            ax.imshow(lung_window(image.astype(np.float32)), cmap="gray", vmin=0.0, vmax=1.0)
            ax.set_title((real_caption if real else factor_caption)(frame.iloc[chosen[c]]), fontsize=6.5)


@plain_text
def gallery_figure(root: Path, *, per_cell: int = 4, seed: int = 0) -> Figure:
    """The gallery of a dataset folder as a matplotlib ``Figure``: one panel per split, one row per cell.

    Images are shown in the lung window (WL -600, WW 1500); 3D samples by a 6 mm axial
    maximum-intensity slab through the nodule. Rows are the union of cells over splits, so panels
    line up; up to three panels per row. A real dataset's cells are (label, spiculation rating >= 4)
    and its captions the readers' malignancy and spiculation ratings and the diameter.

    Args:
        root: dataset folder.
        per_cell: samples shown per cell (fewer when a cell is smaller).
        seed: picks which samples are shown.
    """
    if not 1 <= per_cell <= MAX_PER_CELL:
        raise DatasetError(f"--per-cell must be 1..{MAX_PER_CELL}, got {per_cell}")
    manifest = load_manifest(root)
    splits = sorted(manifest["splits"], key=lambda s: ({"train": 0, "val": 1}.get(s, 2), s))
    loaded = {s: load_split(root, s) for s in splits}
    real = is_real(manifest)
    if real:
        loaded = {s: (images, masks, _with_spiculated(frame)) for s, (images, masks, frame) in loaded.items()}
    confounds = [SPICULATED] if real else cell_columns(loaded[splits[0]][2])
    cells = {s: _cells(loaded[s][2], confounds) for s in splits}
    rows = sorted({c for found in cells.values() for c in found}, key=lambda c: (c[0], [-a for a in c[1]]))
    columns = min(3, len(splits))
    grid_rows = -(-len(splits) // columns)
    height = len(rows) * 1.6 + 0.6
    fig = Figure(figsize=(columns * (per_cell * 1.35 + 1.1), grid_rows * height + 0.5), layout="constrained")
    header, body = fig.subfigures(2, 1, height_ratios=[0.5, grid_rows * height])
    if real:
        source = manifest["real"].get("source", "real CT")
        readers = manifest["real"].get("readers")
        name = f"{source} (real CT{f', readers {readers}' if readers else ''})"
        rows_are = f"label × readers' spiculation rating >= {SPICULATED_FROM}"
    else:
        name, rows_are = manifest["scenario"].get("name", ""), "label × confound agreement"
    caption = f"{name}: rows are {rows_are}; lung window WL -600 / WW 1500"
    if manifest["image"]["dim"] == 3:
        caption += f"; {MIP_SLAB_MM:g} mm axial MIP through each nodule"
    header.suptitle(caption, fontsize=12)
    panels = body.subfigures(grid_rows, columns, squeeze=False).ravel()
    for panel in panels[len(splits) :]:
        panel.set_visible(False)
    for k, (split, panel) in enumerate(zip(splits, panels)):
        images, _, frame = loaded[split]
        rng = np.random.default_rng([seed, k])
        title = f"{split} (n={len(frame)})"
        _draw_split(panel, title, rows, cells[split], images, frame, confounds, per_cell, rng, real)
    return fig


def _save_png(fig: Figure, target: str | io.BytesIO) -> None:
    fig.savefig(target, format="png", dpi=GALLERY_DPI, metadata={"Software": None})


def gallery_png(root: Path, *, per_cell: int = 4, seed: int = 0) -> bytes:
    """The gallery of a dataset folder as PNG bytes (what a study stores in ``datasets.gallery``)."""
    buffer = io.BytesIO()
    _save_png(gallery_figure(root, per_cell=per_cell, seed=seed), buffer)
    return buffer.getvalue()


def gallery(root: Path, out_png: Path, *, per_cell: int = 4, seed: int = 0, force: bool = False) -> Path:
    """Draw a dataset gallery (``gallery_figure``) into a PNG file.

    Args:
        root: dataset folder. out_png: PNG file to write.
        per_cell: samples shown per cell (fewer when a cell is smaller).
        seed: picks which samples are shown.
        force: replace an existing ``out_png``.

    Returns:
        ``out_png``, the file written (atomically; its name is never changed).

    Raises:
        DatasetError: ``out_png`` does not end in ``.png``, exists without ``force``
            (``OutExists``), or lies inside the dataset.
    """
    out_png = Path(out_png)
    if out_png.suffix.lower() != ".png":
        raise DatasetError(f"--out {out_png}: a gallery is a PNG file; name it *.png")
    check_out(out_png, [root])
    if (out_png.exists() or out_png.is_symlink()) and not force:
        raise OutExists(f"--out {out_png} already exists (use --force to replace it)")
    fig = gallery_figure(root, per_cell=per_cell, seed=seed)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(out_png, lambda tmp: _save_png(fig, tmp), exclusive=not force)
    return out_png
