"""Writing files safely: folder checks before slow work, and atomic writes (temporary file, then rename), used by
every command that writes outputs (images, students, the demo's results)."""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_paths", "folder_problem", "replace_folder"]


def folder_problem(folder: str | Path) -> str | None:
    """Why files cannot be written into ``folder`` (created if missing), or None when they can.

    Checks, without creating anything, that ``folder`` is not an existing file, that its nearest existing ancestor
    is a folder (not a regular file), and that this ancestor accepts a new file (an anonymous temporary file is
    created and removed at once, so permissions, read-only mounts and ACLs are all honoured; note that root may
    write into folders whose mode forbids it)."""
    path = Path(folder)
    if path.exists() and not path.is_dir():
        return f"{path} is a file, not a folder"
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        return f"the folder {existing} is not writable ({err.strerror or err})"
    return None


@contextmanager
def atomic_paths(*paths: str | Path) -> Iterator[list[Path]]:
    """Write files atomically: yields one temporary path per entry of ``paths``, in the same folder and with the
    same extension (so writers that infer the format from the name still work); when the block ends without an
    error each is moved onto its target with :func:`os.replace`, one after another in the order given, and when it
    raises every temporary file is removed, leaving the targets as they were. No file is ever half-written; with
    several targets, a failure between two renames (a full disk cannot cause one) would leave the first ones new.
    The folders must exist; a target that is a folder is refused before anything is written.

    A temporary file is created as a plain ``open(path, "x")`` creates files (the umask applies, unless the writer
    sets its own mode), and a replaced target's permissions carry over to its successor. A process killed by a
    signal may leave a hidden ``.*.tmp*`` file behind (never a target)."""
    targets = [Path(p) for p in paths]
    for target in targets:
        if target.is_dir():
            raise IsADirectoryError(f"{target} is a folder; it cannot be replaced by a file")
    temps: list[Path] = []
    try:
        for target in targets:
            temps.append(_new_temp(target))
        yield list(temps)
        for temp, target in zip(temps, targets, strict=True):
            if target.is_file():
                os.chmod(temp, target.stat().st_mode & 0o7777)
            os.replace(temp, target)
    finally:
        for temp in temps:
            temp.unlink(missing_ok=True)


def _new_temp(target: Path) -> Path:
    """A new, empty, hidden file beside ``target`` with its extension."""
    while True:
        temp = target.parent / f".{secrets.token_hex(4)}.tmp{target.suffix}"  # short: any valid target name fits
        try:
            with open(temp, "x"):
                return temp
        except FileExistsError:
            continue


def replace_folder(new: Path, target: Path) -> None:
    """Rename the finished folder ``new`` onto ``target`` (in the same folder); an existing ``target`` is renamed aside
    first and removed after, so at every moment either the old or the new folder stands at ``target``."""
    if not target.exists():
        os.replace(new, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=new.parent))
    os.replace(target, old)  # onto the empty folder just made: atomic
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)
