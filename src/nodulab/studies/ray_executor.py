"""``nodulab study --executor ray``: one Ray task per run, on the cluster ``RAY_ADDRESS`` names or a local one.

Workers share no files with the driver. A task gets the run's spec, the datasets it reads (its
own and, for a ceiling's run, the confounded scenarios'), each as its resolved scenario and the
manifest hash the driver's dataset has; it regenerates each dataset into the worker's own cache
when it lacks it (the renderer is pure), refuses it unless the manifest and every file match the
hashes, runs, and returns the results with its run folder packed as bytes. The driver alone writes
the store and the run folders. Each task asks for the study's threads as CPUs and one GPU on CUDA.
Install with ``pip install 'nodulab[ray]'``.
"""

from __future__ import annotations

import io
import os
import shutil
import tarfile
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from nodulab.studies.runner import Batch, Done, RunResult, RunSpec, StudyRunError, ensure_dataset, execute
from nodulab.synth.scenarios import load_scenario_dict, scenario_to_dict


def _ray():  # noqa: ANN202 - the ray module
    try:
        import ray
    except ImportError:
        raise StudyRunError("--executor ray needs Ray: pip install 'nodulab[ray]'") from None
    return ray


def worker_cache() -> Path:
    """A worker's own dataset cache (Ray workers share no files with the driver)."""
    return Path(tempfile.gettempdir()) / f"nodulab-cache-{os.getuid()}"


def pack_folder(folder: Path) -> bytes:
    """A run folder as an uncompressed tar (how a Ray worker hands it to the driver)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and not path.is_symlink():
                tar.add(path, arcname=str(path.relative_to(folder)), recursive=False)
    return buffer.getvalue()


def execute_packed(
    spec: dict[str, Any], datasets: dict[str, tuple[dict[str, Any], str]], data_seed: int, device: str
) -> RunResult:
    """A run where no file is shared: regenerate its datasets (``{name: (scenario, manifest sha256)}``),
    check their hashes, run, pack the folder."""
    run = RunSpec(**spec)
    data_dirs = {
        name: ensure_dataset(worker_cache(), load_scenario_dict(scenario), data_seed, sha)
        for name, (scenario, sha) in datasets.items()
    }
    scratch = Path(tempfile.mkdtemp(prefix="nodulab-run-"))
    try:
        result = execute(run, data_dirs, scratch / run.run_id, device)
        if (scratch / run.run_id).is_dir():
            result.folder = pack_folder(scratch / run.run_id)
        return result
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def run_ray(todo: list[RunSpec], batch: Batch, record: Done) -> None:
    """Run ``todo`` as Ray tasks; ``record`` each result on the driver as it arrives.

    Connects to ``RAY_ADDRESS`` when set (``ray.init`` reads it), else starts a local instance, and
    shuts down only an instance it started; an interrupt cancels every task not yet recorded. A task
    that dies (worker lost, out of memory) is recorded as a failed run with Ray's one-line reason.
    """
    if not todo:
        return
    ray = _ray()
    study, device = batch.study, batch.device
    started = not ray.is_initialized()
    if started:
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        task = ray.remote(execute_packed).options(
            num_cpus=study.model.train.threads, num_gpus=1 if device == "cuda" else 0, max_retries=0
        )

        def datasets(spec: RunSpec) -> dict[str, tuple[dict[str, Any], str]]:
            names = [spec.data, *(other["data"] for other in spec.config["ceiling_of"])]
            return {n: (scenario_to_dict(batch.scenarios[n]), batch.manifests[n]) for n in names}

        refs = {task.remote(asdict(spec), datasets(spec), study.model.data.seed, device): spec for spec in todo}
        pending = list(refs)
        try:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                for ref in ready:
                    try:
                        result = ray.get(ref)
                    except ray.exceptions.RayError as error:
                        reason = " ".join(f"{type(error).__name__}: {error}".split())[:500]
                        result = RunResult(refs[ref], "failed", reason)
                    record(result)
        except BaseException:  # an interrupt: queued and running tasks are cancelled, nothing more recorded
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
    finally:
        if started:
            ray.shutdown()
