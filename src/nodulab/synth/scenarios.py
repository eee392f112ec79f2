"""Loading scenarios (design.md "Scenarios"): presets, TOML files, overrides, the checks that need
the geometry or a table. The model itself (what a scenario may say) is ``nodulab.synth.scenario``;
sampling lives in ``nodulab.synth.sampling``.
"""

from __future__ import annotations

import copy
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from nodulab.synth.factors import FACTORS
from nodulab.synth.scenario import (
    MAX_SCENARIO_BYTES,
    SOURCE_MAPPED,
    Scenario,
    ScenarioError,
    declared_distributions,
    dist_support,
    dist_values,
    factor_columns,
    one_line,
    raw_dict,
)
from nodulab.synth.shapes import body_reach


def split_distributions(s: Scenario, split: str, name: str) -> list[object]:
    """Every distribution factor ``name`` can be drawn from in ``split``: a ``[source]`` scenario's
    mapped factors from its table (``twins.support``), the rest as the scenario declares them."""
    if s.source is not None and name in SOURCE_MAPPED:
        from nodulab.synth import twins  # pandas: imported where a [source] needs it, so listing stays light

        return twins.support(s, name)
    return declared_distributions(s, split, name)


def _max_abs(s: Scenario, split: str, name: str) -> float:
    factor = FACTORS[name]
    return max(max(abs(lo), abs(hi)) for d in split_distributions(s, split, name) for lo, hi in dist_support(d, factor))


def _check_field_of_view(s: Scenario, split: str) -> None:
    """Body radius x (1 + longest spicule) + largest offset <= half the patch (design.md "Scenarios").

    With ``elongation`` or ``irregularity`` named, the radius is that of the farthest boundary
    point (``shapes.body_reach``) rather than of the equivalent disc or ball."""
    radius = _max_abs(s, split, "diameter_mm") / 2
    named = factor_columns(s)
    if "elongation" in named or "irregularity" in named:  # the stretched, irregular body reaches further
        stretch = [_max_abs(s, split, f) if f in named else 0.0 for f in ("elongation", "irregularity")]
        radius *= float(body_reach(*stretch, s.image.dim))
    shapes = set().union(*(dist_values(d) for d in split_distributions(s, split, "shape")))
    spicule = _max_abs(s, split, "spicule_length_rel") if "spiculated" in shapes else 0.0
    axes = ("offset_x_mm", "offset_y_mm", "offset_z_mm")[: s.image.dim]
    offset = max(_max_abs(s, split, a) for a in axes)
    need = radius * (1 + spicule) + offset
    half = s.image.size * s.image.pixel_mm / 2
    if need > half + 1e-9:
        raise ValueError(
            f"splits.{split}: the lesion does not fit the field of view: radius {radius:g} mm"
            f" * (1 + spicule {spicule:g}) + offset {offset:g} mm = {need:g} mm > {half:g} mm"
            f" (image.size {s.image.size} * image.pixel_mm {s.image.pixel_mm:g} / 2)"
        )


def load_scenario_dict(d: dict) -> Scenario:
    """Validate a scenario from its dict form (parsed TOML or :func:`scenario_to_dict`): the model's
    checks, then the field of view of every split, or the ``[source]`` checks against its table.

    Raises:
        ScenarioError: on any invalid key or value; the message names it.
    """
    if not isinstance(d, dict):
        raise ScenarioError(f"a scenario is a table of keys (got {type(d).__name__})")
    try:
        s = Scenario.model_validate(d)
    except ValidationError as err:
        raise ScenarioError(one_line(err)) from None
    try:
        if s.source is not None:
            from nodulab.synth import twins

            twins.check_source(s)
        else:
            for split in s.splits:
                _check_field_of_view(s, split)
    except ValueError as err:
        raise ScenarioError(" ".join(str(err).split())) from None
    return s


def scenario_to_dict(s: Scenario) -> dict:
    """JSON-able, fully resolved form (what ``dataset.json`` stores); inverse of load_scenario_dict.

    Every factor whose values come from a distribution is listed in ``factors``, defaults
    included, so the file still says what was drawn if a later version changes a default.
    """
    d = raw_dict(s)
    reserved = {s.label.factor, "pixel_mm", *(c.factor for c in s.confounds)}
    if s.source is not None:
        from nodulab.synth import twins

        reserved.update(SOURCE_MAPPED)
        d["source"]["sha256"] = twins.table_sha256(s.source.table)
    if s.image.dim == 2:
        reserved.add("offset_z_mm")
    factors = d["factors"]
    d["factors"] = {
        name: factors.get(name, copy.deepcopy(FACTORS[name].default))
        for name in factor_columns(s)
        if name not in reserved
    }
    return d


def _with_overrides(d: dict, n: int | None, dim: int | None, size: int | None, pixel_mm: float | None) -> dict:
    image = dict(d.get("image", {}))
    for key, value in (("dim", dim), ("size", size), ("pixel_mm", pixel_mm)):
        if value is not None:
            image[key] = value
    d = {**d, "image": image}
    if n is not None and isinstance(d.get("splits"), dict):
        d["splits"] = {
            name: {**split, "n": n} if isinstance(split, dict) else split for name, split in d["splits"].items()
        }
    return d


def resolve(
    s: Scenario,
    *,
    n: int | None = None,
    dim: int | None = None,
    size: int | None = None,
    pixel_mm: float | None = None,
) -> Scenario:
    """Apply command-line overrides and validate again (field of view included).

    Args:
        s: The scenario.
        n: Sample count for every split.
        dim: 2 or 3.
        size: Patch side in pixels.
        pixel_mm: Isotropic spacing; also the ``pixel_mm`` column.

    Returns:
        A new scenario; ``s`` is unchanged.
    """
    return load_scenario_dict(_with_overrides(raw_dict(s), n, dim, size, pixel_mm))


def _presets() -> Any:
    return resources.files("nodulab") / "presets"


def preset_names() -> list[str]:
    """Names of the scenarios shipped with nodulab, sorted."""
    return sorted(p.name[: -len(".toml")] for p in _presets().iterdir() if p.name.endswith(".toml"))


def list_presets() -> list[tuple[str, str]]:
    """``(name, description)`` of every preset, for ``nodulab scenarios``.

    Read from the TOML alone (the presets are validated by the tests), so listing them stays
    light: a ``[source]`` preset would otherwise load its table (pandas) to check its pool.
    """
    out = []
    for name in preset_names():
        d = parse_toml((_presets() / f"{name}.toml").read_bytes(), f"preset {name}")
        out.append((name, str(d.get("description", ""))))
    return out


MAX_TOML_DEPTH = 32
"""Deepest nesting of tables and arrays a scenario or study file may have (theirs is at most 4)."""


def nesting_depth(value: Any) -> int:
    """How deeply tables and arrays nest in a parsed document (a scalar: 0), counted without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        elif not isinstance(item, list):
            continue
        deepest = max(deepest, depth + 1)
        if depth + 1 > MAX_TOML_DEPTH:
            break  # deep enough to refuse: stop counting
        stack.extend((v, depth + 1) for v in item)
    return deepest


def parse_toml(text: bytes, where: str) -> dict:
    """Parse TOML bytes; ``ScenarioError`` naming ``where`` when they are not UTF-8 TOML or nest
    deeper than ``MAX_TOML_DEPTH`` (tables and arrays nested without end exhaust the parser's stack)."""
    deep = f"{where}: unreadable TOML: tables or arrays nested deeper than {MAX_TOML_DEPTH} levels"
    try:
        parsed = tomllib.loads(text.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ScenarioError(" ".join(f"{where}: unreadable TOML: {err}".split())) from None
    except RecursionError:
        raise ScenarioError(deep) from None
    if nesting_depth(parsed) > MAX_TOML_DEPTH:
        raise ScenarioError(deep)
    return parsed


def read_limited(path: Path, kind: str = "scenario") -> bytes:
    """The bytes of a scenario (or study) file, refused beyond ``MAX_SCENARIO_BYTES`` (read no further)."""
    try:
        with open(path, "rb") as f:
            text = f.read(MAX_SCENARIO_BYTES + 1)
    except OSError as err:
        raise ScenarioError(f"{path}: cannot read ({err.strerror})") from None
    if len(text) > MAX_SCENARIO_BYTES:
        raise ScenarioError(f"{path}: larger than {MAX_SCENARIO_BYTES // 1024} KiB; not a {kind} file")
    return text


def load_scenario(
    name_or_path: str | Path,
    *,
    n: int | None = None,
    dim: int | None = None,
    size: int | None = None,
    pixel_mm: float | None = None,
) -> Scenario:
    """Load a preset by name or a scenario TOML by path, with optional overrides.

    Overrides are applied before validation, so e.g. a larger ``size`` can make a scenario fit
    (same meaning as in :func:`resolve`). A file without ``name`` is named after its stem.

    Raises:
        ScenarioError: unknown preset, missing or unreadable file, or an invalid scenario.
    """
    text = str(name_or_path)
    if not isinstance(name_or_path, Path) and text in preset_names():
        d = parse_toml((_presets() / f"{text}.toml").read_bytes(), f"preset {text}")
    else:
        path = Path(name_or_path)
        if not path.is_file():
            looks_like_path = isinstance(name_or_path, Path) or path.suffix or "/" in text
            if looks_like_path or path.exists():
                raise ScenarioError(f"{text}: no such scenario file")
            raise ScenarioError(f"{text}: unknown preset (presets: {', '.join(preset_names())}; or a .toml path)")
        d = parse_toml(read_limited(path), str(path))
        d.setdefault("name", path.stem)
    return load_scenario_dict(_with_overrides(d, n, dim, size, pixel_mm))
