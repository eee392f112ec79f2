"""Adding a loss is one registry entry and one objective: nothing else to edit (design.md "Registries").

A throwaway loss, ``toy-margin``, is registered here the way a real one is (a ``LossSpec`` in
``hparams.LOSSES``, a factory registered with ``@losses.objective``), removed again after each
test, and runs through train, evaluate, a study's validation, grid and run, and the command line.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from tests.conftest import assert_one_line_error
from threadpoolctl import threadpool_limits
from typer.testing import CliRunner

import nodulab
from nodulab.cli import app
from nodulab.results.store import STORE_FILE, Store
from nodulab.studies.config import StudyError, study_from_dict
from nodulab.studies.driver import plan, run_study
from nodulab.training import hparams, losses

TOY = "toy-margin"
SPEC = hparams.LossSpec(
    TOY,
    "toy hinge on squared distances between unit vectors",
    {"margin": hparams.Param(0.5, 0.1, 1.0, log=True, help="toy hinge margin on squared distances")},
)
SIZE = {"size": 16, "pixel_mm": 2.8}
"""The smallest image the size-confound preset fits in: the losses, not the pictures, are tested."""
runner = CliRunner()


class ToyMargin(losses.Objective):
    """Same-label pairs: their squared distance; other pairs: ``max(0, margin - squared distance)``."""

    def __init__(self, margin: float) -> None:
        super().__init__()
        self.margin = margin

    def compute(
        self, embeddings: torch.Tensor | None, labels: torch.Tensor, logits: torch.Tensor | None
    ) -> torch.Tensor:
        z = F.normalize(embeddings, dim=1)
        sq_dist = (2.0 - 2.0 * z @ z.T).clamp_min(0.0)
        same = labels[:, None] == labels[None, :]
        self.stats = {"toy_positive_pairs": float(same.sum() - len(labels)) / 2}
        return torch.where(same, sq_dist, F.relu(self.margin - sq_dist)).mean()


@pytest.fixture(autouse=True)
def toy_loss(monkeypatch: pytest.MonkeyPatch) -> None:
    """Register ``toy-margin`` for one test: copies of both registries, restored afterwards."""
    monkeypatch.setattr(hparams, "LOSSES", {**hparams.LOSSES, TOY: SPEC})
    monkeypatch.setattr(losses, "OBJECTIVES", dict(losses.OBJECTIVES))
    losses.objective(TOY)(ToyMargin)


@pytest.fixture(scope="module", autouse=True)
def one_blas_thread(one_thread: None) -> Iterator[None]:
    """Tiny problems: the readouts' BLAS threads cost more than they save on a busy machine."""
    with threadpool_limits(1):
        yield


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    scenario = nodulab.load_scenario("size-confound", n=40, **SIZE)
    return nodulab.generate(scenario, tmp_path_factory.mktemp("data") / "sc", seed=0)


def test_the_toy_is_registered_like_any_loss() -> None:
    assert hparams.names()[-1] == TOY and losses.names() == hparams.names()
    assert losses.params(TOY) == SPEC.params
    objective = losses.build(TOY)
    assert isinstance(objective, ToyMargin) and objective.margin == 0.5
    assert losses.build(TOY, margin=0.2).margin == 0.2
    draw = losses.draw_params(TOY, 1, seed=0)
    assert set(draw) == {"lr", "weight_decay", "margin"} and 0.1 <= draw["margin"] <= 1.0
    with pytest.raises(ValueError, match="takes no parameter 'temperature'"):
        losses.build(TOY, temperature=0.1)
    with pytest.raises(ValueError, match="no such loss"):
        losses.objective("toy-unregistered")


def test_train_and_evaluate(tiny: Path, tmp_path: Path) -> None:
    run = nodulab.train(
        tiny, tmp_path / "run", loss=TOY, loss_params={"margin": 0.3}, epochs=1, batch_size=20, device="cpu"
    )
    config = json.loads((run / "config.json").read_text())["config"]
    assert config["loss"] == TOY and config["loss_params"] == {"margin": 0.3}
    history = pd.read_csv(run / "history.csv")
    assert history.train_loss.notna().all() and "toy_positive_pairs" in history.columns  # its stats logged
    metrics = nodulab.evaluate(run, tiny)
    assert {"probe", "knn", "dfr"} <= set(metrics["classifier"]) and "head" not in set(metrics["classifier"])
    assert (run / "metrics.csv").is_file() and metrics["value"].notna().all()


def _study(losses_: list[str] | str, **extra: object) -> dict:
    return {
        "name": "toy",
        "scenarios": ["size-confound"],
        "losses": losses_,
        "seeds": 1,
        "data": {**SIZE, "n": 40},
        "train": {"epochs": 1, "batch_size": 20, "threads": 1},
        **extra,
    }


def test_a_study_validates_plans_and_runs_it(tmp_path: Path) -> None:
    assert study_from_dict(_study("all")).model.losses == hparams.names() and TOY in hparams.names()
    with pytest.raises(StudyError, match='losses: a list of loss names, or "all"'):
        study_from_dict(_study("every"))
    study = study_from_dict(_study(["ce", TOY], tuning={"budget": 2}))
    specs = plan(study, {"size-confound": "0" * 64})
    toy = [s for s in specs if s.loss == TOY]
    assert [s.draw for s in toy] == [0, 1] and len(specs) == 4
    assert toy[0].config["loss_params"] == {"margin": 0.5}  # draw 0: the registry's default
    assert toy[1].config["loss_params"] == {"margin": losses.draw_params(TOY, 1, 0)["margin"]}

    summary = run_study(study_from_dict(_study(["ce", TOY])), tmp_path / "out", report=False)
    assert (summary.done, summary.failed) == (2, 0), [r.reason for r in summary.results]
    with Store(tmp_path / "out" / STORE_FILE) as store:
        runs = store.runs()
        metrics = store.table("metrics")
    assert sorted(runs["loss"]) == ["ce", TOY] and set(runs["status"]) == {"done"}
    assert TOY in set(metrics["loss"])


def test_the_command_line_lists_and_trains_it(tiny: Path, tmp_path: Path) -> None:
    help_text = " ".join(runner.invoke(app, ["train", "--help"], env={"COLUMNS": "1000"}).output.split())
    assert f"{TOY}: {SPEC.summary}" in help_text
    assert f"margin ({TOY}): toy hinge margin on squared distances" in help_text
    out = tmp_path / "cli-run"
    args = ["train", str(tiny), "--loss", TOY, "--out", str(out), "--epochs", "1", "--batch-size", "20"]
    result = runner.invoke(app, [*args, "--loss-param", "margin=0.4", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["config"]["loss_params"] == {"margin": 0.4}
    bad = runner.invoke(app, [*args, "--loss-param", "temperature=0.1"])
    assert_one_line_error(bad, "--loss-param", "takes no parameter 'temperature'")
