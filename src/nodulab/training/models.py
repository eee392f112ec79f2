"""Encoders and the network every loss trains (design.md "Losses and training").

``NoduleNet`` = encoder (image -> features, ``(B, embedding_dim)``) + optional linear head
(2 logits) + optional projection MLP. Every readout (linear probe, kNN) uses ``features``, the
encoder's output before any projection head. Two encoders, each for 2D and 3D:

- ``small-cnn``: 4 blocks of conv3-BN-ReLU-conv3-BN-ReLU with widths 16-32-64-128, each followed
  by a 2x max-pool; global average pool; Linear(128 -> embedding_dim).
- ``resnet18``: MONAI's ``ResNet`` (basic blocks, 2-2-2-2) with one input channel and no
  classifier, a CIFAR-style stem by default (3x3 conv, stride 1, no max-pool: our patches are
  32-64 px, and the ImageNet stem would shrink them 4x before the first block); Linear(512 ->
  embedding_dim).

``build_model(seed=...)`` draws its initial weights from a forked RNG, so the global RNG state is
untouched. Checkpoints are safetensors with the architecture and the run config as JSON metadata;
``load_model`` rebuilds the network from that metadata and never unpickles anything.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from nodulab.common.choices import ENCODERS
from nodulab.common.errors import InputError
from nodulab.common.writing import write_safetensors

STEMS = ("small", "imagenet")
CHECKPOINT_FORMAT = "nodulab-model/1"
SMALL_CNN_WIDTHS = (16, 32, 64, 128)
_METADATA_KEY = "nodulab"

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_NORM = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_MAX_POOL = {2: nn.MaxPool2d, 3: nn.MaxPool3d}
_AVG_POOL = {2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}


# ----------------------------------------------------------------------------- encoders
def _conv_block(in_channels: int, out_channels: int, spatial_dims: int) -> nn.Sequential:
    """conv3-BN-ReLU-conv3-BN-ReLU, then a 2x max-pool (halves every spatial axis)."""
    conv, norm = _CONV[spatial_dims], _NORM[spatial_dims]
    return nn.Sequential(
        conv(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        norm(out_channels),
        nn.ReLU(),
        conv(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
        norm(out_channels),
        nn.ReLU(),
        _MAX_POOL[spatial_dims](kernel_size=2),
    )


def small_cnn(spatial_dims: int = 2, embedding_dim: int = 128) -> nn.Sequential:
    """The ``small-cnn`` encoder; inputs need at least 16 px per axis (four 2x pools).

    Args:
        spatial_dims: 2 or 3.
        embedding_dim: size of the output features.

    Returns:
        A module mapping ``(B, 1, *S)`` to ``(B, embedding_dim)``.
    """
    widths = (1,) + SMALL_CNN_WIDTHS
    blocks = [_conv_block(widths[i], widths[i + 1], spatial_dims) for i in range(len(SMALL_CNN_WIDTHS))]
    return nn.Sequential(
        *blocks, _AVG_POOL[spatial_dims](1), nn.Flatten(1), nn.Linear(SMALL_CNN_WIDTHS[-1], embedding_dim)
    )


def resnet18_encoder(spatial_dims: int = 2, embedding_dim: int = 128, stem: str = "small") -> nn.Sequential:
    """The ``resnet18`` encoder: MONAI ResNet-18 without classifier, then a linear embedding.

    Every MONAI default that differs from ours is set explicitly (it defaults to 3D, 3 input
    channels, 400 classes). ReLUs are made non-in-place, so backward hooks (Grad-CAM) work.

    Args:
        spatial_dims: 2 or 3.
        embedding_dim: size of the output features.
        stem: ``"small"`` (3x3 conv, stride 1, no max-pool; for 32-64 px patches) or
            ``"imagenet"`` (7x7 conv, stride 2, then 3x3 max-pool stride 2).

    Returns:
        A module mapping ``(B, 1, *S)`` to ``(B, embedding_dim)``.
    """
    from monai.networks.nets import resnet18  # optional dependency: only this encoder needs it

    if stem not in STEMS:
        raise ValueError(f"resnet18: unknown stem {stem!r}; expected one of {STEMS}")
    small = stem == "small"
    backbone = resnet18(
        pretrained=False,
        spatial_dims=spatial_dims,
        n_input_channels=1,
        conv1_t_size=3 if small else 7,
        conv1_t_stride=1 if small else 2,
        no_max_pool=small,
        feed_forward=False,  # no fc: the backbone returns the pooled (B, 512) features
        act=("relu", {"inplace": False}),
    )
    for module in backbone.modules():  # MONAI 1.6 does not pass ``act`` on to the residual blocks
        if isinstance(module, nn.ReLU):
            module.inplace = False
    return nn.Sequential(backbone, nn.Linear(512, embedding_dim))


# ----------------------------------------------------------------------------- the network
class NoduleNet(nn.Module):
    """Encoder -> features ``(B, embedding_dim)``; optional linear head (2 logits) and projector.

    Args:
        encoder: module mapping ``(B, 1, *S)`` to ``(B, embedding_dim)``.
        embedding_dim: size of the features.
        projection_dim: output size of the projection MLP.
        head: add ``Linear(embedding_dim -> 2)``.
        projector: add ``Linear-ReLU-Linear`` (embedding_dim -> embedding_dim -> projection_dim).
        architecture: the ``build_model`` arguments that rebuild this network (for checkpoints).
    """

    def __init__(
        self,
        encoder: nn.Module,
        embedding_dim: int,
        *,
        projection_dim: int = 128,
        head: bool = True,
        projector: bool = True,
        architecture: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.head: nn.Linear | None = nn.Linear(embedding_dim, 2) if head else None
        self.projector: nn.Module | None = (
            nn.Sequential(nn.Linear(embedding_dim, embedding_dim), nn.ReLU(), nn.Linear(embedding_dim, projection_dim))
            if projector
            else None
        )
        self.architecture: dict[str, Any] = dict(architecture or {})
        self.encoder_frozen = False

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder output, before any projection head.

        Args:
            x: ``(B, 1, *S)`` float input (HU / 1000).

        Returns:
            ``(B, embedding_dim)``.
        """
        spatial_dims = self.architecture.get("spatial_dims")
        if spatial_dims is not None and (x.dim() != spatial_dims + 2 or x.shape[1] != 1):
            raise ValueError(f"NoduleNet: expected input (B, 1, {', '.join('S' * spatial_dims)}), got {tuple(x.shape)}")
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run the encoder and whichever heads exist.

        Args:
            x: ``(B, 1, *S)`` float input.

        Returns:
            ``{"features": (B, embedding_dim)}`` plus ``"logits"`` ``(B, 2)`` if there is a head
            and ``"projection"`` ``(B, projection_dim)`` if there is a projector.
        """
        out = {"features": self.features(x)}
        if self.head is not None:
            out["logits"] = self.head(out["features"])
        if self.projector is not None:
            out["projection"] = self.projector(out["features"])
        return out

    def train(self, mode: bool = True) -> NoduleNet:
        """Set train/eval mode; a frozen encoder stays in eval mode (BatchNorm statistics fixed)."""
        super().train(mode)
        if self.encoder_frozen:
            self.encoder.eval()
        return self


def build_model(
    encoder: str = "small-cnn",
    spatial_dims: int = 2,
    *,
    embedding_dim: int = 128,
    projection_dim: int = 128,
    head: bool = True,
    projector: bool = True,
    stem: str = "small",
    seed: int = 0,
) -> NoduleNet:
    """Build a ``NoduleNet`` with deterministic initial weights.

    The weights are drawn from a forked CPU RNG seeded with ``seed``: the global RNG state is
    unchanged, the same seed gives bit-identical parameters, different seeds different ones.

    Args:
        encoder: one of ``ENCODERS``.
        spatial_dims: 2 (inputs ``(B, 1, H, W)``) or 3 (``(B, 1, D, H, W)``).
        embedding_dim: size of the features. projection_dim: size of the projector's output.
        head: add the 2-logit linear head. projector: add the projection MLP.
        stem: resnet18 stem (``"small"`` or ``"imagenet"``); ignored by ``small-cnn``.
        seed: initialisation seed (non-negative).

    Returns:
        The network, on the CPU, in train mode.
    """
    if encoder not in ENCODERS:
        raise ValueError(f"build_model: unknown encoder {encoder!r}; expected one of {ENCODERS}")
    if spatial_dims not in (2, 3):
        raise ValueError(f"build_model: spatial_dims must be 2 or 3, got {spatial_dims}")
    if embedding_dim < 1 or projection_dim < 1:
        raise ValueError("build_model: embedding_dim and projection_dim must be positive")
    if seed < 0:
        raise ValueError(f"build_model: seed must be non-negative, got {seed}")
    architecture = {
        "encoder": encoder,
        "spatial_dims": spatial_dims,
        "embedding_dim": embedding_dim,
        "projection_dim": projection_dim,
        "head": head,
        "projector": projector,
    }
    if encoder == "resnet18":
        architecture["stem"] = stem
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if encoder == "small-cnn":
            body = small_cnn(spatial_dims, embedding_dim)
        else:
            body = resnet18_encoder(spatial_dims, embedding_dim, stem)
        return NoduleNet(
            body,
            embedding_dim,
            projection_dim=projection_dim,
            head=head,
            projector=projector,
            architecture=architecture,
        )


# ----------------------------------------------------------------------------- helpers
def freeze(model: NoduleNet, frozen: bool = True) -> NoduleNet:
    """Freeze (or unfreeze) the encoder: no gradients, eval mode, BatchNorm statistics fixed.

    A frozen encoder stays in eval mode even after ``model.train()``; the head and projector
    keep training. ``freeze(model, False)`` restores gradients and the model's current mode.

    Args:
        model: the network (modified in place).
        frozen: freeze (True) or unfreeze (False).

    Returns:
        ``model``.
    """
    model.encoder_frozen = frozen
    model.encoder.requires_grad_(not frozen)
    return model.train(model.training)


def state_sha256(model: nn.Module) -> str:
    """Hex sha256 of a network's parameters and buffers (names, dtypes, shapes, bytes; sorted).

    Identifies initial weights that are rebuilt from a seed instead of stored.
    """
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)}".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters (all, or only those with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# ----------------------------------------------------------------------------- checkpoints
def save_model(model: NoduleNet, path: Path | str, config: Mapping[str, Any]) -> None:
    """Write the weights as safetensors, with the architecture and ``config`` as JSON metadata.

    The file is written next to ``path`` and renamed into place, so a reader never sees half
    of it.

    Args:
        model: a network from ``build_model``.
        path: destination file (``.safetensors``).
        config: JSON-serialisable run configuration (loss, seed, data, ...); stored with the
            architecture under ``config["architecture"]``.
    """
    if not model.architecture:
        raise ValueError("save_model: the model has no architecture record; build it with build_model")
    if "architecture" in config and dict(config["architecture"]) != model.architecture:
        raise ValueError("save_model: config['architecture'] disagrees with the model's architecture")
    record = {"format": CHECKPOINT_FORMAT, "config": {**config, "architecture": model.architecture}}
    metadata = {_METADATA_KEY: json.dumps(record, sort_keys=True)}
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    write_safetensors(path, save_file, tensors, metadata)


def read_record(path: Path | str, fmt: str, what: str) -> dict[str, Any]:
    """The JSON record that nodulab stores in a safetensors file's metadata, format-checked.

    Raises:
        ValueError: not a safetensors file, no nodulab record, or another format than ``fmt``.
    """
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path}: not a safetensors file ({err})") from err
    if _METADATA_KEY not in metadata:
        raise ValueError(f"{path}: not a nodulab {what} (no {_METADATA_KEY!r} metadata)")
    try:
        record = json.loads(metadata[_METADATA_KEY])
    except (ValueError, RecursionError):
        raise ValueError(f"{path}: not a nodulab {what} (its {_METADATA_KEY!r} metadata is not JSON)") from None
    found = record.get("format") if isinstance(record, dict) else None
    if found != fmt:
        raise ValueError(f"{path}: unsupported {what} format {found!r}")
    return record


def read_checkpoint_config(path: Path | str) -> dict[str, Any]:
    """The config stored by ``save_model`` (``"architecture"`` included), without the weights."""
    return read_record(path, CHECKPOINT_FORMAT, "model checkpoint")["config"]


class ModelError(InputError):
    """A weights file whose recorded architecture is impossible or does not fit its tensors."""


MAX_WIDTH = 65_536
"""Largest ``embedding_dim`` / ``projection_dim`` a weights file may name (checked before anything is allocated)."""
_ARCHITECTURE = {
    "encoder": str,
    "spatial_dims": int,
    "embedding_dim": int,
    "projection_dim": int,
    "head": bool,
    "projector": bool,
    "stem": str,
}


def check_architecture(path: Path | str, architecture: Any) -> dict[str, Any]:
    """The architecture a weights file records, checked against its own tensors before allocating.

    The keys and types must be ``build_model``'s, the sizes within ``MAX_WIDTH``; then the network
    is built on the ``meta`` device (no memory) and every parameter's shape compared with the
    file's header.

    Raises:
        ModelError: one line naming the first key or tensor that does not fit.
    """
    if not isinstance(architecture, Mapping):
        raise ModelError(f"{path}: its architecture record is not a table")
    for key, value in architecture.items():
        if key not in _ARCHITECTURE or type(value) is not _ARCHITECTURE[key]:
            raise ModelError(f"{path}: architecture {key} = {value!r} is not a {build_model.__name__} setting")
    if architecture.get("encoder") not in ENCODERS or architecture.get("spatial_dims") not in (2, 3):
        raise ModelError(
            f"{path}: architecture names encoder {architecture.get('encoder')!r} in "
            f"{architecture.get('spatial_dims')!r} dimensions; nodulab builds {', '.join(ENCODERS)} in 2 or 3"
        )
    for key in ("embedding_dim", "projection_dim"):
        if not 1 <= architecture.get(key, 128) <= MAX_WIDTH:
            raise ModelError(f"{path}: architecture {key} = {architecture[key]} is outside 1..{MAX_WIDTH:,}")
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in build_model(**architecture).state_dict().items()}
    try:
        with safe_open(str(path), "pt") as handle:
            found = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as err:
        raise ModelError(f"{path}: not a safetensors file ({' '.join(str(err).split())})") from None
    for key in sorted(set(expected) | set(found)):
        if expected.get(key) != found.get(key):
            raise ModelError(
                f"{path}: tensor {key} is {found.get(key, 'missing')}, the recorded architecture needs "
                f"{expected.get(key, 'none')}"
            )
    return dict(architecture)


def load_model(path: Path | str, device: torch.device | str = "cpu") -> tuple[NoduleNet, dict[str, Any]]:
    """Rebuild a network from a ``save_model`` file and load its weights (strictly).

    Args:
        path: the safetensors file.
        device: where to put the network.

    Returns:
        ``(model, config)``: the network in eval mode and the stored config (with
        ``"architecture"``).
    """
    config = read_checkpoint_config(path)
    model = build_model(**check_architecture(path, config.get("architecture") if isinstance(config, dict) else None))
    model.load_state_dict(read_weights(path), strict=True)
    return model.to(device).eval(), config


def read_weights(path: Path | str) -> dict[str, torch.Tensor]:
    """The tensors of a weights file, every one finite (a trained network never holds NaN or inf:
    training stops when it diverges).

    Raises:
        ModelError: not a safetensors file, or a tensor with a NaN or infinite value (named).
    """
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ModelError(f"{path}: not a safetensors file ({' '.join(str(err).split())[:200]})") from None
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ModelError(f"{path}: tensor {key} holds NaN or infinite values (not trained weights)")
    return tensors
