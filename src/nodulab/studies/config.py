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
    n = { train = 1500, val = 500, test = 500 }   # or one number; "test" = every test_* split;
                                             # train may be a list: one budget cell per value

    [train]
    encoder = "small-cnn"
    epochs = 8                               # or a list: one budget cell per value
    batch_size = 128                         # 2..65,536
    views = "both"
    threads = 2                              # 1..256 per run, whatever --jobs or the executor
    checkpoints = [1, 2, 4]                  # epochs whose weights the dynamics stage scores
                                             # (default: 1, 2, 4, ... below epochs); the last
                                             # epoch is always added

    [tuning]
    budget = 1                               # draws per (scenario, loss, seed); 1 = the defaults

    [explain]
    splits = ["test_*conflict"]              # names or shell patterns; none = no explain
    n = 300                                  # rows per split (default all)
    dynamics_n = 200                         # conflict rows the dynamics stage switches

    [ceilings]                               # each confounded scenario's matched ceiling
    size-confound = "clean"

    [hypotheses]                             # the primary comparisons, declared before running
    comparisons = ["size-confound/test_conflict"]   # scenario/test split
    reference = "ce"                         # each loss against this one
    readout = "own"                          # own (head, else probe) | probe | dfr

    [real]                                   # optional: score every run on real nodules too
    dataset = "lidc-64"                      # a dataset ``nodulab import-lidc`` wrote (relative to this file)

**Budget cells.** Every (``n.train``, ``epochs``) pair is a cell of the grid with its own seeds,
datasets and ceiling (``Study.cells``); a study with scalars has one cell.

**Matched ceilings** (``Study.ceilings``). A confounded scenario's ceiling is a scenario of the
study without confounds, named in ``[ceilings]``; with exactly one confound-free synthetic
scenario in the study it is implied, with several and none named the study is refused. A
``[source]`` scenario's ceiling is the scenario drawing from the same table with its confounds
broken in training (``lidc`` -> ``lidc-balanced``). The ceiling must differ from the confounded
scenario only in its confounds: the same label rule, image geometry and, for every other factor,
the same training distribution (a mismatch is refused, naming the factor). The ceiling's runs are
scored on the confounded scenario's own test splits (the same images), so the gap is read on them.

Validation is pydantic's, like scenarios': one line naming the key, ``StudyError``. Losses are
checked against the loss registry (``nodulab.training.hparams``) when a study is validated;
``losses = "all"`` is resolved then to the registry's list, which is what the study records and
hashes (a study that lists the same losses in the same order has the same hash).

**Hashes.** ``Study.sha256`` hashes the whole record (``Study.record``): settings, resolved
scenarios, the grid's size. ``Study.identity`` hashes the same record without the seed count
(``seeds`` and ``planned_runs``): it names the study's results store, so a study resumed with more
(or fewer) seeds (``nodulab study --seeds N``, or ``seeds`` edited) keeps its store and reruns
nothing recorded (a run's key holds its seed, never the seed count), while a change in any other
setting is a new study.

**Real nodules** (``[real]``, ``Study.real``). ``dataset`` names a real dataset folder (``nodulab
import-lidc``; a relative path is read from the study file's folder, an absolute one as it is).
It is checked when the study is loaded, before any run: a real nodulab dataset
(``dataset.is_real``) with rows in ``test_lidc`` and the image geometry (dim, size, pixel_mm) of
every scenario of the study (a mismatch names the scenario and what differs). It is outside both
hashes: adding, changing or removing it never renames the store nor refuses a resume; it only
decides which real dataset the study scores its runs on (``studies.driver``).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator

from nodulab.common.choices import DEFAULT_EPOCHS, ENCODERS, MAX_BATCH_SIZE, MAX_EPOCHS, MAX_N, MAX_THREADS, VIEWS
from nodulab.common.errors import InputError
from nodulab.common.tables import REAL_SPLITS
from nodulab.synth.factors import FACTORS
from nodulab.synth.scenario import Scenario, ScenarioError, is_split_name, one_line, source_mode
from nodulab.synth.scenarios import (
    load_scenario,
    load_scenario_dict,
    parse_toml,
    read_limited,
    scenario_to_dict,
    split_distributions,
)
from nodulab.training import hparams

MAX_SEEDS = 100
Seeds = Annotated[int, Field(ge=1, le=MAX_SEEDS)]
"""A study's seed count (``seeds``; ``--seeds`` is validated by the same rule)."""
MAX_BUDGET = 100
MAX_CELLS = 16
"""Most budget cells (``n.train`` values x ``epochs`` values) a study may have."""
DYNAMICS_N = 200
"""Conflict rows the dynamics stage re-renders under each switch, by default."""
_MODEL = ConfigDict(extra="forbid", strict=True, frozen=True)


class StudyError(InputError):
    """An invalid study: unknown preset, bad TOML, unknown loss or scenario, bad number."""


class DataSettings(BaseModel):
    model_config = _MODEL
    seed: int = Field(0, ge=0)
    dim: int | None = Field(None, ge=2, le=3)
    size: int | None = Field(None, ge=1)
    pixel_mm: float | None = None
    n: int | dict[str, int | list[int]] | None = None

    @field_validator("n")
    @classmethod
    def _check_n(cls, n: int | dict[str, int | list[int]] | None) -> int | dict[str, int | list[int]] | None:
        for key, value in n.items() if isinstance(n, dict) else [("", n)] if n is not None else []:
            if key and key != "test" and not is_split_name(key):
                raise ValueError(f"unknown split {key!r} (a split name, or 'test' for every test_* split)")
            if isinstance(value, list) and key != "train":
                raise ValueError(f"n.{key}: only n.train may be a list (one budget cell per value)")
            for v in _values(value, f"n.{key}" if key else "n"):
                if not 1 <= v <= MAX_N:
                    raise ValueError(f"{key or 'n'} must be 1..{MAX_N:,}, got {v}")
        return n

    def train_sizes(self) -> list[int | None]:
        """The ``n.train`` values (``[None]``: the scenario's own size), one budget cell each."""
        if isinstance(self.n, dict) and "train" in self.n:
            value = self.n["train"]
            return list(value) if isinstance(value, list) else [value]
        return [self.n] if isinstance(self.n, int) else [None]


def _values(value: int | list[int], where: str) -> list[int]:
    """A scalar or a list of distinct values (one budget cell each)."""
    if not isinstance(value, list):
        return [value]
    if not value:
        raise ValueError(f"{where}: an empty list")
    if len(set(value)) != len(value):
        raise ValueError(f"{where}: a value is listed twice")
    return value


class TrainSettings(BaseModel):
    model_config = _MODEL
    encoder: str = "small-cnn"
    epochs: int | list[int] = DEFAULT_EPOCHS
    batch_size: int = Field(128, ge=2, le=MAX_BATCH_SIZE)
    views: str = "both"
    threads: int = Field(1, ge=1, le=MAX_THREADS)
    checkpoints: list[int] | None = None

    @model_validator(mode="after")
    def _check(self) -> TrainSettings:
        for epochs in _values(self.epochs, "epochs"):
            if not 1 <= epochs <= MAX_EPOCHS:
                raise ValueError(f"epochs must be 1..{MAX_EPOCHS:,}, got {epochs}")
        for k in self.checkpoints or []:
            if not 1 <= k <= max(self.epoch_values()):
                raise ValueError(f"checkpoints: {k} is not an epoch of the study (1..{max(self.epoch_values())})")
        if self.encoder not in ENCODERS:
            raise ValueError(f"encoder: must be one of {', '.join(ENCODERS)}, got {self.encoder!r}")
        if self.views not in VIEWS:
            raise ValueError(f"views: must be one of {', '.join(VIEWS)}, got {self.views!r}")
        return self

    def epoch_values(self) -> list[int]:
        return list(self.epochs) if isinstance(self.epochs, list) else [self.epochs]

    def checkpoints_for(self, epochs: int) -> list[int]:
        """The epochs whose weights a run of ``epochs`` saves: ``checkpoints`` up to it (default
        1, 2, 4, ... below it), and the last epoch."""
        from nodulab.training.loop import default_checkpoints

        if self.checkpoints is None:
            return list(default_checkpoints(epochs))
        return sorted({k for k in self.checkpoints if k <= epochs} | {epochs})


class TuningSettings(BaseModel):
    model_config = _MODEL
    budget: int = Field(1, ge=1, le=MAX_BUDGET)


class ExplainSettings(BaseModel):
    model_config = _MODEL
    splits: list[str] = []
    n: int | None = Field(None, ge=1, le=MAX_N)
    dynamics_n: int = Field(DYNAMICS_N, ge=1, le=MAX_N)


READOUT_MODES = ("own", "probe", "dfr")
"""How a declared comparison reads each loss (``results.comparisons.READOUTS``)."""


class HypothesesSettings(BaseModel):
    """``[hypotheses]``: the primary comparisons, declared before the study runs."""

    model_config = _MODEL
    comparisons: list[str] = []
    reference: str = "ce"
    readout: str = "own"

    @model_validator(mode="after")
    def _check(self) -> HypothesesSettings:
        if self.readout not in READOUT_MODES:
            raise ValueError(f"readout: one of {', '.join(READOUT_MODES)}, got {self.readout!r}")
        if len(set(self.comparisons)) != len(self.comparisons):
            raise ValueError("comparisons: an entry is listed twice")
        for entry in self.comparisons:
            if entry.count("/") != 1 or not all(entry.split("/")):
                raise ValueError(f"comparisons: {entry!r} is not 'scenario/split'")
        return self


class RealSettings(BaseModel):
    """``[real]``: the real dataset every run is also scored on (outside the study's hashes)."""

    model_config = _MODEL
    dataset: str

    @field_validator("dataset")
    @classmethod
    def _check_dataset(cls, dataset: str) -> str:
        if not dataset.strip():
            raise ValueError("must name a dataset folder")
        return dataset


REAL_SPLIT = REAL_SPLITS[0]
"""The split of a real dataset a study scores its runs on (``nodulab import-lidc``'s held-out patients)."""


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
    seeds: Seeds
    scenario_losses: dict[str, list[str]] = {}
    data: DataSettings = DataSettings()
    train: TrainSettings = TrainSettings()
    tuning: TuningSettings = TuningSettings()
    explain: ExplainSettings = ExplainSettings()
    ceilings: dict[str, str] = {}
    hypotheses: HypothesesSettings = HypothesesSettings()
    real: RealSettings | None = None

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
        cells = len(self.data.train_sizes()) * len(self.train.epoch_values())
        if cells > MAX_CELLS:
            raise ValueError(f"n.train x epochs makes {cells} budget cells; at most {MAX_CELLS}")
        return self


@dataclass(frozen=True)
class Cell:
    """One budget cell: training rows (``None``: the scenario's own) and epochs."""

    n_train: int | None
    epochs: int

    @property
    def label(self) -> str:
        """``n=1000,epochs=6`` (``epochs=6`` when the scenarios keep their own size): the store's ``budget``."""
        return f"n={self.n_train},epochs={self.epochs}" if self.n_train is not None else f"epochs={self.epochs}"


@dataclass(frozen=True)
class Study:
    """A validated study: its settings, every scenario resolved, and its hashes (module doc, "Hashes")."""

    model: StudyModel
    scenarios: dict[str, Scenario]
    sha256: str
    """The hash of the whole ``record()``, seed count included."""
    identity: str
    """The hash of ``record()`` without the seed count (``identity_of``): what names the study's store."""
    sources: tuple[Path, ...] = ()
    """The files it was read from (the study file, scenario files): a study never writes over them."""
    ceilings: dict[str, str] = field(default_factory=dict)
    """Each confounded scenario's matched ceiling (a scenario of the study), when it has one."""
    sized: dict[tuple[str, int | None], Scenario] = field(default_factory=dict)
    """Each scenario resized to each ``n.train`` value (``Study.scenario``)."""
    real: Path | None = None
    """The ``[real]`` dataset folder (resolved, checked by ``check_real``), or None: outside both hashes."""

    @property
    def name(self) -> str:
        return self.model.name

    def cells(self) -> list[Cell]:
        """The budget cells, ``n.train`` outer, ``epochs`` inner, in the file's order."""
        return [Cell(n, e) for n in self.model.data.train_sizes() for e in self.model.train.epoch_values()]

    def scenario(self, name: str, cell: Cell) -> Scenario:
        """The scenario as a cell trains on it (its train split resized to ``cell.n_train``)."""
        return self.sized.get((name, cell.n_train), self.scenarios[name])

    def data_name(self, scenario: str, n_train: int | None) -> str:
        """The name of a scenario's dataset for one ``n.train`` value (the scenario's name when the
        study has one ``n.train``): how the driver and the executors find it."""
        return scenario if len(self.model.data.train_sizes()) == 1 else f"{scenario} n={n_train}"

    def ceiling_of(self, ceiling: str) -> list[str]:
        """The confounded scenarios whose ceiling is ``ceiling``."""
        return [s for s, c in self.ceilings.items() if c == ceiling]

    def losses(self, scenario: str) -> list[str]:
        return list(self.model.scenario_losses.get(scenario, self.model.losses))

    def explain_splits(self, scenario: str) -> list[str]:
        """The scenario's splits that match ``[explain] splits`` (test splits only)."""
        names = [s for s in self.scenarios[scenario].splits if s.startswith("test_")]
        return [s for s in names if any(fnmatch.fnmatchcase(s, p) for p in self.model.explain.splits)]

    def planned_runs(self) -> int:
        m = self.model
        return sum(len(self.losses(s)) for s in self.scenarios) * m.seeds * m.tuning.budget * len(self.cells())

    def record(self) -> dict[str, Any]:
        """JSON form: the settings, every resolved scenario, the grid's size (what ``sha256`` covers;
        ``identity`` covers it without the seed count)."""
        declared = bool(self.model.hypotheses.comparisons)  # a study declaring none keeps its hash
        left_out = {"real"} | (set() if declared else {"hypotheses"})  # [real] is outside both hashes
        return {
            "study": self.model.model_dump(mode="json", exclude=left_out),
            **({"hypotheses": self.model.hypotheses.model_dump(mode="json")} if declared else {}),
            "budget": self.model.tuning.budget,
            "planned_runs": self.planned_runs(),
            "cells": [c.label for c in self.cells()],
            "ceilings": dict(self.ceilings),
            "scenarios": {name: scenario_to_dict(s) for name, s in self.scenarios.items()},
        }


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def identity_of(record: dict[str, Any]) -> str:
    """The hash of a study's ``record()`` without its seed count: ``study.seeds`` and
    ``planned_runs`` (which counts seeds) left out, everything else kept."""
    kept = {k: v for k, v in record.items() if k != "planned_runs"}
    kept["study"] = {k: v for k, v in record["study"].items() if k != "seeds"}
    return _digest(kept)


def _split_sizes(scenario: Scenario, n: int | dict[str, int | list[int]] | None) -> dict[str, int]:
    """Each split's ``n`` from ``[data] n`` (a ``train`` list counts by its first value)."""
    if n is None:
        return {}
    if isinstance(n, int):
        return dict.fromkeys(scenario.splits, n)
    sizes = {s: n["test"] for s in scenario.splits if s.startswith("test_") and "test" in n}
    return sizes | {s: v[0] if isinstance(v, list) else v for s, v in n.items() if s in scenario.splits}


def _resized(scenario: Scenario, n_train: int) -> Scenario:
    d = scenario_to_dict(scenario)
    d["splits"] = {**d["splits"], "train": {**d["splits"]["train"], "n": n_train}}
    return load_scenario_dict(d)


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
    sized = {}
    for name, scenario in scenarios.items():
        for n_train in model.data.train_sizes()[1:]:
            try:
                sized[(name, n_train)] = _resized(scenario, n_train)
            except ScenarioError as error:
                raise StudyError(f"n.train = {n_train}: {name}: {error}") from None
    ceilings = resolve_ceilings(scenarios, model.ceilings)
    _check_hypotheses(model, scenarios)
    record = Study(model, scenarios, "", "", ceilings=ceilings).record()
    files = [p for p in (_scenario_path(e, base) for e in model.scenarios) if isinstance(p, Path) or Path(p).is_file()]
    real = None
    if model.real is not None:
        real = Path(model.real.dataset).expanduser()
        real = (base / real if base is not None and not real.is_absolute() else real).resolve()
        check_real(real, scenarios)
    sources = tuple(Path(p) for p in ([source] if source else []) + files + ([real] if real else []))
    return Study(model, scenarios, _digest(record), identity_of(record), sources, ceilings, sized, real)


def check_real(folder: Path, scenarios: dict[str, Scenario]) -> dict[str, Any]:
    """Refuse a ``[real] dataset`` that is not a real nodulab dataset, has no ``test_lidc`` rows, or
    whose image geometry differs from a scenario's (one line naming the scenario and what differs);
    return its manifest. Reads the manifest only (the driver checks the files' hashes before any run)."""
    from nodulab.data.dataset import DatasetError, is_real, load_manifest  # torch: only when a study uses [real]

    where = f"real.dataset: {folder}"
    if not folder.is_dir():
        raise StudyError(f"{where}: no such folder")
    try:
        manifest = load_manifest(folder)
    except DatasetError as error:
        raise StudyError(f"{where}: not a nodulab dataset ({error})") from None
    if not is_real(manifest):
        raise StudyError(f"{where}: a synthetic dataset, not a real one (nodulab import-lidc writes one)")
    entry = manifest["splits"].get(REAL_SPLIT)
    if not isinstance(entry, dict) or not entry.get("n"):
        raise StudyError(f"{where}: has no {REAL_SPLIT} rows to score the runs on")
    image = manifest["image"]
    for name, scenario in scenarios.items():
        wanted = scenario.image.model_dump()
        differs = [f"{k} {image.get(k)!r}" for k in ("dim", "size", "pixel_mm") if image.get(k) != wanted[k]]
        if differs:
            study = ", ".join(f"{k} {wanted[k]!r}" for k in ("dim", "size", "pixel_mm"))
            raise StudyError(
                f"{where}: image geometry differs from scenario {name!r}: {', '.join(differs)} (the study's: {study}); "
                "import it again with the study's --dim, --size and --pixel-mm"
            )
    return manifest


def _check_hypotheses(model: StudyModel, scenarios: dict[str, Scenario]) -> None:
    """Each declared comparison names a scenario of the study, one of its test splits, and a
    scenario whose losses include the reference."""
    h = model.hypotheses
    for entry in h.comparisons:
        scenario, split = entry.split("/")
        if scenario not in scenarios:
            raise StudyError(
                f"hypotheses.comparisons: {entry!r}: not a scenario of this study ({', '.join(scenarios)})"
            )
        tests = [s for s in scenarios[scenario].splits if s.startswith("test_")]
        if split not in tests:
            raise StudyError(
                f"hypotheses.comparisons: {entry!r}: {scenario} has no test split {split!r} ({', '.join(tests)})"
            )
        if h.reference not in model.scenario_losses.get(scenario, model.losses):
            raise StudyError(f"hypotheses.reference: {h.reference!r} is not trained on {scenario}")


# ----------------------------------------------------------------------------- matched ceilings
def _confounded(scenario: Scenario) -> bool:
    """Whether a scenario trains with a confound (a ``[source]`` one: with its table's joint ratings)."""
    if scenario.source is not None:
        train = scenario.splits.get("train")
        return source_mode(scenario.source.confounds, "train", train.confounds if train else None) == "real"
    return bool(scenario.confounds)


def _table(scenario: Scenario) -> str | None:
    return scenario.source.table if scenario.source is not None else None


def check_ceiling(confounded: Scenario, ceiling: Scenario, where: str) -> None:
    """Refuse a ceiling that differs from ``confounded`` in more than its confounds (naming what differs)."""
    if _table(confounded) != _table(ceiling):
        raise StudyError(f"{where}: {ceiling.name!r} draws from another source than {confounded.name!r}")
    if _confounded(ceiling):
        raise StudyError(f"{where}: {ceiling.name!r} has confounds itself; a ceiling has none")
    if confounded.label != ceiling.label:
        raise StudyError(f"{where}: {ceiling.name!r} has another label rule than {confounded.name!r}")
    if confounded.image != ceiling.image:
        raise StudyError(f"{where}: {ceiling.name!r} has another image geometry than {confounded.name!r}")
    if _table(confounded) is not None:
        return  # the same table with its confounds broken: the factors are the table's
    taken = {c.factor for c in confounded.confounds} | {confounded.label.factor}
    for factor in FACTORS:
        if factor in taken:
            continue
        mine = split_distributions(confounded, "train", factor)
        theirs = split_distributions(ceiling, "train", factor)
        if mine != theirs:
            raise StudyError(
                f"{where}: {ceiling.name!r} differs from {confounded.name!r} in {factor} "
                "(a matched ceiling differs only in the confounds)"
            )


def resolve_ceilings(scenarios: dict[str, Scenario], named: dict[str, str]) -> dict[str, str]:
    """Each confounded scenario's ceiling: named in ``[ceilings]``, else implied (see the module doc)."""
    for name, ceiling in named.items():
        if name not in scenarios:
            raise StudyError(f"ceilings.{name}: not a scenario of this study ({', '.join(scenarios)})")
        if ceiling not in scenarios:
            raise StudyError(f"ceilings.{name}: {ceiling!r} is not a scenario of this study")
        if not _confounded(scenarios[name]):
            raise StudyError(f"ceilings.{name}: {name!r} has no confound, so it needs no ceiling")
    out = {}
    for name, scenario in scenarios.items():
        if not _confounded(scenario):
            continue
        if name in named:
            out[name] = named[name]
        else:
            free = [c for c, s in scenarios.items() if not _confounded(s) and _table(s) == _table(scenario)]
            if len(free) > 1:
                raise StudyError(
                    f"ceilings: {name!r} could be read against {', '.join(free)}; "
                    f'name its ceiling ([ceilings] {name} = "...")'
                )
            if not free:
                continue
            out[name] = free[0]
        check_ceiling(scenario, scenarios[out[name]], f"ceilings.{name}")
    return out


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


def check_seeds(seeds: Any) -> int:
    """A seed count given outside the study file (``--seeds``), by the rule of ``seeds`` (``Seeds``)."""
    try:
        return TypeAdapter(Seeds, config=ConfigDict(strict=True)).validate_python(seeds)
    except ValidationError as error:
        raise StudyError(f"--seeds: {one_line(error)}") from None


def _with_seeds(d: dict[str, Any], seeds: int | None) -> dict[str, Any]:
    return d if seeds is None else {**d, "seeds": seeds}


def load_study(name_or_path: str | Path, seeds: int | None = None) -> Study:
    """A preset study by name, or a study TOML file by path (at most 1 MiB); ``seeds``, when given,
    replaces the file's ``seeds`` (validated by the same rule; the study's identity, hence its
    store, does not change with it)."""
    if seeds is not None:
        seeds = check_seeds(seeds)
    text = str(name_or_path)
    if not isinstance(name_or_path, Path) and text in preset_names():
        d = _read((_presets() / f"{text}.toml").read_bytes(), f"study preset {text}")
        d.setdefault("name", text)
        return study_from_dict(_with_seeds(d, seeds))
    path = Path(name_or_path)
    if not path.is_file():
        if isinstance(name_or_path, Path) or path.suffix or "/" in text or path.exists():
            raise StudyError(f"{text}: no such study file")
        raise StudyError(f"{text}: unknown study preset (presets: {', '.join(preset_names())}; or a .toml path)")
    d = _read(path, str(path))
    d.setdefault("name", path.stem)
    return study_from_dict(_with_seeds(d, seeds), base=path.parent, source=path)


def list_presets() -> list[tuple[str, str]]:
    """``(name, description)`` of every preset study, for ``nodulab studies``."""
    return [(name, load_study(name).model.description) for name in preset_names()]
