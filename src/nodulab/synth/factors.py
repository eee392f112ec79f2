"""The factors of variation (DESIGN §2): names, kinds, units, valid ranges and defaults.

This table is the contract between scenarios, the renderer and the on-disk format. Default
distributions are written in scenario syntax (``{"uniform": [a, b]}``, ``{"choice": [...]}`` or
a bare scalar) so a scenario's ``[factors]`` table overrides them one key at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

SHAPES = ("round", "lobulated", "spiculated")
ATTENUATIONS = ("ground_glass", "part_solid", "solid", "calcified")

KINDS = ("float", "int", "category")


@dataclass(frozen=True)
class Factor:
    """One factor of variation.

    Attributes:
        name: Column name in ``factors.csv``.
        kind: ``"float"``, ``"int"`` or ``"category"``.
        unit: Physical unit (``"mm"``, ``"HU"``, ``"deg"``; ``""`` when unitless).
        description: One line saying what the factor does to the image.
        low: Smallest valid value (numeric kinds, inclusive).
        high: Largest valid value (numeric kinds, inclusive).
        choices: Valid values (categorical kinds).
        default: Default distribution in scenario syntax; ``None`` when set elsewhere
            (``pixel_mm`` comes from ``[image]``).
    """

    name: str
    kind: str
    unit: str
    description: str
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] = ()
    default: object = None

    @property
    def numeric(self) -> bool:
        """Whether the factor takes numbers (``float`` or ``int``)."""
        return self.kind in ("float", "int")


def _float(name: str, unit: str, low: float, high: float, default: object, what: str) -> Factor:
    return Factor(name, "float", unit, what, low=low, high=high, default=default)


def _int(name: str, low: int, high: int, default: object, what: str) -> Factor:
    return Factor(name, "int", "", what, low=low, high=high, default=default)


_TABLE = (
    Factor(
        "shape",
        "category",
        "",
        "primary morphology; decides which latent parameters show",
        choices=SHAPES,
        default={"choice": list(SHAPES)},
    ),
    _float(
        "lobulation",
        "",
        0.0,
        0.3,
        {"uniform": [0.05, 0.2]},
        "amplitude of radial harmonics k=2..6 (lobulated; x0.3 for spiculated)",
    ),
    _int("n_spicules", 0, 24, {"uniform": [6, 16]}, "number of spicules (spiculated only)"),
    _float(
        "spicule_length_rel", "", 0.2, 1.5, {"uniform": [0.4, 1.0]}, "spicule length as a multiple of the body radius"
    ),
    _float("spicule_width_mm", "mm", 0.3, 2.0, {"uniform": [0.5, 1.0]}, "spicule width at the body surface (tapered)"),
    _float("diameter_mm", "mm", 3.0, 30.0, {"uniform": [6, 18]}, "effective diameter of the nodule body"),
    Factor(
        "attenuation",
        "category",
        "",
        "density class of the body",
        choices=ATTENUATIONS,
        default={"choice": list(ATTENUATIONS[:3])},
    ),
    _float(
        "solid_fraction",
        "",
        0.1,
        0.9,
        {"uniform": [0.3, 0.7]},
        "core diameter / body diameter (part_solid and calcified)",
    ),
    _float("margin_sigma_mm", "mm", 0.0, 2.5, {"uniform": [0.2, 0.8]}, "edge blur: sharp vs ill-defined margin"),
    _int("vessels", 0, 6, {"uniform": [0, 3]}, "soft-tissue tubes crossing the patch"),
    _float("noise_hu", "HU", 0.0, 100.0, {"uniform": [10, 30]}, "SD of the final, kernel-shaped noise"),
    _float("kernel_fwhm_mm", "mm", 0.3, 3.0, {"uniform": [0.6, 1.2]}, "scanner point-spread blur (FWHM)"),
    _float("pixel_mm", "mm", 0.2, 3.0, None, "isotropic spacing; set by [image]"),
    _float("offset_x_mm", "mm", -10.0, 10.0, {"uniform": [-3, 3]}, "nodule centre offset in x"),
    _float("offset_y_mm", "mm", -10.0, 10.0, {"uniform": [-3, 3]}, "nodule centre offset in y"),
    _float("offset_z_mm", "mm", -10.0, 10.0, {"uniform": [-3, 3]}, "nodule centre offset in z (0 in 2D)"),
    _float("rotation_deg", "deg", 0.0, 360.0, {"uniform": [0, 360]}, "in-plane rotation (about z in 3D)"),
    # Shape realism (issue 10): opt-in, see OPTIONAL below.
    _float(
        "elongation",
        "",
        0.0,
        0.7,
        0.0,
        "body elongation: minor / major axis = 1 - elongation, area (2D) or volume (3D) kept",
    ),
    _float(
        "irregularity", "", 0.0, 0.3, 0.0, "amplitude of low-frequency boundary irregularity (orders 2..8, every shape)"
    ),
    _float(
        "spicule_grade",
        "",
        0.0,
        1.0,
        1.0,
        "spiculation grade: 1 = spicules as drawn; lower = fewer, shorter, broader, blunter",
    ),
)

FACTORS: dict[str, Factor] = {f.name: f for f in _TABLE}
"""Every factor of variation, in the column order of DESIGN §2."""

OPTIONAL: dict[str, float] = {"elongation": 0.0, "irregularity": 0.0, "spicule_grade": 1.0}
"""Opt-in factors and their neutral values. A scenario that names none of them (and draws no rows
from a table) writes no column for them, and the renderer reads a missing column as its neutral
value, so datasets made before they existed keep their bytes."""

FACTOR_COLUMNS: tuple[str, ...] = ("label", *(name for name in FACTORS if name not in OPTIONAL))
"""Leading columns of ``factors.csv``; the sampler appends the opted-in ``OPTIONAL`` factors,
``agrees_<factor>`` and ``seed``."""
