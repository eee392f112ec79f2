"""What a study costs beyond its runs: store, CSVs, report and scheduling, against the runs themselves.

Generates the datasets, then in one process: the same runs by a bare loop (``runner.execute`` one
after another into a scratch folder: no store, no CSVs, no report), the study itself (default: a
small grid; ``--study quick`` for the preset) with ``nodulab.studies.driver.run_study`` on the same dataset
cache, and the bare loop again (so warm-up and drift fall on both sides). Prints the study's wall
time, the summed run times, the overhead (wall − datasets − runs) as a share of the summed run
times (goal < 5%), and the study's wall time over the mean of the two bare loops.

    python benchmarks/bench_study.py [--study quick] [--threads 2]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from nodulab.data.dataset import MANIFEST, sha256_file
from nodulab.studies import driver as studying
from nodulab.studies import runner
from nodulab.studies.config import load_study, study_from_dict
from nodulab.synth.renderer import keep_freed_tensors_mapped

SMALL = {
    "name": "bench",
    "scenarios": ["size-confound"],
    "losses": ["ce", "supcon"],
    "seeds": 2,
    "data": {"size": 32, "pixel_mm": 1.4, "n": {"train": 600, "val": 200, "val_balanced": 200, "test": 200}},
    "train": {"epochs": 3, "threads": 2},
    "explain": {"splits": ["test_conflict"], "n": 100},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", help="a preset or study file (default: a small built-in grid)")
    args = parser.parse_args()
    study = load_study(args.study) if args.study else study_from_dict(SMALL)
    keep_freed_tensors_mapped()
    scratch = Path(tempfile.mkdtemp(prefix="bench-study-"))
    cache = scratch / "cache"
    try:
        seed = study.model.data.seed
        data_dirs = {name: runner.ensure_dataset(cache, s, seed) for name, s in study.scenarios.items()}
        manifests = {name: sha256_file(folder / MANIFEST) for name, folder in data_dirs.items()}

        def bare_loop(folder: Path) -> float:
            start = time.perf_counter()
            for spec in studying.plan(study, manifests):
                runner.execute(spec, data_dirs[spec.scenario], folder / spec.run_id)
            return time.perf_counter() - start

        before = bare_loop(scratch / "bare-before")
        summary = studying.run_study(study, scratch / "study", cache=cache)
        after = bare_loop(scratch / "bare-after")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    bare = (before + after) / 2
    overhead = summary.wall_seconds - summary.generate_seconds - summary.run_seconds
    print(f"study {study.name}: {summary.planned} runs ({summary.done} done, {summary.failed} failed)")
    print(
        f"  wall {summary.wall_seconds:.1f} s = datasets (cached: hashes checked) {summary.generate_seconds:.1f} s "
        f"+ runs {summary.run_seconds:.1f} s + overhead {overhead:.1f} s"
    )
    print(
        f"  overhead (store, CSVs, report, scheduling): {100 * overhead / summary.run_seconds:.2f}% "
        "of the summed run times (goal < 5%)"
    )
    print(
        f"  bare loop of the same runs: {before:.1f} s before, {after:.1f} s after; study / mean bare = "
        f"{summary.wall_seconds / bare:.3f}x"
    )


if __name__ == "__main__":
    main()
