"""The digits teacher before training: a class-conditional diffusers ``UNet2DModel`` on the native 8 × 8 grey digits
(blocks of 32 and 64 channels, no attention; 10 classes and a null class for classifier-free guidance) in a
``DDPMPipeline`` with Stable Diffusion's noise schedule (``scaled_linear`` betas 0.00085 … 0.012 over 1,000 steps,
epsilon prediction), written as a pipeline folder that ``tcd-sampler train --method diffusion`` trains."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .data import NUM_CLASSES

__all__ = ["SCHEDULE", "UNET", "initial_teacher", "write_initial_teacher"]

#: The UNet's configuration (the null class is the last of ``num_class_embeds``).
UNET: dict[str, Any] = {
    "sample_size": 8,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": (32, 64),
    "down_block_types": ("DownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "UpBlock2D"),
    "layers_per_block": 2,
    "norm_num_groups": 8,
    "num_class_embeds": NUM_CLASSES + 1,
}
#: Stable Diffusion's noise schedule and prediction type.
SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
}


def initial_teacher(seed: int = 0) -> Any:
    """The untrained teacher pipeline (``DDPMPipeline``), its weights drawn under ``torch.manual_seed(seed)``."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    return DDPMPipeline(unet=UNet2DModel(**UNET), scheduler=DDPMScheduler(**SCHEDULE))


def write_initial_teacher(folder: str | Path, seed: int = 0) -> Path:
    """Write :func:`initial_teacher` as a pipeline folder (``model_index.json``, ``unet/``, ``scheduler/``)."""
    initial_teacher(seed).save_pretrained(folder, safe_serialization=True)
    return Path(folder)
