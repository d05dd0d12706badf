"""The folder input pipeline's throughput: images per second delivered (decode, resize/crop, collate; no VAE), the
DataLoader of ``FolderBatches`` with worker processes against the trainer's former main-thread loop (a permutation
made per step, then ``dataset.sample`` and ``collate`` in the main process), on the same folder of generated
JPEG and PNG images; and the cost per step of finding a step's rows at 1 M and 5 M images, the former per-step
permutation against :class:`~tcd_sampler.distill.batches.EpochOrder` (one permutation per epoch, its cost given
apart). A benchmark, not a test: the numbers depend on the machine (its cores, disk and page cache). The former
loop is also timed with one torch thread, as DataLoader workers run: on a machine with few cores, torch's
intra-op threads slow the per-sample float conversion down, a gain the workers have apart from their parallelism.

Run: .venv/bin/python benchmarks/bench_data.py [--images 512] [--size 512] [--batch 16] [--workers 2] [--quick]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

from tcd_sampler.distill.batches import EpochOrder, FolderBatches
from tcd_sampler.distill.data import DataOptions, ImageCaptionDataset, collate

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
# the rows of a step as the trainer found them before EpochOrder (a permutation made, and listed, every step): the
# specification tests/test_loader.py holds the loader to
from test_loader import reference_order as former_order

SEED = 0


def make_folder(root: Path, count: int, size: int) -> None:
    """``count`` photo-like ``size`` × ``size`` images (smooth colour fields plus grain), half JPEG, half PNG, each
    with a caption file."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size] / size
    for i in range(count):
        a, b, c = rng.uniform(0.5, 4.0, 3)
        field = np.stack([np.sin(a * x + b * y), np.cos(b * x - c * y), np.sin(c * x * y + a)], axis=-1)
        pixels = np.clip(127.5 + 100 * field + rng.normal(0, 12, field.shape), 0, 255).astype(np.uint8)
        if i % 2:
            Image.fromarray(pixels).save(root / f"{i:05d}.jpg", quality=90)
        else:
            Image.fromarray(pixels).save(root / f"{i:05d}.png")
        (root / f"{i:05d}.txt").write_text(f"image {i}")


def former_loop(dataset: ImageCaptionDataset, batch: int, steps: int) -> float:
    """Images per second of the former main-thread loop."""
    began = time.perf_counter()
    for step in range(steps):
        rows = former_order(len(dataset), step, batch, SEED)
        collate([dataset.sample(index, epoch) for index, epoch in rows])
    return steps * batch / (time.perf_counter() - began)


def loader_loop(dataset: ImageCaptionDataset, batch: int, steps: int, workers: int, warmup: int) -> float:
    """Images per second the DataLoader delivers once its workers run (the first ``warmup`` steps, which start them,
    are not timed)."""
    pixel_space = SimpleNamespace(vae=None)  # encode_latents returns the pixels: no VAE
    with FolderBatches(dataset, pixel_space, "cpu", batch, SEED, 0, batch, workers=workers) as batches:
        for step in range(warmup):
            batches(step)
        began = time.perf_counter()
        for step in range(warmup, warmup + steps):
            batches(step)
        return steps * batch / (time.perf_counter() - began)


def order_costs(n: int, batch: int, reps: int) -> tuple[float, float, float]:
    """Milliseconds: the former rows of one step (median), EpochOrder's rows of one step (mean over ``reps`` steps
    of one epoch, its permutation made), and the one permutation an epoch."""
    former = statistics.median(_timed(lambda s=s: former_order(n, s, batch, SEED)) for s in range(1, 4))
    order = EpochOrder(n, batch, SEED)
    permutation = _timed(lambda: order.permutation(0))
    began = time.perf_counter()
    for step in range(reps):
        order.rows(step)
    return former, (time.perf_counter() - began) * 1e3 / reps, permutation


def _timed(fn: Callable[[], object]) -> float:
    began = time.perf_counter()
    fn()
    return (time.perf_counter() - began) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--size", type=int, default=512, help="image side and training resolution")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="64 images, one pass each")
    args = parser.parse_args()
    count = 64 if args.quick else args.images
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} torch threads")  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        began = time.perf_counter()
        make_folder(Path(folder), count, args.size)
        print(
            f"{count} images {args.size}x{args.size} (half JPEG, half PNG) made in {time.perf_counter() - began:.1f} s"
        )
        dataset = ImageCaptionDataset(folder, DataOptions(args.size, crop="random", random_flip=True))
        steps = count // args.batch
        former_loop(dataset, args.batch, 2)  # the page cache warm for both
        former = former_loop(dataset, args.batch, steps)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as in a DataLoader worker: the float conversion of a sample gains on few cores
        former_one = former_loop(dataset, args.batch, steps)
        torch.set_num_threads(threads)
        in_process = loader_loop(dataset, args.batch, steps, 0, 1)
        workers = loader_loop(dataset, args.batch, steps, args.workers, 2)
    print(f"\nimages/s, batch {args.batch}, {steps} steps, resolution {args.size}:")
    print("| pipeline | images/s | vs former |\n|---|---|---|")
    print(f"| former main-thread loop | {former:.1f} | 1.00 |")
    print(f"| former main-thread loop, 1 torch thread | {former_one:.1f} | {former_one / former:.2f} |")
    print(f"| DataLoader, in process (workers=0) | {in_process:.1f} | {in_process / former:.2f} |")
    print(f"| DataLoader, workers={args.workers} | {workers:.1f} | {workers / former:.2f} |")
    print(f"\nrows of one step (batch {args.batch}), milliseconds:")
    print("| images | former, per step | EpochOrder, per step | EpochOrder, one permutation an epoch |")
    print("|---|---|---|---|")
    for n in (1_000_000, 5_000_000):
        former_ms, new_ms, permutation_ms = order_costs(n, args.batch, 100 if args.quick else 1000)
        print(f"| {n:,} | {former_ms:.1f} | {new_ms:.4f} | {permutation_ms:.1f} |")


if __name__ == "__main__":
    main()
