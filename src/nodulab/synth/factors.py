"""The factors of variation (design.md "Factors of variation"): names, kinds, units, valid ranges and defaults.

This table is the contract between scenarios, the renderer and the on-disk format. Default
distributions are written in scenario syntax (``{"uniform": [a, b]}``, ``{"choice": [...]}`` or
a bare scalar) so a scenario's ``[factors]`` table overrides them one key at a time.

Lists that depend on the factors are derived from this table, never kept beside it: the
renderer's required columns, ``OPTIONAL``, ``FACTOR_COLUMNS``, the probes' kinds and where each
factor acts (``nodulab.explanation.probes``), the factors a ``[source]`` scenario draws
(``nodulab.synth.scenario.SOURCE_MAPPED``) and the tests' row strategies. A new factor is one
``Factor`` entry here plus what the renderer does with it; a counterfactual switch
(``nodulab.explanation.switches``), a sweep or a ``[source]`` mapping (``nodulab.synth.twins``)
are written only where one is wanted.
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
        neutral: Opt-in factors only: the value a missing column reads as, the one that leaves
            the image as it was before the factor existed (``OPTIONAL``). ``None``: the factor is
            always written, and the renderer requires its column.
        expressed_when: ``(column, values)`` when the image expresses the factor only on rows whose
            ``column`` is one of ``values`` (the renderer ignores it elsewhere; probes decode it
            there only); ``None`` when every row expresses it.
        decodable: Whether the stored value can be read back from the image, so probes decode
            it; ``False`` for ``rotation_deg`` (circular, and each nodule's own orientation is
            re-drawn from its seed) and ``pixel_mm`` (one value per dataset).
        from_source: Whether a ``[source]`` scenario draws it from its table of annotations
            (``nodulab.synth.twins`` maps the ratings to it), so ``[factors]`` may not set it.
        geometric: Whether a geometric view (flips, 90° turns, shifts) changes it: such a factor
            may not be a label or a confound when views are geometric (``training.augment``).
    """

    name: str
    kind: str
    unit: str
    description: str
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] = ()
    default: object = None
    neutral: float | None = None
    expressed_when: tuple[str, tuple[str, ...]] | None = None
    decodable: bool = True
    from_source: bool = False
    geometric: bool = False

    @property
    def numeric(self) -> bool:
        """Whether the factor takes numbers (``float`` or ``int``)."""
        return self.kind in ("float", "int")

    @property
    def optional(self) -> bool:
        """Whether the factor is opt-in (it has a ``neutral`` value)."""
        return self.neutral is not None


def _float(name: str, unit: str, low: float, high: float, default: object, what: str, **more: object) -> Factor:
    return Factor(name, "float", unit, what, low=low, high=high, default=default, **more)


def _int(name: str, low: int, high: int, default: object, what: str, **more: object) -> Factor:
    return Factor(name, "int", "", what, low=low, high=high, default=default, **more)


_SPICULATED = ("shape", ("spiculated",))

_TABLE = (
    Factor(
        "shape",
        "category",
        "",
        "primary morphology; decides which latent parameters show",
        choices=SHAPES,
        default={"choice": list(SHAPES)},
        from_source=True,
    ),
    _float(
        "lobulation",
        "",
        0.0,
        0.3,
        {"uniform": [0.05, 0.2]},
        "amplitude of radial harmonics k=2..6 (lobulated; x0.3 for spiculated)",
        expressed_when=("shape", ("lobulated", "spiculated")),
        from_source=True,
    ),
    _int("n_spicules", 0, 24, {"uniform": [6, 16]}, "number of spicules (spiculated only)", expressed_when=_SPICULATED),
    _float(
        "spicule_length_rel",
        "",
        0.2,
        1.5,
        {"uniform": [0.4, 1.0]},
        "spicule length as a multiple of the body radius",
        expressed_when=_SPICULATED,
    ),
    _float(
        "spicule_width_mm",
        "mm",
        0.3,
        2.0,
        {"uniform": [0.5, 1.0]},
        "spicule width at the body surface (tapered)",
        expressed_when=_SPICULATED,
    ),
    _float(
        "diameter_mm", "mm", 3.0, 30.0, {"uniform": [6, 18]}, "effective diameter of the nodule body", from_source=True
    ),
    Factor(
        "attenuation",
        "category",
        "",
        "density class of the body",
        choices=ATTENUATIONS,
        default={"choice": list(ATTENUATIONS[:3])},
        from_source=True,
    ),
    _float(
        "solid_fraction",
        "",
        0.1,
        0.9,
        {"uniform": [0.3, 0.7]},
        "core diameter / body diameter (part_solid and calcified)",
        expressed_when=("attenuation", ("part_solid", "calcified")),
    ),
    _float(
        "margin_sigma_mm",
        "mm",
        0.0,
        2.5,
        {"uniform": [0.2, 0.8]},
        "edge blur: sharp vs ill-defined margin",
        from_source=True,
    ),
    _int("vessels", 0, 6, {"uniform": [0, 3]}, "soft-tissue tubes crossing the patch"),
    _float("noise_hu", "HU", 0.0, 100.0, {"uniform": [10, 30]}, "SD of the final, kernel-shaped noise"),
    _float("kernel_fwhm_mm", "mm", 0.3, 3.0, {"uniform": [0.6, 1.2]}, "scanner point-spread blur (FWHM)"),
    _float("pixel_mm", "mm", 0.2, 3.0, None, "isotropic spacing; set by [image]", decodable=False),
    _float("offset_x_mm", "mm", -10.0, 10.0, {"uniform": [-3, 3]}, "nodule centre offset in x", geometric=True),
    _float("offset_y_mm", "mm", -10.0, 10.0, {"uniform": [-3, 3]}, "nodule centre offset in y", geometric=True),
    _float(
        "offset_z_mm", "mm", -10.0, 10.0, {"uniform": [-3, 3]}, "nodule centre offset in z (0 in 2D)", geometric=True
    ),
    _float(
        "rotation_deg",
        "deg",
        0.0,
        360.0,
        {"uniform": [0, 360]},
        "in-plane rotation (about z in 3D)",
        decodable=False,
        geometric=True,
    ),
    # Shape realism (issue 10): opt-in (a neutral value), see OPTIONAL below.
    _float(
        "elongation",
        "",
        0.0,
        0.7,
        0.0,
        "body elongation: minor / major axis = 1 - elongation, area (2D) or volume (3D) kept",
        neutral=0.0,
        from_source=True,
    ),
    _float(
        "irregularity",
        "",
        0.0,
        0.3,
        0.0,
        "amplitude of low-frequency boundary irregularity (orders 2..8, every shape)",
        neutral=0.0,
    ),
    _float(
        "spicule_grade",
        "",
        0.0,
        1.0,
        1.0,
        "spiculation grade: 1 = spicules as drawn; lower = fewer, shorter, broader, blunter",
        neutral=1.0,
        expressed_when=_SPICULATED,
        from_source=True,
    ),
)

FACTORS: dict[str, Factor] = {f.name: f for f in _TABLE}
"""Every factor of variation, in the column order of design.md "Factors of variation"."""

OPTIONAL: dict[str, float] = {name: f.neutral for name, f in FACTORS.items() if f.neutral is not None}
"""Opt-in factors and their neutral values (``Factor.neutral``). A scenario that names none of them
(and draws no rows from a table) writes no column for them, and the renderer reads a missing
column as its neutral value, so datasets made before they existed keep their bytes."""

FACTOR_COLUMNS: tuple[str, ...] = ("label", *(name for name, f in FACTORS.items() if not f.optional))
"""Leading columns of ``factors.csv``; the sampler appends the opted-in ``OPTIONAL`` factors,
``agrees_<factor>`` and ``seed``."""
