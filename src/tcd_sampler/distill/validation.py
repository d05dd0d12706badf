"""Validation images of a training run: a grid of TCD samples of the student — one row a prompt, one column a number
of steps (1, 2, 4, 8) — with the scheduler settings the card will hold, written as a PNG (atomically)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .._files import atomic_paths
from .export import scheduler_from_card

__all__ = ["STEPS", "validation_grid"]

#: The numbers of steps of a grid's columns.
STEPS = (1, 2, 4, 8)


@torch.no_grad()
def validation_grid(pipe: Any, student: Any, card: dict[str, Any], prompts: tuple[str, ...], path: Path,
                    seed: int = 0) -> Path:  # fmt: skip
    """Sample ``prompts`` with ``student`` in ``pipe`` (its UNet swapped in for the call) at each of :data:`STEPS`
    with the card's scheduler, guidance off (a distilled model needs none), the same seed in every cell; write the
    grid to ``path``. Returns ``path``."""
    from PIL import Image

    teacher_unet, teacher_scheduler = pipe.unet, pipe.scheduler
    was_training = student.training
    pipe.unet, pipe.scheduler = student.eval(), scheduler_from_card(card)
    try:
        rows = []
        for prompt in prompts:
            cells = []
            for steps in STEPS:
                generator = torch.Generator().manual_seed(seed)
                if hasattr(pipe, "encode_prompt"):
                    out = pipe(prompt, num_inference_steps=steps, guidance_scale=1.0, generator=generator,
                               output_type="pil")  # fmt: skip
                else:  # an unconditional pipeline (DDPMPipeline): the prompt is the row's label only
                    out = pipe(num_inference_steps=steps, generator=generator, output_type="pil")
                image = out.images[0]
                cells.append(image.convert("RGB"))
            rows.append(cells)
    finally:
        pipe.unet, pipe.scheduler = teacher_unet, teacher_scheduler
        student.train(was_training)
    w, h = rows[0][0].size
    grid = Image.new("RGB", (w * len(STEPS), h * len(rows)))
    for r, cells in enumerate(rows):
        for c, cell in enumerate(cells):
            grid.paste(cell, (c * w, r * h))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_paths(path) as (tmp,):
        grid.save(tmp, format="PNG")
    return path
