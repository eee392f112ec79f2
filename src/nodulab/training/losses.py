"""Training objectives (DESIGN §5): one encoder, many losses, one calling convention.

Every objective is an :class:`Objective` called as ``objective(embeddings, labels, logits)``
and returns a scalar. The pytorch-metric-learning convention holds throughout: the views of a
batch are stacked along the batch axis and ``labels`` are repeated per view, so a batch of ``N``
samples with two views has ``2N`` rows. ``embeddings`` are projection-head outputs; a loss
L2-normalises them where its formula says so. Notation: ``z_i = e_i / ||e_i||``, ``B`` rows,
``P(i) = {p != i : y_p = y_i}``.

- ``ce``: cross-entropy on the head's ``logits`` (2 classes), mean over the ``B`` rows.
- ``contrastive``: Hadsell, Chopra & LeCun (CVPR 2006), on ``d_ij = ||z_i - z_j||_2``:
  ``l_ij = ½ d_ij²`` if ``y_i = y_j`` else ``½ max(0, m - d_ij)²``, margin ``m = 1.0``;
  mean over all ``B(B-1)/2`` pairs ``i < j``. Written here: pytorch-metric-learning's
  ``ContrastiveLoss`` squares nothing and averages over non-zero terms only.
- ``triplet``: Schroff et al. (FaceNet, 2015) triplet margin loss
  ``max(0, d_ap - d_an + m)``, ``m = 0.2``, on pytorch-metric-learning's default
  ``LpDistance`` (Euclidean distance between L2-normalised embeddings), over the triplets
  that ``TripletMarginMiner(margin=m, type_of_triplets="semihard")`` returns
  (``0 < d_an - d_ap <= m``); PML's ``AvgNonZeroReducer`` averages the non-zero terms, which
  for semi-hard triplets is every mined triplet except exact ties ``d_an - d_ap = m``.
- ``supcon``: Khosla et al. (NeurIPS 2020), the ``L_out`` form with ``τ = 0.1`` and no
  ``τ / base_temperature`` scale:
  ``l_i = -(1/|P(i)|) Σ_{p∈P(i)} log( exp(z_i·z_p/τ) / Σ_{a≠i} exp(z_i·z_a/τ) )``,
  mean over the anchors with ``|P(i)| > 0``.
- ``simclr``: NT-Xent (Chen et al., ICML 2020), ``τ = 0.5``: ``supcon`` with *sample ids* as
  labels, so each view's positive is the other view of its sample and every other row is a
  negative; mean over the ``2N`` anchors of
  ``-log( exp(s_ip/τ) / Σ_{a≠i} exp(s_ia/τ) )`` with cosine similarity ``s``.
- ``ce+supcon``, ``ce+triplet``: ``ce + w · metric``, ``w = 0.1`` by default (a small weight on
  the metric term, as in MASF, Dou et al. NeurIPS 2019).

A loss that finds nothing to score (no pair, no positive, no mined triplet) returns a finite
zero that still has a ``grad_fn`` when its input requires grad, so ``backward()`` never fails.
After each call ``objective.stats`` holds what tells a failed run from a good one: the number of
mined triplets (``triplet``), the mean number of positives per anchor (``supcon``, ``simclr``).

One registry holds every tunable number with its default and its tuning range: each loss's
parameters (``names``, ``params``) and the optimiser's (``OPTIMISER_PARAMS``: AdamW learning
rate and weight decay). ``draw_params`` draws a configuration for a tuning budget, each
parameter from its own seed (DomainBed's ``seed_hash`` habit), so adding one leaves the others.
"""

from __future__ import annotations

import hashlib
import math
import numbers
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pytorch_metric_learning.distances import LpDistance
from pytorch_metric_learning.losses import TripletMarginLoss
from pytorch_metric_learning.miners import TripletMarginMiner
from pytorch_metric_learning.reducers import AvgNonZeroReducer
from torch import Tensor

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
DISTANCE_EPS = 1e-12
"""Floor under squared distances before the square root, so ``d`` is differentiable at 0."""


class Objective(torch.nn.Module):
    """A training loss with one calling convention.

    Attributes:
        uses_head: Needs classifier ``logits``.
        uses_embeddings: Needs projection-head ``embeddings``.
        uses_labels: Needs class labels; ``False`` means ``labels`` are sample ids (two views
            of one sample share an id).
    """

    uses_head: bool = False
    uses_embeddings: bool = True
    uses_labels: bool = True

    def __init__(self) -> None:
        super().__init__()
        self.stats: dict[str, float] = {}

    def forward(self, embeddings: Tensor | None, labels: Tensor, logits: Tensor | None = None) -> Tensor:
        """Score a batch.

        Args:
            embeddings: ``(B, D)`` projection outputs, views stacked; ``None`` if unused.
            labels: ``(B,)`` integer class labels, or sample ids when ``uses_labels`` is False.
            logits: ``(B, 2)`` classifier outputs; ``None`` if unused.

        Returns:
            Scalar loss.
        """
        self._check_inputs(embeddings, labels, logits)
        return self.compute(embeddings, labels, logits)

    def compute(self, embeddings: Tensor | None, labels: Tensor, logits: Tensor | None) -> Tensor:
        """The loss itself, on validated inputs."""
        raise NotImplementedError

    def _check_inputs(self, embeddings: Tensor | None, labels: Tensor, logits: Tensor | None) -> None:
        name = type(self).__name__
        if labels.dim() != 1:
            raise ValueError(f"{name}: labels must have shape (B,), got {tuple(labels.shape)}")
        if self.uses_embeddings:
            if embeddings is None:
                raise ValueError(f"{name} needs embeddings")
            if embeddings.dim() != 2 or embeddings.shape[0] != labels.shape[0]:
                raise ValueError(
                    f"{name}: embeddings must have shape (B, D) with B = {labels.shape[0]}, "
                    f"got {tuple(embeddings.shape)}"
                )
        if self.uses_head:
            if logits is None:
                raise ValueError(f"{name} needs logits")
            if logits.dim() != 2 or logits.shape[0] != labels.shape[0]:
                raise ValueError(
                    f"{name}: logits must have shape (B, C) with B = {labels.shape[0]}, got {tuple(logits.shape)}"
                )


def _zero_like(x: Tensor) -> Tensor:
    """A finite scalar zero connected to ``x``'s graph (so ``backward()`` works)."""
    return x.sum() * 0.0


@dataclass(frozen=True)
class Param:
    """A tunable number: its default and the range a tuning draw comes from.

    Attributes:
        default: the value used when nothing is set (budget 1 = defaults).
        low, high: the tuning range (inclusive).
        log: draw log-uniformly (for scales such as a learning rate).
    """

    default: float
    low: float
    high: float
    log: bool = False

    def draw(self, u: float) -> float:
        """The value at quantile ``u`` in [0, 1) of the tuning range."""
        if self.log:
            return float(math.exp(math.log(self.low) + u * (math.log(self.high) - math.log(self.low))))
        return float(self.low + u * (self.high - self.low))


@dataclass(frozen=True)
class _Entry:
    factory: Callable[..., Objective]
    params: dict[str, Param]


_LOSSES: dict[str, _Entry] = {}

OPTIMISER_PARAMS: dict[str, Param] = {
    "lr": Param(DEFAULT_LR, 1e-4, 3e-3, log=True),
    "weight_decay": Param(DEFAULT_WEIGHT_DECAY, 1e-6, 1e-2, log=True),
}
"""AdamW's learning rate and decoupled weight decay (0 by default, tunable by a study)."""


def _register(name: str, **params: Param) -> Callable[[Callable[..., Objective]], Callable[..., Objective]]:
    """Add a loss factory to the registry under ``name`` with its tunable parameters."""

    def add(factory: Callable[..., Objective]) -> Callable[..., Objective]:
        _LOSSES[name] = _Entry(factory, dict(params))
        return factory

    return add


class CrossEntropy(Objective):
    """Cross-entropy on the head's logits, mean over the batch."""

    uses_head = True
    uses_embeddings = False

    def compute(self, embeddings: Tensor | None, labels: Tensor, logits: Tensor | None) -> Tensor:
        return F.cross_entropy(logits, labels.long())


class HadsellContrastive(Objective):
    """Hadsell et al. 2006 pairwise margin loss on L2-normalised embeddings.

    ``½ d²`` for same-label pairs and ``½ max(0, margin - d)²`` otherwise, with ``d`` the
    Euclidean distance between unit vectors; mean over all ``B(B-1)/2`` pairs ``i < j``.

    Args:
        margin: Margin ``m`` (distances between unit vectors lie in [0, 2]).
    """

    def __init__(self, margin: float = CONTRASTIVE_MARGIN) -> None:
        super().__init__()
        self.margin = margin

    def compute(self, embeddings: Tensor | None, labels: Tensor, logits: Tensor | None) -> Tensor:
        n = embeddings.shape[0]
        if n < 2:
            return _zero_like(embeddings)
        z = F.normalize(embeddings, dim=1)
        # ||z_i - z_j||² = 2 - 2 z_i·z_j for unit vectors; rounding can push it below 0.
        sq_dist = (2.0 - 2.0 * z @ z.T).clamp_min(0.0)
        dist = sq_dist.clamp_min(DISTANCE_EPS).sqrt()
        same = labels[:, None] == labels[None, :]
        pair_loss = torch.where(same, 0.5 * sq_dist, 0.5 * F.relu(self.margin - dist).square())
        i, j = torch.triu_indices(n, n, offset=1, device=embeddings.device)
        return pair_loss[i, j].mean()


class SemiHardTriplet(Objective):
    """Triplet margin loss over PML's semi-hard triplets (both margins set to ``margin``).

    Distances are PML's default ``LpDistance``: Euclidean between L2-normalised embeddings.
    Reduction is PML's ``AvgNonZeroReducer`` (mean over the mined triplets with non-zero
    loss); a batch without mined triplets gives a zero with a ``grad_fn``.

    Args:
        margin: Margin of the miner and of the loss.
    """

    def __init__(self, margin: float = TRIPLET_MARGIN) -> None:
        super().__init__()
        self.margin = margin
        self.miner = TripletMarginMiner(
            margin=margin,
            type_of_triplets="semihard",
            distance=LpDistance(normalize_embeddings=True, p=2, power=1),
        )
        self.loss = TripletMarginLoss(
            margin=margin,
            distance=LpDistance(normalize_embeddings=True, p=2, power=1),
            reducer=AvgNonZeroReducer(),
        )

    def compute(self, embeddings: Tensor | None, labels: Tensor, logits: Tensor | None) -> Tensor:
        triplets = self.miner(embeddings, labels)
        # a collapsed embedding mines nothing and reads 0: the count is what shows it
        self.stats = {"mined_triplets": float(triplets[0].numel())}
        if triplets[0].numel() == 0:
            return _zero_like(embeddings)
        return self.loss(embeddings, labels, triplets)


class SupCon(Objective):
    """Supervised contrastive loss (Khosla et al. 2020, ``L_out``), no hidden scale.

    ``-(1/|P(i)|) Σ_p log softmax_{a≠i}(z_i·z_a/τ)_p`` on L2-normalised embeddings, mean over
    the anchors that have at least one positive; zero (with ``grad_fn``) if none has.

    Args:
        temperature: τ.
    """

    def __init__(self, temperature: float = SUPCON_TEMPERATURE) -> None:
        super().__init__()
        self.temperature = temperature

    def compute(self, embeddings: Tensor | None, labels: Tensor, logits: Tensor | None) -> Tensor:
        n = embeddings.shape[0]
        self_mask = torch.eye(n, dtype=torch.bool, device=embeddings.device)
        positive = (labels[:, None] == labels[None, :]) & ~self_mask
        n_positive = positive.sum(dim=1)
        anchors = n_positive > 0
        self.stats = {"positives_per_anchor": float(n_positive.float().mean())}
        if not bool(anchors.any()):
            return _zero_like(embeddings)
        z = F.normalize(embeddings, dim=1)
        similarity = (z @ z.T / self.temperature).masked_fill(self_mask, -math.inf)
        log_prob = similarity - torch.logsumexp(similarity, dim=1, keepdim=True)
        # masked_fill, not a product: the diagonal is -inf and -inf * 0 is NaN.
        positive_log_prob = log_prob.masked_fill(~positive, 0.0).sum(dim=1)
        per_anchor = -positive_log_prob[anchors] / n_positive[anchors]
        return per_anchor.mean()


class NTXent(SupCon):
    """NT-Xent (Chen et al. 2020): :class:`SupCon` with sample ids as labels.

    With two views per id each anchor has exactly one positive, its other view, and the loss
    is the mean over the ``2N`` anchors of ``-log softmax_{a≠i}(s_ia/τ)_p``.

    Args:
        temperature: τ.
    """

    uses_labels = False

    def __init__(self, temperature: float = SIMCLR_TEMPERATURE) -> None:
        super().__init__(temperature=temperature)


class CrossEntropyPlusMetric(Objective):
    """``ce + weight · metric`` on the head's logits and the projection's embeddings.

    Args:
        metric: The metric-learning term.
        weight: Its weight (default :data:`HYBRID_WEIGHT` = 0.1).
    """

    uses_head = True
    uses_embeddings = True

    def __init__(self, metric: Objective, weight: float = HYBRID_WEIGHT) -> None:
        super().__init__()
        self.ce = CrossEntropy()
        self.metric = metric
        self.weight = weight

    def compute(self, embeddings: Tensor | None, labels: Tensor, logits: Tensor | None) -> Tensor:
        ce = self.ce.compute(None, labels, logits)
        total = ce + self.weight * self.metric.compute(embeddings, labels, None)
        self.stats = dict(self.metric.stats)
        return total


@_register("ce")
def _ce() -> Objective:
    return CrossEntropy()


_MARGIN_RANGE = (0.05, 1.0)
_TEMPERATURE_RANGE = (0.05, 1.0)
_WEIGHT = Param(HYBRID_WEIGHT, 0.01, 1.0, log=True)


@_register("contrastive", margin=Param(CONTRASTIVE_MARGIN, 0.5, 1.5))
def _contrastive(margin: float) -> Objective:
    return HadsellContrastive(margin=margin)


@_register("triplet", margin=Param(TRIPLET_MARGIN, *_MARGIN_RANGE, log=True))
def _triplet(margin: float) -> Objective:
    return SemiHardTriplet(margin=margin)


@_register("supcon", temperature=Param(SUPCON_TEMPERATURE, *_TEMPERATURE_RANGE, log=True))
def _supcon(temperature: float) -> Objective:
    return SupCon(temperature=temperature)


@_register("simclr", temperature=Param(SIMCLR_TEMPERATURE, *_TEMPERATURE_RANGE, log=True))
def _simclr(temperature: float) -> Objective:
    return NTXent(temperature=temperature)


@_register("ce+supcon", weight=_WEIGHT, temperature=Param(SUPCON_TEMPERATURE, *_TEMPERATURE_RANGE, log=True))
def _ce_supcon(weight: float, temperature: float) -> Objective:
    return CrossEntropyPlusMetric(SupCon(temperature=temperature), weight=weight)


@_register("ce+triplet", weight=_WEIGHT, margin=Param(TRIPLET_MARGIN, *_MARGIN_RANGE, log=True))
def _ce_triplet(weight: float, margin: float) -> Objective:
    return CrossEntropyPlusMetric(SemiHardTriplet(margin=margin), weight=weight)


def names() -> list[str]:
    """Registered loss names, in registration order."""
    return list(_LOSSES)


def params(name: str) -> dict[str, Param]:
    """The tunable parameters of loss ``name`` (without the optimiser's), by name."""
    if name not in _LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose from {', '.join(_LOSSES)}")
    return dict(_LOSSES[name].params)


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


def build(name: str, **values: float) -> Objective:
    """Build a loss by name.

    Args:
        name: One of :func:`names`.
        **values: ``margin`` (contrastive, triplet, ce+triplet), ``temperature`` (supcon,
            simclr, ce+supcon), ``weight`` (hybrids); each a positive finite number.

    Returns:
        The :class:`Objective`.

    Raises:
        ValueError: Unknown loss, a parameter the loss does not take, or a bad value.
    """
    resolved = {key: p.default for key, p in params(name).items()} | check_params(name, values)
    return _LOSSES[name].factory(**resolved)
