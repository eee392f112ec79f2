"""What every explanation stage shares: the predict callable and the context a table writer gets."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from nodulab.synth.scenario import Scenario
from nodulab.training.runs import LoadedRun

Predict = Callable[[np.ndarray], dict[str, np.ndarray]]
"""HU images ``(N, *S)`` int16 -> ``{classifier: (N,) P(malignant)}``."""


@dataclass
class ExplainContext:
    """What an extra table writer gets: the run, the dataset, the splits and the tables so far."""

    run: LoadedRun
    data_dir: Path
    manifest: dict[str, Any]
    scenario: Scenario | None
    """The dataset's scenario; ``None`` for a real dataset (no counterfactual switches)."""
    splits: list[str]
    n: int | None
    predict: Predict
    device: str
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)
    """``explain.json``; a writer may add its own entry."""


Writer = Callable[[ExplainContext, Path], None]
"""A table writer: called with the context and the temporary ``explain/`` folder."""
