"""Training throughput of `train_epoch` against a plain PyTorch loop, measured in the same run.

Both train the same small-cnn (same seed, AdamW, batch size, channels-last input) with
cross-entropy on two views per sample of 64x64 images. The plain loop reads precomputed views from
in-memory tensors; nodulab's epoch also makes the views each step: `augment` (flips, 90° rotations,
shifts of the stored int16 HU) and `both` (the default: each row re-rendered with fresh nuisance,
then the geometry), so the second ratio is the cost of views that cannot be matched by their
noise. Interleaved repeats, medians; prints samples/s and nodulab's overhead (goal <= 10% for
`augment`). With CUDA available, also a short GPU run: AMP, resnet18, `--views both` rendered on
the device, and the plain-loop ceiling on the same GPU.

    python benchmarks/bench_train.py [--n 1024] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

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


def measure(root: Path, encoder: str, views: str, device: str, batch_size: int, repeats: int) -> tuple[float, float]:
    split = train._Split.load(root, "train")
    image = data.load_manifest(root)["image"]
    config = train.TrainConfig(str(root), "ce", encoder=encoder, batch_size=batch_size, views=views, device=device)
    objective = losses.build("ce")
    inputs = data.hu_to_input(split.images.float()).unsqueeze(1)
    second = torch.flip(inputs, dims=(-1,))
    if device == "cuda":
        inputs, second = inputs.to(device), second.to(device)
    ours, plain = [], []
    for repeat in range(repeats + 1):  # the first round warms up
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
    return statistics.median(ours), statistics.median(plain)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1024, help="training samples")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        scenario = resolve(load_scenario("size-confound"), n=args.n)
        root = data.generate(scenario, Path(tmp) / "sc", seed=0)
        print(
            f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.n} samples 64x64, "
            f"batch {args.batch_size}, 2 views"
        )
        for views in ("augment", "both"):
            ours, plain = measure(root, "small-cnn", views, "cpu", args.batch_size, args.repeats)
            print(
                f"CPU small-cnn ce {views}: nodulab {ours:.1f} samples/s, plain loop {plain:.1f} samples/s, "
                f"overhead {100 * (plain / ours - 1):+.1f}%"
            )
        if torch.cuda.is_available():
            ours, plain = measure(root, "resnet18", "both", "cuda", args.batch_size, args.repeats)
            print(
                f"GPU {torch.cuda.get_device_name()} resnet18 ce both AMP: nodulab {ours:.0f} samples/s "
                f"({2 * ours:.0f} images/s), plain-loop ceiling {plain:.0f} samples/s"
            )


if __name__ == "__main__":
    main()
