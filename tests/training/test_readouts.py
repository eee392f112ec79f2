"""Readouts on the frozen encoder (nodulab.training.readouts): extraction, probe, kNN, files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file
from sklearn.linear_model import LogisticRegression

from nodulab.training import readouts as readouts_module
from nodulab.training.evaluation import binary_metrics
from nodulab.training.models import build_model, freeze
from nodulab.training.readouts import PROBE_CS, Readouts, extract, fit_dfr, fit_readouts, knn_neighbours, load_readouts

pytestmark = pytest.mark.usefixtures("one_thread")


def _hu(n: int, size: int, dim: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1000, 400, (n,) + (size,) * dim).astype(np.int16)


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _modes(model: torch.nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in model.named_modules()}


# ----------------------------------------------------------------------------- extract
@pytest.mark.parametrize("dim, size", [(2, 32), (3, 16)])
def test_extract_and_fit_leave_every_parameter_and_buffer_bit_identical(dim: int, size: int) -> None:
    model = build_model("small-cnn", dim, embedding_dim=8, projection_dim=4).train()
    before, modes = _snapshot(model), _modes(model)
    assert any("running_mean" in k for k in before)  # BatchNorm buffers are part of the check
    images = _hu(12, size, dim)
    out = extract(model, images, batch_size=5)
    labels = np.arange(12) % 2
    fit_readouts(out["features"][:6], labels[:6], out["features"][6:], labels[6:], knn_k=3)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), "extract changed the model"
    assert _modes(model) == modes and model.training  # train mode restored
    assert out["features"].shape == (12, 8) and out["features"].dtype == np.float32
    assert out["head"].shape == (12,) and out["head"].dtype == np.float32


def test_extract_computes_eval_mode_features_and_head() -> None:
    model = build_model("small-cnn", 2, embedding_dim=8).train()
    images = _hu(7, 32, seed=3)
    out = extract(model, images, batch_size=3)
    reference = build_model("small-cnn", 2, embedding_dim=8).eval()  # same seed, same weights
    with torch.no_grad():
        ref = reference(torch.from_numpy(images.astype(np.float32))[:, None] / 1000.0)
    np.testing.assert_allclose(out["features"], ref["features"].numpy(), rtol=1e-5, atol=1e-6)
    p_head = torch.softmax(ref["logits"], 1)[:, 1].numpy()
    np.testing.assert_allclose(out["head"], p_head, rtol=1e-5, atol=1e-6)
    # float input (N, 1, H, W) already scaled gives the same features
    scaled = extract(model, torch.from_numpy(images.astype(np.float32))[:, None] / 1000.0, batch_size=7)
    np.testing.assert_allclose(scaled["features"], out["features"], rtol=1e-6, atol=1e-7)


def test_extract_restores_frozen_encoder_modes_and_handles_no_head() -> None:
    model = freeze(build_model("small-cnn", 2, embedding_dim=8, head=False)).train()
    modes = _modes(model)
    assert not model.encoder.training and model.projector.training
    out = extract(model, _hu(4, 32), batch_size=2)
    assert set(out) == {"features"} and _modes(model) == modes


def test_extract_rejects_wrong_shapes() -> None:
    model = build_model("small-cnn", 2, embedding_dim=8)
    with pytest.raises(ValueError, match="extract"):
        extract(model, np.zeros((3, 32, 32), dtype=np.float32))  # float HU without channel axis
    with pytest.raises(ValueError, match="extract"):
        extract(model, _hu(3, 16, dim=3))  # 3D volumes into a 2D model


# ----------------------------------------------------------------------------- probe
def _imbalanced_1d(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """40 train samples, 1 in 4 malignant, perfectly separable on feature 0 (plus noise features)."""
    rng = np.random.default_rng(seed)
    y = (np.arange(40) % 4 == 0).astype(np.int64)
    signal = 2.0 * y - 1.0 + 0.3 * rng.standard_normal(40)
    x = np.concatenate([signal[:, None], rng.standard_normal((40, 2))], axis=1)
    return x.astype(np.float32), y


def _val_scores_by_hand(x: np.ndarray, y: np.ndarray, xv: np.ndarray, yv: np.ndarray) -> dict[float, float]:
    mean, scale = x.astype(np.float64).mean(0), np.maximum(x.astype(np.float64).std(0), 1e-6)
    scores = {}
    for c in PROBE_CS:
        lr = LogisticRegression(C=c, max_iter=5000, random_state=0).fit((x - mean) / scale, y)
        pred = lr.predict_proba((xv - mean) / scale)[:, 1] >= 0.5
        sens, spec = pred[yv == 1].mean(), (~pred[yv == 0]).mean()
        scores[c] = (sens + spec) / 2
    return scores


def test_probe_chooses_c_on_val_and_keeps_the_train_fit() -> None:
    x, y = _imbalanced_1d()
    xv, yv = _imbalanced_1d(seed=1)
    # C = 1e-3 shrinks the weights to ~0: the intercept calls everything benign (balanced acc 0.5);
    # a large C separates. On a val split that agrees with train, a larger C must win ...
    agree = fit_readouts(x, y, xv, yv, knn_k=5)
    hand = _val_scores_by_hand(x, y, xv, yv)
    assert hand[1e-3] == 0.5 and max(hand.values()) == 1.0
    assert agree.probe_c == min(c for c in PROBE_CS if hand[c] == 1.0) > 1e-3  # ties -> smaller C
    assert [c for c, _ in agree.probe_val_scores] == sorted(PROBE_CS)
    np.testing.assert_allclose([s for _, s in agree.probe_val_scores], [hand[c] for c in sorted(PROBE_CS)])
    # ... on a val split with the relation reversed, the smallest C (constant prediction) wins
    reverse = fit_readouts(x, y, xv, 1 - yv, knn_k=5)
    assert reverse.probe_c == 1e-3
    # the kept probe is the train-only fit with the chosen C (val never enters the fit)
    mean, scale = x.astype(np.float64).mean(0), x.astype(np.float64).std(0)
    lr = LogisticRegression(C=agree.probe_c, max_iter=5000, random_state=0).fit((x - mean) / scale, y)
    np.testing.assert_allclose(agree.probe_coef, lr.coef_[0], rtol=1e-6)
    np.testing.assert_allclose(agree.probe_intercept, lr.intercept_[0], rtol=1e-6)
    p_val = lr.predict_proba((xv - mean) / scale)[:, 1]
    np.testing.assert_allclose(agree.predict(xv)["probe"], p_val, rtol=1e-6)


def test_probe_floors_the_scale_of_constant_features() -> None:
    x, y = _imbalanced_1d()
    x[:, 2] = 7.0
    fitted = fit_readouts(x, y, x, y, knn_k=3)
    assert fitted.probe_scale[2] == 1e-6 and np.isfinite(fitted.predict(x)["probe"]).all()


def test_fit_readouts_rejects_bad_input() -> None:
    x, y = _imbalanced_1d()
    with pytest.raises(ValueError, match="both classes"):
        fit_readouts(x, y, x, np.zeros_like(y))
    with pytest.raises(ValueError, match="cs"):
        fit_readouts(x, y, x, y, cs=())
    with pytest.raises(ValueError, match="features"):
        fit_readouts(x, y, x[:, :2], y)


# ----------------------------------------------------------------------------- kNN
def _knn_brute_force(bank: np.ndarray, queries: np.ndarray, k: int) -> list[list[int]]:
    """A slow, explicit loop: cosine similarity per pair, sort by (-similarity, index)."""
    result = []
    for q in queries.astype(np.float64):
        sims = []
        for i, b in enumerate(bank.astype(np.float64)):
            dot = sum(float(a) * float(c) for a, c in zip(q, b))
            norm = math.sqrt(sum(float(a) ** 2 for a in q)) * math.sqrt(sum(float(c) ** 2 for c in b))
            sims.append((-dot / norm, i))
        result.append([i for _, i in sorted(sims)[:k]])
    return result


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("k", [1, 5, 23])
def test_knn_matches_brute_force(seed: int, k: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(readouts_module, "_QUERY_BLOCK", 7)  # several query blocks
    rng = np.random.default_rng(seed)
    bank, queries = rng.standard_normal((23, 6)), rng.standard_normal((17, 6))
    assert knn_neighbours(bank, queries, k).tolist() == _knn_brute_force(bank, queries, k)


@pytest.mark.parametrize("seed", [0, 1])
def test_knn_ties_go_to_the_lower_index(seed: int) -> None:
    """Scaled one-hot vectors: similarities are exactly 0 or 1, so almost everything ties."""
    rng = np.random.default_rng(seed)
    bank = np.eye(3)[rng.integers(0, 3, 30)] * rng.integers(1, 5, (30, 1))
    queries = np.eye(3)[rng.integers(0, 3, 11)] * 2.0
    for k in (1, 4, 12, 30):
        assert knn_neighbours(bank, queries, k).tolist() == _knn_brute_force(bank, queries, k)
    labels = rng.integers(0, 2, 30)
    fitted = fit_readouts(bank, labels, bank, labels, knn_k=5)
    expected = [np.mean(labels[idx]) for idx in _knn_brute_force(bank, queries, 5)]
    np.testing.assert_array_equal(fitted.predict(queries)["knn"], expected)


def test_knn_k_is_clamped_to_the_bank_and_odd() -> None:
    x, y = _imbalanced_1d()
    fitted = fit_readouts(x, y, x, y)  # default k = 21 <= 40
    assert fitted.knn_k == 21
    assert fit_readouts(x[:12], y[:12], x, y).knn_k == 11  # the largest odd k <= 12
    assert fit_readouts(x, y, x, y, knn_k=8).knn_k == 7
    p = fit_readouts(x[:12], y[:12], x, y).predict(x)["knn"]
    assert not np.any(p == 0.5)  # an odd k never ties the two classes
    with pytest.raises(ValueError, match="k must be"):
        knn_neighbours(x, x, 41)


# ----------------------------------------------------------------------------- predict, files
def _separable(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    centre = np.where(y[:, None] == 1, 1.0, -1.0) * np.array([4.0, -3.0, 2.0, 0.0, 1.0])
    return (centre + 0.3 * rng.standard_normal((n, 5))).astype(np.float32), y


def test_predict_on_separable_features_is_perfect() -> None:
    (x, y), (xv, yv), (xt, yt) = _separable(40, 0), _separable(20, 1), _separable(30, 2)
    scores = fit_readouts(x, y, xv, yv, knn_k=5).predict(xt)
    for name in ("probe", "knn"):
        metrics = binary_metrics(yt, scores[name])
        assert metrics["accuracy"] == 1.0 and metrics["auc"] == 1.0, name
    np.testing.assert_array_equal(scores["knn"], yt)  # every neighbour shares the label


def test_save_load_round_trip_is_exact(tmp_path: Path) -> None:
    x, y = _separable(40, 0)
    fitted = fit_readouts(x, y, *_separable(20, 1), knn_k=7, seed=3)
    fitted.save(tmp_path / "readouts.safetensors")
    loaded = load_readouts(tmp_path / "readouts.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["readouts.safetensors"]  # no temp file left
    for name in ("probe_coef", "probe_mean", "probe_scale", "knn_bank", "knn_labels"):
        a, b = getattr(fitted, name), getattr(loaded, name)
        assert a.dtype == b.dtype and np.array_equal(a, b), name
    for name in ("probe_intercept", "probe_c", "knn_k", "probe_val_scores"):
        assert getattr(fitted, name) == getattr(loaded, name), name
    queries = _separable(9, 5)[0]
    for key, value in fitted.predict(queries).items():
        np.testing.assert_array_equal(loaded.predict(queries)[key], value)


def test_load_rejects_foreign_files(tmp_path: Path) -> None:
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a safetensors file"):
        load_readouts(tmp_path / "junk.safetensors")
    save_file({"a": np.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not a nodulab readouts file"):
        load_readouts(tmp_path / "plain.safetensors")
    record = json.dumps({"format": "nodulab-readouts/0"})
    save_file({"a": np.zeros(2)}, str(tmp_path / "old.safetensors"), metadata={"nodulab": record})
    with pytest.raises(ValueError, match="unsupported readouts file format"):
        load_readouts(tmp_path / "old.safetensors")


def test_predict_checks_the_feature_width() -> None:
    fitted = Readouts(np.zeros(3), 0.0, np.zeros(3), np.ones(3), 1.0, np.eye(3), np.array([0, 1, 1]), 1)
    with pytest.raises(ValueError, match="expected features"):
        fitted.predict(np.zeros((2, 4)))


# ----------------------------------------------------------------------------- convergence, dfr
def test_non_converged_cs_are_recorded_and_warned_only_when_chosen(monkeypatch: pytest.MonkeyPatch) -> None:
    import warnings

    x, y = _imbalanced_1d()
    monkeypatch.setattr(readouts_module, "PROBE_MAX_ITER", 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the chosen C converged: no warning
        fitted = fit_readouts(x, y, x, y)
    assert fitted.probe_c not in fitted.probe_not_converged
    assert 100.0 in fitted.probe_not_converged  # separable at a large C: stops at the limit
    monkeypatch.setattr(readouts_module, "PROBE_MAX_ITER", 1)
    with pytest.warns(UserWarning, match="chosen C = .* stopped at the iteration limit"):
        stopped = fit_readouts(x, y, x, y)
    assert stopped.probe_c in stopped.probe_not_converged


def _grouped(n: int, seed: int, agreement: float) -> tuple[np.ndarray, np.ndarray]:
    """Feature 0 = a weak label signal, feature 1 = a strong confound that agrees with the label."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    agrees = rng.random(n) < agreement
    confound = np.where(agrees, y, 1 - y)
    x = np.stack(
        [y + 0.6 * rng.standard_normal(n), 3.0 * confound + 0.1 * rng.standard_normal(n), rng.standard_normal(n)],
        axis=1,
    )
    return x, y


def test_dfr_on_a_balanced_split_reweights_away_from_the_confound() -> None:
    """Kirichenko et al. 2022: a probe refitted on group-balanced data ignores the spurious feature."""
    x_train, y_train = _grouped(400, 0, agreement=0.98)
    x_balanced, y_balanced = _grouped(400, 1, agreement=0.5)
    x_conflict, y_conflict = _grouped(400, 2, agreement=0.0)
    shortcut = fit_readouts(x_train, y_train, x_train, y_train, knn_k=5)
    dfr = fit_dfr(x_balanced, y_balanced, seed=0)
    probe_score = binary_metrics(y_conflict, shortcut.predict_probe(x_conflict))["balanced_accuracy"]
    dfr_score = binary_metrics(y_conflict, dfr.predict(x_conflict))["balanced_accuracy"]
    assert probe_score < 0.3 < 0.7 < dfr_score
    assert dfr.c in PROBE_CS and dfr.converged
    assert fit_dfr(x_balanced, y_balanced, seed=0).coef.tolist() == dfr.coef.tolist()  # seeded


def test_dfr_refuses_too_few_samples_per_class() -> None:
    x, y = _grouped(8, 0, 0.5)
    with pytest.raises(ValueError, match="at least 5 samples"):
        fit_dfr(x, y)


def test_readouts_with_dfr_round_trip(tmp_path: Path) -> None:
    x, y = _grouped(60, 0, 0.5)
    fitted = fit_readouts(x, y, x, y, knn_k=5)
    fitted.dfr = fit_dfr(x, y)
    fitted.save(tmp_path / "r.safetensors")
    loaded = load_readouts(tmp_path / "r.safetensors")
    assert loaded.dfr is not None and loaded.dfr.c == fitted.dfr.c
    for name, p in fitted.predict(x).items():
        np.testing.assert_array_equal(loaded.predict(x)[name], p)
    assert set(loaded.predict(x)) == {"probe", "knn", "dfr"}
