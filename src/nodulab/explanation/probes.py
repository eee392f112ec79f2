"""Linear decodability of every factor from the frozen embedding, and embedding maps (design.md
"Evaluation and explanation").

``factor_probes`` asks how linearly decodable each factor of variation is from a run's frozen
features (Hermann & Lampinen 2020): a logistic regression for categorical factors (``label``,
``shape``, ``attenuation``, ``agrees_*``; scored by balanced accuracy, chance = 1 / classes) and
a ridge regression for numeric ones (scored by held-out R², chance <= 0). Every score is fitted
on one half of a balanced split and scored on the other (a seeded stratified 2-fold split, both
directions averaged), and comes with two controls beside it:

- ``random_init``: the same probe on the run's untrained encoder (same seed): what the input
  alone gives away through random convolutions. Diameter, attenuation and noise are decodable
  from almost any encoder; a trained score is only interesting above this one.
- ``shuffled_labels``: the trained encoder with the fitting half's targets permuted, scored on
  the true held-out targets (mean over ``PERMUTATIONS`` permutations): the score a probe
  reaches by fitting noise (about chance).

``embedding_figure`` draws the frozen embedding (PCA; UMAP too when ``umap-learn`` is
importable) coloured by the label and by each factor that varies, one panel each.

On a real dataset (``nodulab import-lidc``) the targets are the readers' ratings instead of the
renderer's factors (``REAL_CATEGORICAL``, ``REAL_NUMERIC``): ``label`` (malignancy) and
``attenuation`` by balanced accuracy, ``diameter_mm`` and every ``lidc_*`` rating that varies by
ridge R², with the same controls. The halves are split by patient (a patient's nodules, or one
nodule's readers with ``--readers each``, never on both sides).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from rich.table import Table
from sklearn.decomposition import PCA
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, RidgeCV
from sklearn.metrics import balanced_accuracy_score, r2_score
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from nodulab.common.plaintext import plain_text
from nodulab.common.tables import RESULT_TABLES, write_table
from nodulab.data.dataset import is_real, load_manifest, load_split
from nodulab.data.gallery import short_factor
from nodulab.synth import lidc
from nodulab.synth.factors import FACTORS, Factor
from nodulab.training.readouts import extract
from nodulab.training.runs import LoadedRun, run_threads

if TYPE_CHECKING:
    from nodulab.explanation.context import ExplainContext

CONTROLS = ("trained", "random_init", "shuffled_labels")


def categorical_factors(table: Mapping[str, Factor] = FACTORS) -> tuple[str, ...]:
    """``label``, then every categorical factor of ``table``, in table order."""
    return ("label", *(name for name, f in table.items() if f.kind == "category"))


def numeric_factors(table: Mapping[str, Factor] = FACTORS) -> tuple[str, ...]:
    """Every decodable numeric factor of ``table`` (``Factor.decodable``): ``diameter_mm`` first
    (where ``probes.csv`` has always listed it), then table order."""
    decodable = [name for name, f in table.items() if f.numeric and f.decodable]
    return tuple(sorted(decodable, key=lambda name: name != "diameter_mm"))


def expressed_where(table: Mapping[str, Factor] = FACTORS) -> dict[str, tuple[str, tuple[str, ...]]]:
    """``{factor: (column, values)}`` for each factor of ``table`` that the image expresses on
    some rows only (``Factor.expressed_when``)."""
    return {name: f.expressed_when for name, f in table.items() if f.expressed_when is not None}


CATEGORICAL = categorical_factors()
"""Categorical factors (``agrees_<factor>`` columns are categorical too)."""
NUMERIC = numeric_factors()
"""Numeric factors decoded by ridge R². ``rotation_deg`` is left out: the angle is circular and
each nodule's own orientation is drawn from its seed, so the stored angle is not identifiable
from the image. ``pixel_mm`` is fixed per dataset."""
ACTS_ON = expressed_where()
"""Factors that only act on some rows (the renderer ignores them elsewhere): decoded there only,
so a probe is not scored on values the image cannot show."""
REAL_CATEGORICAL = ("label", "attenuation")
"""Categorical targets on a real dataset: malignancy (the dataset's label) and the texture class."""
REAL_NUMERIC = ("diameter_mm", *(f"lidc_{name}" for name in lidc.RATINGS))
"""Numeric targets on a real dataset: the measured diameter and every reader rating (R²)."""
RIDGE_ALPHAS = tuple(np.logspace(-2, 5, 15))
LOGISTIC_CS = (1e-2, 1e-1, 1.0)
PERMUTATIONS = 5
"""Label permutations averaged in the ``shuffled_labels`` control (per half)."""
PANELS_PER_ROW = 6
MIN_ROWS = 8
"""Fewest rows (after restricting to where a factor acts) a factor is probed on."""


# ----------------------------------------------------------------------------- data
def probe_split(data_dir: Path | str, split: str = "val_balanced") -> str:
    """The split probes use: ``split``, or ``val`` when ``val_balanced`` is asked for but absent."""
    splits = load_manifest(Path(data_dir))["splits"]
    if split == "val_balanced" and split not in splits and "val" in splits:
        return "val"
    return split


def _features(run: LoadedRun, images: np.ndarray) -> dict[str, np.ndarray]:
    """Frozen features of the trained and the untrained encoder, at the run's thread count."""
    with run_threads(run.threads):
        return {
            "trained": extract(run.model, images, device=run.device)["features"],
            "random_init": extract(run.init, images, device=run.device)["features"],
        }


def probe_targets(
    factors: pd.DataFrame,
    *,
    categorical: tuple[str, ...] | None = None,
    numeric: tuple[str, ...] | None = None,
    acts_on: Mapping[str, tuple[str, tuple[str, ...]]] | None = None,
) -> list[tuple[str, str, np.ndarray, np.ndarray]]:
    """Every factor that varies in a factor table, with the rows it is decoded on.

    Args:
        factors: a split's factor table.
        categorical, numeric, acts_on: the targets (default ``CATEGORICAL``, ``NUMERIC``, ``ACTS_ON``:
            the synthetic factors; a real dataset passes ``REAL_CATEGORICAL``, ``REAL_NUMERIC`` and ``{}``).

    Returns:
        ``[(factor, target, rows, values)]``: ``target`` says what is decoded (``class``, or
        ``value``, with ``among ...`` when restricted to the rows where the factor acts), ``rows``
        the int row indices, ``values`` the target per row (class codes or floats).
    """
    categorical = CATEGORICAL if categorical is None else categorical  # read at call time (the registry may grow)
    numeric = NUMERIC if numeric is None else numeric
    acts_on = ACTS_ON if acts_on is None else acts_on
    found = []
    agrees = [c for c in factors.columns if c.startswith("agrees_")]
    for name in (*categorical, *agrees):
        if name in factors:
            _, codes = np.unique(factors[name].astype(str).to_numpy(), return_inverse=True)
            counts = np.bincount(codes)
            keep = np.flatnonzero(counts[codes] >= 4)  # a class needs >= 2 rows in each half
            kept, codes = np.unique(codes[keep], return_inverse=True)
            if len(kept) >= 2:
                found.append((name, f"class ({len(kept)})", keep, codes))
    for name in numeric:
        if name not in factors:
            continue
        rows = np.arange(len(factors))
        target = "value"
        if name in acts_on:
            column, values = acts_on[name]
            rows = np.flatnonzero(factors[column].isin(values).to_numpy())
            target = f"value among {' or '.join(values)}"
        y = factors[name].to_numpy(dtype=np.float64)[rows]
        if len(rows) >= MIN_ROWS and np.ptp(y) > 0:
            found.append((name, target, rows, y))
    return found


# ----------------------------------------------------------------------------- probes
def _logistic(x_fit: np.ndarray, y_fit: np.ndarray, seed: int) -> LogisticRegression:
    """A class-balanced logistic probe; C chosen by inner stratified CV (balanced accuracy, ties
    toward the smaller C, as the run's own probe chooses it)."""
    folds = StratifiedKFold(max(2, min(3, int(np.bincount(y_fit).min()))), shuffle=True, random_state=seed)
    best = (-np.inf, LOGISTIC_CS[0])
    for c in LOGISTIC_CS:
        scores = []
        for inner_fit, inner_test in folds.split(x_fit, y_fit):
            model = LogisticRegression(C=c, class_weight="balanced", max_iter=2000).fit(
                x_fit[inner_fit], y_fit[inner_fit]
            )
            scores.append(balanced_accuracy_score(y_fit[inner_test], model.predict(x_fit[inner_test])))
        if np.mean(scores) > best[0] + 1e-12:
            best = (float(np.mean(scores)), c)
    return LogisticRegression(C=best[1], class_weight="balanced", max_iter=2000).fit(x_fit, y_fit)


def _fit_score(
    x_fit: np.ndarray, y_fit: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, categorical: bool, seed: int
) -> float:
    """Fit a linear probe on standardised features of one half, score it on the other."""
    scaler = StandardScaler().fit(x_fit)
    x_fit, x_test = scaler.transform(x_fit), scaler.transform(x_test)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # a large C on separable rows stops early; it still scores
        if categorical:
            predicted = _logistic(x_fit, y_fit, seed).predict(x_test)
            return float(balanced_accuracy_score(y_test, predicted))
        ridge = RidgeCV(alphas=RIDGE_ALPHAS).fit(x_fit, y_fit)  # efficient leave-one-out choice of the penalty
        return float(r2_score(y_test, ridge.predict(x_test)))


def decodability(
    features: dict[str, np.ndarray],
    factors: pd.DataFrame,
    *,
    seed: int = 0,
    targets: list[tuple[str, str, np.ndarray, np.ndarray]] | None = None,
    groups: np.ndarray | None = None,
) -> pd.DataFrame:
    """Probe scores of every varying factor, from given features, with the controls.

    Args:
        features: ``{"trained": (N, E), "random_init": (N, E)}`` features of the same rows.
        factors: the rows' factor table (``N`` rows).
        seed: the half split and the label permutation.
        targets: what is decoded (default ``probe_targets(factors)``).
        groups: ``(N,)`` group ids kept on one side of the half split (a real dataset's patients);
            default none.

    Returns:
        A frame with the columns of ``RESULT_TABLES["probes"]``: per factor, ``trained``,
        ``random_init`` and ``shuffled_labels`` (the trained features with permuted fitting
        targets) rows.
    """
    records = []
    # the fits are tiny (about 100 x 128): BLAS threads cost 100x more than they save here
    with threadpool_limits(1):
        records = _decode_all(features, factors, seed, probe_targets(factors) if targets is None else targets, groups)
    return pd.DataFrame.from_records(records, columns=list(RESULT_TABLES["probes"].columns))


def _decode_all(
    features: dict[str, np.ndarray],
    factors: pd.DataFrame,
    seed: int,
    targets: list[tuple[str, str, np.ndarray, np.ndarray]],
    groups: np.ndarray | None,
) -> list[tuple]:
    records = []
    for k, (factor, target, rows, y) in enumerate(targets):
        categorical = target.startswith("class")
        strata = y if categorical else factors["label"].to_numpy()[rows]
        if np.bincount(np.unique(strata, return_inverse=True)[1]).min() < 2:
            strata = np.zeros(len(rows), dtype=int)  # too few of a label to stratify by it
        if groups is None:
            halves = list(StratifiedKFold(2, shuffle=True, random_state=seed).split(rows, strata))
        else:
            if len(np.unique(groups[rows])) < 2:
                continue  # one patient: no held-out half
            folds = StratifiedGroupKFold(2, shuffle=True, random_state=seed)
            halves = list(folds.split(rows, strata, groups[rows]))
            if categorical and any(np.bincount(y[fit], minlength=int(y.max()) + 1).min() < 2 for fit, _ in halves):
                continue  # whole patients cannot give each half two rows of every class
        rng = np.random.default_rng([seed, k])
        scores: dict[str, list[float]] = {c: [] for c in CONTROLS}
        for fit, test in halves:
            for control in CONTROLS:
                x = features["trained" if control == "shuffled_labels" else control][rows]
                # one permutation is a noisy chance level (a random probe on size-dominated
                # features scores far from chance either way); the mean of several is not
                draws = PERMUTATIONS if control == "shuffled_labels" else 1
                for _ in range(draws):
                    y_fit = rng.permutation(y[fit]) if control == "shuffled_labels" else y[fit]
                    scores[control].append(_fit_score(x[fit], y_fit, x[test], y[test], categorical, seed))
        metric = "balanced_accuracy" if categorical else "r2"
        records += [(factor, target, metric, float(np.mean(scores[c])), c) for c in CONTROLS]
    return records


def factor_probes(
    run: LoadedRun, data_dir: Path | str, *, split: str = "val_balanced", n: int | None = None, seed: int = 0
) -> pd.DataFrame:
    """How linearly decodable each factor is from the run's frozen embedding (``probes.csv``).

    Probes are fitted and scored on held-out halves of ``split`` (default ``val_balanced``,
    where the confound is balanced, so a factor is not decodable merely through the label; a
    dataset without it falls back to ``val``). The split used is in ``frame.attrs["split"]``.

    Args:
        run: the loaded run (its trained and untrained encoders are used).
        data_dir: the dataset folder.
        split: the split probed.
        n: use the first ``n`` rows only (default all).
        seed: the half split and the shuffled-label permutation.

    Returns:
        Columns ``factor,target,metric,score,control``: ``metric`` is ``balanced_accuracy``
        (categorical) or ``r2`` (numeric); ``control`` is ``trained``, ``random_init`` or
        ``shuffled_labels``.
    """
    used = probe_split(data_dir, split)
    images, _, factors = load_split(Path(data_dir), used)
    count = len(factors) if n is None else min(int(n), len(factors))
    factors = factors.iloc[:count].reset_index(drop=True)
    if is_real(load_manifest(Path(data_dir))):
        targets = probe_targets(factors, categorical=REAL_CATEGORICAL, numeric=REAL_NUMERIC, acts_on={})
        groups = factors["patient"].to_numpy()
        frame = decodability(_features(run, images[:count]), factors, seed=seed, targets=targets, groups=groups)
    else:
        frame = decodability(_features(run, images[:count]), factors, seed=seed)
    frame.attrs["split"] = used
    return frame


# ----------------------------------------------------------------------------- embedding map
def embedding_coordinates(features: np.ndarray, *, seed: int = 0) -> dict[str, np.ndarray]:
    """2D maps of features: ``{"PCA": (N, 2)}``, plus ``"UMAP"`` when ``umap-learn`` is importable."""
    z = StandardScaler().fit_transform(np.asarray(features, dtype=np.float64))
    maps = {"PCA": PCA(n_components=2, random_state=seed).fit_transform(z)}
    try:
        import umap  # optional: not a dependency of nodulab
    except ImportError:
        return maps
    neighbours = max(2, min(15, len(z) - 1))
    maps["UMAP"] = umap.UMAP(n_neighbors=neighbours, random_state=seed).fit_transform(z)
    return maps


def _colour_columns(factors: pd.DataFrame, *, real: bool = False) -> list[str]:
    """The label, then every categorical and numeric factor that varies (a real dataset: its ratings)."""
    agrees = [c for c in factors.columns if c.startswith("agrees_")]
    names = [*REAL_CATEGORICAL, *REAL_NUMERIC] if real else [*CATEGORICAL, *agrees, *NUMERIC, "rotation_deg"]
    return [c for c in names if c in factors and factors[c].nunique() > 1]


@plain_text
def embedding_figure(run: LoadedRun, data_dir: Path | str, *, split: str, n: int | None = None) -> Figure:
    """The frozen embedding of the trained encoder, coloured by label and by each varying factor.

    Args:
        run: the loaded run. data_dir: the dataset folder. split: the split shown.
        n: show the first ``n`` rows only (default all).

    Returns:
        A figure with one row per map (PCA; UMAP when installed) and one panel per factor.
    """
    images, _, factors = load_split(Path(data_dir), split)
    count = len(factors) if n is None else min(int(n), len(factors))
    factors = factors.iloc[:count].reset_index(drop=True)
    with run_threads(run.threads):
        features = extract(run.model, images[:count], device=run.device)["features"]
    maps = embedding_coordinates(features)
    columns = _colour_columns(factors, real=is_real(load_manifest(Path(data_dir))))
    width = max(1, min(PANELS_PER_ROW, len(columns)))
    rows_per_map = -(-len(columns) // width)
    fig = Figure(figsize=(2.5 * width + 0.5, 2.4 * rows_per_map * len(maps) + 0.5), layout="constrained")
    loss = run.record.get("config", {}).get("loss", "")
    fig.suptitle(f"{loss}: frozen embedding of {split} (n={count}), coloured by each factor that varies", fontsize=10)
    axes = fig.subplots(rows_per_map * len(maps), width, squeeze=False)
    for m, (method, xy) in enumerate(maps.items()):
        for k in range(rows_per_map * width):
            ax = axes[m * rows_per_map + k // width, k % width]
            ax.set_xticks([])
            ax.set_yticks([])
            if k >= len(columns):
                ax.set_visible(False)
                continue
            _scatter(fig, ax, xy, factors[columns[k]], columns[k])
            ax.set_title(
                f"{method} · {columns[k] if columns[k].startswith('agrees_') else short_factor(columns[k])}", fontsize=8
            )
    return fig


def _scatter(fig: Figure, ax: Axes, xy: np.ndarray, values: pd.Series, column: str) -> None:
    """One panel: categories in discrete colours with a legend, numbers on a colour bar."""
    if column in CATEGORICAL or column.startswith("agrees_"):
        names = values.astype(str).to_numpy()
        for code, name in enumerate(sorted(set(names))):
            text = ("benign", "malignant")[int(name)] if column == "label" else name
            ax.scatter(xy[names == name, 0], xy[names == name, 1], s=6, color=f"C{code}", label=text, linewidths=0)
        ax.legend(fontsize=6, markerscale=1.5, loc="best", frameon=False)
    else:
        points = ax.scatter(xy[:, 0], xy[:, 1], s=6, c=values.to_numpy(dtype=float), cmap="viridis", linewidths=0)
        fig.colorbar(points, ax=ax, shrink=0.8).ax.tick_params(labelsize=6)


EMBEDDING_ROWS = 1000
"""Rows shown in ``embedding.png`` (the first ones of the first explained split)."""


def write_probes(context: ExplainContext, folder: Path) -> None:
    """``explain`` writer: ``probes.csv`` and ``embedding.png`` into ``folder``.

    On a real dataset the probes decode the readers' ratings (module docstring) on the first
    explained split (default ``test_lidc``: every real row is unseen by a synthetic-trained run).
    """
    split = context.splits[0]
    if is_real(context.manifest):
        frame = factor_probes(context.run, context.data_dir, split=split, n=context.n)
    else:
        frame = factor_probes(context.run, context.data_dir, n=context.n)
    write_table(frame, folder / RESULT_TABLES["probes"].file_name)
    figure = embedding_figure(
        context.run, context.data_dir, split=split, n=min(context.n or EMBEDDING_ROWS, EMBEDDING_ROWS)
    )
    figure.savefig(folder / "embedding.png", dpi=90, metadata={"Software": None})
    context.tables["probes"] = frame
    context.record["probes"] = {"split": frame.attrs["split"], "controls": list(CONTROLS)}
    if is_real(context.manifest):
        context.record["probes"]["targets"] = "label (malignancy), attenuation, diameter_mm, lidc_* ratings"
        context.record["probes"]["halves"] = "split by patient"
    context.record["embedding"] = {"split": split}


def probes_table(frame: pd.DataFrame, title: str | None = None) -> Table:
    """A rich table of a ``probes.csv`` frame: one row per factor, the trained score beside its controls."""
    table = Table(title=title)
    for name in ("factor", "target", "metric", *CONTROLS):
        table.add_column(name, justify="right" if name in CONTROLS else "left", no_wrap=True)
    scores = {(r.factor, r.target, r.control): r.score for r in frame.itertuples(index=False)}
    for r in frame.drop_duplicates(["factor", "target"]).itertuples(index=False):
        table.add_row(
            r.factor, r.target, r.metric, *(f"{scores.get((r.factor, r.target, c), np.nan):.3f}" for c in CONTROLS)
        )
    return table
