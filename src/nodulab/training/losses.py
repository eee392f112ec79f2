"""Training objectives (design.md "Losses and training"): one encoder, many losses, one calling convention.

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

The losses, their parameters (default, tuning range, help) and the tuning draws are declared in
the torch-free registry ``nodulab.training.hparams``; this module holds the objectives, each
registered under the registry's name with :func:`objective`, and :func:`build`. Adding a loss is
one ``LossSpec`` there plus one ``@objective(name)`` factory here. The registry's functions
(``names``, ``params``, ``check_params``, ``parse_params``, ``draw_params``) and
``OPTIMISER_PARAMS`` are importable from here too.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from pytorch_metric_learning.distances import LpDistance
from pytorch_metric_learning.losses import TripletMarginLoss
from pytorch_metric_learning.miners import TripletMarginMiner
from pytorch_metric_learning.reducers import AvgNonZeroReducer
from torch import Tensor

from nodulab.training import hparams
from nodulab.training.hparams import (  # noqa: F401  (re-exported: ``losses.names()`` etc. keep working)
    CONTRASTIVE_MARGIN,
    HYBRID_WEIGHT,
    OPTIMISER_PARAMS,
    SIMCLR_TEMPERATURE,
    SUPCON_TEMPERATURE,
    TRIPLET_MARGIN,
    Param,
    check_params,
    draw_params,
    names,
    params,
    parse_params,
)

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


OBJECTIVES: dict[str, Callable[..., Objective]] = {}
"""Each loss's factory by its registry name; called with every parameter of ``hparams.params(name)``."""


def objective(name: str) -> Callable[[Callable[..., Objective]], Callable[..., Objective]]:
    """Register a factory as the objective of the registry's loss ``name`` (``hparams.LOSSES``)."""
    if name not in hparams.LOSSES:
        raise ValueError(f"objective {name!r}: no such loss in nodulab.training.hparams.LOSSES")

    def add(factory: Callable[..., Objective]) -> Callable[..., Objective]:
        OBJECTIVES[name] = factory
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


@objective("ce")
def _ce() -> Objective:
    return CrossEntropy()


@objective("contrastive")
def _contrastive(margin: float) -> Objective:
    return HadsellContrastive(margin=margin)


@objective("triplet")
def _triplet(margin: float) -> Objective:
    return SemiHardTriplet(margin=margin)


@objective("supcon")
def _supcon(temperature: float) -> Objective:
    return SupCon(temperature=temperature)


@objective("simclr")
def _simclr(temperature: float) -> Objective:
    return NTXent(temperature=temperature)


@objective("ce+supcon")
def _ce_supcon(weight: float, temperature: float) -> Objective:
    return CrossEntropyPlusMetric(SupCon(temperature=temperature), weight=weight)


@objective("ce+triplet")
def _ce_triplet(weight: float, margin: float) -> Objective:
    return CrossEntropyPlusMetric(SemiHardTriplet(margin=margin), weight=weight)


def build(name: str, **values: float) -> Objective:
    """Build a loss by name.

    Args:
        name: One of :func:`names` (``hparams.LOSSES``).
        **values: Parameters of the loss (``hparams.params(name)``: ``margin``, ``temperature``,
            ``weight``, ...), each a positive finite number; the rest take their defaults.

    Returns:
        The :class:`Objective`.

    Raises:
        ValueError: Unknown loss, a loss without a registered objective, a parameter the loss
            does not take, or a bad value.
    """
    resolved = hparams.resolve_params(name, values)
    if name not in OBJECTIVES:
        raise ValueError(f"loss {name!r} has no objective (register one with @losses.objective({name!r}))")
    return OBJECTIVES[name](**resolved)
