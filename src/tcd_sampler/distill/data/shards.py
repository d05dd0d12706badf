"""The webdataset source: :class:`WebDatasetShards`, shards streamed as samples, split across ranks and workers."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple, TypeVar

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from ...core.checks import check_bool, check_int
from .images import _DRAW_BUFFER, _DRAW_SHARDS, _draws, _load_image, _pil, _to_sample
from .options import SHARD_CAPTION_EXTENSIONS, SHARD_IMAGE_EXTENSIONS, DataOptions, _options
from .report import DataReport, _Bad, _describe, log
from .shard_files import _resolve_shards, _tar_groups

T = TypeVar("T")


class _Group(NamedTuple):
    shard: int
    position: int
    key: str
    files: dict[str, bytes]


def _shuffled(items: Iterable[T], size: int, rng: np.random.Generator) -> Iterator[T]:
    """``items`` through a shuffle buffer of ``size``: each new item takes the place of a random one, which goes."""
    buffer: list[T] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        at = int(rng.integers(size))
        yield buffer[at]
        buffer[at] = item
    rng.shuffle(buffer)
    yield from buffer


def _distributed(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """``rank`` and ``world_size``, each defaulting to torch.distributed's when a process group is initialised."""
    initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
    if world_size is None:
        world_size = torch.distributed.get_world_size() if initialised else 1
    if rank is None:
        rank = torch.distributed.get_rank() if initialised else 0
    world_size = check_int("world_size", world_size, 1)
    return check_int("rank", rank, 0, world_size - 1), world_size


class WebDatasetShards(IterableDataset[dict[str, Any]]):
    """Webdataset ``.tar`` shards streamed as samples (the dicts of the package's docstring).

    Shards are split across ranks first (rank ``r`` of ``W`` takes every ``W``-th shard of the pass's order, starting
    at ``r``), then across the DataLoader workers of each rank the same way: every shard is read by exactly one
    worker of one rank in a pass. Give each rank at least as many shards as it has workers, or the extra workers
    idle; a rank's sample count follows its shards, so for DDP prefer ``repeat=True`` and a fixed number of steps.
    Do not pass its DataLoader through ``accelerator.prepare`` with batch dispatching or sharding (accelerate's
    default for an IterableDataset): the split is done here.

    Bad samples are counted as they stream, per worker (:attr:`report` holds the latest count of an iteration in
    this process, i.e. with ``num_workers=0``): the stream stops with one :class:`DataError` once ``min_samples``
    samples have been seen and the running bad fraction exceeds ``options.max_bad_fraction``, or at the end of a
    pass when the whole pass exceeds it or had no usable sample. A shard that breaks counts as one bad sample; the
    samples read before the break are kept.

    Args:
        shards: a ``.tar`` file, a folder of them (recursively), a brace pattern (``data-{000..009}.tar``) or glob,
            or a list of these.
        options: how samples are made and bad data handled. Default None: ``DataOptions()``.
        rank: this process's rank, in ``[0, world_size)``. Default None: torch.distributed's rank when a process
            group is initialised (build the dataset after ``Accelerator()``), else 0.
        world_size: the number of ranks, at least 1 and at most the number of shards. Default None:
            torch.distributed's world size when initialised, else 1.
        shuffle_shards: read the shards in an order shuffled each pass, seeded by ``(options.seed, epoch)`` and the
            same on every rank (True, default); False keeps the given order.
        shuffle_buffer: shuffle samples through a buffer of this many (encoded) samples, per worker; 0 or 1 keeps
            the shard order (default 0). Webdataset's recipes use about 1000.
        repeat: start a new pass (the next epoch) after the last, forever (default False: one pass).
        min_samples: the number of samples a worker must have seen before the running bad fraction can stop the
            stream, at least 1. Default 100.

    Raises:
        TypeError: an argument of the wrong type.
        ValueError: an invalid argument, a shard that does not exist, fewer shards than ranks.
    """

    def __init__(
        self,
        shards: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        options: DataOptions | None = None,
        *,
        rank: int | None = None,
        world_size: int | None = None,
        shuffle_shards: bool = True,
        shuffle_buffer: int = 0,
        repeat: bool = False,
        min_samples: int = 100,
    ) -> None:
        self.options = _options(options)
        self.rank, self.world_size = _distributed(rank, world_size)
        self.shuffle_shards = check_bool("shuffle_shards", shuffle_shards)
        self.shuffle_buffer = check_int("shuffle_buffer", shuffle_buffer, 0)
        self.repeat = check_bool("repeat", repeat)
        self.min_samples = check_int("min_samples", min_samples, 1)
        self.shards, self.source = _resolve_shards(shards)
        if len(self.shards) < self.world_size:
            raise ValueError(
                f"shards: {len(self.shards)} shards cannot be split across world_size={self.world_size} ranks; each "
                "rank needs at least one shard"
            )
        _pil()
        self._epoch = 0
        self.report = self._new_report()

    def _new_report(self) -> DataReport:
        return DataReport("webdataset", self.source, self.options.max_bad_fraction)

    def set_epoch(self, epoch: int) -> None:
        """Start the next iteration at this epoch (its shard order and its samples' draws).

        Args:
            epoch: a non-negative integer. Set it before the DataLoader's iterator is made (its workers copy the
                dataset then). The constructor starts at 0.
        """
        self._epoch = check_int("epoch", epoch, 0)

    def shards_for(self, worker: int = 0, num_workers: int = 1, epoch: int | None = None) -> list[int]:
        """The indices (into :attr:`shards`) that a worker of this rank reads in a pass.

        Args:
            worker: the DataLoader worker's id, in ``[0, num_workers)``. Default 0.
            num_workers: the number of workers of this rank (1 for ``num_workers=0``). Default 1.
            epoch: the pass's epoch (it sets the shuffled order). Default None: the current epoch.

        Returns:
            The shard indices, in reading order.
        """
        num_workers = check_int("num_workers", num_workers, 1)
        worker = check_int("worker", worker, 0, num_workers - 1)
        epoch = self._epoch if epoch is None else check_int("epoch", epoch, 0)
        count = len(self.shards)
        if self.shuffle_shards:
            order = np.random.default_rng((_DRAW_SHARDS, self.options.seed, epoch)).permutation(count).tolist()
        else:
            order = list(range(count))
        return order[self.rank :: self.world_size][worker::num_workers]

    def _bad(self, report: DataReport, reason: str, where: str, detail: str, scope: str) -> None:
        report.record_bad(reason, where, detail)
        if report.total >= self.min_samples and report.exceeds:
            report.check(scope=f" (running count after {report.total} samples{scope})")

    def _groups(self, indices: list[int], report: DataReport, scope: str) -> Iterator[_Group]:
        for shard in indices:
            path = self.shards[shard]
            groups = _tar_groups(path)
            position = 0
            while True:
                try:
                    key, files = next(groups)
                except StopIteration:
                    break
                except _Bad as bad:
                    self._bad(report, bad.reason, path, bad.detail, scope)
                    break
                position += 1
                if any(extension in files for extension in SHARD_IMAGE_EXTENSIONS + SHARD_CAPTION_EXTENSIONS):
                    yield _Group(shard, position - 1, key, files)

    def _caption(self, group: _Group) -> str:
        """The group's caption (the first of .txt, .caption, .json present), or ``""`` when none is required."""
        options = self.options
        extension = next((ext for ext in SHARD_CAPTION_EXTENSIONS if ext in group.files), None)
        if extension is None:
            if options.require_captions:
                listed = "|".join(SHARD_CAPTION_EXTENSIONS)
                raise _Bad("missing_caption", f"no {group.key}.{listed} beside it")
            return ""
        try:
            text = group.files[extension].decode("utf-8-sig")
            if extension == "json":
                record = json.loads(text)
                value = record.get(options.caption_column, record.get("caption")) if isinstance(record, dict) else None
                if not isinstance(value, str):
                    keys = f"'{options.caption_column}' or 'caption'"
                    raise _Bad("missing_caption", f"{group.key}.json has no {keys} text")
                text = value
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise _Bad("missing_caption", f"{group.key}.{extension} is not readable: {_describe(err)}") from err
        text = text.strip()
        if not text and options.require_captions:
            raise _Bad("missing_caption", f"{group.key}.{extension} is empty")
        return text

    def _sample(self, group: _Group, epoch: int, report: DataReport, scope: str) -> dict[str, Any] | None:
        shard = self.shards[group.shard]
        extension = next((ext for ext in SHARD_IMAGE_EXTENSIONS if ext in group.files), None)
        if extension is None:
            detail = f"no {group.key}.{'|'.join(SHARD_IMAGE_EXTENSIONS)}"
            self._bad(report, "missing_image", f"{shard}:{group.key}", detail, scope)
            return None
        where = f"{shard}:{group.key}.{extension}"
        try:
            caption = self._caption(group)
            image = _load_image(group.files[extension], self.options.min_side)
        except _Bad as bad:
            self._bad(report, bad.reason, where, bad.detail, scope)
            return None
        except Exception as err:  # whatever Pillow raises for bytes it cannot decode
            self._bad(report, "unreadable_image", where, _describe(err), scope)
            return None
        report.record_used()
        draws = _draws(self.options.seed, epoch, group.shard, group.position)
        return _to_sample(image, caption, self.options, draws)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        scope = f"; rank {self.rank}, worker {worker}" if self.world_size > 1 or workers > 1 else ""
        report = self._new_report()
        self.report = report
        epoch = self._epoch
        while True:
            indices = self.shards_for(worker, workers, epoch)
            if not indices:
                return  # more workers than this rank's shards: this one idles
            groups: Iterable[_Group] = self._groups(indices, report, scope)
            if self.shuffle_buffer > 1:
                seed = (_DRAW_BUFFER, self.options.seed, epoch, self.rank, worker)
                groups = _shuffled(groups, self.shuffle_buffer, np.random.default_rng(seed))
            for group in groups:
                sample = self._sample(group, epoch, report, scope)
                if sample is not None:
                    yield sample
            names = ", ".join(os.path.basename(self.shards[i]) for i in indices[:3])
            report.check(empty_hint=f"shards read: {names}{', ...' if len(indices) > 3 else ''}", scope=scope)
            if report.skipped_total:
                log.warning("%s", report.summary())
            if not self.repeat:
                return
            epoch += 1
