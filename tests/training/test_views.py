"""Views that cannot be matched by their noise (nodulab.training.augment; design.md "Losses and
training", issue 6 part 1).

The measurements: two views of one sample, aligned back to the sample's own pixel grid by the
known geometric transform, compared only where the lesion cannot reach (background pixels). Under
the default ``both`` views they share nothing there but the row's nuisance *distribution*; under
``augment`` they are the same pixels, which is why ``augment`` is not the default.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import ndimage

from conftest import make_rows
from nodulab.data.dataset import hu_to_input
from nodulab.synth.factors import FACTORS
from nodulab.synth.renderer import REGIONS, render
from nodulab.training.augment import (
    GEOMETRIC_FACTORS,
    VIEW_MODES,
    apply_geometry,
    augment_views,
    both_views,
    draw_geometry,
    geometric_conflicts,
    make_views,
    rerender_views,
    view_id,
)

pytestmark = pytest.mark.usefixtures("one_thread")

LESION_REACH_PX = 6  # beyond the lesion's partial-volume edge and the PSF (design.md "Factors of variation" ranges)
GEOMETRY_SEED = 3


def _background(masks: np.ndarray) -> torch.Tensor:
    """``(N, P)`` bool: pixels more than ``LESION_REACH_PX`` from the body and the spicules.

    Vessels (region 3) are nuisance, re-drawn in every view, so they count as background.
    """
    lesion = (masks == REGIONS["body"]) | (masks == REGIONS["spicules"])
    far = [ndimage.distance_transform_edt(~m) > LESION_REACH_PX for m in lesion]
    return torch.from_numpy(np.stack(far)).flatten(1)


def _aligned(views: torch.Tensor, n_views: int = 2) -> torch.Tensor:
    """Each view scattered back onto its source grid, ``(n_views * B, P)``; NaN where it has no copy.

    The geometry is drawn again from a generator seeded like the one that made the views (both
    modes draw ``draw_geometry(n_views * B, dim, generator, 2)`` first; checked below). An index
    channel holding every pixel's source linear index goes through the same transform, so view
    pixel ``p`` is a copy of source pixel ``index[p]``. Copies made by edge padding repeat a source
    index with the same value, so they collapse onto one source pixel; pixels shifted out stay NaN.
    """
    n, _, *spatial = views.shape
    pixels = int(np.prod(spatial))
    geometry = draw_geometry(n, len(spatial), torch.Generator().manual_seed(GEOMETRY_SEED), max_shift=2)
    index = torch.arange(pixels).view(1, 1, *spatial).expand(n, 1, *spatial).contiguous()
    source = apply_geometry(index, *geometry).flatten(1)
    aligned = torch.full((n, pixels), float("nan"), dtype=torch.float64)
    return aligned.scatter_(1, source, views.flatten(1).double())


def _views(mode: str, rows: pd.DataFrame, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Background mask and aligned views of ``mode`` for 2D ``rows`` (stored images for augment)."""
    stored, masks = render(rows, size, 2)
    images = hu_to_input(torch.from_numpy(stored).float()).unsqueeze(1)
    views = make_views(
        mode,
        rows=rows,
        images=images,
        size=size,
        dim=2,
        epoch=4,
        seed=1,
        generator=torch.Generator().manual_seed(GEOMETRY_SEED),
    )
    return _background(masks), _aligned(views)


def _background_correlations(background: torch.Tensor, aligned: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per sample: Pearson r of view 0 and view 1 on shared background pixels, and their count."""
    n = background.shape[0]
    first, second = aligned[:n], aligned[n:]
    shared = background & ~first.isnan() & ~second.isnan()
    r = []
    for i in range(n):
        x, y = first[i][shared[i]], second[i][shared[i]]
        x, y = x - x.mean(), y - y.mean()  # each sample's own mean: only the pattern is compared
        r.append(float((x * y).sum() / (x.norm() * y.norm())))
    return np.array(r), shared.sum(1).numpy()


# ----------------------------------------------------------------------------- 1. correlation
def test_background_of_default_views_is_uncorrelated_and_augment_is_identical() -> None:
    """Aligned background pixels: |r| < 0.05 per sample under ``both``, r = 1 under ``augment``.

    Why 128 px at 1.4 mm (a 179 mm field): the parenchyma texture is correlated over ~1 mm, so one
    sample's r between independent fields has SD about sqrt(sum of squared autocorrelations / N)
    (Bartlett). At 48 px that is 0.05-0.09, and a per-sample bound of 0.05 would fail by chance;
    with ~15k background pixels it is about 0.01, so 0.05 per sample is a 5-SD bound. Vessels are
    few large structures: two independent vessel maps crossing give |r| up to ~0.06 by chance, so
    per-sample r is bounded on vessel-free rows, and rows with vessels are checked through their
    mean r (SD ~0.005 over 16 rows), which a vessel shared between views would push to ~0.5.
    """
    rows = pd.concat(
        [make_rows(32, seed=21, pixel_mm=1.4, vessels=0), make_rows(16, seed=22, pixel_mm=1.4, vessels=3)],
        ignore_index=True,
    )
    with_vessels = rows["vessels"].to_numpy() > 0
    background, aligned = _views("both", rows, 128)
    r, pixels = _background_correlations(background, aligned)
    assert pixels.min() > 10_000, "too few background pixels for a 0.05 bound to mean anything"
    assert np.abs(r[~with_vessels]).max() < 0.05, f"per-sample r (no vessels): {np.round(r[~with_vessels], 3)}"
    assert abs(r[with_vessels].mean()) < 0.05, f"mean r with vessels: {r[with_vessels].mean():.3f}"
    # The reason augment is not the default: its views are the same pixels moved, noise included.
    # (This also shows the alignment is right: a misaligned comparison would give r near 0.)
    background, aligned = _views("augment", rows, 128)
    r_augment, _ = _background_correlations(background, aligned)
    assert r_augment.min() > 0.99


# ----------------------------------------------------------------------------- 2. pairing attack
def _nearest_partner_rate(first: np.ndarray, second: np.ndarray, distance: str) -> float:
    """Fraction of view-0 feature rows whose nearest view-1 row is their own sample's."""
    if distance == "euclidean":
        d = ((first[:, None] - second[None]) ** 2).sum(-1)
    else:  # L1 between histograms, one query at a time (memory)
        d = np.stack([np.abs(q[None] - second).sum(-1) for q in first])
    return float((d.argmin(1) == np.arange(len(first))).mean())


def _attack_rates(background: torch.Tensor, aligned: torch.Tensor) -> dict[str, float]:
    """Pair each view 0 with its partner among all view 1s from background pixel values alone.

    Each view's background pixels once each (edge copies collapsed); no positions are used, so
    the attack needs no knowledge of the transform. Two features: 101 quantiles of the values
    (sorted pixel values, the issue's attack) and the histogram of integer HU (exact values: the
    strongest use of a shared noise draw).
    """
    n = background.shape[0]
    values = [np.round(a[background[j % n] & ~a.isnan()].numpy() * 1000).astype(int) for j, a in enumerate(aligned)]
    quantiles = np.stack([np.quantile(v, np.linspace(0, 1, 101)) for v in values])
    low, high = min(v.min() for v in values), max(v.max() for v in values)
    histograms = np.stack([np.bincount(v - low, minlength=high - low + 1) / len(v) for v in values])
    return {
        "quantiles": _nearest_partner_rate(quantiles[:n], quantiles[n:], "euclidean"),
        "histogram": _nearest_partner_rate(histograms[:n], histograms[n:], "l1"),
    }


def _factor_pairing_rate(rows: pd.DataFrame) -> float:
    """Expected success of pairing by nearest neighbour in standardised (noise_hu, kernel_fwhm_mm).

    Ties (rows with the same factors) are broken uniformly at random: credit 1 / (tied rows).
    """
    z = rows[["noise_hu", "kernel_fwhm_mm"]].to_numpy(float)
    z = (z - z.mean(0)) / z.std(0)
    d = ((z[:, None] - z[None]) ** 2).sum(-1)
    tied = (d <= d.min(1, keepdims=True)).sum(1)  # the partner is always among them (distance 0)
    return float((1.0 / tied).mean())


def test_views_cannot_be_paired_by_their_background_beyond_what_the_factors_allow() -> None:
    """Attack success under ``both`` <= factor pairing + 3 SE; under ``augment`` near 1.

    Rows share (noise_hu, kernel_fwhm_mm) in 16 groups of 16. With continuous factors, pairing on
    a row's own exact factors would find every partner (distance 0) and the bound would be void;
    with groups it finds the group and then guesses: 1/16. That is the ceiling of *any* attack
    when the two views share only their nuisance distribution (given the group, the partner is
    any of 16 equally likely rows), so beating it means the views share a nuisance draw. Vessels
    are 0: the vessel count is a factor this baseline does not see and would show in the
    background histogram. SE is the binomial SE of a 256-query rate at the baseline rate (the
    null hypothesis: the attack does as well as the factors).
    """
    n = 256
    group = np.arange(n) % 16
    rows = make_rows(n, seed=23, vessels=0)
    rows["noise_hu"] = np.linspace(10.0, 30.0, 4)[group % 4]
    rows["kernel_fwhm_mm"] = np.linspace(0.6, 1.2, 4)[group // 4]
    baseline = _factor_pairing_rate(rows)
    bound = baseline + 3.0 * np.sqrt(baseline * (1.0 - baseline) / n)
    assert baseline == pytest.approx(1 / 16)
    background, aligned = _views("both", rows, 48)
    assert background.sum(1).min() > 500
    for feature, rate in _attack_rates(background, aligned).items():
        assert rate <= bound, f"{feature} attack pairs {rate:.3f} of default views (factor bound {bound:.3f})"
    # The same attack on augment views: the noise pattern gives the partner away.
    background, aligned = _views("augment", rows, 48)
    for feature, rate in _attack_rates(background, aligned).items():
        assert rate > 0.9 and rate > bound, f"{feature} attack pairs only {rate:.3f} of augment views"


# ----------------------------------------------------------------------------- 3. run seeds
def test_rerendered_nuisance_depends_on_the_run_seed() -> None:
    rows = make_rows(
        3,
        seed=24,
        shape="round",
        attenuation="solid",
        diameter_mm=16.0,
        margin_sigma_mm=0.2,
        noise_hu=0.0,
        vessels=0,
        offset_x_mm=0.0,
        offset_y_mm=0.0,
        kernel_fwhm_mm=0.8,
    )
    size = 40
    first = rerender_views(rows, size, 2, epoch=2, seed=0)
    assert torch.equal(first, rerender_views(rows, size, 2, epoch=2, seed=0))
    other = rerender_views(rows, size, 2, epoch=2, seed=1)
    body = render(rows, size, 2)[1] == REGIONS["body"]
    for j in range(6):
        # Noise-free body interior: the lesion is the same for every seed; the parenchyma is not.
        core = torch.from_numpy(ndimage.binary_erosion(body[j % 3], iterations=6))
        background = torch.from_numpy(~ndimage.binary_dilation(body[j % 3], iterations=6))
        assert core.sum() > 20 and background.sum() > 200
        assert torch.equal(first[j, 0][core], other[j, 0][core])
        assert (first[j, 0][background] != other[j, 0][background]).float().mean() > 0.5

    # The default views too: same run seed and generator, same tensors; another run seed, not.
    def both(seed: int) -> torch.Tensor:
        return both_views(rows, size, 2, epoch=2, seed=seed, generator=torch.Generator().manual_seed(5))

    assert torch.equal(both(7), both(7)) and not torch.equal(both(7), both(8))


def test_view_ids_differ_between_runs() -> None:
    # One (epoch, view): every run seed below 2**32 - 1 gets its own id.
    assert len({view_id(seed, 7, 1, 2) for seed in range(1000)}) == 1000
    # Runs with neighbouring seeds share no id over 100 epochs (a plain seed offset would shift
    # one run's sequence onto the next's).
    runs = [{view_id(seed, e, v, 2) for e in range(100) for v in range(2)} for seed in range(10)]
    assert len(set().union(*runs)) == 10 * 200
    assert all(0 not in ids for ids in runs)


# ----------------------------------------------------------------------------- 4. refusals
def test_geometric_conflicts_are_the_geometric_label_and_confound_factors() -> None:
    assert geometric_conflicts("rotation_deg", ["diameter_mm", "offset_x_mm", "noise_hu", "offset_z_mm"]) == [
        "rotation_deg",
        "offset_x_mm",
        "offset_z_mm",
    ]
    assert geometric_conflicts("offset_y_mm", ["offset_y_mm"]) == ["offset_y_mm"]
    others = [name for name in FACTORS if name not in GEOMETRIC_FACTORS]
    assert others and geometric_conflicts("shape", others) == []
    for factor in GEOMETRIC_FACTORS:
        assert geometric_conflicts("shape", [factor]) == [factor] == geometric_conflicts(factor, [])


# ----------------------------------------------------------------------------- 5. dispatch
def test_make_views_dispatches_and_both_is_rerender_then_the_drawn_geometry() -> None:
    rows = make_rows(4, seed=25)
    size, epoch, seed = 24, 3, 9
    images = hu_to_input(torch.from_numpy(render(rows, size, 2)[0]).float()).unsqueeze(1)

    def g() -> torch.Generator:
        return torch.Generator().manual_seed(GEOMETRY_SEED)

    def views(mode: str) -> torch.Tensor:
        return make_views(mode, rows=rows, images=images, size=size, dim=2, epoch=epoch, seed=seed, generator=g())

    assert VIEW_MODES[0] == "both" and set(VIEW_MODES) == {"both", "augment", "rerender"}
    rerendered = rerender_views(rows, size, 2, epoch=epoch, seed=seed)
    assert torch.equal(views("augment"), augment_views(images, g()))
    assert torch.equal(views("rerender"), rerendered)
    assert torch.equal(views("both"), both_views(rows, size, 2, epoch=epoch, seed=seed, generator=g()))
    # The alignment in the tests above relies on this draw order.
    assert torch.equal(views("both"), apply_geometry(rerendered, *draw_geometry(8, 2, g(), 2)))
    assert views("both").shape == (8, 1, size, size)
    with pytest.raises(ValueError, match="'mixup'"):
        views("mixup")
    with pytest.raises(ValueError, match="augment"):
        make_views("augment", rows=rows, images=None, size=size, dim=2, epoch=0, seed=0, generator=g())


def test_both_views_3d() -> None:
    rows = make_rows(2, seed=26, dim=3)
    out = both_views(rows, 16, 3, epoch=1, seed=2, generator=torch.Generator().manual_seed(0), n_views=3)
    assert out.shape == (6, 1, 16, 16, 16) and torch.isfinite(out).all()
    rerendered = rerender_views(rows, 16, 3, epoch=1, seed=2, n_views=3)
    for j in range(6):  # every value is a copy from the same re-rendered view
        assert torch.isin(out[j], rerendered[j]).all()
