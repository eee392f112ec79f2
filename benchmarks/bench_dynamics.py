"""Cost of the dynamics stage (``dynamics.csv``) against the training run it follows, in the same process.

At the ``quick`` study's settings (``presets/studies/quick.toml``): ``size-confound`` at 32 px and
1.4 mm, ``train`` 1,000 rows, ``val``, ``val_balanced`` and every test split 400, small-cnn, 6
epochs, batch 128, 2 threads, default checkpoints (1, 2, 4, 6), dynamics on 200 rows of
``test_conflict``. The dataset is generated first (not timed); then one run is trained
(``train``, checkpoints included) and ``dynamics_run`` scores it. Prints both times and their
ratio; goal: the dynamics stage <= 25% of the run's training time.

    python benchmarks/bench_dynamics.py [--loss ce] [--threads 2] [--n 200]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import torch

from nodulab.data import dataset as data
from nodulab.explanation.dynamics import dynamics_run
from nodulab.synth.renderer import keep_freed_tensors_mapped
from nodulab.synth.scenarios import load_scenario, load_scenario_dict, scenario_to_dict
from nodulab.training.loop import default_checkpoints, train

GOAL = 0.25
SIZES = {"train": 1000, "val": 400, "val_balanced": 400}
"""``quick``'s ``[data] n``; every test split gets ``TEST_N``."""
TEST_N = 400


def make_dataset(root: Path) -> Path:
    d = scenario_to_dict(load_scenario("size-confound"))
    d["image"] = {**d["image"], "size": 32, "pixel_mm": 1.4}
    d["splits"] = {name: {**spec, "n": SIZES.get(name, TEST_N)} for name, spec in d["splits"].items()}
    return data.generate(load_scenario_dict(d), root / "ds", seed=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loss", default="ce", help="the run's loss (quick trains ce, supcon, simclr)")
    parser.add_argument("--threads", type=int, default=2, help="the run's torch threads (quick: 2)")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--n", type=int, default=200, help="conflict rows followed under the switches")
    args = parser.parse_args()
    keep_freed_tensors_mapped()
    with tempfile.TemporaryDirectory() as tmp:
        root = make_dataset(Path(tmp))
        torch.set_num_threads(args.threads)
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run = train(
                root,
                Path(tmp) / "run",
                loss=args.loss,
                epochs=args.epochs,
                batch_size=128,
                device="cpu",
                threads=args.threads,
            )
        trained = time.perf_counter() - start
        start = time.perf_counter()
        frame = dynamics_run(run, root, n=args.n, device="cpu")
        followed = time.perf_counter() - start
    epochs = ", ".join(str(e) for e in default_checkpoints(args.epochs))
    print(
        f"size-confound 32 px, train {SIZES['train']}, val/test {TEST_N}, {args.loss}, {args.epochs} epochs, "
        f"batch 128, {args.threads} threads; checkpoints {epochs}; dynamics on {args.n} test_conflict rows "
        f"({len(frame)} rows written)"
    )
    ratio = followed / trained
    print(f"train (with checkpoints): {trained:6.1f} s")
    print(f"dynamics stage:           {followed:6.1f} s  = {ratio:.1%} of the run (goal <= {GOAL:.0%})")
    if ratio > GOAL:
        print("GOAL MISSED")


if __name__ == "__main__":
    main()
