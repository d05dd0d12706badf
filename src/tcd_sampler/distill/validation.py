"""Validation images of a training run: a grid of TCD samples of the student — one row a prompt, one column a number
of steps (1, 2, 4, 8) — with the scheduler settings the card will hold, written as a PNG (atomically)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._files import atomic_paths
from .export import scheduler_from_card
from .teachers import Conditioning, class_labels
from .unet_sampling import sample_unet

__all__ = ["STEPS", "to_images", "to_uint8", "validation_grid"]

#: The numbers of steps of a grid's columns.
STEPS = (1, 2, 4, 8)
#: The smallest side of a grid's cell in pixels (smaller images are enlarged by a whole factor).
MIN_CELL = 32


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Samples ``x`` ``(B, C, H, W)`` in [-1, 1] (clipped) as uint8 pixels ``(B, H, W, C)``."""
    return ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def to_images(x: torch.Tensor) -> list[Any]:
    """PIL images of samples ``x`` ``(B, C, H, W)`` in [-1, 1] (clipped; one channel: grey)."""
    from PIL import Image

    return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in to_uint8(x)]


def _pixel_sample(pipe: Any, prompt: str, steps: int, generator: torch.Generator) -> Any:
    """One image of a pixel-space pipeline's UNet with its scheduler, class-conditioned when the UNet is."""
    unet = pipe.unet
    config = unet.config
    size = config.sample_size if isinstance(config.sample_size, int) else config.sample_size[0]
    noise = torch.randn((1, config.in_channels, size, size), generator=generator).to(unet.device, unet.dtype)
    cond = Conditioning()
    if getattr(config, "num_class_embeds", None):
        cond = Conditioning(class_labels=class_labels([prompt], config.num_class_embeds - 1, unet.device))
    x = sample_unet(unet, pipe.scheduler, noise, steps, cond, generator=generator)
    return to_images(x)[0]


@torch.no_grad()
def validation_grid(pipe: Any, student: Any, card: dict[str, Any], prompts: tuple[str, ...], path: Path,
                    seed: int = 0, write: bool = True) -> Path:  # fmt: skip
    """Sample ``prompts`` with ``student`` in ``pipe`` (its UNet swapped in for the call) at each of :data:`STEPS`
    with the card's scheduler, guidance off (a distilled model needs none), the same seed in every cell; write the
    grid to ``path`` (unless ``write`` is False: default True). Returns ``path``."""
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
                    guidance = card["scheduler"].get("guidance_scale") or 1.0  # a guidance-conditioned student's
                    out = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, generator=generator,
                               output_type="pil")  # fmt: skip
                    image = out.images[0]
                else:  # a pixel-space UNet2DModel: the prompt is a class label, or the row's name (unconditional)
                    image = _pixel_sample(pipe, prompt, steps, generator)
                cells.append(image.convert("RGB"))
            rows.append(cells)
    finally:
        pipe.unet, pipe.scheduler = teacher_unet, teacher_scheduler
        student.train(was_training)
    if not write:  # a sharded student: every process samples (its forwards are collectives), one writes
        return path
    w, h = rows[0][0].size
    if max(w, h) < MIN_CELL:  # tiny images (8 x 8 digits) enlarged, pixel for pixel
        scale = -(-MIN_CELL // max(w, h))
        rows = [[cell.resize((w * scale, h * scale), Image.Resampling.NEAREST) for cell in cells] for cells in rows]
        w, h = w * scale, h * scale
    grid = Image.new("RGB", (w * len(STEPS), h * len(rows)))
    for r, cells in enumerate(rows):
        for c, cell in enumerate(cells):
            grid.paste(cell, (c * w, r * h))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_paths(path) as (tmp,):
        grid.save(tmp, format="PNG")
    return path
