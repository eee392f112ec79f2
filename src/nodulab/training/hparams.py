"""The loss registry (design.md "Losses and training", "Registries"): every loss's name, summary
and tunable parameters, torch-free.

A loss is one :class:`LossSpec` in :data:`LOSSES` plus its objective in
``nodulab.training.losses``, registered there under the same name. Everything that lists losses
reads this registry: the command line's ``--loss`` and ``--loss-param`` help (at start-up, before
torch loads), study validation and ``losses = "all"``, the tuning draws, and the tests, which are
parameterised over :func:`names`.

Every tunable number has a default and a tuning range: each loss's parameters (:func:`params`)
and the optimiser's (:data:`OPTIMISER_PARAMS`: AdamW learning rate and weight decay).
:func:`draw_params` draws a configuration for a tuning budget, each parameter from its own seed
(DomainBed's ``seed_hash`` habit), so adding one leaves the others. DomainBed keeps the same
split: ``hparams_registry`` beside ``algorithms``.
"""

from __future__ import annotations

import hashlib
import math
import numbers
from collections.abc import Iterable
from dataclasses import dataclass, field

from nodulab.common.choices import DEFAULT_LR, DEFAULT_WEIGHT_DECAY

CONTRASTIVE_MARGIN = 1.0
"""Hadsell margin ``m`` on the Euclidean distance between unit vectors (range [0, 2])."""
TRIPLET_MARGIN = 0.2
"""Triplet margin, used by both the semi-hard miner and the loss (PML defaults disagree)."""
SUPCON_TEMPERATURE = 0.1
"""SupCon τ (Khosla et al. 2020)."""
SIMCLR_TEMPERATURE = 0.5
"""NT-Xent τ (Chen et al. 2020)."""
HYBRID_WEIGHT = 0.1
"""Weight of the metric term in ``ce+supcon`` and ``ce+triplet`` (MASF-style small weight)."""


@dataclass(frozen=True)
class Param:
    """A tunable number: its default and the range a tuning draw comes from.

    Attributes:
        default: the value used when nothing is set (budget 1 = defaults).
        low, high: the tuning range (inclusive).
        log: draw log-uniformly (for scales such as a learning rate).
        help: what it is, in one line (the command line's ``--loss-param`` help).
    """

    default: float
    low: float
    high: float
    log: bool = False
    help: str = ""

    def draw(self, u: float) -> float:
        """The value at quantile ``u`` in [0, 1) of the tuning range."""
        if self.log:
            return float(math.exp(math.log(self.low) + u * (math.log(self.high) - math.log(self.low))))
        return float(self.low + u * (self.high - self.low))


@dataclass(frozen=True)
class LossSpec:
    """One loss as the registry knows it (its objective lives in ``nodulab.training.losses``).

    Attributes:
        name: what ``--loss``, study files and run configs call it.
        summary: what it is, in one line (the command line's ``--loss`` help).
        params: its tunable parameters by name (the optimiser's are in :data:`OPTIMISER_PARAMS`).
    """

    name: str
    summary: str
    params: dict[str, Param] = field(default_factory=dict)


OPTIMISER_PARAMS: dict[str, Param] = {
    "lr": Param(DEFAULT_LR, 1e-4, 3e-3, log=True, help="AdamW peak learning rate"),
    "weight_decay": Param(DEFAULT_WEIGHT_DECAY, 1e-6, 1e-2, log=True, help="AdamW decoupled weight decay"),
}
"""AdamW's learning rate and decoupled weight decay (0 by default, tunable by a study)."""

_TEMPERATURE_HELP = "softmax temperature τ on cosine similarities"
_TRIPLET_MARGIN = Param(TRIPLET_MARGIN, 0.05, 1.0, log=True, help="semi-hard triplet margin (miner and loss)")
_WEIGHT = Param(HYBRID_WEIGHT, 0.01, 1.0, log=True, help="weight w of the metric term in ce + w · metric")


def _temperature(default: float) -> Param:
    return Param(default, 0.05, 1.0, log=True, help=_TEMPERATURE_HELP)


LOSSES: dict[str, LossSpec] = {
    spec.name: spec
    for spec in (
        LossSpec("ce", "cross-entropy on the head's logits"),
        LossSpec(
            "contrastive",
            "pairwise margin loss on unit vectors, Hadsell et al. 2006",
            {"margin": Param(CONTRASTIVE_MARGIN, 0.5, 1.5, help="Hadsell margin on distances between unit vectors")},
        ),
        LossSpec("triplet", "triplet margin loss over semi-hard triplets", {"margin": _TRIPLET_MARGIN}),
        LossSpec(
            "supcon", "supervised contrastive, Khosla et al. 2020", {"temperature": _temperature(SUPCON_TEMPERATURE)}
        ),
        LossSpec("simclr", "NT-Xent of SimCLR, labels unused", {"temperature": _temperature(SIMCLR_TEMPERATURE)}),
        LossSpec(
            "ce+supcon", "ce + weight · supcon", {"weight": _WEIGHT, "temperature": _temperature(SUPCON_TEMPERATURE)}
        ),
        LossSpec("ce+triplet", "ce + weight · triplet", {"weight": _WEIGHT, "margin": _TRIPLET_MARGIN}),
    )
}
"""Every loss by name, in the order studies, help texts and tables list them."""


def names() -> list[str]:
    """Registered loss names, in registration order."""
    return list(LOSSES)


def params(name: str) -> dict[str, Param]:
    """The tunable parameters of loss ``name`` (without the optimiser's), by name."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose from {', '.join(LOSSES)}")
    return dict(LOSSES[name].params)


def check_params(name: str, values: dict[str, float]) -> dict[str, float]:
    """Validate loss parameters; return them as floats.

    Raises:
        ValueError: unknown loss, a parameter the loss does not take, or a value that is not a
            positive finite number.
    """
    known = params(name)
    checked = {}
    for key, value in values.items():
        if key not in known:
            takes = ", ".join(known) or "none"
            raise ValueError(f"loss {name!r} takes no parameter {key!r} (it takes: {takes})")
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"loss {name!r}: parameter {key!r} must be a positive finite number, got {value!r}")
        checked[key] = float(value)
    return checked


def resolve_params(name: str, values: dict[str, float]) -> dict[str, float]:
    """Every parameter of loss ``name``: its defaults, overridden by ``values`` (checked)."""
    return {key: p.default for key, p in params(name).items()} | check_params(name, values)


def parse_params(name: str, items: Iterable[str], flag: str = "--loss-param") -> dict[str, float]:
    """Parse ``KEY=VALUE`` strings (the command line's ``--loss-param``) for loss ``name``.

    Raises:
        ValueError: a malformed item, a repeated key, or what :func:`check_params` refuses; the
            message names ``flag`` and the key.
    """
    found: dict[str, float] = {}
    for item in items:
        key, sep, text = str(item).partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"{flag} {item!r}: expected KEY=VALUE")
        if key in found:
            raise ValueError(f"{flag} {key}: given twice")
        try:
            found[key] = float(text)
        except ValueError:
            raise ValueError(f"{flag} {key}: {text!r} is not a number") from None
    try:
        return check_params(name, found)
    except ValueError as error:
        raise ValueError(f"{flag}: {error}") from None


def _unit(*key: object) -> float:
    """A uniform number in [0, 1) from ``key`` alone (no global RNG state)."""
    digest = hashlib.sha256(":".join(map(str, key)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def draw_params(name: str, draw: int, seed: int = 0) -> dict[str, float]:
    """One tuning draw for loss ``name``: its parameters and the optimiser's.

    Draw 0 is the defaults (a budget of 1 trains the defaults). Draw ``k > 0`` takes each
    parameter from its tuning range with its own seed ``(seed, k, parameter)``, so adding a
    parameter does not move the others.

    Returns:
        ``{parameter: value}``, the optimiser's (``lr``, ``weight_decay``) included.
    """
    if draw < 0:
        raise ValueError(f"draw must be >= 0, got {draw}")
    space = {**OPTIMISER_PARAMS, **params(name)}
    if draw == 0:
        return {key: p.default for key, p in space.items()}
    return {key: p.draw(_unit(seed, draw, key)) for key, p in space.items()}


def param_help() -> list[tuple[str, list[str], str]]:
    """``(parameter, losses that take it, its help)`` over the registry, grouped by name and help,
    in order of first appearance (the command line's ``--loss-param`` help is built from this)."""
    groups: dict[tuple[str, str], list[str]] = {}
    for spec in LOSSES.values():
        for key, p in spec.params.items():
            groups.setdefault((key, p.help), []).append(spec.name)
    order = list(dict.fromkeys(key for key, _ in groups))
    return [(key, losses, text) for name in order for (key, text), losses in groups.items() if key == name]
