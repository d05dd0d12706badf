"""One entry point for every source: :func:`open_dataset` picks the dataset class for a data path."""

from __future__ import annotations

import os
from collections.abc import Sequence

from ...core.checks import check_choice
from .detect import detect_source
from .folders import ImageCaptionDataset
from .options import SOURCES, DataOptions
from .shards import WebDatasetShards


def open_dataset(
    path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    options: DataOptions | None = None,
    *,
    source: str = "auto",
    rank: int | None = None,
    world_size: int | None = None,
) -> ImageCaptionDataset | WebDatasetShards:
    """The dataset of a data path: an :class:`ImageCaptionDataset` for a folder source (scanned now), a
    :class:`WebDatasetShards` for shards (with its defaults; build it directly for more control).

    Args:
        path: the folder, or the shards (see :class:`WebDatasetShards`).
        options: how samples are made and bad data handled. Default None: ``DataOptions()``.
        source: ``"auto"`` (default: :func:`detect_source`) or one of :data:`SOURCES`.
        rank: for shards, this process's rank. Default None: torch.distributed's, else 0.
        world_size: for shards, the number of ranks. Default None: torch.distributed's, else 1.

    Returns:
        The dataset.

    Raises:
        TypeError, ValueError, DataError: as the two classes.
    """
    check_choice("source", source, ("auto", *SOURCES))
    kind = detect_source(path) if source == "auto" else source
    if kind == "webdataset":
        return WebDatasetShards(path, options, rank=rank, world_size=world_size)
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"a {kind} source is one folder, got a {type(path).__name__} of paths")
    return ImageCaptionDataset(path, options, source=kind)
