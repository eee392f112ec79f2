"""Shared helpers: factor rows built directly (no scenario), file snapshots, the one-line-error and file-mode checks."""

from __future__ import annotations

import stat
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import strategies as st

from nodulab.synth.factors import FACTORS, Factor

SEED = st.integers(0, 2**63 - 1)
"""Any valid row seed."""


def factor_strategy(factor: Factor) -> st.SearchStrategy:
    """A factor's whole valid range: floats and ints from ``low`` to ``high``, categories from ``choices``."""
    if factor.kind == "float":
        return st.floats(factor.low, factor.high)
    if factor.kind == "int":
        return st.integers(int(factor.low), int(factor.high))
    return st.sampled_from(factor.choices)


def row_strategies(table: Mapping[str, Factor] = FACTORS, *, optional: bool = False) -> dict[str, st.SearchStrategy]:
    """Strategies for one row of ``table``, in table order, then ``seed``: every factor the
    renderer requires, and the opt-in ones too with ``optional``."""
    chosen = {name: factor_strategy(f) for name, f in table.items() if optional or not f.optional}
    return {**chosen, "seed": SEED}


VALID_ROW = row_strategies()
"""Hypothesis strategies for one row of every required factor over its valid range (design.md
"Factors of variation")."""


def make_rows(n: int, seed: int = 0, dim: int = 2, **fixed) -> pd.DataFrame:
    """``n`` valid rows drawn from the defaults (design.md "Factors of variation"); keyword arguments fix a column."""
    rng = np.random.default_rng(seed)
    rows = pd.DataFrame(
        {
            "label": rng.integers(0, 2, n),
            "shape": rng.choice(["round", "lobulated", "spiculated"], n),
            "lobulation": rng.uniform(0.05, 0.2, n),
            "n_spicules": rng.integers(6, 17, n),
            "spicule_length_rel": rng.uniform(0.4, 1.0, n),
            "spicule_width_mm": rng.uniform(0.5, 1.0, n),
            "diameter_mm": rng.uniform(6, 18, n),
            "attenuation": rng.choice(["ground_glass", "part_solid", "solid"], n),
            "solid_fraction": rng.uniform(0.3, 0.7, n),
            "margin_sigma_mm": rng.uniform(0.2, 0.8, n),
            "vessels": rng.integers(0, 4, n),
            "noise_hu": rng.uniform(10, 30, n),
            "kernel_fwhm_mm": rng.uniform(0.6, 1.2, n),
            "pixel_mm": np.full(n, 0.7 if dim == 2 else 1.4),
            "offset_x_mm": rng.uniform(-3, 3, n),
            "offset_y_mm": rng.uniform(-3, 3, n),
            "offset_z_mm": rng.uniform(-3, 3, n) if dim == 3 else np.zeros(n),
            "rotation_deg": rng.uniform(0, 360, n),
            "seed": rng.integers(0, 2**62, n),
        }
    )
    for key, value in fixed.items():
        rows[key] = value
    return rows


@pytest.fixture
def rows_2d() -> pd.DataFrame:
    return make_rows(24, seed=1)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny tensors: one intra-op thread avoids OpenMP barriers that cost more than the arithmetic."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session", autouse=True)
def bulk_rendering_allocator() -> None:
    """The suite renders in bulk, like ``nodulab generate``: opt in to glibc's faster setting."""
    from nodulab.synth.renderer import keep_freed_tensors_mapped

    keep_freed_tensors_mapped()


def file_tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` by relative path, with its bytes (to show nothing changed)."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_one_line_error(result: Any, *fragments: str, code: int = 2) -> None:
    """A CLI result that printed exactly one line, ``error: ...`` containing ``fragments``."""
    assert result.exit_code == code, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def assert_modes(folder: Path, umask: int) -> None:
    """Every file and folder under ``folder`` has the mode the umask gives a plain create."""
    paths = list(folder.rglob("*"))
    assert any(p.name == "model.safetensors" for p in paths)
    for path in paths:
        expected = (0o777 if path.is_dir() else 0o666) & ~umask
        assert stat.S_IMODE(path.stat().st_mode) == expected, path


def as_from_a_terminal() -> None:
    """``preexec_fn`` of a child that a test interrupts with SIGINT: Ctrl-C's default action restored.

    A process started in the background of a non-interactive shell (CI run with ``&`` or ``nohup``)
    inherits SIGINT ignored, and Python keeps an inherited ignore, as Unix programs should; a test
    of what Ctrl-C does must start its child as a terminal would.
    """
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
