"""The views every loss sees (design.md "Losses and training"), and what each kind of view lets a loss exploit.

One layout for every mode: ``(n_views * B, 1, *S)``, views stacked along the batch axis
(``[view 0 of all B; view 1 of all B; ...]``), the pytorch-metric-learning convention with labels
repeated ``n_views`` times. ``make_views(mode, ...)`` picks one of ``VIEW_MODES``:

- ``"both"`` (the default for every loss; ``both_views``): the sample's factor row is rendered
  again with fresh nuisance (parenchyma texture, vessels, noise; the lesion identical), then each
  view gets its own random geometric transform. Neither the noise pattern nor the position and
  orientation is shared between two views, so the only thing a loss can pair them by is what the
  row itself fixes: the lesion, and the distribution of the nuisance (``noise_hu``,
  ``kernel_fwhm_mm``, vessel count), never its draw.
- ``"augment"`` (``augment_views``): the stored image moved around, and nothing else: random flips
  of every spatial axis, a random 90-degree rotation in the axial (H, W) plane, a random integer
  shift with edge-replicate padding. Every output pixel is a copy of an input pixel of the same
  image (no intensity jitter, rescaling, noise or resampling: those would touch factors a scenario
  varies). *Exploitable:* both views are the same pixels moved, noise and texture included, so
  SimCLR can pair views by their noise (sorted pixel values alone find the partner among 256
  samples almost always) without looking at the lesion. This is why it is not the default.
- ``"rerender"`` (``rerender_views``): the row rendered again with fresh nuisance and no geometric
  transform. *Exploitable:* position and orientation are identical in both views, so a loss can
  pair views by where things are (e.g. the lesion's offset) instead of what they look like.

Geometric views (``augment``, ``both``) change the offset and rotation factors
(``GEOMETRIC_FACTORS``): a scenario whose label or confound is one of them must use ``rerender``
(``geometric_conflicts`` names the offenders).

Re-rendered nuisance depends on the run's seed as well as on the epoch and view (``view_id``), so
runs with different seeds see different nuisance draws and the spread over seeds is not
understated.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch

from nodulab.common.choices import VIEWS
from nodulab.data.dataset import hu_to_input
from nodulab.synth.factors import FACTORS
from nodulab.synth.renderer import prepare, render_tensor
from nodulab.synth.rng import mix32

VIEW_MODES = VIEWS
"""View modes for ``make_views``; ``"both"`` is the default for every loss."""
GEOMETRIC_FACTORS = tuple(name for name, factor in FACTORS.items() if factor.geometric)
"""Factors the geometric transform changes (flips and shifts move the lesion, turns rotate it)."""

_VIEW_IDS = 2**32 - 1  # render's hash keys are 32-bit and 0 is the stored image: ids 1 .. 2**32 - 1


def draw_geometry(
    n: int, spatial_dims: int, generator: torch.Generator, max_shift: int = 2
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw ``n`` random geometric transforms, on the generator's device.

    Draw order (fixed, so a seed always gives the same transforms): flips, rotations, shifts.

    Args:
        n: number of transforms. spatial_dims: 2 or 3.
        generator: the only source of randomness.
        max_shift: shifts are uniform integers in ``[-max_shift, max_shift]`` per axis.

    Returns:
        ``flips`` bool ``(n, spatial_dims)`` (flip array axis ``a``), ``quarter_turns`` int64
        ``(n,)`` in 0..3 (``torch.rot90`` turns in the last two axes), ``shifts`` int64
        ``(n, spatial_dims)`` (content moves by ``+shift`` pixels along each axis).
    """
    device = generator.device
    flips = torch.rand((n, spatial_dims), generator=generator, device=device) < 0.5
    quarter_turns = torch.randint(0, 4, (n,), generator=generator, device=device)
    shifts = torch.randint(-max_shift, max_shift + 1, (n, spatial_dims), generator=generator, device=device)
    return flips, quarter_turns, shifts


def apply_geometry(
    images: torch.Tensor, flips: torch.Tensor, quarter_turns: torch.Tensor, shifts: torch.Tensor
) -> torch.Tensor:
    """Flip, then rotate, then shift each image by its own parameters (vectorised over the batch).

    Args:
        images: ``(N, C, *S)`` with 2 or 3 spatial axes, the last two equal (square axial plane).
        flips, quarter_turns, shifts: per-image parameters as returned by ``draw_geometry``.

    Returns:
        ``(N, C, *S)``, same dtype; every value is copied from the same image.
    """
    spatial_dims = images.dim() - 2
    if spatial_dims not in (2, 3):
        raise ValueError(f"augment: images must be (N, C, H, W) or (N, C, D, H, W), got {tuple(images.shape)}")
    if images.shape[-1] != images.shape[-2]:
        raise ValueError(f"augment: 90-degree rotations need a square axial plane, got {tuple(images.shape)}")
    n = images.shape[0]
    device = images.device
    flips, quarter_turns, shifts = flips.to(device), quarter_turns.to(device), shifts.to(device)
    expand = (n,) + (1,) * (images.dim() - 1)
    x = images
    # A loop over the few transform kinds; each is applied to the whole batch and selected per image.
    for axis in range(spatial_dims):
        x = torch.where(flips[:, axis].view(expand), x.flip(2 + axis), x)
    rotated = x
    for turns in (1, 2, 3):
        rotated = torch.where((quarter_turns == turns).view(expand), torch.rot90(x, turns, dims=(-2, -1)), rotated)
    # Shift with edge-replicate padding: output index i reads input index clamp(i - shift).
    index = []
    for axis in range(spatial_dims):
        length = images.shape[2 + axis]
        steps = torch.arange(length, device=device)
        source = (steps[None, :] - shifts[:, axis, None]).clamp(0, length - 1)  # (N, L)
        view = [n] + [1] * spatial_dims
        view[1 + axis] = -1
        index.append(source.view(view))
    rows = torch.arange(n, device=device).view([n] + [1] * spatial_dims)
    channels_last = rotated.movedim(1, -1)  # advanced indexing over (N, *S); channels ride along
    return channels_last[(rows, *index)].movedim(-1, 1)


def augment_views(
    images: torch.Tensor, generator: torch.Generator, n_views: int = 2, max_shift: int = 2
) -> torch.Tensor:
    """Geometric views of a batch: flips, axial 90-degree rotations, shifts; nothing else.

    Each sample and view draws independently: a flip of each spatial axis (p = 0.5), a rotation
    by 0/90/180/270 degrees in the (H, W) plane, an integer shift in ``[-max_shift, max_shift]``
    per axis with edge-replicate padding (no wrap-around).

    Args:
        images: ``(B, 1, *S)`` float, 2D or 3D, square axial plane.
        generator: the only source of randomness (on any device; draws are moved to the images').
        n_views: views per sample.
        max_shift: largest shift in pixels.

    Returns:
        ``(n_views * B, 1, *S)``: ``[view 0 of all B; view 1 of all B; ...]``.
    """
    if n_views < 1 or max_shift < 0:
        raise ValueError(f"augment_views: need n_views >= 1 and max_shift >= 0, got {n_views}, {max_shift}")
    spatial_dims = images.dim() - 2
    if spatial_dims not in (2, 3):
        raise ValueError(
            f"augment_views: images must be (B, 1, *S) with 2 or 3 spatial axes, got {tuple(images.shape)}"
        )
    stacked = images.repeat((n_views,) + (1,) * (images.dim() - 1))
    flips, quarter_turns, shifts = draw_geometry(stacked.shape[0], spatial_dims, generator, max_shift)
    return apply_geometry(stacked, flips, quarter_turns, shifts)


def _scramble(counter: int) -> int:
    """A fixed pseudo-random permutation of ``[0, 2**32 - 1)``.

    ``mix32`` permutes all 32-bit words; one cycle-walking step sends the single value that lands
    outside the range (``2**32 - 1``) back inside, which keeps it a bijection.
    """
    scrambled = int(mix32(counter))
    return int(mix32(scrambled)) if scrambled == _VIEW_IDS else scrambled


def view_id(seed: int, epoch: int, view: int, n_views: int) -> int:
    """Render view id of augmentation view ``view`` in ``epoch`` of the run seeded ``seed``.

    ``1 + (scramble(epoch * n_views + view) + seed) mod (2**32 - 1)``: a Latin square over
    (counter, seed). For one seed the ids of all ``(epoch, view)`` with
    ``epoch * n_views + view < 2**32 - 1`` are distinct; for one ``(epoch, view)`` seeds below
    ``2**32 - 1`` give distinct ids; never 0 (the stored image). The scramble keeps runs with
    neighbouring seeds (0, 1, 2, ...) from sharing shifted sequences of ids.

    Args:
        seed: the run's seed (non-negative; seeds are taken modulo ``2**32 - 1``).
        epoch: training epoch (non-negative). view: index of the view in ``[0, n_views)``.
        n_views: views per sample and epoch.

    Returns:
        The 32-bit ``view`` argument of ``render`` / ``prepare``.
    """
    if seed < 0 or epoch < 0 or not 0 <= view < n_views:
        raise ValueError(
            f"view_id: need seed >= 0, epoch >= 0 and 0 <= view < n_views, got {seed}, {epoch}, {view}, {n_views}"
        )
    counter = epoch * n_views + view
    if counter >= _VIEW_IDS:
        raise ValueError(f"view_id: epoch {epoch} too large for 32-bit view ids")
    return 1 + (_scramble(counter) + seed) % _VIEW_IDS


def rerender_views(
    rows: pd.DataFrame,
    size: int,
    dim: int,
    *,
    epoch: int,
    seed: int,
    n_views: int = 2,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Views made by re-rendering each row with fresh nuisance (texture, vessels, noise).

    The lesion is identical in every view; the nuisance differs across views, epochs and run
    seeds and never equals the stored image's (view ids from ``view_id``, never 0). Rendering
    stays on ``device``.

    Args:
        rows: the batch's factor rows (design.md "Factors of variation" columns, ``seed`` included), B of them.
        size: pixels per side. dim: 2 or 3 (as the dataset was rendered).
        epoch: training epoch (non-negative). seed: the run's seed (non-negative).
        n_views: views per sample.
        device: where to render (default CPU).

    Returns:
        Float input tensors (HU / 1000) ``(n_views * B, 1, *S)`` on ``device``, views stacked as in
        ``augment_views``.
    """
    if n_views < 1:
        raise ValueError(f"rerender_views: n_views must be >= 1, got {n_views}")
    views = []
    for v in range(n_views):
        hu, _ = render_tensor(prepare(rows, size, dim, device, view=view_id(seed, epoch, v, n_views)))
        views.append(hu_to_input(hu).unsqueeze(1))
    return torch.cat(views, 0)


def both_views(
    rows: pd.DataFrame,
    size: int,
    dim: int,
    *,
    epoch: int,
    seed: int,
    generator: torch.Generator,
    n_views: int = 2,
    max_shift: int = 2,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Re-rendered views (``rerender_views``), then a random geometric transform per view.

    The transforms are ``draw_geometry(n_views * B, dim, generator, max_shift)`` applied with
    ``apply_geometry``, the same draws ``augment_views`` makes from the same generator state.

    Args:
        rows: the batch's factor rows, B of them. size: pixels per side. dim: 2 or 3.
        epoch: training epoch. seed: the run's seed (chooses the nuisance draws).
        generator: the only source of the geometric randomness (any device).
        n_views: views per sample. max_shift: largest shift in pixels.
        device: where to render and transform (default CPU).

    Returns:
        Float input tensors (HU / 1000) ``(n_views * B, 1, *S)`` on ``device``.
    """
    if max_shift < 0:
        raise ValueError(f"both_views: max_shift must be >= 0, got {max_shift}")
    views = rerender_views(rows, size, dim, epoch=epoch, seed=seed, n_views=n_views, device=device)
    flips, quarter_turns, shifts = draw_geometry(views.shape[0], dim, generator, max_shift)
    return apply_geometry(views, flips, quarter_turns, shifts)


def make_views(
    mode: str,
    *,
    rows: pd.DataFrame,
    images: torch.Tensor | None,
    size: int,
    dim: int,
    epoch: int,
    seed: int,
    generator: torch.Generator,
    n_views: int = 2,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The views of one batch in view mode ``mode`` (one of ``VIEW_MODES``; see the module doc).

    Args:
        mode: ``"both"``, ``"augment"`` or ``"rerender"``.
        rows: the batch's factor rows (used by ``both`` and ``rerender``).
        images: ``(B, 1, *S)`` float input already on the device (used by ``augment`` only).
        size, dim: image geometry. epoch, seed: choose the re-rendered nuisance.
        generator: source of the geometric draws (``augment``, ``both``).
        n_views: views per sample. device: where to render (``both``, ``rerender``).

    Returns:
        ``(n_views * B, 1, *S)`` float input, ``[view 0 of all B; view 1 of all B; ...]``.
    """
    if mode == "augment":
        if images is None:
            raise ValueError("make_views: mode 'augment' needs the stored images")
        return augment_views(images, generator, n_views=n_views)
    if mode == "rerender":
        return rerender_views(rows, size, dim, epoch=epoch, seed=seed, n_views=n_views, device=device)
    if mode == "both":
        return both_views(rows, size, dim, epoch=epoch, seed=seed, generator=generator, n_views=n_views, device=device)
    raise ValueError(f"make_views: unknown view mode {mode!r}; choose from {', '.join(VIEW_MODES)}")


def geometric_conflicts(label_factor: str, confound_factors: Sequence[str]) -> list[str]:
    """The label and confound factors a geometric view would change, in order, without repeats.

    Flips, 90-degree turns and shifts move and rotate the lesion, so a label or confound defined
    by an offset or the rotation would no longer hold for the view; such a scenario must train
    with ``rerender`` views.

    Args:
        label_factor: the scenario's label factor. confound_factors: its confounds' factors.

    Returns:
        The members of ``GEOMETRIC_FACTORS`` among them (empty: geometric views are safe).
    """
    conflicts: list[str] = []
    for factor in (label_factor, *confound_factors):
        if factor in GEOMETRIC_FACTORS and factor not in conflicts:
            conflicts.append(factor)
    return conflicts
