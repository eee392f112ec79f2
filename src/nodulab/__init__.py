"""nodulab: synthetic lung-nodule CT with controlled factors; one encoder, many losses; what each learned.

The main verbs, loaded on first use (``import nodulab`` stays fast and imports no torch)::

    import nodulab
    scenario = nodulab.load_scenario("size-confound", n=400, size=32, pixel_mm=1.4)
    nodulab.generate(scenario, "data/sc")
    run = nodulab.train("data/sc", "runs/ce", loss="ce", epochs=5)
    nodulab.evaluate(run, "data/sc")                       # metrics.csv, groups.csv
    nodulab.dynamics(run, "data/sc")                       # dynamics.csv: the checkpoints scored
    tables = nodulab.explain(run, "data/sc", splits=["test_conflict"])   # reliance, sweep, cue, ...
    nodulab.run_study(nodulab.load_study("quick"), "studies/quick")        # the grid, store, report

Modules are named after what they hold (``renderer``, ``training``, ``explanation``), never after
a verb above, so importing a module never rebinds a verb.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = {
    "render": ("nodulab.synth.renderer", "render"),
    "load_scenario": ("nodulab.synth.scenarios", "load_scenario"),
    "generate": ("nodulab.data.dataset", "generate"),
    "load_split": ("nodulab.data.dataset", "load_split"),
    "NoduleDataset": ("nodulab.data.dataset", "NoduleDataset"),
    "train": ("nodulab.training.loop", "train"),
    "evaluate": ("nodulab.training.evaluation", "evaluate_run"),
    "load_run": ("nodulab.training.runs", "load_run"),
    "explain": ("nodulab.explanation.run", "explain_run"),
    "dynamics": ("nodulab.explanation.dynamics", "dynamics_run"),
    "explain_split": ("nodulab.explanation.counterfactual", "explain_split"),
    "factor_probes": ("nodulab.explanation.probes", "factor_probes"),
    "cam_table": ("nodulab.explanation.cam", "cam_table"),
    "gradcam": ("nodulab.explanation.cam", "gradcam"),
    "load_study": ("nodulab.studies.config", "load_study"),
    "run_study": ("nodulab.studies.driver", "run_study"),
    "write_report": ("nodulab.results.report", "write_report"),
    "compare_realism": ("nodulab.data.realism", "compare"),
    "lidc_table": ("nodulab.synth.lidc", "load_table"),
    "lidc_contours": ("nodulab.synth.lidc", "load_contours"),
    "import_lidc": ("nodulab.data.lidc_import", "import_lidc"),
}
"""Public verb -> (module, attribute); each is imported on first access."""

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'nodulab' has no attribute {name!r}")
    module, attribute = _API[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
