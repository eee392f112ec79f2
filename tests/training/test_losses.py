"""Losses (design.md "Losses and training"): every loss against a slow, explicit loop over its pairs/anchors/triplets.

The reference loops work on Python floats in double precision, one pair or anchor at a time,
straight from the formulas in ``nodulab.training.losses``' module docstring.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pytorch_metric_learning.losses import SupConLoss
from pytorch_metric_learning.miners import TripletMarginMiner

from nodulab.training import hparams, losses

DTYPES = [torch.float64, torch.float32]
TOL = 1e-5


def _unit(row: list[float]) -> list[float]:
    norm = math.sqrt(sum(v * v for v in row))
    return [v / norm for v in row]


def _unit_rows(embeddings: torch.Tensor) -> list[list[float]]:
    return [_unit(row) for row in embeddings.double().tolist()]


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


def _dist(a: list[float], b: list[float]) -> float:
    return math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b)))


def naive_supcon(embeddings: torch.Tensor, labels: torch.Tensor, temperature: float) -> float:
    """Khosla et al. L_out, one anchor at a time; mean over anchors with a positive."""
    z, y = _unit_rows(embeddings), labels.tolist()
    per_anchor = []
    for i in range(len(z)):
        positives = [p for p in range(len(z)) if p != i and y[p] == y[i]]
        if not positives:
            continue
        denominator = sum(math.exp(_dot(z[i], z[a]) / temperature) for a in range(len(z)) if a != i)
        terms = [math.log(math.exp(_dot(z[i], z[p]) / temperature) / denominator) for p in positives]
        per_anchor.append(-sum(terms) / len(positives))
    return sum(per_anchor) / len(per_anchor) if per_anchor else 0.0


def naive_ntxent(embeddings: torch.Tensor, ids: torch.Tensor, temperature: float) -> float:
    """NT-Xent with exactly two views per id: mean over all 2N anchors."""
    z, y = _unit_rows(embeddings), ids.tolist()
    total = 0.0
    for i in range(len(z)):
        (p,) = [k for k in range(len(z)) if k != i and y[k] == y[i]]
        cos = [_dot(z[i], z[a]) for a in range(len(z))]
        denominator = sum(math.exp(cos[a] / temperature) for a in range(len(z)) if a != i)
        total += -math.log(math.exp(cos[p] / temperature) / denominator)
    return total / len(z)


def naive_hadsell(embeddings: torch.Tensor, labels: torch.Tensor, margin: float) -> float:
    """Hadsell et al. 2006 on unit vectors, mean over all pairs i < j."""
    z, y = _unit_rows(embeddings), labels.tolist()
    terms = []
    for i, j in itertools.combinations(range(len(z)), 2):
        d = _dist(z[i], z[j])
        terms.append(0.5 * d * d if y[i] == y[j] else 0.5 * max(0.0, margin - d) ** 2)
    return sum(terms) / len(terms)


def semihard_triplets(embeddings: torch.Tensor, labels: torch.Tensor, margin: float) -> set[tuple[int, int, int]]:
    """All (a, p, n) with y_a = y_p, a != p, y_n != y_a and 0 < d_an - d_ap <= margin."""
    z, y = _unit_rows(embeddings), labels.tolist()
    found = set()
    for a, p, n in itertools.product(range(len(z)), repeat=3):
        if a != p and y[a] == y[p] and y[n] != y[a]:
            gap = _dist(z[a], z[n]) - _dist(z[a], z[p])
            if 0 < gap <= margin:
                found.add((a, p, n))
    return found


def _random_batch(
    seed: int, n: int, dim: int, n_classes: int, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(n, dim, generator=generator, dtype=torch.float64).to(dtype)
    labels = torch.randint(0, n_classes, (n,), generator=generator)
    return embeddings, labels


# --- supcon / simclr -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("seed", "n_classes", "temperature"), [(0, 2, 0.1), (1, 4, 0.1), (2, 5, 0.5)])
def test_supcon_equals_naive_loop(dtype: torch.dtype, seed: int, n_classes: int, temperature: float) -> None:
    embeddings, labels = _random_batch(seed, 14, 6, n_classes, dtype)
    loss = losses.build("supcon", temperature=temperature)(embeddings, labels)
    assert loss.dtype == dtype
    expected = naive_supcon(embeddings, labels, temperature)
    assert loss.item() == pytest.approx(expected, rel=TOL, abs=TOL)


def test_supcon_default_temperature_has_no_hidden_scale() -> None:
    embeddings, labels = _random_batch(3, 12, 5, 3)
    loss = losses.build("supcon")(embeddings, labels)
    assert loss.item() == pytest.approx(naive_supcon(embeddings, labels, 0.1), rel=1e-9)


def test_supcon_anchors_without_positives_are_skipped() -> None:
    embeddings, _ = _random_batch(4, 5, 3, 1)
    labels = torch.tensor([0, 0, 1, 2, 3])  # only anchors 0 and 1 have a positive
    loss = losses.build("supcon")(embeddings, labels)
    assert loss.item() == pytest.approx(naive_supcon(embeddings, labels, 0.1), rel=1e-9)


def test_supcon_matches_pml_when_batch_has_positives_and_negatives() -> None:
    # PML's SupConLoss (CosineSimilarity, AvgNonZeroReducer) drops anchors without positives
    # (their loss is 0) and divides by |P| + tiny: the same number as our L_out form here.
    embeddings, labels = _random_batch(5, 16, 4, 3)
    ours = losses.build("supcon", temperature=0.2)(embeddings, labels)
    theirs = SupConLoss(temperature=0.2)(embeddings, labels)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-9)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("seed", "temperature"), [(0, 0.5), (1, 0.1)])
def test_simclr_equals_naive_ntxent(dtype: torch.dtype, seed: int, temperature: float) -> None:
    embeddings, _ = _random_batch(seed, 12, 5, 1, dtype)
    ids = torch.arange(6).repeat(2)
    loss = losses.build("simclr", temperature=temperature)(embeddings, ids)
    expected = naive_ntxent(embeddings, ids, temperature)
    assert loss.item() == pytest.approx(expected, rel=TOL, abs=TOL)


@pytest.mark.parametrize("temperature", [0.1, 0.5, 2.0])
def test_supcon_with_one_label_per_sample_equals_simclr(temperature: float) -> None:
    embeddings, _ = _random_batch(7, 16, 8, 1)
    labels = (torch.arange(8) * 3 + 11).repeat(2)  # unique per sample, shared by its two views
    supcon = losses.build("supcon", temperature=temperature)(embeddings, labels)
    simclr = losses.build("simclr", temperature=temperature)(embeddings, labels)
    assert supcon.item() == pytest.approx(simclr.item(), rel=1e-12)


# --- contrastive ---------------------------------------------------------------------------


def test_contrastive_hand_computed() -> None:
    # z0 = (1, 0), z1 = (0, 1), z2 = (-1, 0) (given unnormalised); labels 0, 0, 1.
    # Pairs: (0,1) positive, d = √2 -> ½·2 = 1; (0,2) negative, d = 2; (1,2) negative, d = √2.
    embeddings = torch.tensor([[3.0, 0.0], [0.0, 0.5], [-2.0, 0.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1])
    # m = 1: both negatives are beyond the margin -> (1 + 0 + 0) / 3.
    assert losses.build("contrastive")(embeddings, labels).item() == pytest.approx(1 / 3)
    # m = 2: (0,2) gives ½·0² = 0, (1,2) gives ½(2 - √2)² = 3 - 2√2 -> (4 - 2√2) / 3.
    loss = losses.build("contrastive", margin=2.0)(embeddings, labels)
    assert loss.item() == pytest.approx((4 - 2 * math.sqrt(2)) / 3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("seed", "n_classes", "margin"), [(0, 2, 1.0), (1, 4, 1.0), (2, 3, 1.5)])
def test_contrastive_equals_naive_loop(dtype: torch.dtype, seed: int, n_classes: int, margin: float) -> None:
    embeddings, labels = _random_batch(seed, 13, 3, n_classes, dtype)
    loss = losses.build("contrastive", margin=margin)(embeddings, labels)
    assert loss.item() == pytest.approx(naive_hadsell(embeddings, labels, margin), rel=TOL, abs=TOL)


def test_contrastive_is_differentiable_at_zero_distance() -> None:
    embeddings = torch.tensor([[1.0, 2.0], [1.0, 2.0], [2.0, 4.0], [-1.0, 0.5]], requires_grad=True)
    labels = torch.tensor([0, 1, 0, 1])  # coincident negatives (0,1) and coincident positives (0,2)
    loss = losses.build("contrastive")(embeddings, labels)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(embeddings.grad).all()


# --- triplet -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("seed", "n_classes", "margin"), [(0, 2, 0.2), (1, 3, 0.2), (2, 3, 0.5)])
def test_triplet_equals_naive_loop_over_mined_triplets(
    dtype: torch.dtype, seed: int, n_classes: int, margin: float
) -> None:
    embeddings, labels = _random_batch(seed, 12, 3, n_classes, dtype)
    miner = TripletMarginMiner(margin=margin, type_of_triplets="semihard")
    mined = list(zip(*(idx.tolist() for idx in miner(embeddings, labels))))
    assert mined, "test batch should contain semi-hard triplets"
    if dtype == torch.float64:  # the miner returns exactly the semi-hard set of the docstring
        assert set(mined) == semihard_triplets(embeddings, labels, margin)
    z = _unit_rows(embeddings)
    terms = [max(0.0, _dist(z[a], z[p]) - _dist(z[a], z[n]) + margin) for a, p, n in mined]
    # AvgNonZeroReducer averages the non-zero terms; semi-hard triplets (0 < d_an - d_ap <= m)
    # give margin - gap >= 0, zero only at an exact tie, so here it is the mean over all mined.
    assert all(t > 0 for t in terms)
    loss = losses.build("triplet", margin=margin)(embeddings, labels)
    assert loss.item() == pytest.approx(sum(terms) / len(terms), rel=TOL, abs=TOL)


def test_triplet_without_mined_triplets_is_zero_with_grad() -> None:
    # Two tight, far-apart clusters: every negative is beyond the margin -> nothing semi-hard.
    embeddings = torch.tensor([[1.0, 0.0], [1.0, 0.01], [-1.0, 0.0], [-1.0, 0.01]], requires_grad=True)
    loss = losses.build("triplet")(embeddings, torch.tensor([0, 0, 1, 1]))
    assert loss.item() == 0.0 and loss.grad_fn is not None
    loss.backward()
    assert torch.isfinite(embeddings.grad).all()


# --- ce and hybrids ------------------------------------------------------------------------


def test_ce_is_mean_cross_entropy() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1])
    expected = [
        -math.log(math.exp(row[y]) / sum(math.exp(v) for v in row)) for row, y in zip(logits.tolist(), labels.tolist())
    ]
    loss = losses.build("ce")(None, labels, logits)
    assert loss.item() == pytest.approx(sum(expected) / 3)


@pytest.mark.parametrize(
    ("name", "metric", "params"),
    [("ce+supcon", "supcon", {"temperature": 0.2}), ("ce+triplet", "triplet", {"margin": 0.3})],
)
@pytest.mark.parametrize("weight", [None, 0.5])
def test_hybrid_is_ce_plus_weighted_metric(
    name: str, metric: str, params: dict[str, float], weight: float | None
) -> None:
    embeddings, labels = _random_batch(8, 12, 4, 2)
    logits = torch.randn(12, 2, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    extra = {} if weight is None else {"weight": weight}
    hybrid = losses.build(name, **params, **extra)(embeddings, labels, logits)
    ce = losses.build("ce")(None, labels, logits)
    term = losses.build(metric, **params)(embeddings, labels)
    expected_weight = losses.HYBRID_WEIGHT if weight is None else weight
    assert losses.HYBRID_WEIGHT == 0.1
    assert hybrid.item() == pytest.approx(ce.item() + expected_weight * term.item(), rel=1e-12)


# --- every loss ----------------------------------------------------------------------------


def _call(name: str, embeddings: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    objective = losses.build(name)
    return objective(
        embeddings if objective.uses_embeddings else None,
        labels,
        logits if objective.uses_head else None,
    )


FLAGS = {
    "ce": (True, False, True),
    "contrastive": (False, True, True),
    "triplet": (False, True, True),
    "supcon": (False, True, True),
    "simclr": (False, True, False),
    "ce+supcon": (True, True, True),
    "ce+triplet": (True, True, True),
}
"""(uses_head, uses_embeddings, uses_labels) of the shipped losses."""


def test_flags() -> None:
    objectives = {name: losses.build(name) for name in FLAGS}
    flags = {n: (o.uses_head, o.uses_embeddings, o.uses_labels) for n, o in objectives.items()}
    assert flags == FLAGS


@pytest.mark.parametrize("name", hparams.names())
def test_every_loss_scores_something(name: str) -> None:
    objective = losses.build(name)
    assert objective.uses_head or objective.uses_embeddings


def test_every_registered_loss_has_an_objective_and_every_objective_a_loss() -> None:
    assert set(losses.OBJECTIVES) == set(hparams.LOSSES) and losses.names() == hparams.names()


@pytest.mark.parametrize("name", hparams.names())
def test_registry_entry_is_complete(name: str) -> None:
    spec = hparams.LOSSES[name]
    assert spec.name == name and spec.summary and "\n" not in spec.summary
    for key, p in {**spec.params, **hparams.OPTIMISER_PARAMS}.items():
        assert p.help and "\n" not in p.help, key
        assert 0 < p.low <= p.high and (p.default == 0 or p.low <= p.default <= p.high), key
    # the objective takes every parameter the registry declares, at either end of its range
    for end in ("low", "high"):
        values = {key: getattr(p, end) for key, p in spec.params.items()}
        assert isinstance(losses.build(name, **values), losses.Objective)


def test_an_objective_needs_a_registry_entry_and_an_entry_an_objective(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="objective 'arcface': no such loss"):
        losses.objective("arcface")
    monkeypatch.setattr(hparams, "LOSSES", {**hparams.LOSSES, "arcface": hparams.LossSpec("arcface", "x")})
    with pytest.raises(ValueError, match="loss 'arcface' has no objective"):
        losses.build("arcface")


# With two classes, a loss that needs logits has at most two distinct labels in a batch.
NO_POSITIVE_CASES = [
    (name, n) for name in hparams.names() for n in ([1, 2] if losses.build(name).uses_head else [1, 2, 6])
]


@pytest.mark.parametrize(("name", "n"), NO_POSITIVE_CASES)
def test_no_positive_pair_gives_finite_loss_and_gradient(name: str, n: int) -> None:
    generator = torch.Generator().manual_seed(n)
    embeddings = torch.randn(n, 4, generator=generator, requires_grad=True)
    logits = torch.randn(n, 2, generator=generator, requires_grad=True)
    labels = torch.arange(n)  # all labels distinct
    loss = _call(name, embeddings, labels, logits)
    assert loss.dim() == 0 and torch.isfinite(loss) and loss.grad_fn is not None
    loss.backward()
    for tensor in (embeddings, logits):
        assert tensor.grad is None or torch.isfinite(tensor.grad).all()


@settings(max_examples=25, deadline=None)
@given(
    name=st.sampled_from(hparams.names()),
    n=st.integers(1, 12),
    dim=st.integers(1, 6),
    n_classes=st.integers(1, 4),
    log_scale=st.floats(-3, 3),
    duplicate_views=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_batches_give_finite_values_and_gradients(
    name: str, n: int, dim: int, n_classes: int, log_scale: float, duplicate_views: bool, seed: int
) -> None:
    generator = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(n, dim, generator=generator) * 10**log_scale
    if duplicate_views:  # identical views: zero distances between positives
        embeddings = torch.cat([embeddings, embeddings])
    embeddings.requires_grad_()
    rows = embeddings.shape[0]
    logits = torch.randn(rows, 2, generator=generator, requires_grad=True)
    classes = 2 if losses.build(name).uses_head else n_classes
    labels = torch.randint(0, min(classes, n_classes), (rows,), generator=generator)
    loss = _call(name, embeddings, labels, logits)
    assert torch.isfinite(loss)
    loss.backward()
    for tensor in (embeddings, logits):
        assert tensor.grad is None or torch.isfinite(tensor.grad).all()


# --- names and build -----------------------------------------------------------------------


def test_names() -> None:
    # the shipped losses, in the order studies list them (a new loss may come anywhere)
    expected = ["ce", "contrastive", "triplet", "supcon", "simclr", "ce+supcon", "ce+triplet"]
    assert [name for name in losses.names() if name in expected] == expected == list(FLAGS)


def test_build_unknown_loss() -> None:
    with pytest.raises(ValueError, match=r"unknown loss 'arcface'; choose from ce, contrastive"):
        losses.build("arcface")


@pytest.mark.parametrize(
    ("name", "param"),
    [
        ("ce", "margin"),
        ("supcon", "margin"),
        ("triplet", "temperature"),
        ("contrastive", "weight"),
        ("simclr", "tau"),
    ],
)
def test_build_rejects_parameter_the_loss_does_not_take(name: str, param: str) -> None:
    with pytest.raises(ValueError, match=f"takes no parameter '{param}'") as info:
        losses.build(name, **{param: 0.5})
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("value", [0, -0.1, float("nan"), float("inf"), True, "0.1", None])
def test_build_rejects_non_positive_or_non_numeric_values(value: object) -> None:
    with pytest.raises(ValueError, match="'temperature' must be a positive finite number"):
        losses.build("supcon", temperature=value)


def test_build_passes_params_through() -> None:
    hybrid = losses.build("ce+supcon", weight=0.5, temperature=0.2)
    assert hybrid.weight == 0.5 and hybrid.metric.temperature == 0.2
    triplet = losses.build("ce+triplet", margin=0.3).metric
    assert triplet.miner.margin == 0.3 and triplet.loss.margin == 0.3
    assert losses.build("triplet").loss.margin == losses.build("triplet").miner.margin == 0.2
    assert losses.build("simclr").temperature == 0.5
    assert losses.build("contrastive").margin == 1.0


def test_missing_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="needs logits"):
        losses.build("ce+supcon")(torch.randn(4, 3), torch.tensor([0, 0, 1, 1]))
    with pytest.raises(ValueError, match="needs embeddings"):
        losses.build("supcon")(None, torch.tensor([0, 0, 1, 1]))


# --- toy training --------------------------------------------------------------------------


TOY_SEED = 2


class _ToyModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = torch.nn.Sequential(
            torch.nn.Linear(2, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16), torch.nn.ReLU()
        )
        self.projection = torch.nn.Linear(16, 8)
        self.head = torch.nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.encoder(x)
        return self.projection(features), self.head(features)


def _ncm_accuracy(embeddings: torch.Tensor, labels: torch.Tensor) -> float:
    z = torch.nn.functional.normalize(embeddings, dim=1)
    means = torch.stack([z[labels == c].mean(0) for c in (0, 1)])
    return (torch.cdist(z, means).argmin(1) == labels).float().mean().item()


def _toy_points(xor: bool, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """32 points in well-separated 2D Gaussian blobs (std 0.3), labels alternating 0/1.

    With ``xor`` there are four blobs at (±1.5, ±1.5) and a class is two opposite corners, so
    no linear map (and no randomly initialised encoder) separates the classes: the loss must.
    """
    labels = torch.arange(32) % 2
    if xor:
        corner = torch.arange(32) // 2 % 2
        signs = torch.stack([1 - 2 * corner, (1 - 2 * corner) * (1 - 2 * labels)], dim=1)
    else:
        signs = torch.stack([1 - 2 * labels, 2 * labels - 1], dim=1)
    return 1.5 * signs + 0.3 * torch.randn(32, 2, generator=generator), labels


@pytest.mark.parametrize("name", hparams.names())
def test_each_loss_learns_two_gaussian_blobs(name: str, one_thread: None) -> None:
    # SimCLR never sees labels, so it gets two blobs and views jittered by the blob's own spread
    # (the augmentation defines the invariance); every label-using loss gets the XOR blobs and
    # must pull opposite corners together. Seeds 0-3 all reach 100 %; seed 2 is the test's.
    objective = losses.build(name)
    data = torch.Generator().manual_seed(TOY_SEED)
    x, labels = _toy_points(xor=objective.uses_labels, generator=data)
    with torch.random.fork_rng():
        torch.manual_seed(TOY_SEED)
        model = _ToyModel()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    targets = labels if objective.uses_labels else torch.arange(32)
    targets = targets.repeat(2)  # two views per sample, stacked on the batch axis
    first = None
    for _ in range(200):
        views = x.repeat(2, 1) + 0.3 * torch.randn(64, 2, generator=data)
        embeddings, logits = model(views)
        loss = objective(embeddings, targets, logits)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        first = loss.item() if first is None else first
    assert loss.item() < first
    with torch.no_grad():
        embeddings, logits = model(x)
    if objective.uses_embeddings:
        assert _ncm_accuracy(embeddings, labels) >= 0.95
    if objective.uses_head:
        assert (logits.argmax(1) == labels).float().mean().item() >= 0.95


def test_xor_blobs_are_not_separated_before_training() -> None:
    x, labels = _toy_points(xor=True, generator=torch.Generator().manual_seed(TOY_SEED))
    with torch.random.fork_rng():
        torch.manual_seed(TOY_SEED)
        embeddings, logits = _ToyModel()(x)
    assert _ncm_accuracy(embeddings.detach(), labels) < 0.8
    assert (logits.argmax(1) == labels).float().mean().item() < 0.8
