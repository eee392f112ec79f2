"""The budget table behind the `quick` and `standard` presets (README "Studies").

ce trained on `clean` (no shortcut to learn) at the `quick` geometry (32 px, 1.4 mm, batch 128,
2 threads) for 1x, 2x, 4x and 10x the old `quick` budget (1,000 rows x 6 epochs), 3 seeds each,
scored on its own `test_iid` and on `size-confound`'s test splits (the matched ceiling of the
conflict split: the same images a size-confound run is scored on). Prints mean and SD over seeds
of the head's balanced accuracy, and the training time per run.

    python benchmarks/budget_table.py [--out /tmp/budget] [--seeds 3]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd

from nodulab.data.dataset import generate
from nodulab.synth.scenarios import load_scenario, load_scenario_dict, scenario_to_dict
from nodulab.training.evaluation import evaluate_run
from nodulab.training.loop import train

BUDGETS = {"1x": (1000, 6), "2x": (2000, 6), "4x": (2000, 12), "10x": (2000, 30)}
"""Budget -> (training rows, epochs)."""


def dataset(root: Path, name: str, n_train: int) -> Path:
    """``name`` at the quick geometry with ``n_train`` training rows and 400 in every other split."""
    d = scenario_to_dict(load_scenario(name, dim=2, size=32, pixel_mm=1.4))
    d["splits"] = {k: {**v, "n": n_train if k == "train" else 400} for k, v in d["splits"].items()}
    out = root / f"{name}_{n_train}"
    if not (out / "dataset.json").exists():
        generate(load_scenario_dict(d), out, seed=0)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/nodulab-budget"))
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    confounded, rows = dataset(args.out, "size-confound", 1000), []
    for budget, (n, epochs) in BUDGETS.items():
        clean = dataset(args.out, "clean", n)
        for seed in range(args.seeds):
            run = args.out / f"run_{budget}_{seed}"
            start = time.perf_counter()
            train(clean, run, loss="ce", epochs=epochs, batch_size=128, seed=seed, threads=2, force=True)
            seconds = time.perf_counter() - start
            for data, out in ((clean, None), (confounded, run / "on_size_confound")):
                frame = evaluate_run(run, data, out=out, force=True)
                frame = frame[(frame["metric"] == "balanced_accuracy") & (frame["classifier"] == "head")]
                rows += [(budget, n, epochs, seed, r.dataset, r.split, r.value, seconds) for r in frame.itertuples()]
            print(f"{budget} seed {seed}: {seconds:.0f} s", flush=True)
    table = pd.DataFrame(rows, columns=["budget", "n_train", "epochs", "seed", "dataset", "split", "value", "train_s"])
    table.to_csv(args.out / "budget.csv", index=False)
    tests = table[table["split"].str.startswith("test_")]
    print(tests.groupby(["budget", "dataset", "split"], sort=False)["value"].agg(["mean", "std"]).round(3))
    print(table.groupby("budget", sort=False)["train_s"].agg(["min", "max"]).round(0))


if __name__ == "__main__":
    main()
