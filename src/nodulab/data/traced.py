"""Measures of a traced nodule outline, the same for a radiologist's contour and a synthetic image.

A *traced* nodule is a boolean mask on one axial slice: either a LIDC-IDRI reader's contour,
rasterised (``scripts/build_lidc_table.py``), or a synthetic image thresholded the way a reader
would outline it (:func:`trace`). Both go through :func:`measure`, so the two distributions are
comparable measure by measure.

Measures (all from the pixel grid, ``pixel_mm`` isotropic):

* ``area_mm2``: pixel count × pixel area.
* ``diameter_mm``: area-equivalent diameter, sqrt(4 A / π).
* ``solidity``: pixel area / area of the convex hull of the pixel squares' corners (a filled
  convex shape is close to 1, spicules and lobes lower it). A single pixel has solidity 1.
* ``radial_cv``: std / mean of the distances from the mask centroid to the boundary pixels'
  centres (boundary: mask pixels with a 4-neighbour outside the mask). A disc is near 0.
  NaN when the mean distance is 0 (a single pixel).
* ``aspect``: sqrt(λmin / λmax) of the covariance of the pixel coordinates (1 round, 0.5 for a
  2:1 ellipse). NaN when λmax is 0 (a single pixel); 0 for a straight line of pixels.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

MEASURES = ("diameter_mm", "area_mm2", "solidity", "radial_cv", "aspect")

_FOUR = ndimage.generate_binary_structure(2, 1)


def _hull_area_px(ys: np.ndarray, xs: np.ndarray) -> float:
    """Area (in pixels) of the convex hull of the corners of the given pixels' squares.

    Passing only the boundary pixels gives the hull of the whole mask (an interior pixel's
    corners are shared with its neighbours'); repeated corners do not change a hull.
    """
    corners = np.concatenate([np.stack([ys + dy, xs + dx], axis=1) for dy in (-0.5, 0.5) for dx in (-0.5, 0.5)])
    try:
        return float(ConvexHull(corners).volume)  # in 2D, ``volume`` is the area
    except QhullError:  # cannot happen for pixel squares, which are never collinear
        return float(len(ys))


def measure(mask: np.ndarray, pixel_mm: float) -> dict[str, float]:
    """Measure one traced 2D outline.

    Args:
        mask: boolean 2D array, True inside the nodule (any number of components; an empty mask
            gives NaN for every measure and 0 area).
        pixel_mm: isotropic pixel spacing in mm.

    Returns:
        ``{"area_mm2", "diameter_mm", "solidity", "radial_cv", "aspect"}`` as floats; see the module
        docstring for definitions and where NaN appears (1–2 pixel masks).
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"measure: expected a 2D mask, got shape {mask.shape}")
    if pixel_mm <= 0 or not np.isfinite(pixel_mm):
        raise ValueError(f"measure: pixel_mm must be positive, got {pixel_mm}")
    n = int(mask.sum())
    nan = float("nan")
    if n == 0:
        return {"area_mm2": 0.0, "diameter_mm": 0.0, "solidity": nan, "radial_cv": nan, "aspect": nan}
    area = n * pixel_mm**2
    ys, xs = np.nonzero(mask)
    box = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]  # the measures are shift-invariant
    ys, xs = ys - ys.min(), xs - xs.min()
    cy, cx = ys.mean(), xs.mean()
    inner = ndimage.binary_erosion(box, structure=_FOUR, border_value=0)
    by, bx = np.nonzero(box & ~inner)
    solidity = n / _hull_area_px(by, bx)
    dist = np.hypot(by - cy, bx - cx)
    radial_cv = float(dist.std() / dist.mean()) if dist.mean() > 0 else nan
    if n >= 2:
        cov = np.cov(np.stack([ys, xs]).astype(float), bias=True)
        lo, hi = np.linalg.eigvalsh(cov)
        aspect = float(np.sqrt(max(lo, 0.0) / hi)) if hi > 0 else nan
    else:
        aspect = nan
    return {
        "area_mm2": float(area),
        "diameter_mm": float(np.sqrt(4 * area / np.pi)),
        "solidity": float(solidity),
        "radial_cv": radial_cv,
        "aspect": aspect,
    }


def trace(image_hu: np.ndarray, centre_px, threshold_hu: float) -> np.ndarray:
    """Outline the nodule at ``centre_px`` as a reader would: threshold, fill holes, one component.

    Pixels at or above ``threshold_hu`` are kept and the connected component (face-connected)
    containing the centre pixel is returned with its holes filled (``binary_fill_holes``). If the
    centre pixel is below the threshold, the image's holes are filled first and the component at
    the centre, or else the one nearest to it, is returned (an empty mask if nothing passes the
    threshold).

    Args:
        image_hu: 2D (H, W) or 3D (D, H, W) image in HU.
        centre_px: the nodule centre, one (possibly fractional) coordinate per axis, in array
            order (z, y, x in 3D); it is rounded to the nearest pixel and clipped to the image.
        threshold_hu: the HU threshold.

    Returns:
        A boolean mask with the image's shape.
    """
    image = np.asarray(image_hu)
    centre = np.asarray(centre_px, dtype=float)
    if image.ndim not in (2, 3) or centre.shape != (image.ndim,):
        raise ValueError(
            f"trace: need a 2D or 3D image and one centre coordinate per axis, got {image.shape} and {centre.shape}"
        )
    at = tuple(int(np.clip(np.rint(c), 0, s - 1)) for c, s in zip(centre, image.shape))
    above = image >= threshold_hu
    if above[at]:  # the component at the centre, its own holes filled (within its box)
        labels, _ = ndimage.label(above)
        box = ndimage.find_objects(labels, max_label=labels[at])[-1]
        out = np.zeros(image.shape, dtype=bool)
        out[box] = ndimage.binary_fill_holes(labels[box] == labels[at])
        return out
    return _trace_whole(above, centre, at)


def _trace_whole(above: np.ndarray, centre: np.ndarray, at: tuple[int, ...]) -> np.ndarray:
    labels, count = ndimage.label(ndimage.binary_fill_holes(above))
    if count == 0:
        return np.zeros(above.shape, dtype=bool)
    keep = labels[at]
    if keep == 0:
        idx = np.argwhere(labels > 0)
        nearest = idx[np.argmin(((idx - centre) ** 2).sum(axis=1))]
        keep = labels[tuple(nearest)]
    return labels == keep


def largest_slice(mask3d: np.ndarray) -> np.ndarray:
    """The axial slice (axis 0) of a 3D mask with the most pixels (the first one on a tie)."""
    mask3d = np.asarray(mask3d, dtype=bool)
    if mask3d.ndim != 3:
        raise ValueError(f"largest_slice: expected a 3D mask, got shape {mask3d.shape}")
    return mask3d[int(np.argmax(mask3d.sum(axis=(1, 2))))]
