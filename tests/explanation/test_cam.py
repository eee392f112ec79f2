"""Grad-CAM (nodulab.explanation.cam): frozen network, not inverted, input-shaped maps, the cam table."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import make_rows
from nodulab.common.tables import RESULT_TABLES
from nodulab.data import dataset as data
from nodulab.explanation.cam import (
    REGIONS,
    SANITY_REGION,
    DecisionScore,
    cam_figure,
    cam_layer,
    cam_table,
    gradcam,
    region_mass,
)
from nodulab.synth.renderer import render
from nodulab.synth.scenarios import load_scenario, resolve
from nodulab.training.models import build_model, freeze
from nodulab.training.readouts import Readouts
from nodulab.training.runs import LoadedRun

pytestmark = pytest.mark.usefixtures("one_thread")


def _hu(n: int, size: int, dim: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1000, 400, (n,) + (size,) * dim).astype(np.int16)


def _readouts(width: int, seed: int) -> Readouts:
    rng = np.random.default_rng(seed)
    return Readouts(
        probe_coef=rng.normal(size=width),
        probe_intercept=0.1,
        probe_mean=rng.normal(size=width) * 0.1,
        probe_scale=np.full(width, 0.5),
        probe_c=1.0,
        knn_bank=rng.normal(size=(5, width)),
        knn_labels=np.array([0, 1, 0, 1, 0]),
        knn_k=3,
    )


def _run(dim: int = 2) -> LoadedRun:
    """An untrained run in memory: a seed-0 network as 'trained', seed 1 as the untrained control."""
    model, init = (build_model("small-cnn", dim, embedding_dim=16, seed=s).eval() for s in (0, 1))
    record = {"threads": 1, "config": {"seed": 1, "loss": "ce"}}
    return LoadedRun(Path("."), record, model, init, _readouts(16, 0), _readouts(16, 1), "cpu")


# ----------------------------------------------------------------------------- frozen network
@pytest.mark.parametrize("dim, size", [(2, 32), (3, 16)])
@pytest.mark.parametrize("readout", ["head", "probe"])
def test_gradcam_leaves_weights_buffers_grads_and_modes_unchanged(dim: int, size: int, readout: str) -> None:
    model = build_model("small-cnn", dim, embedding_dim=16).train()
    model.head.eval()  # a mixed pattern of flags must come back exactly
    freeze(model, False)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    modes = {name: m.training for name, m in model.named_modules()}
    assert any("running_mean" in k for k in before)
    r = _readouts(16, 0)
    scorer = (
        DecisionScore(model)
        if readout == "head"
        else DecisionScore(model, (r.probe_coef, r.probe_mean, r.probe_scale, r.probe_intercept))
    )
    maps = gradcam(scorer, _hu(5, size, dim), batch_size=2)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "Grad-CAM changed a weight or buffer"
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert all(p.grad is None for p in model.parameters()), "Grad-CAM wrote .grad"
    assert maps.shape == (5,) + (size,) * dim and maps.dtype == np.float32  # the input's spatial shape
    assert np.all(maps >= 0) and np.any(maps > 0)


def test_gradcam_works_on_a_frozen_encoder_and_matches_eval_mode() -> None:
    images = _hu(4, 32, 2, seed=2)
    model = freeze(build_model("small-cnn", 2, embedding_dim=16).train())
    reference = gradcam(build_model("small-cnn", 2, embedding_dim=16).eval(), images)
    np.testing.assert_allclose(gradcam(model, images), reference, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- the layer
@pytest.mark.parametrize(
    "encoder, stem, size, side",
    [
        ("small-cnn", "small", 64, 16),
        ("small-cnn", "small", 32, 8),
        ("resnet18", "small", 64, 16),
        ("resnet18", "imagenet", 64, 16),
    ],
)
def test_cam_layer_keeps_a_quarter_of_the_side(encoder: str, stem: str, size: int, side: int) -> None:
    model = build_model(encoder, 2, embedding_dim=8, stem=stem)
    name, _, shape = cam_layer(model, (size, size))
    assert shape == (side, side), name
    if encoder == "small-cnn":
        assert name == "encoder.2.5"  # block 3 before its pool: deeper than block 2, as fine


# ----------------------------------------------------------------------------- not inverted
class RegionChannels(nn.Module):
    """Tissue density split into two channels: inside a central disk, and outside it."""

    def __init__(self, size: int, dim: int, radius: float) -> None:
        super().__init__()
        grid = torch.stack(
            torch.meshgrid(*[torch.arange(size, dtype=torch.float32) - (size - 1) / 2] * dim, indexing="ij")
        )
        disk = (grid.pow(2).sum(0).sqrt() <= radius).float()
        self.register_buffer("disk", torch.stack([disk, 1 - disk])[None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + 1.1) * self.disk  # (B, 2, *S)


class CentreReader(nn.Module):
    """A hand-built conv net whose decision reads only a central disk of its input.

    Its layer has the density inside the disk (channel 0) and outside (channel 1); the score sums
    channel 0 only. Grad-CAM must find the disk (an inverted map would find the rest).
    """

    def __init__(self, size: int, dim: int, radius: float) -> None:
        super().__init__()
        self.regions = RegionChannels(size, dim, radius)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.regions(x)[:, 0].flatten(1).mean(1)


@pytest.mark.parametrize("dim, size", [(2, 32), (3, 16)])
def test_gradcam_is_high_where_a_hand_built_model_looks(dim: int, size: int) -> None:
    model = CentreReader(size, dim, radius=size / 5)
    maps = gradcam(model, _hu(6, size, dim, seed=4), layer=model.regions)
    assert maps.shape == (6,) + (size,) * dim
    centre = np.broadcast_to(model.regions.disk[0, 0].numpy() > 0, maps.shape)
    mass = (maps * centre).sum() / maps.sum()
    area = centre.mean()
    assert mass > 0.9 and area < 0.3, (mass, area)  # an inverted map puts its mass outside


def test_gradcam_finds_the_dense_body_of_rendered_nodules() -> None:
    """A model reading tissue denser than -500 HU looks at the body of round solid nodules."""
    rows = make_rows(
        8, seed=5, shape="round", attenuation="solid", vessels=0, pixel_mm=1.4, offset_x_mm=0.0, offset_y_mm=0.0
    )
    images, masks = render(rows, size=32, dim=2)
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.ReLU(), nn.Flatten(1), nn.LazyLinear(1), nn.Flatten(0))
    with torch.no_grad():
        model[0].weight[:] = torch.tensor([1.0, -1.0]).view(2, 1, 1, 1)  # density, and its inverse
        model[0].bias[:] = torch.tensor([0.5, -0.5])
        model(torch.zeros(1, 1, 32, 32))
        model[3].weight[:] = torch.cat([torch.ones(32 * 32), torch.zeros(32 * 32)]) / 1024  # reads channel 0 only
        model[3].bias.zero_()
    table = region_mass(gradcam(model, images, layer=model[1]), masks).set_index("region")
    assert table.loc["body", "mass"] > 0.9 > 0.3 > table.loc["body", "area_share"], table
    assert table.loc["background", "mass"] < 0.1


def test_gradcam_agrees_with_monai_when_its_traps_are_handled() -> None:
    from monai.visualize import GradCAM

    model = build_model("small-cnn", 2, embedding_dim=16).eval()
    images = _hu(3, 32, 2, seed=6)
    ours = gradcam(model, images, explain="malignant")

    class TwoLogits(nn.Module):  # MONAI explains a class column: column 1 is the malignant log-odds
        def __init__(self) -> None:
            super().__init__()
            self.score = DecisionScore(model)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            z = self.score(x)
            return torch.stack([torch.zeros_like(z), z], dim=1)

    cam = GradCAM(TwoLogits(), target_layers="score.model.encoder.2.5", postprocessing=lambda m: m)
    theirs = cam(torch.from_numpy(images.astype(np.float32))[:, None] / 1000, class_idx=1)[:, 0].detach().numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-6 * float(np.abs(theirs).max()))


# ----------------------------------------------------------------------------- the table
@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    scenario = resolve(load_scenario("size-confound"), n=6, size=32, pixel_mm=1.4, dim=2)
    return data.generate(scenario, tmp_path_factory.mktemp("ds") / "ds", seed=0)


def test_cam_table_columns_regions_and_sanity(dataset: Path) -> None:
    run = _run()
    table = cam_table(run, dataset, split="test_balanced", n=4)
    assert tuple(table.columns) == RESULT_TABLES["cam"].columns
    assert list(table["classifier"].unique()) == ["head", "probe"]  # no dfr fitted, kNN has no gradient
    for _, group in table.groupby("classifier"):
        regions = group.set_index("region")
        assert list(regions.index) == [*REGIONS, SANITY_REGION]
        assert regions.loc[list(REGIONS), "mass"].sum() == pytest.approx(1.0)
        assert regions.loc[list(REGIONS), "area_share"].sum() == pytest.approx(1.0)
        assert -1.0 <= regions.loc[SANITY_REGION, "mass"] <= 1.0 and np.isnan(regions.loc[SANITY_REGION, "area_share"])
    assert (table["split"] == "test_balanced").all()


def test_sanity_check_is_one_for_identical_weights(dataset: Path) -> None:
    run = _run()
    run.init, run.readouts_init = run.model, run.readouts  # "randomised" = the same model: a failed check
    table = cam_table(run, dataset, split="val", n=4).set_index(["classifier", "region"])
    assert table.loc[("head", SANITY_REGION), "mass"] == pytest.approx(1.0)


def test_cam_figure_draws_both_labels(dataset: Path) -> None:
    fig = cam_figure(_run(), dataset, split="test_balanced", per_label=2)
    assert len([ax for ax in fig.axes if ax.get_visible()]) == 4
