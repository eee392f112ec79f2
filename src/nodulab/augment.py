"""The two views every loss sees (DESIGN §5).

Two sources, one layout: ``(n_views * B, 1, *S)``, views stacked along the batch axis
(``[view 0 of all B; view 1 of all B; ...]``), the pytorch-metric-learning convention with labels
repeated ``n_views`` times.

- ``augment_views``: geometric augmentation of the stored image, and nothing else: random flips
  of every spatial axis, a random 90-degree rotation in the axial (H, W) plane, a random integer
  shift with edge-replicate padding. Every output pixel is a copy of an input pixel of the same
  image: no intensity jitter, rescaling, noise or resampling, since those would touch factors a
  scenario varies (attenuation, noise, kernel).
- ``rerender_views``: the sample's factor row rendered again with fresh nuisance seeds
  (parenchyma texture, vessels, noise); the lesion is identical.
"""

from __future__ import annotations

import pandas as pd
import torch

from nodulab.data import hu_to_input
from nodulab.render import prepare, render_tensor

_MAX_VIEW_ID = 2**32 - 1  # render's hash keys are 32-bit


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
        raise ValueError(f"augment_views: images must be (B, 1, *S) with 2 or 3 spatial axes, got {tuple(images.shape)}")
    stacked = images.repeat((n_views,) + (1,) * (images.dim() - 1))
    flips, quarter_turns, shifts = draw_geometry(stacked.shape[0], spatial_dims, generator, max_shift)
    return apply_geometry(stacked, flips, quarter_turns, shifts)


def view_id(epoch: int, view: int, n_views: int) -> int:
    """Render view id of augmentation view ``view`` in ``epoch``: ``1 + epoch * n_views + view``.

    Distinct for every (epoch, view) at a fixed ``n_views`` and never 0 (the stored image).
    """
    if epoch < 0 or not 0 <= view < n_views:
        raise ValueError(f"view_id: need epoch >= 0 and 0 <= view < n_views, got {epoch}, {view}, {n_views}")
    ident = 1 + epoch * n_views + view
    if ident > _MAX_VIEW_ID:
        raise ValueError(f"view_id: epoch {epoch} too large for 32-bit view ids")
    return ident


def rerender_views(
    rows: pd.DataFrame,
    size: int,
    dim: int,
    *,
    epoch: int,
    n_views: int = 2,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Views made by re-rendering each row with fresh nuisance (texture, vessels, noise).

    The lesion is identical in every view; the nuisance differs across views and epochs and
    never equals the stored image's (view id from ``view_id``, never 0). Rendering stays on
    ``device``.

    Args:
        rows: the batch's factor rows (DESIGN §2 columns, ``seed`` included), B of them.
        size: pixels per side. dim: 2 or 3 (as the dataset was rendered).
        epoch: training epoch (non-negative).
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
        hu, _ = render_tensor(prepare(rows, size, dim, device, view=view_id(epoch, v, n_views)))
        views.append(hu_to_input(hu).unsqueeze(1))
    return torch.cat(views, 0)
