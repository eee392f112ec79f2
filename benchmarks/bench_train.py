"""Training throughput of `train_epoch` against a plain PyTorch loop, measured in the same run.

Both train the same small-cnn (same seed, AdamW, batch size, channels-last input) with
cross-entropy on two views per sample of `size-confound` images (64x64 at 0.7 mm; `--size` changes
the pixel count and keeps the 44.8 mm field of view, so `--size 32` is 32 px at 1.4 mm). The plain
loop reads precomputed views from in-memory tensors; nodulab's epoch also makes the views each
step: `augment` (flips, 90° rotations, shifts of the stored int16 HU) and `both` (the default:
each row re-rendered with fresh nuisance, then the geometry), so the second ratio is the cost of
views that cannot be matched by their noise. Prints samples/s and nodulab's overhead (goal <= 10%
for `augment`).

Also prices both against the machine: the rate of a float32 2048x2048 @ 2048x2048 `torch.matmul`
(GFLOPS = 2 * 2048^3 / s) at the training's thread count, timed in the same interleaved rounds,
and the FLOPs of one sample counted by `torch.utils.flop_counter.FlopCounterMode` over one batch
of forward + backward through the loss (both views of each sample, divided by the batch size;
convolutions and matrix products only: batch norm, activations, pooling and the AdamW step are
not counted). At `--size 32` this counts 78.5 MFLOP per image (the reference figure is 78.7), 157.1
per sample. Each loop's samples/s times that is its achieved GFLOPS, printed with its share of the
matmul rate.

Interleaved repeats (a warm-up round first), medians. With CUDA available, also a short GPU run:
AMP, resnet18, `--views both` rendered on the device, and the plain-loop ceiling on the same GPU
(samples/s only).

    python benchmarks/bench_train.py [--n 1024] [--repeats 3] [--size 64]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from nodulab.data import dataset as data
from nodulab.synth.scenarios import load_scenario, resolve
from nodulab.training import loop as train
from nodulab.training import losses
from nodulab.training.models import build_model


def plain_epoch(
    model,
    optimiser,
    inputs: torch.Tensor,
    second: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    generator: torch.Generator,
    device: str,
) -> None:
    model.train()
    order = torch.randperm(len(labels), generator=generator)
    for index in torch.split(order, batch_size):
        views = torch.cat([inputs[index], second[index]]).to(device)
        views = train.channels_last(views)  # the layout train uses
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
            logits = model(views)["logits"]
        loss = torch.nn.functional.cross_entropy(logits.float(), labels[index].repeat(2).to(device))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()


def matmul_gflops(n: int = 2048, times: int = 3) -> list[float]:
    """GFLOPS of `times` float32 n x n @ n x n products at the current thread count."""
    generator = torch.Generator().manual_seed(0)  # the global RNG is left alone
    a, b = torch.randn(n, n, generator=generator), torch.randn(n, n, generator=generator)
    rates = []
    for _ in range(times):
        start = time.perf_counter()
        torch.matmul(a, b)
        rates.append(2 * n**3 / (time.perf_counter() - start) / 1e9)
    return rates


def flops_per_sample(encoder: str, dim: int, size: int, batch_size: int) -> float:
    """Forward + backward FLOPs of one sample (its two views), counted on one batch of the plain loop."""
    model = build_model(encoder, dim, head=True, projector=False, seed=0)
    views = train.channels_last(torch.zeros((2 * batch_size, 1) + (size,) * dim))
    with FlopCounterMode(display=False) as counter:
        logits = model(views)["logits"]
        torch.nn.functional.cross_entropy(logits, torch.zeros(2 * batch_size, dtype=torch.long)).backward()
    return counter.get_total_flops() / batch_size


def measure(
    root: Path, encoder: str, views: str, device: str, batch_size: int, repeats: int
) -> tuple[float, float, list[float]]:
    """Median samples/s of nodulab's epoch and of the plain loop, and the CPU matmul GFLOPS of each round."""
    split = train._Split.load(root, "train")
    image = data.load_manifest(root)["image"]
    config = train.TrainConfig(str(root), "ce", encoder=encoder, batch_size=batch_size, views=views, device=device)
    objective = losses.build("ce")
    inputs = data.hu_to_input(split.images.float()).unsqueeze(1)
    second = torch.flip(inputs, dims=(-1,))
    if device == "cuda":
        inputs, second = inputs.to(device), second.to(device)
    ours, plain, matmul = [], [], []
    for repeat in range(repeats + 1):  # the first round warms up
        rates = matmul_gflops() if device == "cpu" else []
        matmul += rates if repeat else []
        for kind in ("ours", "plain"):
            model = build_model(encoder, image["dim"], head=True, projector=False, seed=0).to(device)
            optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3)
            generator = torch.Generator().manual_seed(repeat)
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            if kind == "ours":
                scheduler = train._schedule(optimiser, -(-len(split.labels) // batch_size), train.WARMUP_FRACTION)
                train.train_epoch(model, objective, optimiser, scheduler, split, config, image, 0, generator, device)
            else:
                plain_epoch(model, optimiser, inputs, second, split.labels, batch_size, generator, device)
            if device == "cuda":
                torch.cuda.synchronize()
            if repeat:
                (ours if kind == "ours" else plain).append(len(split.labels) / (time.perf_counter() - start))
    return statistics.median(ours), statistics.median(plain), matmul


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1024, help="training samples")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=64, help="patch side in px (the 44.8 mm field of view is kept)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        scenario = load_scenario("size-confound")
        pixel_mm = scenario.image.size * scenario.image.pixel_mm / args.size
        scenario = resolve(scenario, n=args.n, size=args.size, pixel_mm=pixel_mm)
        root = data.generate(scenario, Path(tmp) / "sc", seed=0)
        print(
            f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.n} samples "
            f"{args.size}x{args.size} at {pixel_mm:g} mm, batch {args.batch_size}, 2 views"
        )
        flops = flops_per_sample("small-cnn", scenario.image.dim, args.size, args.batch_size)
        print(
            f"small-cnn forward+backward: {flops / 2e6:.1f} MFLOP per image, {flops / 1e6:.1f} per sample "
            "(two views; FlopCounterMode: convolutions and matrix products)"
        )
        results, matmul = {}, []
        for views in ("augment", "both"):
            ours, plain, rates = measure(root, "small-cnn", views, "cpu", args.batch_size, args.repeats)
            results[views] = ours, plain
            matmul += rates
        peak = statistics.median(matmul)
        print(f"matmul float32 2048^3: {peak:.1f} GFLOPS (median of {len(matmul)}, interleaved with the epochs)")

        def rate(samples: float) -> str:
            gflops = samples * flops / 1e9
            return f"{samples:.1f} samples/s = {gflops:.2f} GFLOPS ({100 * gflops / peak:.1f}% of matmul)"

        for views, (ours, plain) in results.items():
            print(
                f"CPU small-cnn ce {views}: nodulab {rate(ours)}, plain loop {rate(plain)}, "
                f"overhead {100 * (plain / ours - 1):+.1f}%"
            )
        if torch.cuda.is_available():
            ours, plain, _ = measure(root, "resnet18", "both", "cuda", args.batch_size, args.repeats)
            print(
                f"GPU {torch.cuda.get_device_name()} resnet18 ce both AMP: nodulab {ours:.0f} samples/s "
                f"({2 * ours:.0f} images/s), plain-loop ceiling {plain:.0f} samples/s"
            )


if __name__ == "__main__":
    main()
