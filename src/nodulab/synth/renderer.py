"""The pure renderer: one row of factors (plus its seed) and the geometry give one CT patch.

``render(rows, size, dim)`` returns int16 HU images and uint8 region masks as numpy arrays;
``prepare`` + ``render_tensor`` are the float-tensor path beneath it, which stays on the device.

How purity is kept (design.md "Factors of variation"). Every random number is a counter-based hash of
(row seed, stream, element, draw) (``nodulab.synth.rng``), so sample ``i`` depends on row ``i`` alone. Per-row scalars
(directions, radii, blur kernels) are computed in float64 numpy; per-pixel work uses only
``+ - * /``, ``sqrt``, ``min``/``max`` and integer ops, which are exactly rounded in both the
vectorised and the scalar code paths, so a pixel's value does not depend on where it falls in a
batch. Blurs are truncated spatial convolutions evaluated on a canvas extended by the kernel
radius: the whole scene is analytic, so the margin is rendered, not padded, and a batch-wide
radius only adds exact zero taps.

Physics, in order: lung parenchyma (-860 HU, correlated texture) -> vessels (+40 HU curved
tubes) -> spicules (tapered, partial-volume strands) -> nodule body (lobulated, attenuation class,
optional solid or calcified core) -> white noise -> scanner PSF (Gaussian, FWHM
``kernel_fwhm_mm``), which also shapes the noise, whose final SD is ``noise_hu``. Edges use an
analytic partial-volume profile: the cumulative of a Beta(3,3) kernel whose variance is the margin
blur's plus the pixel box's (sigma^2 = margin_sigma^2 + pixel^2 / 12), a compact Gaussian surrogate.

Shape realism (issue 10; opt-in factors, a missing column reads as its neutral value, and neutral
rows take exactly the code path, draws and bytes they had before). ``elongation`` e stretches the
body about a random major axis (own stream; in-plane in 2D, on the sphere in 3D; rotated by
``rotation_deg``): minor / major = 1 - e, area (2D) or volume (3D) kept, so ``diameter_mm`` stays
the equivalent diameter. ``irregularity`` a adds, for every shape, radial harmonics of orders
2..8 (weights +-1/k, sum |w| = 1, random axes/phases on their own stream) to the lobulation
profile, both evaluated in the unstretched frame (``nodulab.synth.shapes``); the edge's signed distance
is the radial gap in mm along the ray from the centre. ``spicule_grade`` g (spiculated only):
ceil(n g) spicules, length x (0.2 + 0.8 g), base width x (1 + 0.5 (1 - g)), tip / base width
0.3 + 0.3 (1 - g) (``nodulab.synth.shapes.GRADE_*``; g = 1 is the spicule as before). A spicule's tip keeps its
height above the local surface in its direction. ``body_reach`` bounds the body's extent.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from nodulab.synth.factors import FACTORS, Factor
from nodulab.synth.rng import hash_keys, uniform, white_noise_pair
from nodulab.synth.shapes import (
    GRADE_BLUNT,
    GRADE_LENGTH_FLOOR,
    GRADE_WIDEN,
    IRREGULARITY_ORDERS,
    LOBE_ORDERS,
    LOBULATION_EXPRESSION,
    body_reach,  # noqa: F401  (public: nodulab.synth.renderer.body_reach)
    elongation_terms,
    irregularity_terms,
    shaped_r0,
    surface_radius,
)
from nodulab.synth.shapes import directions as _directions
from nodulab.synth.shapes import probe_directions as _probe_directions
from nodulab.synth.shapes import zonal_profile as _lobe_profile

HU_MIN, HU_MAX = -1024, 3071
PARENCHYMA_HU = -860.0
PARENCHYMA_SD_HU = 25.0
TEXTURE_MM = 1.0  # correlation length (Gaussian sigma) of the parenchyma texture
VESSEL_HU = 40.0
SPICULE_HU = 30.0
SPICULE_TIP_WIDTH = 0.3  # tip width / width at the body surface
BODY_HU = {"ground_glass": -650.0, "part_solid": -650.0, "solid": 30.0, "calcified": 30.0}
CORE_HU = {"ground_glass": -650.0, "part_solid": 30.0, "solid": 30.0, "calcified": 600.0}
REGIONS = {"background": 0, "body": 1, "spicules": 2, "vessels": 3}

_BETA33_SD = 1.0 / math.sqrt(28.0)  # SD of the Beta(3,3) kernel per unit support width
_STREAM = {"lobes": 1, "spicules": 2, "vessels": 3, "nuisance": 4, "elongation": 5, "irregularity": 6}
_REQUIRED = (*(name for name, factor in FACTORS.items() if not factor.optional), "seed")
"""Columns a row must have: every factor but the opt-in ones (``Factor.neutral``), and ``seed``."""
_MAX_SIZE = {2: 8192, 3: 256}
_COORD_BITS = {2: 15, 3: 10}


# ----------------------------------------------------------------------------- per-row parameters
@dataclass
class RenderBatch:
    """Per-row render parameters as tensors on one device (see ``prepare``).

    Vectors are in array-axis order: (y, x) in 2D, (z, y, x) in 3D. Lengths in mm.
    """

    dim: int
    size: int
    pixel_mm: torch.Tensor  # (N,)
    center: torch.Tensor  # (N, dim) nodule centre, mm from the patch centre
    body_r0: torch.Tensor  # (N,) base radius before lobulation
    lobe_amp: torch.Tensor  # (N, 5) expressed lobulation x harmonic weights
    lobe_axis: torch.Tensor  # (N, 5, dim)
    irr_amp: torch.Tensor  # (N, 7) irregularity x harmonic weights (orders 2..8)
    irr_axis: torch.Tensor  # (N, 7, dim)
    elong_axis: torch.Tensor  # (N, dim) major axis of the stretch
    elong_inv_minor: torch.Tensor  # (N,) 1 / s_minor; normalised n = x * this + (x . axis) * coef
    elong_coef: torch.Tensor  # (N, dim) (1 / s_major - 1 / s_minor) * axis; 0 = not elongated
    stretch_min: torch.Tensor  # (N,) s_minor (1 = not elongated)
    stretch_max: torch.Tensor  # (N,) s_major
    stretch_box: torch.Tensor  # (N,) half-width of the stretched unit ball's bounding cube (1 = none)
    edge_inv_w: torch.Tensor  # (N,) 1 / support width of the lesion edge profile
    body_hu: torch.Tensor  # (N,)
    core_hu: torch.Tensor  # (N,)
    core_r: torch.Tensor  # (N,)
    spic_dir: torch.Tensor  # (N, K, dim)
    spic_base: torch.Tensor  # (N, K) start along the axis (inside the body)
    spic_tip: torch.Tensor  # (N, K)
    spic_slope: torch.Tensor  # (N, K) half-width lost per mm towards the tip; 0 = absent
    spic_tip_half_w: torch.Tensor  # (N, K) half-width at the tip; 0 = absent
    vessel_center: torch.Tensor  # (N, V, dim) centre of the vessel's arc
    vessel_radius: torch.Tensor  # (N, V) arc radius
    vessel_normal: torch.Tensor  # (N, V, dim) normal of the arc's plane (3D only; zeros in 2D)
    vessel_half_w: torch.Tensor  # (N, V); 0 = absent
    nuisance_base: torch.Tensor  # (N,) int32 hash of the texture-and-noise stream
    texture_w: torch.Tensor  # (N, 2T+1) separable texture kernel
    texture_scale: torch.Tensor  # (N,) HU per unit of blurred white noise
    psf_w: torch.Tensor  # (N, 2E+1) separable PSF kernel
    noise_scale: torch.Tensor  # (N,) HU per unit of white noise before the PSF

    @property
    def n(self) -> int:
        return int(self.pixel_mm.shape[0])


def _numbers(frame: pd.DataFrame, factor: Factor) -> np.ndarray:
    """A numeric factor's column as float64; an opt-in factor's neutral value where the rows lack it."""
    if factor.name in frame.columns:
        return frame[factor.name].to_numpy(dtype=np.float64)
    return np.full(len(frame), factor.neutral)


def _as_frame(rows: pd.DataFrame | Sequence[dict]) -> pd.DataFrame:
    frame = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    missing = [c for c in _REQUIRED if c not in frame.columns]
    if missing:
        raise ValueError(f"render: rows lack column(s) {', '.join(missing)}")
    return frame


def _gauss_kernel(sigma_px: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row truncated (3 sigma) Gaussian taps, normalised, zero beyond each row's radius.

    Returns the taps (N, 2R+1) and the SD of unit white noise blurred by them along one axis.
    Sums run tap by tap from the centre outwards, so a row's numbers do not depend on the
    batch-wide radius R (added taps are exact zeros).
    """
    radius = np.maximum(1, np.ceil(3.0 * sigma_px)).astype(int)
    r_max = int(radius.max()) if radius.size else 1
    k = np.arange(-r_max, r_max + 1, dtype=np.float64)[None, :]
    w = np.where(np.abs(k) <= radius[:, None], np.exp(-0.5 * (k / sigma_px[:, None]) ** 2), 0.0)
    w = w / _centre_out_sum(w)[:, None]
    return w, np.sqrt(_centre_out_sum(w**2))


def _centre_out_sum(taps: np.ndarray) -> np.ndarray:
    """Row sums of symmetric taps (N, 2R+1), added from the centre outwards in pairs."""
    r_max = taps.shape[1] // 2
    total = taps[:, r_max].copy()
    for j in range(1, r_max + 1):
        total += taps[:, r_max - j] + taps[:, r_max + j]
    return total


def prepare(
    rows: pd.DataFrame | Sequence[dict],
    size: int = 64,
    dim: int = 2,
    device: torch.device | str | None = None,
    *,
    view: int = 0,
) -> RenderBatch:
    """Turn factor rows into per-row render parameters on ``device``.

    Args:
        rows: the §2 columns (``seed`` included); ``label`` and ``agrees_*`` are ignored.
        size: pixels per side. dim: 2 or 3.
        device: torch device for the tensors (default CPU).
        view: nuisance view: 0 is the stored image; other values re-draw parenchyma, vessels and
            noise from fresh sub-seeds while the lesion stays identical.

    Returns:
        A ``RenderBatch`` for ``render_tensor``.
    """
    if dim not in (2, 3):
        raise ValueError(f"render: dim must be 2 or 3, got {dim}")
    if not 8 <= size <= _MAX_SIZE[dim]:
        raise ValueError(f"render: size must be in [8, {_MAX_SIZE[dim]}] for {dim}D, got {size}")
    f = _as_frame(rows)
    n = len(f)
    seeds = f["seed"].to_numpy(dtype=np.int64)
    if n and (seeds.min() < 0):
        raise ValueError("render: seed must be a non-negative integer")
    num = {name: _numbers(f, factor) for name, factor in FACTORS.items() if factor.numeric}
    shape = f["shape"].astype(str).to_numpy()
    atten = f["attenuation"].astype(str).to_numpy()
    for name, values, table in (("shape", shape, LOBULATION_EXPRESSION), ("attenuation", atten, BODY_HU)):
        bad = sorted(set(values) - set(table))
        if bad:
            raise ValueError(f"render: unknown {name} {bad[0]!r}")
    px = num["pixel_mm"]
    rot = np.deg2rad(num["rotation_deg"])
    r_eff = 0.5 * num["diameter_mm"]
    offsets = [num["offset_z_mm"], num["offset_y_mm"], num["offset_x_mm"]][3 - dim :]
    center = np.stack(offsets, axis=1) if n else np.zeros((0, dim))

    # Body: lobulation as zonal Chebyshev harmonics about random axes (k = 2..6, phase by axis).
    u = uniform(seeds, _STREAM["lobes"], 0, len(LOBE_ORDERS), 3)
    weights = 2.0 * u[..., 0] - 1.0
    weights /= np.maximum(np.abs(weights).sum(axis=1, keepdims=True), 1e-12)
    expressed = num["lobulation"] * np.array([LOBULATION_EXPRESSION[s] for s in shape])
    lobe_amp = expressed[:, None] * weights
    lobe_axis = _directions(u[..., 1:3], dim, rot[:, None])
    # Scale the base radius so the body's area (2D) or volume (3D) is that of diameter_mm:
    # in 2D the harmonics are orthogonal (mean f^2 = 1 + sum a_k^2 / 2); in 3D, quadrature.
    if dim == 2:
        body_r0 = r_eff / np.sqrt(1.0 + 0.5 * np.sum(lobe_amp**2, axis=1))
    else:
        probe = _probe_directions()
        probe = np.broadcast_to(probe, (n,) + probe.shape)
        body_r0 = r_eff / np.cbrt(np.mean(_lobe_profile(probe, lobe_amp, lobe_axis) ** 3, axis=1))
    # Shape realism (opt-in; a missing column is its neutral value): elongation stretches the
    # body about a random axis, irregularity adds harmonics of orders 2..8 for every shape. Rows
    # with both neutral ("plain") keep the code path above; the others ("shaped") take nodulab.synth.shapes'.
    elong, irr, grade = num["elongation"], num["irregularity"], num["spicule_grade"]
    el = elongation_terms(uniform(seeds, _STREAM["elongation"], 0, 1, 2)[:, 0], elong, dim, rot)
    irr_amp, irr_axis = irregularity_terms(
        uniform(seeds, _STREAM["irregularity"], 0, len(IRREGULARITY_ORDERS), 3), irr, dim, rot
    )
    el["coef"] = np.where((elong != 0)[:, None], el["coef"], 0.0)
    shaped = (elong != 0) | (irr != 0)
    if shaped.any():
        pick = np.flatnonzero(shaped)
        r0 = shaped_r0(r_eff[pick], lobe_amp[pick], lobe_axis[pick], irr_amp[pick], irr_axis[pick], dim)
        body_r0 = body_r0.copy()
        body_r0[pick] = r0

    sigma_edge = np.sqrt(num["margin_sigma_mm"] ** 2 + px**2 / 12.0)
    edge_w = sigma_edge / _BETA33_SD
    has_core = np.isin(atten, ["part_solid", "calcified"])
    core_r = np.where(has_core, num["solid_fraction"] * r_eff, 0.0)

    # Spicules: tapered strands from inside the body to r_eff * (1 + length), own sub-seed each.
    # Graded rows (spiculated, spicule_grade < 1) keep the first ceil(n g) spicules (each its
    # own sub-seed), shorter, broader and blunter; g = 1 takes the ungraded values as they were.
    spiculated = shape == "spiculated"
    graded = spiculated & (grade != 1.0)
    n_spic = np.where(spiculated, num["n_spicules"], 0)
    n_spic = np.where(graded, np.ceil(n_spic * grade - 1e-9), n_spic).astype(int)
    k_max = int(n_spic.max()) if n else 0
    u = uniform(seeds, _STREAM["spicules"], 0, k_max, 4)
    spic_dir = _directions(u[..., 0:2], dim, rot[:, None])
    surface = body_r0[:, None] * _lobe_profile(spic_dir, lobe_amp, lobe_axis) if k_max else np.zeros((n, 0))
    length = num["spicule_length_rel"][:, None] * r_eff[:, None] * (0.6 + 0.4 * u[..., 2])
    tip = np.maximum(r_eff[:, None] + length, surface + px[:, None])
    half_w = 0.5 * num["spicule_width_mm"][:, None] * (0.7 + 0.3 * u[..., 3])
    tip_ratio = np.full((n, 1), SPICULE_TIP_WIDTH)
    if k_max and (graded.any() or shaped.any()):
        g = grade[:, None]
        length = np.where(graded[:, None], length * (GRADE_LENGTH_FLOOR + (1.0 - GRADE_LENGTH_FLOOR) * g), length)
        half_w = np.where(graded[:, None], half_w * (1.0 + GRADE_WIDEN * (1.0 - g)), half_w)
        tip_ratio = np.where(graded[:, None], SPICULE_TIP_WIDTH + GRADE_BLUNT * (1.0 - g), tip_ratio)
        # The tip keeps its height above the local surface: a shaped body moves it with the surface.
        local = surface.copy()
        pick = np.flatnonzero(shaped)
        el_pick = {key: value[pick] for key, value in el.items()}
        local[pick] = surface_radius(
            spic_dir[pick], body_r0[pick], lobe_amp[pick], lobe_axis[pick], irr_amp[pick], irr_axis[pick], el_pick
        )
        moved = np.maximum(r_eff[:, None] + length + (local - surface), local + px[:, None])
        tip = np.where((graded | shaped)[:, None], moved, tip)
        surface = local
    present = np.arange(k_max)[None, :] < n_spic[:, None]
    # Linear taper from the full width at the body surface to TIP_WIDTH of it at the tip.
    spic_slope = np.where(present, (1.0 - tip_ratio) * half_w / (tip - surface), 0.0)
    spic_tip_half_w = np.where(present, tip_ratio * half_w, 0.0)
    spic_base = 0.5 * surface

    # Vessels: arcs of large radius through a random point of the patch (nuisance streams).
    v_max = int(num["vessels"].max()) if n else 0
    u = uniform(seeds, _STREAM["vessels"], view, v_max, 10)
    half_fov = 0.5 * size * px
    through = (2.0 * u[..., 0:3][..., :dim] - 1.0) * 0.8 * half_fov[:, None, None]
    tangent = _directions(u[..., 3:5], dim, np.zeros((n, 1)))
    if dim == 2:
        sign = np.where(u[..., 5] < 0.5, -1.0, 1.0)[..., None]
        normal = sign * np.stack([-tangent[..., 1], tangent[..., 0]], axis=-1)
        plane = np.zeros_like(tangent)
    else:
        g = _directions(u[..., 5:7], dim, np.zeros((n, 1)))
        g = g - np.sum(g * tangent, axis=-1, keepdims=True) * tangent
        normal = g / np.maximum(np.linalg.norm(g, axis=-1, keepdims=True), 1e-9)
        plane = np.cross(tangent, normal)
    arc_r = 40.0 + 160.0 * u[..., 7]
    vessel_center = through + arc_r[..., None] * normal
    vessel_half_w = np.where(np.arange(v_max)[None, :] < num["vessels"][:, None], 0.5 + u[..., 8], 0.0)

    texture_w, texture_sd = _gauss_kernel(TEXTURE_MM / px)
    fwhm_to_sigma = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))
    psf_w, psf_sd = _gauss_kernel(num["kernel_fwhm_mm"] * fwhm_to_sigma / px)
    texture_sd, psf_sd = texture_sd**dim, psf_sd**dim  # separable: product over the axes

    def t(a: np.ndarray, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.tensor(np.ascontiguousarray(a), dtype=dtype, device=device)

    return RenderBatch(
        dim=dim,
        size=size,
        pixel_mm=t(px),
        center=t(center),
        body_r0=t(body_r0),
        lobe_amp=t(lobe_amp),
        lobe_axis=t(lobe_axis),
        irr_amp=t(irr_amp),
        irr_axis=t(irr_axis),
        elong_axis=t(el["axis"]),
        elong_inv_minor=t(el["inv_minor"]),
        elong_coef=t(el["coef"]),
        stretch_min=t(el["s_minor"]),
        stretch_max=t(el["s_major"]),
        stretch_box=t(el["box"]),
        edge_inv_w=t(1.0 / edge_w),
        body_hu=t(np.array([BODY_HU[a] for a in atten])),
        core_hu=t(np.array([CORE_HU[a] for a in atten])),
        core_r=t(core_r),
        spic_dir=t(spic_dir.reshape(n, k_max, dim)),
        spic_base=t(spic_base),
        spic_tip=t(tip),
        spic_slope=t(spic_slope),
        spic_tip_half_w=t(spic_tip_half_w),
        vessel_center=t(vessel_center.reshape(n, v_max, dim)),
        vessel_radius=t(arc_r),
        vessel_normal=t(plane.reshape(n, v_max, dim)),
        vessel_half_w=t(vessel_half_w),
        nuisance_base=t(hash_keys(seeds, _STREAM["nuisance"], view).astype(np.uint32).view(np.int32), torch.int32),
        texture_w=t(texture_w),
        texture_scale=t(PARENCHYMA_SD_HU / texture_sd),
        psf_w=t(psf_w),
        noise_scale=t(num["noise_hu"] / psf_sd),
    )


# ----------------------------------------------------------------------------- per-pixel rendering
def _step(d: torch.Tensor, inv_w: torch.Tensor) -> torch.Tensor:
    """Partial-volume occupancy of a half-space at signed distance ``d`` (mm, negative inside).

    The cumulative of a Beta(3,3) kernel of support width ``1 / inv_w``: smooth (C2), exactly 0
    and 1 outside the support, and built from exactly rounded arithmetic only.
    """
    t = (d * inv_w).neg_().add_(0.5).clamp_(0.0, 1.0)
    return (t * 6.0).sub_(15.0).mul_(t).add_(10.0).mul_(t).mul_(t).mul_(t)


def _strand(dist: torch.Tensor, half_w: torch.Tensor, inv_px: torch.Tensor) -> torch.Tensor:
    """Partial-volume occupancy of a strand of half-width ``half_w`` at ``dist`` from its axis.

    Exact for a straight strand and a pixel box along the strand's normal: the overlap of
    [dist - half_w, dist + half_w] with a pixel of width 1 / inv_px centred at 0, per pixel width.
    """
    near = (dist - half_w).mul_(inv_px).neg_().add_(0.5).clamp_(0.0, 1.0)
    far = (dist + half_w).mul_(inv_px).neg_().add_(0.5).clamp_(0.0, 1.0)
    return near.sub_(far)


def _per_row(x: torch.Tensor, dim: int) -> torch.Tensor:
    """View a (N,) tensor as (N, 1, ..., 1) to broadcast over ``dim`` spatial axes."""
    return x.view((-1,) + (1,) * dim)


def _coordinates(b: RenderBatch, margin: int) -> list[torch.Tensor]:
    """Pixel-centre coordinates (mm from the patch centre) per axis, each (N, 1.., L, 1..)."""
    device = b.pixel_mm.device
    idx = torch.arange(-margin, b.size + margin, device=device, dtype=torch.float32) - (b.size - 1) / 2.0
    coords = []
    for axis in range(b.dim):
        shape = [b.n] + [1] * b.dim
        shape[1 + axis] = -1
        coords.append((b.pixel_mm[:, None] * idx[None, :]).view(shape))
    return coords


def _pixel_index(b: RenderBatch, margin: int) -> torch.Tensor:
    """Absolute integer index of every pixel of the extended grid, (*grid) int32 < 2**30."""
    bits = _COORD_BITS[b.dim]
    idx = torch.arange(-margin, b.size + margin, device=b.pixel_mm.device, dtype=torch.int32) + (1 << (bits - 1))
    total = torch.zeros((1,) * b.dim, dtype=torch.int32, device=idx.device)
    for axis in range(b.dim):
        shape = [1] * b.dim
        shape[axis] = -1
        total = total + (idx << (bits * (b.dim - 1 - axis))).view(shape)
    return total


def _blur(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Valid separable convolution of every spatial axis of ``x`` (N, ...) with per-row taps ``w``."""
    taps = w.shape[1]
    dim = x.dim() - 1
    weights = [_per_row(w[:, j].contiguous(), dim) for j in range(taps)]
    for axis in range(1, x.dim()):
        length = x.shape[axis] - (taps - 1)
        acc = x.narrow(axis, 0, length) * weights[0]
        for j in range(1, taps):
            acc.add_(x.narrow(axis, j, length) * weights[j])
        x = acc
    return x


def _norm2(vectors: Sequence[torch.Tensor]) -> torch.Tensor:
    """sum_a vectors[a]**2, broadcast over the per-axis coordinate tensors."""
    total = vectors[0] * vectors[0]
    for v in vectors[1:]:
        total = total + v * v
    return total


def _dot(vectors: Sequence[torch.Tensor], direction: torch.Tensor) -> torch.Tensor:
    """sum_a vectors[a] * direction[:, a], with per-row ``direction`` (N, dim)."""
    dim = len(vectors)
    total = vectors[0] * _per_row(direction[:, 0].contiguous(), dim)
    for axis in range(1, dim):
        total = total + vectors[axis] * _per_row(direction[:, axis].contiguous(), dim)
    return total


def _ragged(present: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Order rows for a ragged loop over elements (spicules, vessels).

    Args:
        present: bool (N, K); each row's present elements form a prefix.

    Returns:
        The rows with at least one element, by count descending, and for each element k the
        number of those rows that have it (a prefix), so the loop works on slices, not copies.
    """
    counts = present.sum(1)
    order = torch.argsort(counts, descending=True, stable=True)
    sorted_counts = counts[order].tolist()
    rows = order[: sum(c > 0 for c in sorted_counts)]
    prefix = [sum(c > k for c in sorted_counts) for k in range(present.shape[1])]
    return rows, [m for m in prefix if m > 0]


def _window(
    b: RenderBatch, rows: torch.Tensor, extent_mm: torch.Tensor, margin: int, shift_mm: torch.Tensor | None = None
) -> tuple[list[torch.Tensor], torch.Tensor, int]:
    """Coordinates of a square window inside the canvas, per row, relative to the lesion centre.

    The window covers every canvas pixel within ``extent_mm`` (per selected row) of the lesion
    centre moved by ``shift_mm`` (m, dim); its coordinates are computed exactly as the canvas's
    (same integers, same float ops), so a pixel's value does not depend on the window. Integer
    placement is decided in float64 on the CPU.

    Returns:
        Per-axis coordinates relative to the centre, each (m, 1.., width, 1..); the flat canvas
        index of every window pixel (m * width**dim,) for ``_paste``; the window width.
    """
    size, dim = b.size, b.dim
    canvas = size + 2 * margin
    px = b.pixel_mm[rows].double().cpu()
    centre = b.center[rows].double().cpu()
    if shift_mm is not None:
        centre = centre + shift_mm.double().cpu()
    centre = centre / px[:, None] + (size - 1) / 2.0 + margin
    half = torch.ceil(extent_mm.double().cpu() / px) + 1.0
    width = min(int(2 * half.max()) + 2, canvas) if len(rows) else 1
    origin = torch.floor(centre - half[:, None]).clamp(0, canvas - width).long()
    steps = torch.arange(width, device=rows.device)
    coords = []
    for axis in range(dim):
        idx = (origin[:, axis].to(rows.device)[:, None] + steps[None, :] - margin).to(torch.float32) - (size - 1) / 2.0
        coord = b.pixel_mm[rows][:, None] * idx - b.center[rows, axis][:, None]
        shape = [len(rows)] + [1] * dim
        shape[1 + axis] = width
        coords.append(coord.view(shape))
    return coords, _window_index(rows, origin.to(rows.device), width, canvas, dim), width


def _window_index(rows: torch.Tensor, origin: torch.Tensor, width: int, side: int, dim: int) -> torch.Tensor:
    """Flat indices into an (N, side, ...) canvas of each row's window, (m * width**dim,)."""
    start = rows.to(torch.int64) * side**dim
    local = torch.zeros((1,) * dim, dtype=torch.int64, device=rows.device)
    steps = torch.arange(width, device=rows.device)
    for axis in range(dim):
        stride = side ** (dim - 1 - axis)
        start = start + origin[:, axis] * stride
        shape = [1] * dim
        shape[axis] = width
        local = local + (steps * stride).view(shape)
    return (start.view((-1,) + (1,) * dim) + local).view(-1)


def _paste(canvas: torch.Tensor, index: torch.Tensor, values: torch.Tensor, maximum: bool = False) -> None:
    """Write window ``values`` into ``canvas`` at the flat ``index`` from ``_window``.

    With ``maximum`` the canvas keeps the larger of its value and the window's (a union).
    """
    flat = canvas.view(-1)
    if maximum:  # indices are distinct, so the reduction is exact and order-free
        flat.scatter_reduce_(0, index, values.reshape(-1), reduce="amax")
    else:
        flat[index] = values.reshape(-1)


def _body_layer(b: RenderBatch, margin: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The nodule body on the canvas: occupancy, its HU (with the core) and the body region.

    Plain rows (no elongation, no irregularity) share one window, as they always did; shaped rows
    go in groups of similar window width (an elongated body's window is up to 3x wider in 3D, and
    a batch-wide width would make every row pay for the widest). Window placement never changes
    a pixel's value (``_window``), so grouping is invisible in the result.
    """
    grid = (b.n,) + (b.size + 2 * margin,) * b.dim
    device = b.pixel_mm.device
    occupancy = torch.zeros(grid, device=device)
    hu = torch.zeros(grid, device=device)
    inside = torch.zeros(grid, dtype=torch.bool, device=device)
    if b.n == 0:
        return occupancy, hu, inside
    reach = (1.0 + b.lobe_amp.abs().sum(1) + b.irr_amp.abs().sum(1)) * b.stretch_box
    extent = b.body_r0 * reach + 0.5 / b.edge_inv_w
    shaped = (b.irr_amp != 0).any(1) | (b.elong_coef != 0).any(1)
    groups = [(torch.arange(b.n, device=device), False)] if not bool(shaped.any()) else []
    if groups == []:
        plain = (~shaped).nonzero().squeeze(1)
        if plain.numel():
            groups.append((plain, False))
        picked = shaped.nonzero().squeeze(1)
        width = (extent[picked] / b.pixel_mm[picked]).double().cpu().clamp(min=1.0)
        bucket = torch.floor(torch.log(width) / math.log(1.25)).long()
        for key in torch.unique(bucket).tolist():
            groups.append((picked[(bucket == key).to(picked.device)], True))
    for rows, is_shaped in groups:
        body, body_hu, distance, index = _body_window(b, rows, extent[rows], margin, is_shaped)
        _paste(occupancy, index, body)
        _paste(hu, index, body_hu)
        _paste(inside, index, distance <= 0.0)
    return occupancy, hu, inside


def _body_window(
    b: RenderBatch, rows: torch.Tensor, extent: torch.Tensor, margin: int, shaped: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Body occupancy, HU and signed distance of ``rows`` in one window, and its canvas index."""
    q, index, _ = _window(b, rows, extent, margin)
    row = lambda x: _per_row(x[rows].contiguous(), b.dim)  # noqa: E731
    rho = _norm2(q).sqrt_()
    core = bool((b.core_hu[rows] != b.body_hu[rows]).any())
    if shaped:
        distance, core_distance = _shaped_distance(b, q, rho, rows)
    else:
        profile = torch.ones_like(rho)
        lobed = (b.lobe_amp[rows] != 0).any(1).nonzero().squeeze(1)
        if lobed.numel():
            lobes = _lobe_profile_tensor(
                b, [qa.index_select(0, lobed) for qa in q], rho.index_select(0, lobed), rows[lobed]
            )
            profile.index_copy_(0, lobed, lobes)
        distance = rho - profile.mul_(row(b.body_r0))
        core_distance = rho - row(b.core_r) if core else None
    edge = row(b.edge_inv_w)
    body = _step(distance, edge)
    body_hu = row(b.body_hu).expand_as(body)
    if core:
        body_hu = _step(core_distance, edge).mul_(row(b.core_hu - b.body_hu)).add_(body_hu)
    return body, body_hu, distance, index


def _spicule_layer(b: RenderBatch, margin: int) -> torch.Tensor:
    """Spicule occupancy on the canvas: tapered strands, union by max (pixel-box partial volume)."""
    grid = (b.n,) + (b.size + 2 * margin,) * b.dim
    occupancy = torch.zeros(grid, device=b.pixel_mm.device)
    rows, prefix = _ragged(b.spic_slope > 0)
    if not prefix:
        return occupancy
    dim = b.dim
    # Gather each parameter once for the ragged rows; element k of the first m rows is a view.
    direction, base, tip, slope, tip_half_w = (
        x[rows] for x in (b.spic_dir, b.spic_base, b.spic_tip, b.spic_slope, b.spic_tip_half_w)
    )
    inv_px = 1.0 / b.pixel_mm[rows]
    widest = slope * (tip - base) + tip_half_w
    for k, m in enumerate(prefix):
        # Each spicule in its own window around its segment: a thin strand, not the whole lesion.
        extent = 0.5 * (tip[:m, k] - base[:m, k]) + widest[:m, k] + b.pixel_mm[rows[:m]]
        shift = direction[:m, k] * (0.5 * (base[:m, k] + tip[:m, k]))[:, None]
        q, index, _ = _window(b, rows[:m], extent, margin, shift)
        param = lambda x: _per_row(x[:m, k].contiguous(), dim)  # noqa: E731, B023 - called within this iteration
        rho2 = _norm2(q)
        along = _dot(q, direction[:m, k])
        dist = (along * along).neg_().add_(rho2).clamp_(min=0.0)
        end = param(tip)
        clamped = torch.minimum(torch.maximum(along, param(base)), end)
        beyond = along.sub_(clamped)
        dist.add_(beyond.mul_(beyond)).sqrt_()
        half_w = (end - clamped).mul_(param(slope)).add_(param(tip_half_w))
        occ = _strand(dist, half_w, _per_row(inv_px[:m], dim))
        _paste(occupancy, index, occ, maximum=True)
    return occupancy


def _vessel_layer(b: RenderBatch, margin: int) -> torch.Tensor:
    """Vessel occupancy: tubes along arcs of large radius, through the whole patch."""
    coords = _coordinates(b, margin)
    grid = torch.broadcast_shapes(*(c.shape for c in coords))
    occupancy = torch.zeros(grid, device=coords[0].device)
    rows, prefix = _ragged(b.vessel_half_w > 0)
    if not prefix:
        return occupancy
    coords = [c.index_select(0, rows) for c in coords]
    sub_occ = torch.zeros((len(rows),) + grid[1:], device=occupancy.device)
    dim = b.dim
    for v, m in enumerate(prefix):
        r = rows[:m]
        param = lambda x: _per_row(x[r, v].contiguous(), dim)  # noqa: E731, B023 - called within this iteration
        w = [c[:m] - param(b.vessel_center[..., a]) for a, c in enumerate(coords)]
        d2 = _norm2(w)
        radius = param(b.vessel_radius)
        if dim == 2:
            dist = (d2.sqrt_() - radius).abs_()
        else:
            z = _dot(w, b.vessel_normal[r, v])
            in_plane = (d2 - z * z).clamp_(min=0.0).sqrt_() - radius
            dist = (in_plane * in_plane + z * z).sqrt_()
        half_w = param(b.vessel_half_w)
        occ = _strand(dist, half_w, _per_row(1.0 / b.pixel_mm[r], dim))
        torch.maximum(sub_occ[:m], occ, out=sub_occ[:m])
    occupancy.index_copy_(0, rows, sub_occ)
    return occupancy


def _lobe_profile_tensor(b: RenderBatch, q: list[torch.Tensor], rho: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """1 + sum_k amp_k T_k(cos angle to axis_k) per pixel, Chebyshev recurrence (no trig)."""
    inv_rho = rho.clamp(min=1e-6).reciprocal_()
    return _zonal_add(torch.ones_like(rho), q, inv_rho, b.lobe_amp[rows], b.lobe_axis[rows], LOBE_ORDERS)


def _zonal_add(
    profile: torch.Tensor,
    q: list[torch.Tensor],
    inv_rho: torch.Tensor,
    amp: torch.Tensor,
    axis: torch.Tensor,
    orders: Sequence[int],
) -> torch.Tensor:
    """profile += sum_k amp_k T_k(q . axis_k / |q|) in place, Chebyshev recurrence (no trig)."""
    dim = len(q)
    for k, order in enumerate(orders):
        c = _dot(q, axis[:, k]).mul_(inv_rho)
        two_c = c * 2.0
        t0, t1 = torch.ones_like(c), c
        for _ in range(order - 1):
            t0, t1 = t1, (two_c * t1).sub_(t0)
        profile.add_(t1.mul_(_per_row(amp[:, k].contiguous(), dim)))
    return profile


def _shaped_distance(
    b: RenderBatch, q: list[torch.Tensor], rho: torch.Tensor, rows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed distances (mm, along the ray from the centre) to the body and the core boundaries of
    elongated and/or irregular bodies (``nodulab.synth.shapes``): the profile is evaluated in the
    normalised frame n = S^-1 x, and |x| / |n| turns the normalised gap back into mm on the ray."""
    row = lambda x: _per_row(x.contiguous(), b.dim)  # noqa: E731
    along = _dot(q, b.elong_axis[rows])
    coef = b.elong_coef[rows]
    n = [qa * row(b.elong_inv_minor[rows]) + along * row(coef[:, a]) for a, qa in enumerate(q)]
    nu = _norm2(n).sqrt_()
    inv_nu = nu.clamp(min=1e-6).reciprocal_()
    profile = _zonal_add(torch.ones_like(nu), n, inv_nu, b.lobe_amp[rows], b.lobe_axis[rows], LOBE_ORDERS)
    profile = _zonal_add(profile, n, inv_nu, b.irr_amp[rows], b.irr_axis[rows], IRREGULARITY_ORDERS)
    # |x| / |n| lies in [s_minor, s_major]; the clamp also settles the centre (0 / 0).
    ratio = torch.minimum(torch.maximum(rho * inv_nu, row(b.stretch_min[rows])), row(b.stretch_max[rows]))
    body = (nu - profile.mul_(row(b.body_r0[rows]))).mul_(ratio)
    core = (nu - row(b.core_r[rows])).mul_(ratio)
    return body, core


def render_tensor(b: RenderBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Render a prepared batch on its device.

    Returns:
        ``hu``: float32 (N, *grid), rounded and clipped HU values; ``mask``: uint8 region map
        (0 background, 1 body, 2 spicules, 3 vessels) from the geometry before any blur.
    """
    dim, size = b.dim, b.size
    e = (b.psf_w.shape[1] - 1) // 2
    t = (b.texture_w.shape[1] - 1) // 2
    row = lambda x: _per_row(x.contiguous(), dim)  # noqa: E731
    valid = (slice(None),) + (slice(e, e + size),) * dim
    body, body_hu, inside = _body_layer(b, e)
    spicules = _spicule_layer(b, e)
    vessels = _vessel_layer(b, e)

    # Parenchyma texture and quantum noise share one hash per pixel (different bits).
    texture, noise = white_noise_pair(b.nuisance_base, _pixel_index(b, e + t))
    inner = (slice(None),) + (slice(t, t + size + 2 * e),) * dim
    image = _blur(texture, b.texture_w).mul_(row(b.texture_scale)).add_(PARENCHYMA_HU)
    image.add_(vessels.mul(image.neg().add_(VESSEL_HU)))
    image.add_(spicules.mul(image.neg().add_(SPICULE_HU)))
    image.add_(body.mul(body_hu - image))
    image.add_(noise[inner].mul(row(b.noise_scale)))
    hu = _blur(image, b.psf_w).round_().clamp_(HU_MIN, HU_MAX)

    # Regions from the geometry before blur: >= 50 % partial-volume coverage (body: centre inside).
    mask = (vessels[valid] >= 0.5).to(torch.uint8).mul_(REGIONS["vessels"])
    mask.masked_fill_(spicules[valid] >= 0.5, REGIONS["spicules"])
    mask.masked_fill_(inside[valid], REGIONS["body"])
    return hu, mask


@functools.cache
def keep_freed_tensors_mapped() -> bool:
    """Opt in: raise glibc's mmap threshold so freed tensor buffers are reused, not unmapped.

    Every op of the renderer allocates a buffer of a few MB; by default glibc maps and unmaps
    each one, and the page faults that follow cost more than the arithmetic (measured: the
    noise stage runs 3x faster). Same effect as running with MALLOC_MMAP_THRESHOLD_; a no-op
    where glibc is absent. It changes the allocator for the whole process, for its whole life
    (glibc then keeps its dynamic threshold off), so ``render`` never calls it: a program that
    renders in bulk opts in (``nodulab generate`` does). Results are identical either way.

    Returns:
        Whether glibc accepted both settings.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 32 << 20) and libc.mallopt(m_trim_threshold, 256 << 20))
    except (OSError, AttributeError):
        return False


def render(
    rows: pd.DataFrame | Sequence[dict],
    size: int = 64,
    dim: int = 2,
    device: torch.device | str | None = None,
    *,
    view: int = 0,
    chunk: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Render factor rows into CT patches.

    Args:
        rows: pandas DataFrame or list of dicts with the columns of design.md "Factors of
            variation" (``seed`` included).
        size: pixels per side. dim: 2 (N×H×W) or 3 (N×D×H×W).
        device: torch device to render on (default CPU); results come back as numpy.
        view: 0 for the stored image; other values re-draw the nuisance (texture, vessels, noise).
        chunk: rows per device batch (default: about 256k pixels); never changes the result.

    Returns:
        ``(images, masks)``: int16 HU clipped to [-1024, 3071] and uint8 region maps.

    The process's allocator is left alone; bulk renderers may call
    :func:`keep_freed_tensors_mapped` first (faster, process-wide).
    """
    frame = _as_frame(rows)
    n = len(frame)
    images = np.empty((n,) + (size,) * dim, dtype=np.int16)
    masks = np.empty((n,) + (size,) * dim, dtype=np.uint8)
    chunk = chunk or max(1, (2**21 if dim == 2 else 2**23) // (size + 16) ** dim)
    for start in range(0, n, chunk):
        batch = prepare(frame.iloc[start : start + chunk], size, dim, device, view=view)
        hu, mask = render_tensor(batch)
        images[start : start + chunk] = hu.to(torch.int16).cpu().numpy()
        masks[start : start + chunk] = mask.cpu().numpy()
    return images, masks
