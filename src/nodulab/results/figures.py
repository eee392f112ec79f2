"""The report's figures, drawn from the study's tables: heatmaps, the diameter sweep, training curves.

Each is a matplotlib ``Figure`` (no pyplot state, so nothing leaks between figures or threads)
saved as PNG bytes without a software tag, so the same tables give the same bytes.
"""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from nodulab.common.plaintext import plain_text

DPI = 90


def to_png(fig: Figure) -> bytes:
    """The figure as PNG bytes (no ``Software`` metadata)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return buffer.getvalue()


@plain_text
def heatmap(
    matrix: pd.DataFrame, *, title: str, colorbar: str, vmin: float = 0.0, vmax: float = 1.0, cmap: str = "viridis"
) -> bytes:
    """Rows × columns of numbers as coloured cells with the value written in each (NaN left blank).

    Args:
        matrix: the values; its index and columns label the rows and columns.
        title: the figure title. colorbar: what the colour means.
        vmin, vmax, cmap: the colour scale.
    """
    values = matrix.to_numpy(dtype=float)
    rows, columns = values.shape
    fig = Figure(figsize=(2.2 + 0.75 * columns, 1.8 + 0.38 * rows), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(columns), [str(c) for c in matrix.columns], rotation=35, ha="right", fontsize=8)
    ax.set_yticks(range(rows), [str(r) for r in matrix.index], fontsize=8)
    middle = (vmin + vmax) / 2
    for (r, c), value in np.ndenumerate(values):
        if np.isfinite(value):
            ax.text(
                c, r, f"{value:.2f}", ha="center", va="center", fontsize=7, color="white" if value < middle else "black"
            )
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, shrink=0.8).set_label(colorbar, fontsize=8)
    return to_png(fig)


@plain_text
def sweep_figure(curves: pd.DataFrame, *, title: str) -> bytes:
    """Mean P(malignant) against the swept value, one line per loss.

    Args:
        curves: columns ``label`` (the line's name), ``value``, ``mean_p``.
    """
    fig = Figure(figsize=(5.0, 3.2), layout="constrained")
    ax = fig.subplots()
    for label, part in curves.groupby("label", sort=True):
        part = part.sort_values("value")
        ax.plot(part["value"], part["mean_p"], marker=".", label=str(label))
    ax.axhline(0.5, color="0.6", linestyle=":", linewidth=1)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("diameter (mm)")
    ax.set_ylabel("mean P(malignant)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    return to_png(fig)


@plain_text
def history_figure(history: pd.DataFrame, names: list[str], *, title: str) -> bytes:
    """Training curves: one panel per history name, one line per run label.

    Args:
        history: columns ``label`` (the line's name), ``epoch``, ``name``, ``value``.
        names: the history names to draw, one panel each.
    """
    fig = Figure(figsize=(4.0 * len(names), 3.0), layout="constrained")
    for ax, name in zip(np.atleast_1d(fig.subplots(1, len(names))), names):
        for label, part in history[history["name"] == name].groupby("label", sort=True):
            part = part.sort_values("epoch")
            ax.plot(part["epoch"], part["value"], marker=".", label=str(label))
        ax.set_xlabel("epoch")
        ax.set_title(name.replace("_", " "), fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return to_png(fig)


DYNAMICS_LINES = {
    "balanced_accuracy": ("conflict balanced accuracy", "C0", "-"),
    "cue_flip_rate": ("cue flip rate", "C2", "--"),
    "confound_flip_rate": ("confound flip rate", "C3", "--"),
    "null_flip_rate": ("null flip rate", "0.5", ":"),
}
"""The dynamics figure's lines: measure -> (legend, colour, line style)."""


@plain_text
def dynamics_figure(frame: pd.DataFrame, *, title: str) -> bytes:
    """Per loss (one panel each), the conflict score and the flip rates against epoch: mean over
    seeds as a line, the seeds' range as a band.

    Args:
        frame: columns ``label`` (the panel: a loss and its readout), ``seed``, ``epoch``,
            ``measure`` (``DYNAMICS_LINES``), ``value``.
    """
    labels = list(dict.fromkeys(frame["label"])) or [""]
    fig = Figure(figsize=(3.0 * len(labels), 2.8), layout="constrained")
    axes = fig.subplots(1, len(labels), squeeze=False)[0]
    for ax, label in zip(axes, labels):
        part = frame[frame["label"] == label]
        for measure, (legend, colour, style) in DYNAMICS_LINES.items():
            lines = part[part["measure"] == measure].groupby("epoch")["value"]
            if not len(lines):
                continue
            mean, low, high = lines.mean(), lines.min(), lines.max()
            ax.plot(mean.index, mean.to_numpy(), color=colour, linestyle=style, marker=".", label=legend)
            ax.fill_between(mean.index, low.to_numpy(), high.to_numpy(), color=colour, alpha=0.15, linewidth=0)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xscale("log", base=2)
        epochs = sorted(set(part["epoch"]))
        ax.set_xticks(epochs, [f"{e:g}" for e in epochs])
        ax.minorticks_off()
        ax.set_xlabel("epoch (log scale)")
        ax.set_title(label, fontsize=9, usetex=False)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    return to_png(fig)
