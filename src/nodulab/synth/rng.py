"""The counter-based random scheme shared by every device (versioned as ``RNG_SCHEME``).

A random number is a hash of (row seed, stream, element, draw, ...), never the state of a
generator, so a sample's numbers do not depend on which other samples share its batch, and CPU
and CUDA draw the same bits. The hash is ``lowbias32`` (C. Wellons' hash-prospector constants),
chained over the keys; per-row draws run in numpy uint64, per-pixel noise in torch int32 with
wrapping products (the same bits, tested against the uint64 path).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

RNG_SCHEME = "lowbias32-xor/v1"
"""Version of the counter-based random scheme; stored in ``dataset.json``."""

_M32 = 0xFFFFFFFF
BLOCK_ELEMENTS = 1 << 20
"""Elements per block of the per-pixel hash; the result never depends on it."""


def mix32(x: Any) -> Any:
    """lowbias32 integer hash on values < 2**32 (numpy uint64 or torch int64; no overflow)."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _M32
    return x ^ (x >> 15)


def hash_keys(seeds: np.ndarray, *keys: Any) -> np.ndarray:
    """Hash of (row seed, key, key, ...); seeds int64 in [0, 2**63); broadcasts over keys."""
    s = seeds.astype(np.uint64)
    h = mix32((s & np.uint64(_M32)) ^ np.uint64(0x9E3779B9))
    h = mix32(h ^ (s >> np.uint64(32)))
    for key in keys:
        h = mix32(h ^ np.asarray(key, dtype=np.uint64))
    return h


def uniform(seeds: np.ndarray, stream: int, view: int, n_elem: int, n_draw: int) -> np.ndarray:
    """U(0, 1) draws of shape (N, n_elem, n_draw): element k of a stream has its own sub-seed."""
    k = np.arange(n_elem, dtype=np.uint64)[None, :, None]
    j = np.arange(n_draw, dtype=np.uint64)[None, None, :]
    h = hash_keys(seeds[:, None, None], stream, view, k, j)
    return (h.astype(np.float64) + 0.5) / 2.0**32


def mix32_int32(x: torch.Tensor) -> torch.Tensor:
    """``mix32`` on int32 tensors with wrapping products (the same bits, about 10x faster)."""
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * _as_int32(0x21F0AAAD)
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * _as_int32(0x735A2D97)
    return x ^ ((x >> 15) & 0x1FFFF)


def _as_int32(value: int) -> int:
    """The int32 with the same 32 bits as ``value``."""
    return value - (1 << 32) if value >= (1 << 31) else value


def white_noise_pair(base: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independent unit-variance white-noise fields from one 32-bit hash per pixel.

    Each field is the sum of two 8-bit uniforms (a triangular law) scaled to SD 1; it becomes
    Gaussian once blurred by the texture or PSF kernel.

    Args:
        base: per-row stream hash, int32, shape (N,).
        index: absolute pixel index (< 2**30), int32, shape (*grid).

    Returns:
        Two float32 tensors of shape (N, *grid).
    """
    flat = index.reshape(1, -1)
    texture = torch.empty((len(base), flat.shape[1]), device=base.device)
    noise = torch.empty_like(texture)
    scale, shift = math.sqrt(6.0) / 256.0, math.sqrt(6.0)
    # Rows in blocks of about BLOCK_ELEMENTS: the chain of integer ops then stays in cache.
    for rows in torch.split(torch.arange(len(base), device=base.device), max(1, BLOCK_ELEMENTS // flat.shape[1])):
        first, last = int(rows[0]), int(rows[-1]) + 1
        h = mix32_int32(base[first:last, None] ^ flat)
        # SWAR: one add sums bytes 0+1 into the low half-word and bytes 2+3 into the high one.
        pairs = (h & 0x00FF00FF).add_((h >> 8) & 0x00FF00FF)
        texture[first:last] = (pairs & 0xFFFF).to(torch.float32).add_(1.0).mul_(scale).sub_(shift)
        noise[first:last] = (pairs >> 16).to(torch.float32).add_(1.0).mul_(scale).sub_(shift)
    grid = (-1,) + tuple(index.shape)
    return texture.view(grid), noise.view(grid)
