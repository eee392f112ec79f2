"""The scenario model (design.md "Scenarios"): what a scenario TOML may say, validated by pydantic.

A scenario says which factor is the causal cue (``[label]``), which nuisance factors are tied
to the label and how often (``[[confounds]]`` and each split's ``agreement``), and how every other
factor is distributed (``[factors]``, overridable per split). Validation happens once, here, and
every refusal is a :class:`ScenarioError` whose one-line message names the offending key. Loading
(presets, files, overrides) and the checks that need the geometry or a ``[source]`` table are in
``nodulab.synth.scenarios``.
"""

from __future__ import annotations

import copy
import difflib
import math
import re
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError, model_validator

from nodulab.common.choices import MAX_N
from nodulab.common.errors import InputError
from nodulab.synth.factors import FACTORS, OPTIONAL, Factor

MAX_SIZE = {2: 2048, 3: 256}
"""Largest patch side (pixels) per ``image.dim``."""
MIN_SIZE = 8
PIXEL_MM_RANGE = (0.2, 3.0)
NORMAL_SUPPORT_SD = 3.0
"""A normal is truncated to mu ± 3 sd (and the factor's range), so its support is exact."""

MAX_SCENARIO_BYTES = 1 << 20
"""A scenario file larger than this (1 MiB) is refused before it is parsed."""
SPLIT_NAME_RULE = "splits are train, val, val_balanced and test_<letters, digits, _, ->"
_SPLIT_NAME = re.compile(r"^(train|val|val_balanced|test_[A-Za-z0-9_-]+)$")
BALANCED_SPLIT = "val_balanced"
"""Optional held-out split with every confound at agreement 0.5: fits the ``dfr`` readout only;
never used for training, model selection or thresholds, and never scored."""
BALANCED_AGREEMENT = 0.5
_MODEL = ConfigDict(extra="forbid", strict=True, frozen=True)


class ScenarioError(InputError):
    """An invalid scenario; the message is one line and names the offending key."""


# ----------------------------------------------------------------------------- distributions
class Uniform(BaseModel):
    """``{ uniform = [a, b] }``: continuous on [a, b), or the integers a..b for int factors."""

    model_config = _MODEL
    uniform: tuple[int | float, int | float]


class Choice(BaseModel):
    """``{ choice = [...], weights = [...] }``: one of the values (uniform unless weighted)."""

    model_config = _MODEL
    choice: tuple[int | float | str, ...]
    weights: tuple[float, ...] | None = None


class Normal(BaseModel):
    """``{ normal = [mu, sd] }``: truncated to mu ± 3 sd and to the factor's valid range."""

    model_config = _MODEL
    normal: tuple[float, float]


def is_split_name(name: object) -> bool:
    """Whether ``name`` is a valid split name (scenarios and dataset manifests share the rule)."""
    return isinstance(name, str) and _SPLIT_NAME.fullmatch(name) is not None


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _numbers(v: object, what: str, count: int | None = None) -> list[int | float]:
    if not isinstance(v, (list, tuple)) or not all(_is_number(x) for x in v):
        raise ValueError(f"{what} needs a list of finite numbers (got {v!r})")
    if count is not None and len(v) != count:
        raise ValueError(f"{what} needs exactly {count} numbers (got {list(v)!r})")
    return list(v)


def _parse_dist(v: object) -> object:
    """Check the syntax of a distribution (factor-specific checks come later)."""
    if isinstance(v, (Uniform, Choice, Normal)):
        return v
    if isinstance(v, str) or _is_number(v):
        return v
    if not isinstance(v, dict):
        raise ValueError(f"expected a constant or a table like {{ uniform = [a, b] }} (got {v!r})")
    kinds = [k for k in ("uniform", "choice", "normal") if k in v]
    if len(kinds) != 1:
        raise ValueError(f"a distribution needs exactly one of uniform, choice, normal (got {v!r})")
    kind = kinds[0]
    allowed = {kind, "weights"} if kind == "choice" else {kind}
    for key in v:
        if key not in allowed:
            raise ValueError(f"unknown key {key!r} in a {kind} distribution")
    if kind == "uniform":
        a, b = _numbers(v["uniform"], "uniform", 2)
        if a > b:
            raise ValueError(f"uniform needs a <= b (got [{a}, {b}])")
        return Uniform(uniform=(a, b))
    if kind == "normal":
        mu, sd = _numbers(v["normal"], "normal", 2)
        if sd <= 0:
            raise ValueError(f"normal needs sd > 0 (got {sd})")
        return Normal(normal=(float(mu), float(sd)))
    values = v["choice"]
    if not isinstance(values, (list, tuple)) or not values:
        raise ValueError(f"choice needs a non-empty list (got {values!r})")
    if not all(isinstance(x, str) or _is_number(x) for x in values):
        raise ValueError(f"choice values must be strings or finite numbers (got {values!r})")
    weights = v.get("weights")
    if weights is not None:
        weights = [float(w) for w in _numbers(weights, "weights", len(values))]
        if min(weights) < 0 or not 0 < sum(weights) < math.inf:  # the sampler divides by the sum
            raise ValueError(f"weights must be >= 0 with a positive, finite sum (got {weights})")
    return Choice(choice=tuple(values), weights=None if weights is None else tuple(weights))


Dist = Annotated[Uniform | Choice | Normal | int | float | str, BeforeValidator(_parse_dist)]


def _parse_agreement(v: object) -> object:
    if v is None or _is_number(v):
        return None if v is None else float(v)
    if isinstance(v, dict) and all(_is_number(x) for x in v.values()):
        return {str(k): float(x) for k, x in v.items()}
    raise ValueError(f"expected a number in [0, 1] or a table {{ <confound> = p }} (got {v!r})")


# ----------------------------------------------------------------------------- the scenario
class Image(BaseModel):
    """``[image]``: patch geometry."""

    model_config = _MODEL
    dim: int = 2
    size: int = 64
    pixel_mm: float = 0.7


class Label(BaseModel):
    """``[label]``: malignant iff ``factor == malignant``; benign values listed."""

    model_config = _MODEL
    factor: str
    malignant: str
    benign: list[str]


class Confound(BaseModel):
    """``[[confounds]]``: a nuisance factor with one distribution per label."""

    model_config = _MODEL
    factor: str
    malignant: Dist
    benign: Dist


class Split(BaseModel):
    """One entry of ``[splits]``."""

    model_config = _MODEL
    n: int
    agreement: Annotated[float | dict[str, float] | None, BeforeValidator(_parse_agreement)] = None
    malignant_rate: float | None = None
    factors: dict[str, Dist] = {}
    confounds: str | None = None  # with [source]: "real" or "broken" (default: the source's)


SOURCE_CONFOUNDS = ("real", "broken")
SOURCE_MAPPED = tuple(name for name, f in FACTORS.items() if f.from_source)
"""Factors a ``[source]`` scenario draws from its table (``Factor.from_source``; they may not be
set in ``[factors]``)."""
SOURCE_LABEL = {"factor": "shape", "malignant": "spiculated", "benign": ["round", "lobulated"]}
"""With ``[source]`` the label is the annotation's malignancy; ``[label]`` names the cue that
``explain`` switches (spicules), and is this one."""


def source_mode(source_confounds: str, split: str, split_confounds: str | None) -> str:
    """``real`` or ``broken`` for one split of a ``[source]`` scenario: the split's own setting,
    else ``broken`` for ``val_balanced`` and the source's for the others."""
    if split_confounds is not None:
        return split_confounds
    return "broken" if split == BALANCED_SPLIT else source_confounds


class Source(BaseModel):
    """``[source]``: each row's lesion drawn from a table of real annotations (``nodulab.synth.twins``).

    ``confounds = "real"`` keeps each annotation's joint ratings (the real confounds);
    ``"broken"`` takes the non-cue factors from another annotation whatever its label.
    Annotations rated ``malignant`` give label 1, ``benign`` label 0, the rest are left out.
    """

    model_config = _MODEL
    table: str
    confounds: str = "real"
    malignant: list[int] = [4, 5]
    benign: list[int] = [1, 2]
    max_diameter_mm: float = 30.0
    sha256: str | None = None


class Scenario(BaseModel):
    """A validated scenario; build it with :func:`load_scenario` or :func:`load_scenario_dict`."""

    model_config = _MODEL
    name: str
    description: str = ""
    image: Image = Image()
    source: Source | None = None
    label: Label
    factors: dict[str, Dist] = {}
    confounds: list[Confound] = []
    splits: dict[str, Split]

    @model_validator(mode="before")
    @classmethod
    def _source_label(cls, d: Any) -> Any:
        """With ``[source]`` and no ``[label]``, the label section is ``SOURCE_LABEL``."""
        if isinstance(d, dict) and "source" in d and "label" not in d:
            return {**d, "label": copy.deepcopy(SOURCE_LABEL)}
        return d

    @model_validator(mode="after")
    def _check(self) -> Scenario:
        """Every cross-field check that needs no table (raises ``ValueError`` naming the key); the
        loader (``scenarios.load_scenario_dict``) adds the field of view and the ``[source]`` checks."""
        if not self.name.strip():
            raise ValueError("name: must not be empty")
        _check_image(self.image)
        _check_label(self)
        _check_confounds(self)
        _check_factor_table(self, self.factors, "factors")
        _check_splits(self)
        return self


# ----------------------------------------------------------------------------- checks
_DEFAULTS: dict[str, object] = {name: _parse_dist(f.default) for name, f in FACTORS.items() if f.default is not None}


def _unknown_factor(key: str, name: str) -> ValueError:
    close = difflib.get_close_matches(name, FACTORS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else f" (factors: {', '.join(FACTORS)})"
    return ValueError(f"{key}: unknown factor {name!r}{hint}")


def normal_bounds(dist: Normal, factor: Factor) -> tuple[float, float]:
    mu, sd = dist.normal
    lo, hi = mu - NORMAL_SUPPORT_SD * sd, mu + NORMAL_SUPPORT_SD * sd
    return max(lo, factor.low), min(hi, factor.high)  # type: ignore[type-var]


def dist_support(dist: object, factor: Factor) -> list[tuple[float, float]]:
    """Closed intervals covering every value a numeric distribution can take."""
    if isinstance(dist, Uniform):
        return [(float(dist.uniform[0]), float(dist.uniform[1]))]
    if isinstance(dist, Normal):
        return [normal_bounds(dist, factor)]
    values = dist.choice if isinstance(dist, Choice) else (dist,)
    return [(float(v), float(v)) for v in values]  # type: ignore[arg-type]


def dist_values(dist: object) -> set[object]:
    """Every value a categorical distribution can take."""
    return set(dist.choice) if isinstance(dist, Choice) else {dist}


def _check_range(key: str, factor: Factor, v: float) -> None:
    if not factor.low <= v <= factor.high:  # type: ignore[operator]
        unit = f" {factor.unit}" if factor.unit else ""
        raise ValueError(f"{key}: {v:g} is outside the valid range [{factor.low:g}, {factor.high:g}]{unit}")


def _check_dist(key: str, factor: Factor, dist: object) -> None:
    """Refuse a distribution that does not fit the factor's kind and valid range."""
    if factor.kind == "category":
        if isinstance(dist, (Uniform, Normal)):
            raise ValueError(f"{key}: {factor.name} is categorical; use a choice or a constant")
        for v in dist_values(dist):
            if v not in factor.choices:
                raise ValueError(f"{key}: {v!r} is not one of {', '.join(factor.choices)}")
        return
    if isinstance(dist, Normal):
        _check_range(key, factor, dist.normal[0])
        lo, hi = normal_bounds(dist, factor)
        if factor.kind == "int" and math.floor(hi) < math.ceil(lo):
            raise ValueError(f"{key}: normal {list(dist.normal)} covers no integer")
        return
    values = dist.uniform if isinstance(dist, Uniform) else dist_values(dist)
    for v in values:
        if isinstance(v, str):
            raise ValueError(f"{key}: {factor.name} is numeric (got {v!r})")
        if factor.kind == "int" and not isinstance(v, int):
            raise ValueError(f"{key}: {factor.name} takes integers (got {v!r})")
        _check_range(key, factor, v)


def _fixed(s: Scenario, name: str) -> str | None:
    """Why a factor's values are set elsewhere than by a distribution, or None."""
    if name == s.label.factor:
        return f"{name} is the label factor; [label] sets it"
    if name == "pixel_mm":
        return "pixel_mm is set by image.pixel_mm"
    if name == "offset_z_mm" and s.image.dim == 2:
        return "offset_z_mm is 0 in 2D (image.dim = 2)"
    return None


def _check_image(image: Image) -> None:
    if image.dim not in MAX_SIZE:
        raise ValueError(f"image.dim: must be 2 or 3 (got {image.dim})")
    if not MIN_SIZE <= image.size <= MAX_SIZE[image.dim]:
        raise ValueError(f"image.size: {image.size} is outside [{MIN_SIZE}, {MAX_SIZE[image.dim]}] for {image.dim}D")
    lo, hi = PIXEL_MM_RANGE
    if not (math.isfinite(image.pixel_mm) and lo <= image.pixel_mm <= hi):
        raise ValueError(f"image.pixel_mm: {image.pixel_mm:g} is outside [{lo:g}, {hi:g}] mm")


def _check_label(s: Scenario) -> None:
    label = s.label
    factor = FACTORS.get(label.factor)
    if factor is None:
        raise _unknown_factor("label.factor", label.factor)
    if factor.kind != "category":
        raise ValueError(f"label.factor: {label.factor} is not categorical")
    if label.malignant not in factor.choices:
        raise ValueError(f"label.malignant: {label.malignant!r} is not one of {', '.join(factor.choices)}")
    if not label.benign:
        raise ValueError("label.benign: needs at least one value")
    for i, v in enumerate(label.benign):
        if v not in factor.choices:
            raise ValueError(f"label.benign: {v!r} is not one of {', '.join(factor.choices)}")
        if v == label.malignant or v in label.benign[:i]:
            raise ValueError(f"label.benign: {v!r} is repeated or is the malignant value")


def _overlap(c: Confound, factor: Factor) -> str | None:
    """Describe where the two branches of a confound overlap, or None."""
    if factor.kind == "category":
        common = dist_values(c.malignant) & dist_values(c.benign)
        return f"both contain {sorted(common)[0]!r}" if common else None
    for a_lo, a_hi in dist_support(c.malignant, factor):
        for b_lo, b_hi in dist_support(c.benign, factor):
            if a_lo <= b_hi and b_lo <= a_hi:
                return f"[{a_lo:g}, {a_hi:g}] (malignant) meets [{b_lo:g}, {b_hi:g}] (benign)"
    return None


def _check_confounds(s: Scenario) -> None:
    seen: set[str] = set()
    for c in s.confounds:
        key = f"confounds.{c.factor}"
        factor = FACTORS.get(c.factor)
        if factor is None:
            raise _unknown_factor("confounds.factor", c.factor)
        if c.factor in seen:
            raise ValueError(f"{key}: listed twice")
        seen.add(c.factor)
        reason = _fixed(s, c.factor)
        if reason:
            raise ValueError(f"{key}: {reason}; it cannot be a confound")
        _check_dist(f"{key}.malignant", factor, c.malignant)
        _check_dist(f"{key}.benign", factor, c.benign)
        where = _overlap(c, factor)
        if where:
            raise ValueError(f"{key}: the malignant and benign branches overlap: {where}")


def _check_factor_table(s: Scenario, table: dict[str, object], prefix: str) -> None:
    for name, dist in table.items():
        key = f"{prefix}.{name}"
        factor = FACTORS.get(name)
        if factor is None:
            raise _unknown_factor(key, name)
        reason = _fixed(s, name)
        if any(c.factor == name for c in s.confounds):
            reason = f"{name} is a confound; its branches in [[confounds]] set it"
        if reason:
            raise ValueError(f"{key}: {reason}")
        _check_dist(key, factor, dist)


def _check_agreement(key: str, agreement: float | dict[str, float] | None, confounds: list[str]) -> None:
    if agreement is None:
        if confounds:
            raise ValueError(f"{key}: required with confounds ({', '.join(confounds)})")
        return
    table = agreement if isinstance(agreement, dict) else {"": agreement}
    if isinstance(agreement, dict):
        for c in confounds:
            if c not in agreement:
                raise ValueError(f"{key}.{c}: missing; the table needs one entry per confound")
    for name, p in table.items():
        if name and name not in confounds:
            listed = ", ".join(confounds) or "none"
            raise ValueError(f"{key}.{name}: not a confound (confounds: {listed})")
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{key}{'.' + name if name else ''}: {p:g} is outside [0, 1]")


def _check_splits(s: Scenario) -> None:
    for required in ("train", "val"):
        if required not in s.splits:
            raise ValueError(f"splits.{required}: required split is missing")
    confounds = [c.factor for c in s.confounds]
    for name, split in s.splits.items():
        key = f"splits.{name}"
        if not is_split_name(name):
            raise ValueError(f"{key}: {SPLIT_NAME_RULE}")
        if not 1 <= split.n <= MAX_N:
            raise ValueError(f"{key}.n: must be between 1 and {MAX_N:,} (got {split.n})")
        rate = split.malignant_rate
        if rate is not None and not 0.0 < rate < 1.0:
            raise ValueError(f"{key}.malignant_rate: {rate:g} is outside (0, 1)")
        _check_agreement(f"{key}.agreement", split.agreement, confounds)
        if split.confounds is not None:
            if s.source is None:
                raise ValueError(f"{key}.confounds: only a [source] scenario has it (real or broken)")
            if split.confounds not in SOURCE_CONFOUNDS:
                raise ValueError(f"{key}.confounds: {split.confounds!r} is not real or broken")
        _check_factor_table(s, split.factors, f"{key}.factors")
        if name == BALANCED_SPLIT:
            _check_balanced(key, split, confounds)


def _check_balanced(key: str, split: Split, confounds: list[str]) -> None:
    """``val_balanced`` is the training distribution with every confound group balanced."""
    table = split.agreement if isinstance(split.agreement, dict) else dict.fromkeys(confounds, split.agreement)
    for confound, p in table.items():
        if p != BALANCED_AGREEMENT:
            where = f"{key}.agreement" + (f".{confound}" if isinstance(split.agreement, dict) else "")
            raise ValueError(f"{where}: {BALANCED_SPLIT} balances every confound (agreement 0.5), got {p:g}")
    if split.malignant_rate not in (None, 0.5):
        raise ValueError(f"{key}.malignant_rate: {BALANCED_SPLIT} has balanced labels")
    if split.factors:
        raise ValueError(f"{key}.factors: {BALANCED_SPLIT} keeps the training distribution (no overrides)")
    if split.confounds not in (None, "broken"):
        raise ValueError(f"{key}.confounds: {BALANCED_SPLIT} is always broken (its confound groups balanced)")


def factor_columns(s: Scenario) -> list[str]:
    """The factor columns a scenario's tables carry: every factor but the ``OPTIONAL`` ones it
    does not name (in ``[factors]``, a split's ``factors``, a confound or the label); a
    ``[source]`` scenario carries them all."""
    named = {s.label.factor, *s.factors, *(c.factor for c in s.confounds)}
    named.update(*(split.factors for split in s.splits.values()))
    return [name for name in FACTORS if name not in OPTIONAL or name in named or s.source is not None]


def declared_distributions(s: Scenario, split: str, name: str) -> list[object]:
    """Every distribution the scenario declares for factor ``name`` in ``split`` (label, confound,
    ``[factors]`` or the default); a ``[source]`` scenario's mapped factors come from its table
    instead (``scenarios.split_distributions``)."""
    if name == s.label.factor:
        return [Choice(choice=(s.label.malignant, *s.label.benign))]
    for c in s.confounds:
        if c.factor == name:
            return [c.malignant, c.benign]
    if name == "pixel_mm":
        return [s.image.pixel_mm]
    if name == "offset_z_mm" and s.image.dim == 2:
        return [0.0]
    return [s.splits[split].factors.get(name, s.factors.get(name, _DEFAULTS[name]))]


def one_line(err: ValidationError) -> str:
    """The first pydantic error as ``"<loc>: <msg>"`` on one line."""
    e = err.errors()[0]
    loc = ".".join(str(part) for part in e["loc"])
    msg = e["msg"].removeprefix("Value error, ")
    if e["type"] == "extra_forbidden":
        msg = "unknown key"
    elif e["type"] == "missing":
        msg = "required key is missing"
    elif e["type"] not in ("value_error", "assertion_error"):
        msg = f"{msg} (got {e.get('input')!r})"
    return " ".join((f"{loc}: {msg}" if loc else msg).split())


def raw_dict(s: Scenario) -> dict:
    """The scenario as written (unlisted factors keep their defaults implicitly)."""
    return s.model_dump(mode="json", exclude_none=True)
