"""Geometric and re-rendered views (nodulab.training.augment), checked against slow explicit references."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from conftest import make_rows
from nodulab.data.dataset import hu_to_input
from nodulab.synth.renderer import REGIONS, render
from nodulab.training.augment import apply_geometry, augment_views, draw_geometry, rerender_views, view_id

pytestmark = pytest.mark.usefixtures("one_thread")


def _images(batch: int, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((batch, 1) + shape, generator=g)


def _reference(image: torch.Tensor, flips: list[bool], turns: int, shifts: list[int]) -> torch.Tensor:
    """One image (1, *S): flip, rotate, then shift with replicate padding, the slow obvious way."""
    dim = image.dim() - 1
    axes = [1 + a for a in range(dim) if flips[a]]
    x = image.flip(axes) if axes else image
    x = torch.rot90(x, turns, dims=(-2, -1))
    m = max(abs(s) for s in shifts) if shifts else 0
    padded = F.pad(x[None], (m, m) * dim, mode="replicate")[0]
    window = tuple(slice(m - s, m - s + n) for s, n in zip(shifts, x.shape[1:]))
    return padded[(slice(None),) + window]


def _matching_transforms(view: torch.Tensor, source: torch.Tensor, max_shift: int) -> list[tuple]:
    """Every (flips, turns, shifts) whose reference transform of ``source`` equals ``view`` exactly.

    Same arithmetic as ``_reference``, with every shift window of the padded image taken at once.
    """
    dim, m = source.dim() - 1, max_shift
    found = []
    for flips in itertools.product([False, True], repeat=dim):
        for turns in range(4):
            x = _reference(source, list(flips), turns, [0] * dim)[0]
            windows = F.pad(x[None, None], (m, m) * dim, mode="replicate")[0, 0]
            for axis, n in enumerate(x.shape):
                windows = windows.unfold(axis, n, 1)  # window start w reads shift s = m - w
            hits = (windows == view[0]).flatten(dim).all(-1).nonzero().tolist()
            found += [(flips, turns, tuple(m - w for w in start)) for start in hits]
    return found


# ----------------------------------------------------------------------------- augment_views
@pytest.mark.parametrize("shape", [(8, 8), (4, 6, 6)])
def test_each_view_is_a_flip_rotation_and_shift_of_its_source(shape: tuple[int, ...]) -> None:
    batch, n_views, max_shift = 3, 2, 2 if len(shape) == 2 else 1
    images = _images(batch, shape)
    out = augment_views(images, torch.Generator().manual_seed(1), n_views=n_views, max_shift=max_shift)
    assert out.shape == (n_views * batch, 1) + shape and out.dtype == images.dtype
    for j in range(n_views * batch):
        assert _matching_transforms(out[j], images[j % batch], max_shift), f"view {j} is no allowed transform"
    # The search can fail: wrap-around shifts and intensity changes are not allowed transforms.
    source = images[0]
    assert not _matching_transforms(source.roll(1, -1), source, max_shift)
    assert not _matching_transforms(source * 1.01, source, max_shift)


def test_vectorised_geometry_matches_the_reference_loop() -> None:
    for shape, max_shift in (((10, 10), 3), ((5, 7, 7), 2)):
        images = _images(64, shape, seed=2)
        flips, turns, shifts = draw_geometry(64, len(shape), torch.Generator().manual_seed(3), max_shift)
        out = apply_geometry(images, flips, turns, shifts)
        for i in range(64):
            expected = _reference(images[i], flips[i].tolist(), int(turns[i]), shifts[i].tolist())
            assert torch.equal(out[i], expected), f"image {i} of {shape}"


def test_views_are_stacked_view_major() -> None:
    """Without shifts the multiset of values is preserved, so each output names its source."""
    images = _images(5, (6, 6), seed=4)
    out = augment_views(images, torch.Generator().manual_seed(0), n_views=3, max_shift=0)
    assert out.shape == (15, 1, 6, 6)
    for j in range(15):
        assert torch.equal(out[j].flatten().sort().values, images[j % 5].flatten().sort().values)


@pytest.mark.parametrize("shape", [(12, 12), (6, 8, 8)])
def test_values_only_come_from_the_source_image(shape: tuple[int, ...]) -> None:
    images = _images(4, shape, seed=5)
    out = augment_views(images, torch.Generator().manual_seed(6), max_shift=3)
    for j in range(8):
        assert torch.isin(out[j], images[j % 4]).all()
    # HU-scaled integer images keep their exact values too (no resampling, no jitter).
    hu = torch.randint(-1024, 3072, (4, 1) + shape, generator=torch.Generator().manual_seed(7)).float() / 1000.0
    out = augment_views(hu, torch.Generator().manual_seed(8))
    for j in range(8):
        assert torch.isin(out[j], hu[j % 4]).all()


def test_shift_replicates_the_edge_instead_of_wrapping() -> None:
    ramp = torch.arange(8.0).expand(8, 8)[None, None]  # value = column index
    flips = torch.zeros(1, 2, dtype=torch.bool)
    out = apply_geometry(ramp, flips, torch.zeros(1, dtype=torch.long), torch.tensor([[0, 2]]))
    assert out[0, 0, 0].tolist() == [0, 0, 0, 1, 2, 3, 4, 5]
    out = apply_geometry(ramp, flips, torch.zeros(1, dtype=torch.long), torch.tensor([[0, -2]]))
    assert out[0, 0, 0].tolist() == [2, 3, 4, 5, 6, 7, 7, 7]


def test_same_seed_same_views_and_no_global_rng() -> None:
    images = _images(6, (8, 8))
    state = torch.get_rng_state()
    a = augment_views(images, torch.Generator().manual_seed(11))
    b = augment_views(images, torch.Generator().manual_seed(11))
    c = augment_views(images, torch.Generator().manual_seed(12))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_draws_cover_every_transform() -> None:
    n, max_shift = 2000, 2
    flips, turns, shifts = draw_geometry(n, 3, torch.Generator().manual_seed(0), max_shift)
    assert flips.shape == (n, 3) and turns.shape == (n,) and shifts.shape == (n, 3)
    assert ((flips.float().mean(0) - 0.5).abs() < 0.05).all()
    assert torch.bincount(turns, minlength=4).tolist() == pytest.approx([n / 4] * 4, rel=0.15)
    assert set(shifts.flatten().tolist()) == set(range(-max_shift, max_shift + 1))
    # The two views of a sample are drawn independently and almost never equal the source.
    images = _images(64, (8, 8), seed=1)
    out = augment_views(images, torch.Generator().manual_seed(2))
    same_as_source = sum(torch.equal(out[j], images[j % 64]) for j in range(128))
    same_views = sum(torch.equal(out[j], out[j + 64]) for j in range(64))
    assert same_as_source <= 4 and same_views <= 4


def test_augment_rejects_bad_input() -> None:
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="square"):
        augment_views(torch.zeros(2, 1, 6, 8), g)
    with pytest.raises(ValueError):
        augment_views(torch.zeros(2, 8), g)
    with pytest.raises(ValueError):
        augment_views(torch.zeros(2, 1, 8, 8), g, n_views=0)


# ----------------------------------------------------------------------------- rerender_views
def test_view_ids_are_distinct_and_never_the_stored_image() -> None:
    for seed in (0, 1, 2**40 + 7):
        ids = [view_id(seed, e, v, 3) for e in range(200) for v in range(3)]
        assert len(set(ids)) == len(ids) and 0 not in ids
        assert all(0 < i < 2**32 for i in ids)
    # The last counter of the range (epoch * n_views + view = 2**32 - 2) is valid; the next is refused.
    last = (2**32 - 2) // 2
    assert 0 < view_id(5, last, 0, 2) < 2**32 and 0 < view_id(5, 2**32 - 2, 0, 1) < 2**32
    with pytest.raises(ValueError, match="too large"):
        view_id(5, last, 1, 2)
    with pytest.raises(ValueError):
        view_id(-1, 0, 0, 2)
    with pytest.raises(ValueError):
        view_id(0, 0, 2, 2)


def test_rerender_views_differ_but_repeat_per_epoch() -> None:
    rows = make_rows(3, seed=3)
    size = 24
    views = rerender_views(rows, size, 2, epoch=0, seed=0)
    assert views.shape == (6, 1, size, size) and views.dtype == torch.float32
    assert torch.equal(views, rerender_views(rows, size, 2, epoch=0, seed=0))
    later = rerender_views(rows, size, 2, epoch=1, seed=0)
    stored = hu_to_input(torch.from_numpy(render(rows, size, 2)[0]).float())
    for b in range(3):
        pictures = [stored[b], views[b, 0], views[3 + b, 0], later[b, 0], later[3 + b, 0]]
        for p, q in itertools.combinations(pictures, 2):
            assert not torch.equal(p, q)
    # The tensor path gives exactly render()'s int16 HU / 1000 for the same view id.
    direct = render(rows, size, 2, view=view_id(0, 0, 1, 2))[0]
    assert torch.equal(views[3:, 0], hu_to_input(torch.from_numpy(direct).float()))


def test_rerender_keeps_the_lesion_and_changes_the_background() -> None:
    rows = make_rows(
        2,
        seed=4,
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
    stored, masks = render(rows, size, 2)
    views = rerender_views(rows, size, 2, epoch=3, seed=0, n_views=1)
    for b in range(2):
        body = masks[b] == REGIONS["body"]
        # Away from the edge profile and the PSF, a noise-free body is the same in every view.
        core = torch.from_numpy(ndimage.binary_erosion(body, iterations=6))
        background = torch.from_numpy(~ndimage.binary_dilation(body, iterations=6))
        assert core.sum() > 20 and background.sum() > 200
        view = views[b, 0]
        original = hu_to_input(torch.from_numpy(stored[b]).float())
        assert torch.equal(view[core], original[core])
        assert (view[background] != original[background]).float().mean() > 0.5


def test_rerender_views_3d() -> None:
    rows = make_rows(2, seed=5, dim=3)
    views = rerender_views(rows, 16, 3, epoch=2, seed=0, n_views=2)
    assert views.shape == (4, 1, 16, 16, 16)
    stored = hu_to_input(torch.from_numpy(render(rows, 16, 3)[0]).float())
    assert not torch.equal(views[:2, 0], stored) and not torch.equal(views[:2], views[2:])
    assert np.isfinite(views.numpy()).all()
