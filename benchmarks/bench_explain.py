"""Speed of ``nodulab explain``'s reliance stage against the bare cost of its renders and forward passes.

Generates ``size-confound`` at 64x64 (a small train split, ``test_conflict`` of 2,000 samples),
trains a small-cnn for one epoch (the speed of explain does not depend on training quality), then
in the same process:

1. the whole ``explain_run`` on ``test_conflict`` as the command runs it (reliance, cue, sweep,
   probes, Grad-CAM, plots), with the reliance
   stage (the unswitched predictions plus every documented switch) timed from its progress events;
2. the bare cost: the same predictions of the stored images, and the same switched rows rendered
   and predicted in the same chunks (same batch size, same threads), with no bookkeeping.

Run it at the thread count you train with (``--threads``); both sides use it. Goals
(2-core CPU): reliance stage <= 2 minutes and <= 1.3x the bare cost. With CUDA available,
the same on the GPU.

    python benchmarks/bench_explain.py [--n 2000] [--n-train 512]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from nodulab.data import dataset as data
from nodulab.explanation.counterfactual import CHUNK
from nodulab.explanation.run import EXTRA_WRITERS, explain_run
from nodulab.explanation.switches import build_switches, fits
from nodulab.synth.renderer import keep_freed_tensors_mapped, render
from nodulab.synth.scenarios import load_scenario, load_scenario_dict, scenario_to_dict
from nodulab.training.loop import train
from nodulab.training.runs import load_run, run_threads

SPLIT = "test_conflict"


def make_dataset(root: Path, n: int, n_train: int) -> Path:
    d = scenario_to_dict(load_scenario("size-confound"))
    splits = d["splits"]
    d["splits"] = {
        "train": {**splits["train"], "n": n_train},
        "val": {**splits["val"], "n": n_train // 2},
        "val_balanced": {**splits["val_balanced"], "n": n_train // 2},
        SPLIT: {**splits[SPLIT], "n": n},
    }
    return data.generate(load_scenario_dict(d), root / "ds", seed=0)


def bare_cost(run, root: Path, batch_size: int) -> float:
    """Seconds to predict the stored images and render + predict every switched row, nothing else."""
    manifest = data.load_manifest(root)
    size, dim = manifest["image"]["size"], manifest["image"]["dim"]
    images, _, rows = data.load_split(root, SPLIT)
    scenario = load_scenario_dict(manifest["scenario"])
    batches = []
    for switch in build_switches(scenario, SPLIT, manifest["seed"], len(rows), rows):
        _, switched = switch.change(rows)
        batches.append(switched[fits(switched, size, dim)])
    with run_threads(run.threads):
        start = time.perf_counter()
        for i in range(0, len(images), CHUNK):
            run.predict(np.asarray(images[i : i + CHUNK]), batch_size=batch_size)
        for switched in batches:
            for i in range(0, len(switched), CHUNK):
                rendered, _ = render(switched.iloc[i : i + CHUNK], size, dim, run.device, chunk=CHUNK)
                run.predict(rendered, batch_size=batch_size)
        return time.perf_counter() - start


def measure(run_dir: Path, root: Path, device: str, batch_size: int) -> None:
    # bare, explain, bare: on a shared machine the load drifts; the bare cost is the mean of the two
    # runs either side of explain's.
    run = load_run(run_dir, device=device)
    bare = [bare_cost(run, root, batch_size)]
    events: list[tuple[str, float]] = []
    start = time.perf_counter()
    explain_run(
        run_dir,
        root,
        splits=[SPLIT],
        device=device,
        batch_size=batch_size,
        force=True,
        writers=EXTRA_WRITERS,
        progress=lambda stage, done, total: events.append((stage, time.perf_counter())),
    )
    whole = time.perf_counter() - start
    stamps = [t for stage, t in events if stage in ("predict", "reliance")]
    sweep = [t for stage, t in events if stage == "sweep"]
    reliance = stamps[-1] - stamps[0]
    bare = (bare[0] + bare_cost(run, root, batch_size)) / 2
    print(
        f"[{device}] reliance stage {reliance:.1f} s (goal <= 120 s), bare renders + forward passes {bare:.1f} s, "
        f"ratio {reliance / bare:.2f}x (goal <= 1.3x); sweep {sweep[-1] - stamps[-1]:.1f} s; "
        f"whole explain_run (with probes, Grad-CAM, plots) {whole:.1f} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help=f"samples in {SPLIT}")
    parser.add_argument("--n-train", type=int, default=512, help="samples in train (val and val_balanced: half)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help=(
            "torch threads of the run (explain uses the run's). Default 1: on a shared 2-core machine two "
            "OpenMP threads fighting other processes render 40x slower (measured 33 vs 1,560 rows/s)"
        ),
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_tensors_mapped()  # as the explain command does
    with tempfile.TemporaryDirectory() as tmp:
        root = make_dataset(Path(tmp), args.n, args.n_train)
        run_dir = train(
            root, Path(tmp) / "run", loss="ce", epochs=1, batch_size=128, device="cpu", threads=args.threads
        )
        print(
            f"{SPLIT}: {args.n} samples, 64x64, small-cnn, {torch.get_num_threads()} threads, batch {args.batch_size}"
        )
        measure(run_dir, root, "cpu", args.batch_size)
        if torch.cuda.is_available():
            measure(run_dir, root, "cuda", args.batch_size)


if __name__ == "__main__":
    main()
