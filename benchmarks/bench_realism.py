"""Cost of `nodulab realism` per nodule, against the bare minimum a tracer does, in the same run.

The peer is the smallest honest tracer: threshold the image and label its connected components
with scipy (`ndimage.label`), nothing else. nodulab's per-nodule work adds the vessel mask, hole
filling, the centre component and the four measures (a convex hull each). Both run over the
same images of a `lidc` dataset (96 px at 0.7 mm), interleaved, medians compared.

    python benchmarks/bench_realism.py [--n 600] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from nodulab.data.dataset import generate, load_split
from nodulab.data.realism import threshold_hu, trace_row
from nodulab.synth.scenarios import load_scenario, load_scenario_dict, scenario_to_dict


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=600)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    d = scenario_to_dict(load_scenario("lidc"))
    d["splits"] = {"train": {**d["splits"]["train"], "n": args.n}, "val": {"n": 2}}
    with tempfile.TemporaryDirectory() as tmp:
        root = generate(load_scenario_dict(d), Path(tmp) / "d", seed=0)
        images, masks, factors = load_split(root, "train")
        images, masks = np.asarray(images), np.asarray(masks)
    rows = [factors.iloc[i] for i in range(len(factors))]
    thresholds = [threshold_hu(str(r["attenuation"])) for r in rows]

    def ours() -> None:
        for i, row in enumerate(rows):
            trace_row(images[i], row, masks[i])

    def peer() -> None:
        for i, t in enumerate(thresholds):
            ndimage.label(images[i] >= t)

    times: dict[str, list[float]] = {"nodulab realism (trace + measure)": [], "threshold + ndimage.label": []}
    for _ in range(args.repeats):
        for name, fn in zip(times, (ours, peer)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["threshold + ndimage.label"])
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"{name:36s} {1e6 * m / len(rows):8.0f} us/nodule   {m / base:5.1f}x the peer")


if __name__ == "__main__":
    main()
