"""What a data path is: :func:`detect_source` and the path checks the sources share."""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .options import IMAGE_EXTENSIONS, SHARD_SUFFIXES

_BRACE = re.compile(r"\{([^{}]*)\}")


def _is_shard_name(text: str) -> bool:
    return text.lower().endswith(SHARD_SUFFIXES)


def _path_text(path: Any, name: str = "path") -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name} must be a str or os.PathLike, got {type(path).__name__}")
    return os.fspath(path)


def detect_source(path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> str:
    """Which kind of source ``path`` is: ``"webdataset"`` for a list of shards, a brace pattern or glob, a ``.tar``
    file, or a folder of ``.tar`` files with no images beside them; ``"imagefolder"`` for a folder with a
    ``metadata.jsonl``; ``"folder"`` otherwise.

    Args:
        path: the data path (or a list of shards).

    Returns:
        One of :data:`SOURCES`.

    Raises:
        TypeError: ``path`` is not a path or a list of them.
        ValueError: the path does not exist, is a file that is not a shard, or holds a metadata file of a format
            that is not read (``metadata.csv``, ``metadata.parquet``).
    """
    if isinstance(path, (list, tuple)):
        return "webdataset"
    text = _path_text(path)
    if _BRACE.search(text) or glob.has_magic(text) or _is_shard_name(text):
        return "webdataset"
    root = Path(text)
    if not root.exists():
        raise ValueError(f"data path {text} does not exist")
    if not root.is_dir():
        raise ValueError(f"data path {text} is a file, not a folder or a {'/'.join(SHARD_SUFFIXES)} shard")
    if (root / "metadata.jsonl").is_file():
        return "imagefolder"
    for other in ("metadata.csv", "metadata.parquet"):
        if (root / other).is_file():
            raise ValueError(
                f"data folder {root} has {other}: only metadata.jsonl is read (one JSON object a line with "
                "'file_name' and a caption); convert it"
            )
    names = [child.name.lower() for child in root.iterdir() if child.is_file()]
    if any(_is_shard_name(name) for name in names) and not any(name.endswith(IMAGE_EXTENSIONS) for name in names):
        return "webdataset"
    return "folder"
