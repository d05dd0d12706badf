"""Where a training step's rows come from.

- :class:`FolderBatches` (an image folder, scanned up front): the global batch of step ``n`` is the ``n``-th slice of
  a permutation of the data seeded per epoch (:class:`EpochOrder`: each epoch's permutation made once), and each
  process takes its rows of it — a function of the step number alone, so one process and several end with the same
  weights, and a resumed run with an uninterrupted one's. A DataLoader reads the rows (:class:`StepSampler`, its
  batch sampler): its workers decode and collate the images ahead of the steps, the main process moves them to the
  device and encodes them. Optionally through an :class:`~tcd_sampler.distill.cache.EncodingCache` (only images not
  cached are decoded).
- :class:`StreamBatches` (webdataset shards, streamed): each process reads its own shards (every ``W``-th, in an
  order shuffled each pass and seeded), through a seeded shuffle buffer, passing after pass; a resumed run reads its
  stream again up to the step it resumes at, so it too ends bit-identical to an uninterrupted one. A different
  number of processes reads different shards per process, so its weights differ (as any streaming trainer's).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from ..core.checks import check_int
from .cache import Decoded, EncodingCache
from .data import DataOptions, ImageCaptionDataset, WebDatasetShards, collate
from .teachers import check_class_captions, encode_latents

__all__ = ["STREAM_SHUFFLE", "EpochOrder", "FolderBatches", "StepSampler", "StreamBatches"]

#: The shuffle buffer (samples per process) of a streamed run.
STREAM_SHUFFLE = 1000

Row = tuple[int, int]  # (dataset index, epoch)
Key = tuple[int, int, bool]  # (dataset index, epoch, whether to decode it)


class EpochOrder:
    """The ``(dataset index, epoch)`` of each row of a step's global batch: consecutive slices of a permutation of the
    ``n`` samples seeded per epoch (``torch.randperm`` with the seed ``seed * 7919 + epoch``). Each epoch's
    permutation is made once while the steps asked for increase (the epochs before a step's first are dropped).

    Args:
        n: the number of samples.
        batch: the global batch.
        seed: the run's seed.
    """

    def __init__(self, n: int, batch: int, seed: int) -> None:
        self.n, self.batch, self.seed = check_int("n", n, 1), check_int("batch", batch, 1), seed
        self._permutations: dict[int, torch.Tensor] = {}

    def permutation(self, epoch: int) -> torch.Tensor:
        """The order of the samples in ``epoch`` (int64 ``(n,)``, on the CPU)."""
        if epoch not in self._permutations:
            generator = torch.Generator().manual_seed(self.seed * 7919 + epoch)
            self._permutations[epoch] = torch.randperm(self.n, generator=generator)
        return self._permutations[epoch]

    def rows(self, step: int) -> list[Row]:
        """The global batch of ``step``: ``batch`` rows ``(dataset index, epoch)``."""
        start = step * self.batch
        for epoch in [e for e in self._permutations if e < start // self.n]:
            del self._permutations[epoch]
        out: list[Row] = []
        while len(out) < self.batch:
            epoch, offset = divmod(start + len(out), self.n)
            taken = self.permutation(epoch)[offset : offset + self.batch - len(out)].tolist()
            out.extend((index, epoch) for index in taken)
        return out


def _order(n: int, step: int, batch: int, seed: int) -> list[Row]:
    """The global batch of ``step`` (:meth:`EpochOrder.rows`, its permutations made for this call alone)."""
    return EpochOrder(n, batch, seed).rows(step)


class StepSampler:
    """A DataLoader batch sampler over steps: per step from ``start`` (to ``stop``, or without end) this process's
    rows of the global batch (``EpochOrder.rows(step)[rank * local : (rank + 1) * local]``), each as a key
    ``(dataset index, epoch, decode)``; ``decode`` is False for an image ``cached`` says it has (and for a repeat
    of an index within the step).

    Args:
        order: the steps' global batches.
        rank, local: this process's rank and its number of rows.
        start: the first step.
        stop: the step after the last one, or None.
        cached: whether an image's latents are cached already, or None (every row is decoded).
    """

    def __init__(self, order: EpochOrder, rank: int, local: int, start: int, stop: int | None = None,
                 cached: Callable[[int], bool] | None = None) -> None:  # fmt: skip
        self.order, self.rank, self.local, self.start, self.stop, self.cached = order, rank, local, start, stop, cached

    def __iter__(self) -> Iterator[list[Key]]:
        step = self.start
        while self.stop is None or step < self.stop:
            rows = self.order.rows(step)[self.rank * self.local : (self.rank + 1) * self.local]
            if self.cached is None:
                yield [(index, epoch, True) for index, epoch in rows]
            else:
                seen: set[int] = set()
                keys = []
                for index, epoch in rows:
                    keys.append((index, epoch, index not in seen and not self.cached(index)))
                    seen.add(index)
                yield keys
            step += 1


class _Samples(Dataset[tuple[int, int, "dict[str, Any] | None"]]):
    """What a worker reads for a key: the row, and its sample as drawn in its epoch (None when not decoded)."""

    def __init__(self, dataset: ImageCaptionDataset) -> None:
        self.dataset = dataset

    def __getitem__(self, key: Key) -> tuple[int, int, dict[str, Any] | None]:
        index, epoch, decode = key
        return index, epoch, self.dataset.sample(index, epoch) if decode else None


def _collate_rows(items: list[tuple[int, int, dict[str, Any] | None]]) -> tuple[list[Row], Decoded | None]:
    """A step's rows, and its decoded samples (their indices and :func:`collate`-d batch; None when none is)."""
    decoded = [(index, sample) for index, _, sample in items if sample is not None]
    rows = [(index, epoch) for index, epoch, _ in items]
    if not decoded:
        return rows, None
    return rows, Decoded([index for index, _ in decoded], collate([sample for _, sample in decoded]))


class FolderBatches:
    """The rows of each step from a scanned folder source, read by a DataLoader (see the module's docstring). Steps
    are asked for in order (from ``start``); a resumed run starts where it resumes, and sees the same rows as an
    uninterrupted one, for any number of workers or processes. Usable as a context manager (:meth:`close`).

    Args:
        dataset: the scanned dataset.
        pipe: the teacher pipeline (its VAE makes the latents).
        device: the run's device (a CUDA device: the batches in pinned memory, copied without waiting).
        batch_size, seed: the global batch and the run's seed.
        rank, local: this process's rank and its number of rows.
        cache: encode every image and caption once (:class:`EncodingCache`), or None.
        workers: the DataLoader's worker processes that decode and collate; 0 (default): in this process, when a
            step is asked for.
        prefetch: batches each worker prepares ahead, at least 1. Default 2.
        start: the first step. Default None: the first one asked for.
        stop: the step after the last one (the workers decode no further), or None (default): no end.

    Raises:
        TypeError, ValueError: an invalid ``workers``, ``prefetch``, ``start`` or ``stop``.
    """

    def __init__(self, dataset: ImageCaptionDataset, pipe: Any, device: Any, batch_size: int, seed: int, rank: int,
                 local: int, cache: EncodingCache | None = None, *, workers: int = 0, prefetch: int = 2,
                 start: int | None = None, stop: int | None = None) -> None:  # fmt: skip
        self.dataset, self.pipe, self.device, self.cache = dataset, pipe, device, cache
        self.batch_size, self.seed, self.rank, self.local = batch_size, seed, rank, local
        self.workers, self.prefetch = check_int("workers", workers, 0), check_int("prefetch", prefetch, 1)
        self.stop = None if stop is None else check_int("stop", stop, 0)
        self.order = EpochOrder(len(dataset), batch_size, seed)
        self._next = None if start is None else check_int("start", start, 0)
        self._loaded: Iterator[tuple[list[Row], Decoded | None]] | None = None

    def __call__(self, step: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """This process's latents and batch fields (captions, sizes) of ``step``."""
        if self._next is None:
            self._next = step
        if step != self._next:
            raise RuntimeError(f"folder batches are read in order: step {self._next} is next, not {step}")
        if self.stop is not None and step >= self.stop:
            raise RuntimeError(f"step {step} is past the last step: stop={self.stop}")
        if self._loaded is None:
            self._loaded = iter(self._loader(step))
        rows, decoded = next(self._loaded)
        self._next = step + 1
        if self.cache is not None:
            return self.cache.batch(self.dataset, rows, decoded)
        assert decoded is not None  # uncached: every row is decoded
        batch = decoded.batch
        return encode_latents(self.pipe, batch["pixel_values"].to(self.device, non_blocking=True)), batch

    def _loader(self, start: int) -> DataLoader[Any]:
        cached = None if self.cache is None else self.cache.has
        sampler = StepSampler(self.order, self.rank, self.local, start, self.stop, cached)
        return DataLoader(
            _Samples(self.dataset),
            batch_sampler=sampler,
            num_workers=self.workers,
            collate_fn=_collate_rows,
            pin_memory=torch.device(self.device).type == "cuda",
            prefetch_factor=self.prefetch if self.workers else None,
            generator=torch.Generator().manual_seed(self.seed),  # the workers' base seed: not from the global RNG
        )

    def close(self) -> None:
        """Stop the workers (they are started again, from the next step, if another step is asked for)."""
        loaded, self._loaded = self._loaded, None
        shutdown = getattr(loaded, "_shutdown_workers", None)  # what the iterator's own finalizer calls
        if shutdown is not None:
            shutdown()

    def __enter__(self) -> FolderBatches:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


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
