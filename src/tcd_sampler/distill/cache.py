"""Encoding each training image and caption once (``TrainConfig.cache_encodings``): the data latents by dataset
index (the VAE runs once per image, and the image is read once) and the text encodings by caption (the text
encoders run once per distinct caption, the empty prompt of guidance and dropout included), kept in CPU memory and
gathered per step. Only for fixed crops (center, no flip): a random crop or flip changes an image's latents every
epoch. A cached run computes what an uncached one does, up to the floating-point effect of encoding in batches of
another composition."""

from __future__ import annotations

from typing import Any

import torch

from .data import collate
from .teachers import encode_latents

__all__ = ["EncodingCache"]


class EncodingCache:
    """The latents (and SDXL's size conditions) of the images seen so far, by dataset index, and the text encodings
    by caption (:attr:`text`, what :func:`tcd_sampler.distill.teachers.conditions` takes as its ``cache``).

    Args:
        pipe: the teacher pipeline (its VAE encodes; a pixel-space one caches the pixels).
        device: the device the latents are encoded on and returned to.
        resolution: the training resolution (SDXL's target size condition).
    """

    def __init__(self, pipe: Any, device: Any, resolution: int) -> None:
        self.pipe, self.device, self.resolution = pipe, device, resolution
        self.latents: dict[int, torch.Tensor] = {}
        self.sizes: dict[int, tuple[tuple[int, int], tuple[int, int]]] = {}
        self.text: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def batch(self, dataset: Any, rows: list[tuple[int, int]]) -> tuple[torch.Tensor, dict[str, Any]]:
        """The latents ``(B, …)`` on the device and the batch fields (``caption`` after the epoch's dropout,
        ``original_size``, ``crop_top_left``, ``resolution``) of ``rows`` (``(index, epoch)`` pairs); images not
        seen before are read and encoded, in one batch."""
        missing = list(dict.fromkeys(index for index, _ in rows if index not in self.latents))
        if missing:
            epochs = dict(rows)
            fresh = collate([dataset.sample(index, epochs[index]) for index in missing])
            encoded = encode_latents(self.pipe, fresh["pixel_values"].to(self.device)).cpu()
            for j, index in enumerate(missing):
                self.latents[index] = encoded[j]
                (h, w), (top, left) = fresh["original_size"][j].tolist(), fresh["crop_top_left"][j].tolist()
                self.sizes[index] = ((h, w), (top, left))
        indices = [index for index, _ in rows]
        latents = torch.stack([self.latents[i] for i in indices]).to(self.device)
        batch = {
            "caption": [dataset.caption(index, epoch) for index, epoch in rows],
            "original_size": torch.tensor([self.sizes[i][0] for i in indices], dtype=torch.int64),
            "crop_top_left": torch.tensor([self.sizes[i][1] for i in indices], dtype=torch.int64),
            "resolution": self.resolution,
        }
        return latents, batch
