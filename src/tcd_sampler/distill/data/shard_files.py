"""Webdataset shard files: expanding brace patterns, finding the shards of what was given, and reading a shard's
samples (the runs of members sharing a key) with Python's :mod:`tarfile`."""

from __future__ import annotations

import glob
import os
import re
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .detect import _BRACE, _is_shard_name, _path_text
from .options import SHARD_CAPTION_EXTENSIONS, SHARD_IMAGE_EXTENSIONS, SHARD_SUFFIXES
from .report import _Bad, _describe

_SHARD_MEMBER = re.compile(r"^((?:.*/|)[^./][^.]*)\.([^/]*)$")  # webdataset's key/extension split; hidden files fail

_RANGE = re.compile(r"(-?\d+)\.\.(-?\d+)")
_TAR_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error)


def expand_shards(pattern: str) -> list[str]:
    """Expand brace groups as the shell (and webdataset) do: ``{000..009}`` (a numeric range, zero-padded when an end
    is), ``{a,b}`` (alternatives), several groups in one pattern.

    Args:
        pattern: the pattern, e.g. ``"data-{000..009}.tar"``.

    Returns:
        The names, in order; ``[pattern]`` when it has no brace group.

    Raises:
        ValueError: a brace group that is neither a range nor a comma list.
    """
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body, prefix, suffix = match.group(1), pattern[: match.start()], pattern[match.end() :]
    span = _RANGE.fullmatch(body)
    if span is not None:
        first, last = span.groups()
        padded = any(len(end.lstrip("-")) > 1 and end.lstrip("-")[0] == "0" for end in (first, last))
        width = max(len(first), len(last)) if padded else 0
        a, b = int(first), int(last)
        step = 1 if b >= a else -1
        choices = [str(value).zfill(width) for value in range(a, b + step, step)]
    elif "," in body:
        choices = body.split(",")
    else:
        raise ValueError(f"shards: cannot expand {{{body}}} in {pattern!r} (a brace group is 'A..B' or 'a,b,...')")
    return [name for choice in choices for name in expand_shards(prefix + choice + suffix)]


def _resolve_shards(shards: Any) -> tuple[list[str], str]:
    """The shard files of ``shards`` (checked to exist) and a short description of what was given."""
    given = list(shards) if isinstance(shards, (list, tuple)) else [shards]
    if not given:
        raise ValueError("shards must name at least one shard, got an empty list")
    files: list[str] = []
    for item in given:
        text = _path_text(item, "shards")
        if os.path.isdir(text):
            found = sorted(str(p) for p in Path(text).rglob("*") if p.is_file() and _is_shard_name(p.name))
            if not found:
                raise ValueError(f"shards folder {text} holds no {'/'.join(SHARD_SUFFIXES)} files")
            files.extend(found)
            continue
        for name in expand_shards(text):
            if glob.has_magic(name):
                matched = sorted(glob.glob(name))
                if not matched:
                    raise ValueError(f"shards pattern {name!r} matches no file")
                files.extend(matched)
            else:
                files.append(name)
    missing = [name for name in files if not os.path.isfile(name)]
    if missing:
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise ValueError(f"shards: {len(missing)} of {len(files)} shard files do not exist: {shown}")
    described = os.fspath(given[0]) if len(given) == 1 else f"[{os.fspath(given[0])}, ... ({len(given)} items)]"
    return files, f"{described} ({len(files)} shards)"


def _tar_groups(path: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """The samples of a shard: ``(key, {extension: bytes})`` for each run of consecutive members sharing a key (only
    the image and caption members are read).

    Raises:
        _Bad: ``unreadable_shard`` when the tar cannot be read (the sample being read then is dropped).
    """
    wanted = set(SHARD_IMAGE_EXTENSIONS) | set(SHARD_CAPTION_EXTENSIONS)
    try:
        archive = tarfile.open(path, mode="r|*")  # noqa: SIM115 - closed by the `with` below
    except _TAR_ERRORS as err:
        raise _Bad("unreadable_shard", _describe(err)) from err
    with archive:
        key: str | None = None
        files: dict[str, bytes] = {}
        while True:
            try:
                member = archive.next()
                if member is None:
                    break
                parts = _SHARD_MEMBER.match(member.name) if member.isfile() else None
                if parts is None:
                    continue
                name, extension = parts.group(1), parts.group(2).lower()
                data = b""
                if extension in wanted:
                    handle = archive.extractfile(member)
                    data = handle.read() if handle is not None else b""
                    if len(data) != member.size:  # a stream-mode tar returns a cut member short, silently
                        raise tarfile.ReadError(f"{member.name} is cut short: {len(data)} of {member.size} bytes")
            except _TAR_ERRORS as err:
                raise _Bad("unreadable_shard", f"{_describe(err)}, at byte {archive.offset}") from err
            if name != key:
                if files and key is not None:
                    yield key, files
                key, files = name, {}
            files[extension] = data
        # tarfile ends a stream quietly at a cut header, at a cut between members, or past the end of a cut member
        # it skipped; an uncompressed shard shows it by what follows its last member: less than the end-of-archive
        # block every tar writer puts there (a compressed shard fails in the decompressor instead)
        if getattr(archive.fileobj, "comptype", "tar") == "tar":
            size = os.path.getsize(path)
            if size - archive.offset < tarfile.BLOCKSIZE:
                raise _Bad("unreadable_shard", f"cut short: it ends at byte {size} without the end-of-archive block")
        if files and key is not None:
            yield key, files
