"""Draw a split's factor table from a validated scenario (design.md "Scenarios").

Labels are stratified; each confound is drawn given the label (from the matching branch with
probability ``agreement``, recorded in ``agrees_<factor>``); every other factor from its own
distribution. Each column draws from its own stream keyed by name, so adding a factor leaves the
others unchanged; row seeds hash (dataset seed, split, index) alone, so they do not depend on ``n``.
"""

from __future__ import annotations

import hashlib
import math
import zlib

import numpy as np
import pandas as pd

from nodulab.synth.factors import FACTORS, Factor
from nodulab.synth.scenario import Choice, Normal, Scenario, ScenarioError, Uniform, factor_columns, normal_bounds
from nodulab.synth.scenarios import split_distributions


def _hash32(text: str) -> int:
    """Stable 32-bit hash of a name (unlike ``hash``, the same in every process)."""
    return zlib.crc32(text.encode("utf-8"))


def _stream(dataset_seed: int, split: str, key: str) -> np.random.Generator:
    """The generator for one key: a child of the split's seed sequence, keyed by name."""
    seq = np.random.SeedSequence([dataset_seed, _hash32(split)], spawn_key=(_hash32(key),))
    return np.random.Generator(np.random.PCG64(seq))


def _check_seed(dataset_seed: int) -> None:
    if not isinstance(dataset_seed, (int, np.integer)) or isinstance(dataset_seed, bool) or dataset_seed < 0:
        raise ValueError(f"dataset_seed: must be a non-negative integer (got {dataset_seed!r})")


def row_seeds(dataset_seed: int, split: str, start: int, stop: int) -> np.ndarray:
    """Render seeds of rows ``start..stop-1`` of a split.

    Each is a hash of (dataset seed, split, index) alone, so it does not depend on ``n``.

    Returns:
        ``int64`` array of shape ``(stop - start,)`` with values in ``[0, 2**63)``.
    """
    _check_seed(dataset_seed)
    if not 0 <= start <= stop:
        raise ValueError(f"row_seeds: need 0 <= start <= stop (got {start}, {stop})")
    prefix = f"nodulab/row-seed/v1/{int(dataset_seed)}/{split}/".encode()
    digests = b"".join(hashlib.blake2b(prefix + str(i).encode(), digest_size=8).digest() for i in range(start, stop))
    return (np.frombuffer(digests, dtype="<u8") >> np.uint64(1)).astype(np.int64)


_DTYPES = {"float": np.float64, "int": np.int64, "category": object}


def _draw(dist: object, factor: Factor, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` values of one factor from one distribution (already validated for it)."""
    dtype = _DTYPES[factor.kind]
    if isinstance(dist, Uniform):
        a, b = dist.uniform
        if factor.kind == "int":
            return rng.integers(a, b, size=n, endpoint=True, dtype=np.int64)
        return rng.uniform(a, b, size=n)
    if isinstance(dist, Choice):
        values = np.array(dist.choice, dtype=dtype)
        p = None if dist.weights is None else np.asarray(dist.weights) / sum(dist.weights)
        return values[rng.choice(len(values), size=n, p=p)]
    if isinstance(dist, Normal):
        return _draw_normal(dist, factor, n, rng)
    return np.full(n, dist, dtype=dtype)


def _draw_normal(dist: Normal, factor: Factor, n: int, rng: np.random.Generator) -> np.ndarray:
    """Truncated normal by vectorised rejection (int factors: rounded, then truncated)."""
    mu, sd = dist.normal
    lo, hi = normal_bounds(dist, factor)
    rounding = np.rint if factor.kind == "int" else (lambda x: x)
    x = rounding(rng.normal(mu, sd, size=n))
    for _ in range(1000):  # acceptance >= ~0.5 per round since mu lies inside the bounds
        bad = (x < lo) | (x > hi)
        if not bad.any():
            break
        x[bad] = rounding(rng.normal(mu, sd, size=int(bad.sum())))
    x = np.clip(x, math.ceil(lo), math.floor(hi)) if factor.kind == "int" else np.clip(x, lo, hi)
    return x.astype(_DTYPES[factor.kind])


def _labels(n: int, malignant_rate: float | None, rng: np.random.Generator) -> np.ndarray:
    n_malignant = (n + 1) // 2 if malignant_rate is None else math.floor(n * malignant_rate + 0.5)
    label = np.zeros(n, dtype=np.int64)
    label[:n_malignant] = 1
    return rng.permutation(label)


def sample_split(s: Scenario, split: str, dataset_seed: int) -> pd.DataFrame:
    """Draw the factor table of one split.

    Args:
        s: A validated scenario.
        split: A key of ``s.splits``.
        dataset_seed: Non-negative integer; same inputs give an identical frame.

    Returns:
        ``n`` rows indexed ``0..n-1``; columns ``label``, the scenario's factor columns
        (``scenarios.factor_columns``: ``FACTOR_COLUMNS`` and the opted-in optional ones), ``agrees_<factor>``
        (0/1) per confound in scenario order, then ``seed`` (int64); a ``[source]`` scenario's
        rows take their mapped factors from their real twins and add ``twins.TWIN_COLUMNS``.
    """
    if split not in s.splits:
        raise ScenarioError(f"splits.{split}: no such split (splits: {', '.join(s.splits)})")
    _check_seed(dataset_seed)
    spec, n = s.splits[split], s.splits[split].n
    label = _labels(n, spec.malignant_rate, _stream(dataset_seed, split, "label"))
    columns: dict[str, np.ndarray] = {"label": label}
    agrees: dict[str, np.ndarray] = {}
    confounds = {c.factor: c for c in s.confounds}
    names = factor_columns(s)
    for name in names:
        factor, rng = FACTORS[name], _stream(dataset_seed, split, name)
        if name == s.label.factor:
            benign = _draw(Choice(choice=tuple(s.label.benign)), factor, n, rng)
            columns[name] = np.where(label == 1, np.array(s.label.malignant, dtype=object), benign)
        elif name in confounds:
            c = confounds[name]
            p = spec.agreement if isinstance(spec.agreement, float) else spec.agreement[name]
            agree = _stream(dataset_seed, split, f"agrees_{name}").random(n) < p
            malignant, benign = _draw(c.malignant, factor, n, rng), _draw(c.benign, factor, n, rng)
            columns[name] = np.where((label == 1) == agree, malignant, benign)
            agrees[f"agrees_{name}"] = agree.astype(np.int64)
        else:
            columns[name] = _draw(split_distributions(s, split, name)[0], factor, n, rng)
    columns.update(agrees)
    columns["seed"] = row_seeds(dataset_seed, split, 0, n)
    frame = pd.DataFrame(columns, columns=["label", *names, *agrees, "seed"])
    if s.source is not None:
        from nodulab.synth import twins

        frame = twins.draw(s, split, frame, lambda key: _stream(dataset_seed, split, key))
    return frame
