"""Executors of a study's runs, by name (``nodulab study --executor``): ``{name: fn(runs, batch, done)}``.

``local`` runs here (``--jobs 1``) or in spawned worker processes; ``ray`` one Ray task per run
(``ray_executor``). Only the driver's process writes the store: every executor hands each finished
run to ``done``.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path

from nodulab.studies.ray_executor import run_ray
from nodulab.studies.runner import Batch, Done, RunResult, RunSpec, execute


def _execute_in_worker(spec: RunSpec, data_dirs: dict[str, str], run_dir: str, device: str) -> RunResult:
    return execute(spec, {k: Path(v) for k, v in data_dirs.items()}, Path(run_dir), device)


def run_local(specs: list[RunSpec], batch: Batch, done: Done) -> None:
    """Run ``specs`` here (``jobs`` 1) or in ``jobs`` spawned worker processes; ``done`` per result."""
    if batch.jobs == 1:
        for spec in specs:
            done(execute(spec, batch.data_dirs, batch.runs_dir / spec.run_id, batch.device, batch.progress))
        return
    paths = {k: str(v) for k, v in batch.data_dirs.items()}
    with ProcessPoolExecutor(max_workers=batch.jobs, mp_context=get_context("spawn")) as pool:
        pending: set[Future[RunResult]] = {
            pool.submit(_execute_in_worker, s, paths, str(batch.runs_dir / s.run_id), batch.device) for s in specs
        }
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                done(future.result())


Executor = Callable[[list[RunSpec], Batch, Done], None]
EXECUTORS: dict[str, Executor] = {"local": run_local, "ray": run_ray}
"""Every executor by its ``--executor`` name (``common.choices.EXECUTORS`` lists the names for the CLI)."""
