"""Encoders, heads, seeding, freezing and safetensors checkpoints (nodulab.training.models)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from nodulab.training.models import ENCODERS, ModelError, build_model, count_parameters, freeze, load_model, save_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _input(dim: int, size: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((batch, 1) + (size,) * dim, generator=g)


def _states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "encoder, dim, size",
    [("small-cnn", 2, 32), ("small-cnn", 3, 16), ("resnet18", 2, 32), ("resnet18", 3, 16)],
)
def test_forward_shapes(encoder: str, dim: int, size: int) -> None:
    model = build_model(encoder, dim, embedding_dim=24, projection_dim=8).eval()
    with torch.no_grad():
        out = model(_input(dim, size))
    assert {k: tuple(v.shape) for k, v in out.items()} == {"features": (2, 24), "logits": (2, 2), "projection": (2, 8)}
    assert all(torch.isfinite(v).all() for v in out.values())


@pytest.mark.parametrize("head, projector", [(True, True), (True, False), (False, True), (False, False)])
@pytest.mark.parametrize("dim, size", [(2, 32), (3, 16)])
def test_optional_heads(head: bool, projector: bool, dim: int, size: int) -> None:
    model = build_model("small-cnn", dim, embedding_dim=16, projection_dim=4, head=head, projector=projector)
    assert (model.head is not None) == head and (model.projector is not None) == projector
    with torch.no_grad():
        out = model.eval()(_input(dim, size))
    expected = {"features"} | ({"logits"} if head else set()) | ({"projection"} if projector else set())
    assert set(out) == expected


def test_features_come_before_the_projector() -> None:
    model = build_model("small-cnn", 2, embedding_dim=16, projection_dim=4).eval()
    x = _input(2, 32)
    with torch.no_grad():
        out = model(x)
        features = model.features(x)
        assert torch.equal(out["features"], features)
        assert torch.equal(out["features"], model.encoder(x))
        assert torch.equal(out["projection"], model.projector(features))
        assert torch.equal(out["logits"], model.head(features))
    assert out["features"].shape == (2, 16) and out["projection"].shape == (2, 4)


def test_small_cnn_layout() -> None:
    """4 blocks 16-32-64-128 (conv3-BN-ReLU x2, max-pool), then Linear(128 -> embedding): count by formula."""
    emb, proj = 20, 6
    model = build_model("small-cnn", 2, embedding_dim=emb, projection_dim=proj)
    widths = [1, 16, 32, 64, 128]
    convs = sum(widths[i] * widths[i + 1] * 9 + widths[i + 1] * widths[i + 1] * 9 for i in range(4))
    norms = sum(2 * 2 * w for w in widths[1:])
    encoder = convs + norms + 128 * emb + emb
    assert count_parameters(model.encoder) == encoder
    assert count_parameters(model) == encoder + (emb * 2 + 2) + (emb * emb + emb) + (emb * proj + proj)
    pools = [m for m in model.encoder.modules() if isinstance(m, torch.nn.MaxPool2d)]
    assert len(pools) == 4
    model3 = build_model("small-cnn", 3, embedding_dim=emb, projection_dim=proj)
    assert count_parameters(model3.encoder) == encoder + 2 * convs  # 3x3x3 kernels: 27 = 3 * 9


def test_resnet18_configuration() -> None:
    model = build_model("resnet18", 2, embedding_dim=8)
    backbone = model.encoder[0]
    assert backbone.conv1.in_channels == 1 and backbone.conv1.kernel_size == (3, 3)
    assert backbone.conv1.stride == (1, 1) and backbone.no_max_pool and backbone.fc is None
    assert isinstance(backbone.conv1, torch.nn.Conv2d)
    assert model.encoder[1].in_features == 512 and model.encoder[1].out_features == 8
    imagenet = build_model("resnet18", 2, embedding_dim=8, stem="imagenet").encoder[0]
    assert imagenet.conv1.kernel_size == (7, 7) and imagenet.conv1.stride == (2, 2) and not imagenet.no_max_pool
    assert not any(getattr(m, "inplace", False) for m in model.modules())


@pytest.mark.parametrize("encoder", ENCODERS)
def test_seed_controls_initialisation(encoder: str) -> None:
    a = build_model(encoder, 2, seed=3).state_dict()
    b = build_model(encoder, 2, seed=3).state_dict()
    c = build_model(encoder, 2, seed=4).state_dict()
    assert _states_equal(a, b)
    assert not _states_equal(a, c)
    first_conv = "encoder.0.0.weight" if encoder == "small-cnn" else "encoder.0.conv1.weight"
    assert not torch.equal(a[first_conv], c[first_conv])


def test_build_model_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    before = torch.get_rng_state()
    expected = torch.rand(4)
    torch.set_rng_state(before)
    build_model("small-cnn", 2, seed=7)
    build_model("small-cnn", 3, seed=8)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(torch.rand(4), expected)


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown encoder"):
        build_model("vit")
    with pytest.raises(ValueError, match="spatial_dims"):
        build_model("small-cnn", 1)
    with pytest.raises(ValueError, match="stem"):
        build_model("resnet18", 2, stem="tiny")
    with pytest.raises(ValueError, match="expected input"):
        build_model("small-cnn", 2)(_input(3, 16))


# ----------------------------------------------------------------------------- freezing
def _encoder_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.encoder.state_dict().items()}


def test_freeze_keeps_encoder_and_batchnorm_statistics_fixed() -> None:
    model = build_model("small-cnn", 2, embedding_dim=8)
    freeze(model)
    model.train()  # a frozen encoder must stay in eval mode even so
    before = _encoder_state(model)
    assert not any(m.training for m in model.encoder.modules())
    assert model.training and model.head.training
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for seed in range(3):
        out = model(_input(2, 16, batch=4, seed=seed) * 3.0 + 1.0)
        loss = out["logits"].sum() + out["projection"].sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert _states_equal(before, model.encoder.state_dict())
    assert all(p.grad is None and not p.requires_grad for p in model.encoder.parameters())
    assert model.head.weight.grad is not None and model.head.weight.requires_grad
    assert count_parameters(model, trainable_only=True) == count_parameters(model.head) + count_parameters(
        model.projector
    )


def test_unfrozen_encoder_does_update_statistics() -> None:
    """Control for the test above: the same passes without freeze change the BN statistics."""
    model = build_model("small-cnn", 2, embedding_dim=8)
    freeze(model)
    freeze(model, False)
    model.train()
    assert all(m.training for m in model.encoder.modules())
    assert all(p.requires_grad for p in model.parameters())
    before = _encoder_state(model)
    model(_input(2, 16, batch=4) * 3.0 + 1.0)
    after = model.encoder.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert any(k.endswith("running_mean") for k in changed)


# ----------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize(
    "encoder, dim, size, kwargs",
    [
        ("small-cnn", 2, 32, {}),
        ("small-cnn", 3, 16, {"head": False, "projection_dim": 5}),
        ("resnet18", 2, 16, {"embedding_dim": 12, "projector": False}),
    ],
)
def test_safetensors_round_trip(tmp_path, encoder: str, dim: int, size: int, kwargs: dict) -> None:
    model = build_model(encoder, dim, seed=5, **kwargs)
    model(_input(dim, size, batch=3))  # train-mode pass: non-default BN statistics must survive
    model.eval()
    path = tmp_path / "model.safetensors"
    config = {"loss": "supcon", "seed": 5, "lr": 1e-3}
    save_model(model, path, config)
    assert path.read_bytes()[8:9] == b"{"  # safetensors header, not a pickle
    loaded, stored = load_model(path)
    assert stored == {**config, "architecture": model.architecture}
    assert stored["architecture"]["encoder"] == encoder and stored["architecture"]["spatial_dims"] == dim
    assert _states_equal(model.state_dict(), loaded.state_dict())
    x = _input(dim, size, seed=9)
    with torch.no_grad():
        a, b = model(x), loaded(x)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert list(tmp_path.iterdir()) == [path]  # no temporary left behind


def test_load_refuses_foreign_files(tmp_path) -> None:
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(ValueError, match="not a nodulab model checkpoint"):
        load_model(plain)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x80\x04not a safetensors file at all")
    with pytest.raises(ValueError, match="not a safetensors file"):
        load_model(garbage)


def test_load_is_strict(tmp_path) -> None:
    """Metadata that does not match the tensors fails loudly instead of loading part of them."""
    model = build_model("small-cnn", 2, embedding_dim=8)
    path = tmp_path / "m.safetensors"
    save_model(model, path, {})
    record = {"format": "nodulab-model/1", "config": {"architecture": {**model.architecture, "head": False}}}
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata={"nodulab": json.dumps(record)})
    with pytest.raises(ModelError, match="tensor head.bias is .2,., the recorded architecture needs none"):
        load_model(path)


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"embedding_dim": 2**34}, "embedding_dim = 17179869184 is outside 1..65,536"),  # no 8.8 TB allocation
        ({"spatial_dims": 3}, "the recorded architecture needs"),  # 3D weights named for 2D tensors
        ({"spatial_dims": 4}, "in 2 or 3"),
        ({"encoder": "vit"}, "encoder 'vit'"),
        ({"embedding_dim": "8"}, "embedding_dim = '8' is not a build_model setting"),
        ({"dropout": 0.1}, "dropout = 0.1 is not a build_model setting"),
        ({"embedding_dim": 16}, "tensor encoder"),
    ],
)
def test_impossible_model_metadata_is_refused_before_allocating(tmp_path, change: dict, fragment: str) -> None:
    model = build_model("small-cnn", 2, embedding_dim=8)
    path = tmp_path / "m.safetensors"
    record = {"format": "nodulab-model/1", "config": {"architecture": {**model.architecture, **change}}}
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata={"nodulab": json.dumps(record)}
    )
    with pytest.raises(ModelError) as error:
        load_model(path)
    assert fragment in str(error.value) and "\n" not in str(error.value)


def test_save_rejects_conflicting_architecture(tmp_path) -> None:
    model = build_model("small-cnn", 2)
    with pytest.raises(ValueError, match="disagrees"):
        save_model(model, tmp_path / "m.safetensors", {"architecture": {"encoder": "resnet18"}})
