"""Study definitions (design.md "Study, store, report"): the grid scenarios × losses × seeds × tuning draws, validated.

A study is a preset (``presets/studies/*.toml``, listed by ``nodulab studies``) or a TOML file::

    name = "quick"
    description = "..."
    scenarios = ["clean", "size-confound"]   # preset names or scenario TOML paths (relative to this file)
    losses = ["ce", "supcon", "simclr"]      # or "all": every registered loss, in registry order
    seeds = 3                                # training seeds 0, 1, 2
    scenario_losses = { clean = ["ce"] }     # optional: fewer losses for a scenario

    [data]                                   # one dataset per scenario, shared by its runs
    seed = 0
    dim = 2
    size = 32
    pixel_mm = 1.4
    n = { train = 1500, val = 500, test = 500 }   # or one number; "test" = every test_* split

    [train]
    encoder = "small-cnn"
    epochs = 8
    batch_size = 128
    views = "both"
    threads = 2                              # per run, whatever --jobs or the executor

    [tuning]
    budget = 1                               # draws per (scenario, loss, seed); 1 = the defaults

    [explain]
    splits = ["test_*conflict"]              # names or shell patterns; none = no explain
    n = 300                                  # rows per split (default all)

Validation is pydantic's, like scenarios': one line naming the key, ``StudyError``. Losses are
checked against the loss registry (``nodulab.training.hparams``) when a study is validated;
``losses = "all"`` is resolved then to the registry's list, which is what the study records and
hashes (a study that lists the same losses in the same order has the same hash).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from nodulab.common.choices import DEFAULT_EPOCHS, ENCODERS, MAX_N, VIEWS
from nodulab.synth.scenario import Scenario, ScenarioError, is_split_name, one_line
from nodulab.synth.scenarios import load_scenario, load_scenario_dict, parse_toml, read_limited, scenario_to_dict
from nodulab.training import hparams

MAX_SEEDS = 100
MAX_BUDGET = 100
_MODEL = ConfigDict(extra="forbid", strict=True, frozen=True)


class StudyError(ValueError):
    """An invalid study: unknown preset, bad TOML, unknown loss or scenario, bad number."""


class DataSettings(BaseModel):
    model_config = _MODEL
    seed: int = Field(0, ge=0)
    dim: int | None = Field(None, ge=2, le=3)
    size: int | None = Field(None, ge=1)
    pixel_mm: float | None = None
    n: int | dict[str, int] | None = None

    @field_validator("n")
    @classmethod
    def _check_n(cls, n: int | dict[str, int] | None) -> int | dict[str, int] | None:
        for key, value in n.items() if isinstance(n, dict) else [("", n)] if n is not None else []:
            if key and key != "test" and not is_split_name(key):
                raise ValueError(f"unknown split {key!r} (a split name, or 'test' for every test_* split)")
            if not 1 <= value <= MAX_N:
                raise ValueError(f"{key or 'n'} must be 1..{MAX_N:,}, got {value}")
        return n


class TrainSettings(BaseModel):
    model_config = _MODEL
    encoder: str = "small-cnn"
    epochs: int = Field(DEFAULT_EPOCHS, ge=1)
    batch_size: int = Field(128, ge=2)
    views: str = "both"
    threads: int = Field(1, ge=1, le=256)

    @model_validator(mode="after")
    def _check(self) -> TrainSettings:
        if self.encoder not in ENCODERS:
            raise ValueError(f"encoder: must be one of {', '.join(ENCODERS)}, got {self.encoder!r}")
        if self.views not in VIEWS:
            raise ValueError(f"views: must be one of {', '.join(VIEWS)}, got {self.views!r}")
        return self


class TuningSettings(BaseModel):
    model_config = _MODEL
    budget: int = Field(1, ge=1, le=MAX_BUDGET)


class ExplainSettings(BaseModel):
    model_config = _MODEL
    splits: list[str] = []
    n: int | None = Field(None, ge=1, le=MAX_N)


ALL_LOSSES = "all"
"""``losses = "all"``: every loss of the registry, in its order."""


def _check_losses(values: list[str], where: str) -> None:
    known = hparams.names()  # read now, not at import: a loss registered later is accepted
    for loss in values:
        if loss not in known:
            raise ValueError(f"{where}: unknown loss {loss!r}; choose from {', '.join(known)}")
    if len(set(values)) != len(values):
        raise ValueError(f"{where}: a loss is listed twice")


class StudyModel(BaseModel):
    """The study file as written (scenarios not yet loaded)."""

    model_config = _MODEL
    name: str
    description: str = ""
    scenarios: list[str] = Field(min_length=1)
    losses: list[str] = Field(min_length=1)
    seeds: int = Field(ge=1, le=MAX_SEEDS)
    scenario_losses: dict[str, list[str]] = {}
    data: DataSettings = DataSettings()
    train: TrainSettings = TrainSettings()
    tuning: TuningSettings = TuningSettings()
    explain: ExplainSettings = ExplainSettings()

    @field_validator("losses", mode="before")
    @classmethod
    def _all_losses(cls, losses: Any) -> Any:
        if isinstance(losses, str):
            if losses != ALL_LOSSES:
                raise ValueError(f'a list of loss names, or "{ALL_LOSSES}", got {losses!r}')
            return hparams.names()
        return losses

    @model_validator(mode="after")
    def _check(self) -> StudyModel:
        if not self.name.strip():
            raise ValueError("name: must not be empty")
        _check_losses(self.losses, "losses")
        for scenario, chosen in self.scenario_losses.items():
            _check_losses(chosen, f"scenario_losses.{scenario}")
        return self


@dataclass(frozen=True)
class Study:
    """A validated study: its settings, every scenario resolved, and the hash that names it."""

    model: StudyModel
    scenarios: dict[str, Scenario]
    sha256: str
    sources: tuple[Path, ...] = ()
    """The files it was read from (the study file, scenario files): a study never writes over them."""

    @property
    def name(self) -> str:
        return self.model.name

    def losses(self, scenario: str) -> list[str]:
        return list(self.model.scenario_losses.get(scenario, self.model.losses))

    def explain_splits(self, scenario: str) -> list[str]:
        """The scenario's splits that match ``[explain] splits`` (test splits only)."""
        names = [s for s in self.scenarios[scenario].splits if s.startswith("test_")]
        return [s for s in names if any(fnmatch.fnmatchcase(s, p) for p in self.model.explain.splits)]

    def planned_runs(self) -> int:
        m = self.model
        return sum(len(self.losses(s)) for s in self.scenarios) * m.seeds * m.tuning.budget

    def record(self) -> dict[str, Any]:
        """JSON form: the settings, every resolved scenario (what the hash covers), the grid's size."""
        return {
            "study": self.model.model_dump(mode="json"),
            "budget": self.model.tuning.budget,
            "planned_runs": self.planned_runs(),
            "scenarios": {name: scenario_to_dict(s) for name, s in self.scenarios.items()},
        }


def _split_sizes(scenario: Scenario, n: int | dict[str, int] | None) -> dict[str, int]:
    if n is None:
        return {}
    if isinstance(n, int):
        return dict.fromkeys(scenario.splits, n)
    sizes = {s: n["test"] for s in scenario.splits if s.startswith("test_") and "test" in n}
    return sizes | {s: v for s, v in n.items() if s in scenario.splits}


def _scenario_path(entry: str, base: Path | None) -> Path | str:
    """A scenario entry as ``load_scenario`` takes it: a path relative to ``base``, or a preset name."""
    return base / entry if base is not None and (entry.endswith(".toml") or "/" in entry) else entry


def _resolve_scenario(entry: str, base: Path | None, data: DataSettings, where: str) -> Scenario:
    try:
        scenario = load_scenario(_scenario_path(entry, base), dim=data.dim, size=data.size, pixel_mm=data.pixel_mm)
        sizes = _split_sizes(scenario, data.n)
        if not sizes:
            return scenario
        d = scenario_to_dict(scenario)
        d["splits"] = {name: {**split, "n": sizes.get(name, split["n"])} for name, split in d["splits"].items()}
        return load_scenario_dict(d)
    except ScenarioError as error:
        raise StudyError(f"{where}: {error}") from None


def study_from_dict(d: dict[str, Any], base: Path | None = None, source: Path | None = None) -> Study:
    """Validate a study from its parsed TOML; scenario paths are relative to ``base``; ``source`` is its file."""
    if not isinstance(d, dict):
        raise StudyError(f"a study is a table of keys (got {type(d).__name__})")
    try:
        model = StudyModel.model_validate(d)
    except ValidationError as error:
        raise StudyError(one_line(error)) from None
    scenarios: dict[str, Scenario] = {}
    for i, entry in enumerate(model.scenarios):
        scenario = _resolve_scenario(entry, base, model.data, f"scenarios[{i}]")
        if scenario.name in scenarios:
            raise StudyError(f"scenarios[{i}]: a second scenario named {scenario.name!r}")
        scenarios[scenario.name] = scenario
    for name in model.scenario_losses:
        if name not in scenarios:
            raise StudyError(f"scenario_losses.{name}: not a scenario of this study ({', '.join(scenarios)})")
    partial = Study(model, scenarios, "")
    digest = hashlib.sha256(json.dumps(partial.record(), sort_keys=True).encode()).hexdigest()
    files = [p for p in (_scenario_path(e, base) for e in model.scenarios) if isinstance(p, Path) or Path(p).is_file()]
    sources = tuple(Path(p) for p in ([source] if source else []) + files)
    return Study(model, scenarios, digest, sources)


def _presets() -> Any:
    return resources.files("nodulab") / "presets" / "studies"


def preset_names() -> list[str]:
    """The studies shipped with nodulab, sorted."""
    return sorted(p.name[: -len(".toml")] for p in _presets().iterdir() if p.name.endswith(".toml"))


def _read(text: bytes | Path, where: str) -> dict[str, Any]:
    try:
        return parse_toml(text if isinstance(text, bytes) else read_limited(text, "study"), where)
    except ScenarioError as error:
        raise StudyError(str(error)) from None


def load_study(name_or_path: str | Path) -> Study:
    """A preset study by name, or a study TOML file by path (at most 1 MiB)."""
    text = str(name_or_path)
    if not isinstance(name_or_path, Path) and text in preset_names():
        d = _read((_presets() / f"{text}.toml").read_bytes(), f"study preset {text}")
        d.setdefault("name", text)
        return study_from_dict(d)
    path = Path(name_or_path)
    if not path.is_file():
        if isinstance(name_or_path, Path) or path.suffix or "/" in text or path.exists():
            raise StudyError(f"{text}: no such study file")
        raise StudyError(f"{text}: unknown study preset (presets: {', '.join(preset_names())}; or a .toml path)")
    d = _read(path, str(path))
    d.setdefault("name", path.stem)
    return study_from_dict(d, base=path.parent, source=path)


def list_presets() -> list[tuple[str, str]]:
    """``(name, description)`` of every preset study, for ``nodulab studies``."""
    return [(name, load_study(name).model.description) for name in preset_names()]
