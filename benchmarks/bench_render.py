"""Render throughput against MONAI's synthetic test-image generator, measured in the same run.

Interleaved repeats, medians, ratios (nodulab's image rate / MONAI's image rate). nodulab renders
full nodules from the ``size-confound`` preset (texture, vessels, spicules, PSF, noise); MONAI draws
one disc plus uniform noise. With CUDA available it also reports the GPU render rate.

Shape realism (issue 10): the same rows rendered with elongation U[0, 0.7], irregularity
U[0, 0.3] and spicule_grade U[0, 1] added vs without those columns, interleaved in the same run;
the ratio is (time with) / (time without).

    python benchmarks/bench_render.py [--repeats 5] [--shapes-only]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from monai.data import create_test_image_2d, create_test_image_3d

from nodulab.synth.renderer import keep_freed_tensors_mapped, prepare, render, render_tensor
from nodulab.synth.sampling import sample_split
from nodulab.synth.scenarios import load_scenario, resolve

CASES = [
    # name, dim, size, pixel_mm, batch, MONAI call, goal (nodulab rate / MONAI rate)
    (
        "2D 64x64",
        2,
        64,
        0.7,
        256,
        lambda rs: create_test_image_2d(64, 64, num_objs=1, rad_max=15, noise_max=0.2, random_state=rs),
        1.0,
    ),
    (
        "3D 32^3",
        3,
        32,
        1.4,
        64,
        lambda rs: create_test_image_3d(32, 32, 32, num_objs=1, rad_max=10, noise_max=0.2, random_state=rs),
        0.3,
    ),
]


def rows_for(dim: int, size: int, pixel_mm: float, n: int):
    scenario = resolve(load_scenario("size-confound"), n=n, dim=dim, size=size, pixel_mm=pixel_mm)
    return sample_split(scenario, "train", 0)


def with_shape_factors(rows):
    rng = np.random.default_rng(0)
    n = len(rows)
    return rows.assign(
        elongation=rng.uniform(0, 0.7, n), irregularity=rng.uniform(0, 0.3, n), spicule_grade=rng.uniform(0, 1, n)
    )


def shape_cost(name: str, dim: int, size: int, pixel_mm: float, batch: int, repeats: int) -> None:
    rows = rows_for(dim, size, pixel_mm, batch)
    shaped = with_shape_factors(rows)
    render(shaped.iloc[:8], size=size, dim=dim)  # warm-up
    plain, new = [], []
    for _ in range(repeats):
        plain.append(seconds_per_image(lambda: render(rows, size=size, dim=dim), batch))
        new.append(seconds_per_image(lambda: render(shaped, size=size, dim=dim), batch))
    p, s = statistics.median(plain), statistics.median(new)
    print(f"{name:10s} shapes: {p * 1e6:10.1f} us/img without, {s * 1e6:10.1f} with, ratio {s / p:5.2f}x")


def seconds_per_image(fn, n: int) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--shapes-only", action="store_true", help="only the shape-realism cost")
    args = parser.parse_args()
    keep_freed_tensors_mapped()  # as `nodulab generate` does (render itself leaves malloc alone)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, cuda={torch.cuda.is_available()}")
    for name, dim, size, pixel_mm, batch, *_ in CASES:
        shape_cost(name, dim, size, pixel_mm, batch, args.repeats)
    if args.shapes_only:
        return
    print(f"{'case':10s} {'MONAI us/img':>13s} {'nodulab us/img':>15s} {'rate ratio':>11s} {'goal':>6s}")
    for name, dim, size, pixel_mm, batch, monai_call, goal in CASES:
        rows = rows_for(dim, size, pixel_mm, batch)
        rs = np.random.RandomState(0)
        render(rows.iloc[:8], size=size, dim=dim)  # warm-up
        monai, ours = [], []
        for _ in range(args.repeats):
            monai.append(seconds_per_image(lambda: [monai_call(rs) for _ in range(batch)], batch))  # noqa: B023
            ours.append(seconds_per_image(lambda: render(rows, size=size, dim=dim), batch))  # noqa: B023
        m, o = statistics.median(monai), statistics.median(ours)
        ratio = m / o
        print(
            f"{name:10s} {m * 1e6:13.1f} {o * 1e6:15.1f} {ratio:10.2f}x {goal:5.1f}x "
            f"{'met' if ratio >= goal else 'NOT met'}"
        )
        if torch.cuda.is_available():
            big = rows_for(dim, size, pixel_mm, 4096 if dim == 2 else 512)
            batch_gpu = prepare(big, size, dim, "cuda")
            render_tensor(batch_gpu)
            torch.cuda.synchronize()
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                render_tensor(batch_gpu)
                torch.cuda.synchronize()
                times.append((time.perf_counter() - start) / len(big))
            print(
                f"{name:10s} GPU render_tensor: {1 / statistics.median(times):,.0f} images/s "
                f"({torch.cuda.get_device_name()})"
            )


if __name__ == "__main__":
    main()
