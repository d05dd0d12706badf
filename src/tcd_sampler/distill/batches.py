"""Where a training step's rows come from.

- :class:`FolderBatches` (an image folder, scanned up front): the global batch of step ``n`` is the ``n``-th slice of
  a permutation of the data seeded per epoch, and each process takes its rows of it — a function of the step number
  alone, so one process and several end with the same weights, and a resumed run with an uninterrupted one's.
  Optionally through an :class:`~tcd_sampler.distill.cache.EncodingCache`.
- :class:`StreamBatches` (webdataset shards, streamed): each process reads its own shards (every ``W``-th, in an
  order shuffled each pass and seeded), through a seeded shuffle buffer, passing after pass; a resumed run reads its
  stream again up to the step it resumes at, so it too ends bit-identical to an uninterrupted one. A different
  number of processes reads different shards per process, so its weights differ (as any streaming trainer's).
"""

from __future__ import annotations

from typing import Any

import torch

from .cache import EncodingCache
from .data import DataOptions, ImageCaptionDataset, WebDatasetShards, collate
from .teachers import check_class_captions, encode_latents

__all__ = ["STREAM_SHUFFLE", "FolderBatches", "StreamBatches"]

#: The shuffle buffer (samples per process) of a streamed run.
STREAM_SHUFFLE = 1000


def _order(n: int, step: int, batch: int, seed: int) -> list[tuple[int, int]]:
    """The ``(dataset index, epoch)`` of each row of the global batch of ``step``: consecutive slices of a
    permutation seeded per epoch."""
    out: list[tuple[int, int]] = []
    start = step * batch
    while len(out) < batch:
        epoch, offset = divmod(start + len(out), n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch)).tolist()
        out.extend((i, epoch) for i in perm[offset : offset + batch - len(out)])
    return out


class FolderBatches:
    """The rows of each step from a scanned folder source.

    Args:
        dataset: the scanned dataset.
        pipe: the teacher pipeline (its VAE makes the latents).
        device: the run's device.
        batch_size, seed: the global batch and the run's seed.
        rank, local: this process's rank and its number of rows.
        cache: encode every image and caption once (:class:`EncodingCache`), or None.
    """

    def __init__(self, dataset: ImageCaptionDataset, pipe: Any, device: Any, batch_size: int, seed: int, rank: int,
                 local: int, cache: EncodingCache | None = None) -> None:  # fmt: skip
        self.dataset, self.pipe, self.device, self.cache = dataset, pipe, device, cache
        self.batch_size, self.seed, self.rank, self.local = batch_size, seed, rank, local

    def __call__(self, step: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """This process's latents and batch fields (captions, sizes) of ``step``."""
        rows = _order(len(self.dataset), step, self.batch_size, self.seed)
        rows = rows[self.rank * self.local : (self.rank + 1) * self.local]
        if self.cache is not None:
            return self.cache.batch(self.dataset, rows)
        batch = collate([self.dataset.sample(index, epoch) for index, epoch in rows])
        return encode_latents(self.pipe, batch["pixel_values"].to(self.device)), batch


class StreamBatches:
    """The rows of each step from webdataset shards, streamed (see the module's docstring); steps must be asked for
    in order, from ``start``.

    Args:
        shards: the shards (a file, folder, brace pattern or glob).
        options: the data options (the stream's seed is ``options.seed``).
        pipe, device: the teacher pipeline and the run's device.
        rank, world, local: this process's rank, the number of processes, and its rows per step.
        start: the first step asked for (the stream is read up to it).
        null_class: a class-conditional teacher's null class (the captions are checked per batch), or None.
    """

    def __init__(self, shards: str, options: DataOptions, pipe: Any, device: Any, rank: int, world: int,
                 local: int, start: int = 0, null_class: int | None = None) -> None:  # fmt: skip
        stream = WebDatasetShards(shards, options, rank=rank, world_size=world, shuffle_buffer=STREAM_SHUFFLE,
                                  repeat=True)  # fmt: skip
        self.pipe, self.device, self.local, self.null_class = pipe, device, local, null_class
        self.samples = iter(stream)
        for _ in range(start * local):  # read again up to the resumed step: the same stream, the same rows
            next(self.samples)
        self.next_step = start

    def __call__(self, step: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """This process's latents and batch fields of ``step`` (the next ``local`` samples of its stream)."""
        if step != self.next_step:
            raise RuntimeError(f"a stream gives its steps in order: step {self.next_step} is next, not {step}")
        self.next_step += 1
        batch = collate([next(self.samples) for _ in range(self.local)])
        if self.null_class is not None:  # an empty caption is a dropped one (the null class)
            check_class_captions([c for c in batch["caption"] if c.strip()], self.null_class, "streamed sample")
        return encode_latents(self.pipe, batch["pixel_values"].to(self.device)), batch
