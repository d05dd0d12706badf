"""SHA-256 checksums of files, computed once per process for each unchanged file: the shipped assets' manifest
(:mod:`tcd_sampler.assets`) and the ``files`` a training card records
(:func:`~tcd_sampler.distill.export.card.verify_card_files`) are checked with them before weights load."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

__all__ = ["file_sha256", "sha256_file"]

# (resolved path, size, mtime_ns, inode) → hex digest: a file rewritten since is hashed again
_DIGESTS: dict[tuple[str, int, int, int], str] = {}
_LOCK = threading.Lock()


def file_sha256(path: str | Path) -> str:
    """The hex SHA-256 of the file at ``path``, read now (no cache: for callers that keep their own, such as the
    checkpoint verifier's).

    Raises:
        OSError: the file cannot be read (FileNotFoundError when it is missing).
    """
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def sha256_file(path: str | Path) -> str:
    """The hex SHA-256 of the file at ``path`` (:func:`file_sha256`); cached for the rest of the process under the
    file's resolved path, size, modification time and inode, so each unchanged file is read once.

    Raises:
        OSError: the file cannot be read (FileNotFoundError when it is missing).
    """
    file = Path(path).resolve()
    stat = file.stat()
    key = (str(file), stat.st_size, stat.st_mtime_ns, stat.st_ino)
    with _LOCK:
        known = _DIGESTS.get(key)
    if known is not None:
        return known
    value = file_sha256(file)
    with _LOCK:
        _DIGESTS[key] = value
    return value


def _clear_cache() -> None:
    """Forget every cached digest (for tests that change a file within one modification-time tick)."""
    with _LOCK:
        _DIGESTS.clear()
