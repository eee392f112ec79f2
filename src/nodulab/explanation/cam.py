"""Grad-CAM of a run's decision, summarised by the renderer's region masks (design.md "Evaluation and explanation").

``gradcam`` computes Grad-CAM (Selvaraju et al. 2017) with our own forward hook and
``torch.autograd.grad``: no backward hooks, no ``.grad`` written into any parameter, the network
in eval mode (BatchNorm uses its running statistics and updates nothing), every module's
train/eval flag restored afterwards. The map is ``ReLU(sum_k alpha_k A_k)`` with ``alpha_k`` the
spatial mean of d(score)/d(A_k), upsampled (bi/trilinear) to the input's spatial shape, in raw
units: no min-max normalisation, so nothing can invert it (MONAI's default post-processing maps
(min, max) to (1, 0)).

The score is the malignant log-odds of one classifier: the model's own ``head`` (logit 1 minus
logit 0) or a linear readout on the features (``probe``, ``dfr``: standardise, dot, add the
intercept; differentiable). kNN has no gradient and gets no map.

The layer (``cam_layer``) is the deepest one whose maps keep at least a quarter of the input's
side (16x16 at 64 px): for ``small-cnn`` the output of block 3 before its max-pool (64
channels; 16x16 at 64 px, 8x8 at 32 px); for ``resnet18`` with the small stem ``layer3`` (the
ImageNet stem reaches a quarter by ``layer1``). Finer than the block outputs (block 2's output
is as fine but shallower), coarse enough that each unit sees the whole lesion. Because such a
layer always exists, the body / spicules / vessels / background split is always reported.

``cam_table`` gives ``cam.csv``: per classifier, the share of positive attribution in each
mask region against that region's share of the image, plus the weight-randomisation sanity
check of Adebayo et al. (2018) as the row ``region == "sanity_rank_corr"``: the mean per-sample
Spearman rank correlation between the trained model's maps and the maps of the run's untrained
encoder (same seed) read by its own untrained head or probe; ``area_share`` is empty there. A
map that barely changes when the weights are random (correlation near 1) shows the input's
edges, not what the model learned.

On a real dataset (``nodulab import-lidc``) the mask has two regions only: ``body`` is the
readers' outline (consensus >= 50%, or the one reader) and ``background`` the rest
(``REAL_REGIONS``); ``cam.csv`` reads the same (the share of the map inside the outline against
the outline's area), with the same sanity row.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from scipy.stats import spearmanr
from torch import nn

from nodulab.common.plaintext import plain_text
from nodulab.common.tables import RESULT_TABLES, write_table
from nodulab.data.dataset import hu_to_input, is_real, load_manifest, load_split, lung_window
from nodulab.data.gallery import LABEL_NAMES, axial_mip
from nodulab.synth.renderer import REGIONS
from nodulab.training.models import NoduleNet
from nodulab.training.readouts import Readouts
from nodulab.training.runs import LoadedRun, run_threads

if TYPE_CHECKING:
    from nodulab.explanation.context import ExplainContext

SANITY_REGION = "sanity_rank_corr"
CAM_CLASSIFIERS = ("head", "probe", "dfr")
"""Classifiers with a gradient (kNN has none)."""
EXPLAIN = ("predicted", "malignant", "benign")
REAL_REGIONS = {"background": REGIONS["background"], "body": REGIONS["body"]}
"""The regions of a real dataset's masks: the readers' outline is ``body`` (no spicule or vessel regions)."""
MIN_SIDE_FRACTION = 0.25
"""The Grad-CAM layer keeps at least this fraction of the input's side."""


# ----------------------------------------------------------------------------- the score
class DecisionScore(nn.Module):
    """Image ``(B, 1, *S)`` -> malignant log-odds ``(B,)`` of one classifier of a ``NoduleNet``.

    Args:
        model: the network.
        linear: ``None`` for the model's own head (logit 1 - logit 0), or
            ``(coef, mean, scale, intercept)`` of a logistic readout on standardised features.
    """

    def __init__(
        self, model: NoduleNet, linear: tuple[np.ndarray, np.ndarray, np.ndarray, float] | None = None
    ) -> None:
        super().__init__()
        if linear is None and model.head is None:
            raise ValueError("DecisionScore: the model has no head; pass a linear readout")
        self.model = model
        self.linear = None
        if linear is not None:
            coef, mean, scale, intercept = (torch.as_tensor(np.asarray(v, dtype=np.float64)) for v in linear)
            # the readout is float64 on standardised features: fold it into one float32 affine map
            weight = coef / scale
            self.register_buffer("weight", weight.to(torch.float32), persistent=False)
            self.register_buffer("bias", (intercept - (mean * weight).sum()).to(torch.float32), persistent=False)
            self.linear = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.model.features(x)
        if self.linear is None:
            logits = self.model.head(features)
            return logits[:, 1] - logits[:, 0]
        return features @ self.weight + self.bias


def decision_score(model: NoduleNet, readouts: Readouts | None, classifier: str) -> DecisionScore:
    """The differentiable score of ``head``, ``probe`` or ``dfr`` (``readouts`` for the last two)."""
    if classifier == "head":
        return DecisionScore(model)
    if classifier == "probe" and readouts is not None:
        return DecisionScore(
            model, (readouts.probe_coef, readouts.probe_mean, readouts.probe_scale, readouts.probe_intercept)
        )
    if classifier == "dfr" and readouts is not None and readouts.dfr is not None:
        d = readouts.dfr
        return DecisionScore(model, (d.coef, d.mean, d.scale, d.intercept))
    raise ValueError(f"decision_score: no gradient score for {classifier!r} (have head, probe, dfr)")


# ----------------------------------------------------------------------------- the layer
def _candidate_layers(model: NoduleNet) -> list[tuple[str, nn.Module]]:
    """Layers Grad-CAM may read, shallow to deep: each block's output before any pooling."""
    encoder = model.encoder
    if model.architecture.get("encoder") == "resnet18":
        backbone = encoder[0]
        return [(f"encoder.0.{name}", getattr(backbone, name)) for name in ("layer1", "layer2", "layer3", "layer4")]
    # small-cnn: block i is encoder[i] = conv-BN-ReLU-conv-BN-ReLU-pool; index 5 is its last ReLU
    blocks = [m for m in encoder if isinstance(m, nn.Sequential)]
    return [(f"encoder.{i}.5", block[5]) for i, block in enumerate(blocks)]


def cam_layer(model: NoduleNet, spatial_shape: tuple[int, ...]) -> tuple[str, nn.Module, tuple[int, ...]]:
    """The deepest layer whose maps keep at least a quarter of the input's side.

    Args:
        model: the network. spatial_shape: the input's ``S``.

    Returns:
        ``(name, module, map_shape)``.
    """
    layers = _candidate_layers(model)
    shapes: dict[int, tuple[int, ...]] = {}
    hooks = [
        m.register_forward_hook(lambda mod, _, out, i=i: shapes.__setitem__(i, tuple(out.shape[2:])))
        for i, (_, m) in enumerate(layers)
    ]
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            device = next(model.parameters()).device
            model.features(torch.zeros((1, 1, *spatial_shape), device=device))
    finally:
        for hook in hooks:
            hook.remove()
        for m, training in modes.items():
            m.training = training
    need = [max(1, int(np.ceil(s * MIN_SIDE_FRACTION))) for s in spatial_shape]
    fine = [i for i in range(len(layers)) if all(a >= b for a, b in zip(shapes[i], need))]
    i = max(fine) if fine else 0
    return layers[i][0], layers[i][1], shapes[i]


# ----------------------------------------------------------------------------- Grad-CAM
def _as_input(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Integer HU ``(N, *S)`` -> float input ``(N, 1, *S)``; float input passes through."""
    x = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.array(images))
    if not x.is_floating_point():
        x = hu_to_input(x.to(torch.float32)).unsqueeze(1)
    return x.to(torch.float32)


def gradcam(
    scorer: nn.Module,
    images: np.ndarray | torch.Tensor,
    *,
    layer: nn.Module | None = None,
    explain: str = "predicted",
    batch_size: int = 64,
) -> np.ndarray:
    """Grad-CAM maps of a score, at the input's spatial shape.

    Args:
        scorer: maps input ``(B, 1, *S)`` to the malignant log-odds ``(B,)`` (e.g.
            ``DecisionScore``) or to class scores ``(B, 2)``; a ``NoduleNet`` is read through its
            head.
        images: integer HU ``(N, *S)`` or float input ``(N, 1, *S)``; ``S`` 2D or 3D.
        layer: the module whose output is explained (default ``cam_layer`` of the network).
        explain: the class explained: ``"predicted"`` (each sample's own decision: the
            malignant log-odds where it is predicted malignant, the benign log-odds elsewhere;
            Grad-CAM shows only evidence *for* the class it explains), ``"malignant"`` or
            ``"benign"``. Always one class per sample, never a sum over classes.
        batch_size: images per pass.

    Returns:
        ``(N, *S)`` float32 maps, ``ReLU(sum_k alpha_k A_k)`` upsampled, not normalised.
    """
    if isinstance(scorer, NoduleNet):
        scorer = DecisionScore(scorer)
    x_all = _as_input(images)
    spatial = tuple(x_all.shape[2:])
    if layer is None:
        network = scorer.model if isinstance(scorer, DecisionScore) else None
        if network is None:
            raise ValueError("gradcam: pass the layer for a scorer that is not a NoduleNet")
        layer = cam_layer(network, spatial)[1]
    modes = {m: m.training for m in scorer.modules()}
    device = next(iter([*scorer.parameters(), *scorer.buffers()]), torch.zeros(0)).device
    captured: list[torch.Tensor] = []
    hook = layer.register_forward_hook(lambda mod, _, out: captured.append(out))
    maps = []
    try:
        scorer.eval()  # BatchNorm reads its running statistics and writes none
        with torch.enable_grad():
            for start in range(0, len(x_all), batch_size):
                x = x_all[start : start + batch_size].to(device).requires_grad_(True)  # a graph even if frozen
                captured.clear()
                score = _class_score(scorer(x), explain)
                activation = captured[-1]
                # samples are independent in eval mode, so the gradient of the sum is per sample
                (grad,) = torch.autograd.grad(score.sum(), activation)
                alpha = grad.mean(dim=tuple(range(2, grad.dim())), keepdim=True)
                cam = torch.relu((alpha * activation).sum(dim=1, keepdim=True)).detach()
                mode = "bilinear" if len(spatial) == 2 else "trilinear"
                maps.append(F.interpolate(cam, size=spatial, mode=mode, align_corners=False)[:, 0].cpu())
    finally:
        hook.remove()
        for m, training in modes.items():
            m.training = training
    return torch.cat(maps).numpy() if maps else np.zeros((0, *spatial), np.float32)


def _class_score(score: torch.Tensor, explain: str) -> torch.Tensor:
    """Per-sample score of the explained class from log-odds ``(B,)`` or class scores ``(B, 2)``."""
    if explain not in EXPLAIN:
        raise ValueError(f"gradcam: explain must be one of {EXPLAIN}, got {explain!r}")
    if score.dim() == 2:
        column = {"malignant": 1, "benign": 0}.get(explain)
        chosen = (
            score.detach().argmax(dim=1) if column is None else torch.full_like(score[:, 0], column, dtype=torch.long)
        )
        return score.gather(1, chosen[:, None])[:, 0]
    sign = {"malignant": 1.0, "benign": -1.0}.get(explain)
    if sign is None:  # predicted: log-odds >= 0 is malignant
        return torch.where(score.detach() >= 0, score, -score)
    return sign * score


# ----------------------------------------------------------------------------- summaries
def region_mass(maps: np.ndarray, masks: np.ndarray, regions: dict[str, int] = REGIONS) -> pd.DataFrame:
    """Share of positive attribution in each mask region against the region's share of the image.

    Args:
        maps: ``(N, *S)`` attribution maps. masks: ``(N, *S)`` region codes (``REGIONS``).
        regions: the regions reported (``REAL_REGIONS`` on a real dataset).

    Returns:
        Columns ``region, mass, area_share``: per-sample shares averaged over samples (samples
        whose map is zero everywhere are left out of ``mass``).
    """
    positive = np.clip(np.asarray(maps, dtype=np.float64), 0.0, None).reshape(len(maps), -1)
    codes = np.asarray(masks).reshape(len(masks), -1)
    total = positive.sum(axis=1)
    some = total > 0
    rows = []
    for region, code in regions.items():
        inside = codes == code
        mass = (positive * inside).sum(axis=1)[some] / total[some]
        rows.append((region, float(mass.mean()) if some.any() else float("nan"), float(inside.mean())))
    return pd.DataFrame(rows, columns=["region", "mass", "area_share"])


def rank_correlation(maps: np.ndarray, other: np.ndarray) -> float:
    """Mean per-sample Spearman correlation of two sets of maps (constant maps left out)."""
    values = []
    for a, b in zip(np.reshape(maps, (len(maps), -1)), np.reshape(other, (len(other), -1))):
        if np.ptp(a) > 0 and np.ptp(b) > 0:
            values.append(spearmanr(a, b).statistic)
    return float(np.mean(values)) if values else float("nan")


def cam_classifiers(run: LoadedRun) -> list[str]:
    """The run's classifiers Grad-CAM explains: ``head`` when it has one, ``probe``, ``dfr``."""
    return [c for c in CAM_CLASSIFIERS if c in run.classifiers]


def _maps(run: LoadedRun, images: np.ndarray, classifier: str, *, untrained: bool = False) -> np.ndarray:
    model, readouts = (run.init, run.readouts_init) if untrained else (run.model, run.readouts)
    with run_threads(run.threads):
        return gradcam(decision_score(model, readouts, classifier), images)


def cam_table(run: LoadedRun, data_dir: Path | str, *, split: str, n: int | None = None) -> pd.DataFrame:
    """``cam.csv``: where each classifier's Grad-CAM puts its positive attribution.

    Args:
        run: the loaded run. data_dir: the dataset folder. split: the split explained.
        n: the first ``n`` rows only (default all).

    Returns:
        Columns ``split,classifier,region,mass,area_share``; regions ``background``, ``body``,
        ``spicules``, ``vessels`` (a real dataset: ``background``, ``body``, the readers' outline),
        then ``sanity_rank_corr`` (``mass`` = mean Spearman
        correlation with the untrained encoder's maps, ``area_share`` empty). ``dfr`` has no
        untrained counterpart; its check uses the untrained ``probe``.
    """
    images, masks, factors = load_split(Path(data_dir), split)
    count = len(factors) if n is None else min(int(n), len(factors))
    images, masks = images[:count], masks[:count]
    regions = REAL_REGIONS if is_real(load_manifest(Path(data_dir))) else REGIONS
    frames = []
    for classifier in cam_classifiers(run):
        maps = _maps(run, images, classifier)
        control = "head" if classifier == "head" else "probe"
        random_maps = _maps(run, images, control, untrained=True)
        frame = region_mass(maps, masks, regions)
        sanity = pd.DataFrame(
            [(SANITY_REGION, rank_correlation(maps, random_maps), float("nan"))], columns=frame.columns
        )
        frame = pd.concat([frame, sanity], ignore_index=True)
        frame.insert(0, "classifier", classifier)
        frame.insert(0, "split", split)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)[list(RESULT_TABLES["cam"].columns)]


def _display(image: np.ndarray, cam: np.ndarray, row: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """A 2D image and map to show: 3D samples as an axial MIP slab (image) and slab maximum (map)."""
    if image.ndim == 2:
        return image, cam
    return axial_mip(image, row), axial_mip(cam, row)


@plain_text
def cam_figure(
    run: LoadedRun,
    data_dir: Path | str,
    *,
    split: str,
    classifier: str | None = None,
    per_label: int = 4,
    seed: int = 0,
) -> Figure:
    """An overlay gallery: lung-windowed images with the Grad-CAM map, ``per_label`` per label.

    Args:
        run: the loaded run. data_dir: the dataset folder. split: the split shown.
        classifier: ``head``, ``probe`` or ``dfr`` (default: the head where there is one, else
            the probe: the loss's own behaviour).
        per_label: samples per label (fewer when the split has fewer).
        seed: picks the samples.

    Returns:
        A figure: one row per label; each map scaled to its own maximum (shown: where, not how much).
    """
    classifier = classifier or ("head" if "head" in run.classifiers else "probe")
    images, masks, factors = load_split(Path(data_dir), split)
    rng = np.random.default_rng(seed)
    chosen = {
        label: np.sort(
            rng.choice(
                np.flatnonzero(factors["label"].to_numpy() == label),
                size=min(per_label, int((factors["label"] == label).sum())),
                replace=False,
            )
        )
        for label in (0, 1)
    }
    order = np.concatenate(list(chosen.values())).astype(int)
    maps = dict(zip(order, _maps(run, images[order], classifier))) if len(order) else {}
    fig = Figure(figsize=(1.7 * per_label + 0.6, 2 * 1.9 + 0.5), layout="constrained")
    fig.suptitle(f"Grad-CAM of {classifier} on {split} (lung window; map scaled per image)", fontsize=9)
    axes = fig.subplots(2, per_label, squeeze=False)
    for r, label in enumerate((0, 1)):
        for c, ax in enumerate(axes[r]):
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(LABEL_NAMES[label], fontsize=8)
            if c >= len(chosen[label]):
                ax.set_visible(c == 0)
                continue
            i = int(chosen[label][c])
            image, cam = _display(np.asarray(images[i], dtype=np.float32), maps[i], factors.iloc[i])
            ax.imshow(lung_window(image), cmap="gray", vmin=0.0, vmax=1.0)
            ax.imshow(cam / cam.max() if cam.max() > 0 else cam, cmap="jet", alpha=0.4, vmin=0.0, vmax=1.0)
            body = _display((np.asarray(masks[i]) == REGIONS["body"]).astype(np.uint8), maps[i], factors.iloc[i])[0]
            ax.contour(body, levels=[0.5], colors="white", linewidths=0.5)
            row = factors.iloc[i]
            kind = row["shape"] if "shape" in row else f"spic {float(row['lidc_spiculation']):g}"
            ax.set_title(f"#{i} · {kind}\n{float(row['diameter_mm']):.1f} mm", fontsize=6.5)
    return fig


CAM_ROWS = 256
"""Rows of each explained split that Grad-CAM summarises (the first ones)."""


def write_cam(context: ExplainContext, folder: Path) -> None:
    """``explain`` writer: ``cam.csv`` (every explained split) and ``cam.png`` (the first one)."""
    rows = min(context.n or CAM_ROWS, CAM_ROWS)
    frame = pd.concat(
        [cam_table(context.run, context.data_dir, split=s, n=rows) for s in context.splits], ignore_index=True
    )
    write_table(frame, folder / RESULT_TABLES["cam"].file_name)
    cam_figure(context.run, context.data_dir, split=context.splits[0]).savefig(
        folder / "cam.png", dpi=90, metadata={"Software": None}
    )
    context.tables["cam"] = frame
    context.record["cam"] = {
        "rows_per_split": rows,
        **({"regions": "body: the readers' outline; background: the rest"} if is_real(context.manifest) else {}),
        "layer": cam_layer(
            context.run.model, tuple(context.manifest["image"]["size"] for _ in range(context.manifest["image"]["dim"]))
        )[0],
    }
