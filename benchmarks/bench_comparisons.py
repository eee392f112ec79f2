"""Cost of the report's comparisons with the test set's noise against the seed-level ones, in one run.

A ``paper``-sized table of per-sample predictions is made up (``--scenarios`` scenarios, each with
three test splits of ``--rows`` samples, ``--losses`` losses, ``--seeds`` seeds, six classifiers:
about 2.7 million rows at the defaults, what ``paper``'s store holds), then
``results.comparisons.comparisons`` runs twice: from the predictions (both sources of noise) and
from the seed-level scores only (``predictions=None``, the peer). Prints both times and the ratio;
goal: the report's comparisons at paper size in under a minute on the 2-core CPU.

    python benchmarks/bench_comparisons.py [--scenarios 5] [--losses 10] [--seeds 5] [--rows 500]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd

from nodulab.results.comparisons import Hypotheses, comparisons

CLASSIFIERS = ("head", "probe", "knn", "dfr", "probe_init", "knn_init")
SPLITS = ("test_iid", "test_balanced", "test_conflict")
GOAL_S = 60.0


def made_up(scenarios: int, losses: int, seeds: int, rows: int) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    rng = np.random.default_rng(0)
    labels = np.arange(rows) % 2
    metrics, predictions = [], []
    names = ["ce", *(f"loss{i}" for i in range(1, losses))]
    for s in range(scenarios):
        for loss in names:
            for seed in range(seeds):
                for split in SPLITS:
                    for classifier in CLASSIFIERS:
                        if classifier == "head" and loss != "ce":
                            continue
                        predicted = np.where(rng.random(rows) < 0.8, labels, 1 - labels)
                        keys = {"scenario": f"s{s}", "dataset": f"s{s}", "loss": loss, "seed": seed, "draw": 0}
                        keys |= {"selected": 1, "split": split, "classifier": classifier}
                        recall = np.mean([(predicted[labels == c] == c).mean() for c in (0, 1)])
                        metrics.append({**keys, "metric": "balanced_accuracy", "value": recall})
                        predictions.append(
                            pd.DataFrame({**keys, "row": np.arange(rows), "label": labels, "predicted": predicted})
                        )
    readouts = {loss: "head" if loss == "ce" else "probe" for loss in names}
    return pd.DataFrame(metrics), pd.concat(predictions, ignore_index=True), readouts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", type=int, default=5)
    parser.add_argument("--losses", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--rows", type=int, default=500)
    args = parser.parse_args()
    metrics, predictions, readouts = made_up(args.scenarios, args.losses, args.seeds, args.rows)
    hypotheses = Hypotheses(tuple(f"s{s}/test_conflict" for s in range(args.scenarios)))
    start = time.perf_counter()
    seeds_only = comparisons(metrics, None, readouts, hypotheses)
    peer = time.perf_counter() - start
    start = time.perf_counter()
    both = comparisons(metrics, predictions, readouts, hypotheses)
    ours = time.perf_counter() - start
    assert len(both) == len(seeds_only) and both["test_noise"].all()
    print(f"{len(predictions):,} per-sample rows, {len(both)} comparisons")
    print(f"seed-level only (peer): {peer:.2f} s; with the test set's noise: {ours:.2f} s; ratio {ours / peer:.1f}x")
    print(f"goal: under {GOAL_S:.0f} s -> {'met' if ours < GOAL_S else 'NOT met'}")


if __name__ == "__main__":
    main()
