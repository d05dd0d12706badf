"""The guidance scale of the digits main job, chosen on the teacher alone before any student was distilled: the FID
(and class accuracy) of the teacher's 50-step DDIM samples at several guidance scales, 500 images, seed 0.

    .venv/bin/python studies/digits_guidance.py [--teacher DIR --classifier DIR] [--grid docs/digits_teacher.png]

The smallest FID picks ``tcd_sampler.evaluation.digits.models.GUIDANCE``, used for the teacher's solvers and as the
students' fixed distillation guidance. Not a test; prints a table."""

from __future__ import annotations

import argparse

import torch
from diffusers import DDIMScheduler

from tcd_sampler.distill.teachers import Conditioning
from tcd_sampler.distill.unet_sampling import sample_unet
from tcd_sampler.evaluation.digits.classifier import load_classifier
from tcd_sampler.evaluation.digits.data import NUM_CLASSES, load_digits_split, to_uint8
from tcd_sampler.evaluation.digits.metrics import DigitMetrics
from tcd_sampler.evaluation.digits.models import DIGITS_ASSETS


def write_grid(images: torch.Tensor, path: str) -> None:
    """Images ``(100, 1, 8, 8)`` (sample i of class i % 10) as a 10 x 10 grid, a row per class, enlarged 5x."""
    from PIL import Image

    cells = torch.from_numpy(to_uint8(images))
    cells = torch.nn.functional.pad(cells, (1, 1, 1, 1))  # a background-coloured gap around each digit
    rows = [torch.cat([cells[c + 10 * j] for j in range(10)], dim=1) for c in range(10)]
    grid = 255 - torch.cat(rows, dim=0)  # dark ink on white, as the figure
    side = grid.shape[0] * 5
    Image.fromarray(grid.numpy()).resize((side, side), Image.Resampling.NEAREST).save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", default=str(DIGITS_ASSETS / "teacher"))
    parser.add_argument("--classifier", default=str(DIGITS_ASSETS / "classifier"))
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0, 4.0])
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--grid", help="also write a PNG of the first 100 samples at the first scale (10 per class)")
    args = parser.parse_args()
    from diffusers import DiffusionPipeline

    from tcd_sampler.integrations.pipelines import verify_local_files

    verify_local_files(args.teacher)  # the shipped teacher against the manifest, a trained one against its card
    pipe = DiffusionPipeline.from_pretrained(args.teacher)
    metrics = DigitMetrics(load_classifier(args.classifier), load_digits_split("test").images)
    labels = torch.arange(args.samples) % NUM_CLASSES
    null = torch.full_like(labels, pipe.unet.config.num_class_embeds - 1)
    noise = torch.randn((args.samples, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    print("| guidance | FID | accuracy | precision | recall |\n|---:|---:|---:|---:|---:|")
    for scale in args.scales:
        scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
        x = sample_unet(pipe.unet, scheduler, noise.clone(), 50, Conditioning(class_labels=labels),
                        Conditioning(class_labels=null), scale)  # fmt: skip
        m = metrics(x.clamp(-1, 1), labels)
        if args.grid and scale == args.scales[0]:
            write_grid(x[:100], args.grid)
        print(f"| {scale:g} | {m['fid']:.3f} | {m['accuracy']:.3f} | {m['precision']:.3f} | {m['recall']:.3f} |")


if __name__ == "__main__":
    main()
