"""Writing files safely: folder and free-space checks before slow work, atomic writes (temporary file, flushed to
disk, then renamed), folders replaced atomically, clear messages for a full or read-only disk, and the clean-up of
what a killed process leaves behind; used by every command that writes outputs (images, students, checkpoints, the
demo's results).

The temporary names, which :func:`clean_leftovers` recognises (and nothing else):

- ``.<8 hex digits>.tmp<suffix>``: a file of :func:`atomic_paths` (``<suffix>`` its target's extension);
- ``.<name>.<8 characters>.old``: a folder :func:`replace_folder` renamed aside (where it cannot swap folders),
  for the names a run replaces (``unet``, ``scheduler``, a checkpoint's ``step-<step>``);
- ``.<name>.<8 characters>.tmp``: a ``unet`` or ``scheduler`` folder the exporters write before
  :func:`replace_folder` moves it (``tempfile.mkdtemp(prefix=".<name>.", suffix=".tmp")``);
- ``.tmp-step-<step>`` in a folder named ``checkpoints``: a checkpoint being written
  (:func:`tcd_sampler.distill.checkpoints.save_checkpoint`).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import re
import secrets
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = [
    "atomic_paths",
    "clean_leftovers",
    "folder_problem",
    "replace_folder",
    "size_text",
    "space_problem",
    "storage_problem",
    "umask",
]


def _existing(folder: str | Path) -> Path:
    """``folder``, or its nearest ancestor that exists."""
    existing = Path(folder)
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    return existing


def folder_problem(folder: str | Path) -> str | None:
    """Why files cannot be written into ``folder`` (created if missing), or None when they can.

    Checks, without creating anything, that ``folder`` is not an existing file, that its nearest existing ancestor
    is a folder (not a regular file), and that this ancestor accepts a new file (an anonymous temporary file is
    created and removed at once, so permissions, read-only mounts and ACLs are all honoured; note that root may
    write into folders whose mode forbids it)."""
    path = Path(folder)
    if path.exists() and not path.is_dir():
        return f"{path} is a file, not a folder"
    existing = _existing(path)
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        return f"the folder {existing} is not writable ({err.strerror or err})"
    return None


def size_text(n: float) -> str:
    """``n`` bytes in decimal units: ``"512 bytes"``, ``"3.2 MB"``, ``"12.4 GB"``."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} bytes"


def _free(folder: str | Path) -> int | None:
    try:
        return shutil.disk_usage(_existing(folder)).free
    except OSError:
        return None


def space_problem(folder: str | Path, need_bytes: int) -> str | None:
    """Why ``need_bytes`` more bytes will not fit into ``folder`` (or the file system of its nearest existing
    ancestor): ``"no space left on device (need ~X, Y free in FOLDER)"``; None when they fit, or where the free
    space cannot be read."""
    free = _free(folder)
    if free is None or free >= need_bytes:
        return None
    return f"no space left on device (need ~{size_text(need_bytes)}, {size_text(free)} free in {folder})"


# how the messages of writers that do not raise OSError (safetensors' Rust errors, torch's) name these errors
_NO_SPACE = ("no space left on device", "storagefull", "os error 28", "code: 28", "errno 28")
_QUOTA = ("disk quota exceeded", "quotaexceeded", "os error 122", "code: 122", "errno 122")
_READ_ONLY = ("read-only file system", "readonlyfilesystem", "os error 30", "code: 30", "errno 30")


def storage_problem(error: BaseException, folder: str | Path, need_bytes: int | None = None) -> str | None:
    """What ``error`` (or an exception it was raised from) says about the file system of ``folder``, in a few words:
    ``"no space left on device (need ~X, Y free in FOLDER)"`` (the need where given), ``"disk quota exceeded"``,
    ``"the file system is read-only"``; None for any other error. Recognises an OSError's errno, and the messages of
    writers that raise other errors (safetensors, torch)."""
    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        code, text = getattr(cause, "errno", None), str(cause).lower()
        if code == errno.ENOSPC or any(s in text for s in _NO_SPACE):
            free = _free(folder)
            if need_bytes is not None and free is not None:
                return f"no space left on device (need ~{size_text(need_bytes)}, {size_text(free)} free in {folder})"
            return "no space left on device" + ("" if free is None else f" ({size_text(free)} free in {folder})")
        if code == errno.EDQUOT or any(s in text for s in _QUOTA):
            return "disk quota exceeded"
        if code == errno.EROFS or any(s in text for s in _READ_ONLY):
            return "the file system is read-only"
        cause = cause.__cause__ or cause.__context__
    return None


def _fsync_file(path: Path) -> None:
    """Flush the file ``path`` to disk (errors propagate: a full disk may show only here)."""
    fd = os.open(path, os.O_RDWR if os.name == "nt" else os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(path: Path) -> None:
    """Flush the entries of the folder ``path`` (renames, new files) to disk; nothing where the system refuses."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Flush every file and folder under the folder ``root`` (and ``root``) to disk; symbolic links are left."""
    for folder, _, files in os.walk(root):
        for name in files:
            path = Path(folder) / name
            if not path.is_symlink():
                _fsync_file(path)
        _fsync_folder(Path(folder))


@contextmanager
def atomic_paths(*paths: str | Path) -> Iterator[list[Path]]:
    """Write files atomically: yields one temporary path per entry of ``paths``, in the same folder and with the
    same extension (so writers that infer the format from the name still work); when the block ends without an
    error each is flushed to disk and moved onto its target with :func:`os.replace`, one after another in the order
    given, and the folders are flushed after (so a power cut leaves the old file or the new one, never an empty
    one); when it raises every temporary file is removed, leaving the targets as they were. No file is ever
    half-written; with several targets, a failure between two renames (a full disk cannot cause one) would leave the
    first ones new. The folders must exist; a target that is a folder is refused before anything is written.

    A full disk, a quota or a read-only file system while the block writes raise an OSError whose one line names the
    targets and the problem (:func:`storage_problem`). A new target gets the mode a plain ``open()`` gives under the
    umask (whatever mode the writer gave the temporary file: safetensors makes its files 0600), and a replaced
    target's permissions carry over to its successor. A process killed by a signal may leave a hidden ``.*.tmp*``
    file behind (never a target), which :func:`clean_leftovers` removes."""
    targets = [Path(p) for p in paths]
    for target in targets:
        if target.is_dir():
            raise IsADirectoryError(f"{target} is a folder; it cannot be replaced by a file")
    temps: list[Path] = []
    try:
        for target in targets:
            temps.append(_new_temp(target))
        try:
            yield list(temps)
            for temp in temps:
                _fsync_file(temp)
        except Exception as error:  # a full or read-only disk: one line naming the file
            problem = storage_problem(error, targets[0].parent)
            if problem is None:
                raise
            raise OSError(f"cannot write {', '.join(map(str, targets))}: {problem}") from None
        for temp, target in zip(temps, targets, strict=True):
            # a replaced target's mode carries over; a new file gets a plain open()'s (some writers make theirs 0600)
            os.chmod(temp, target.stat().st_mode & 0o7777 if target.is_file() else 0o666 & ~umask())
            os.replace(temp, target)
        for folder in dict.fromkeys(target.parent for target in targets):
            _fsync_folder(folder)
    finally:
        for temp in temps:
            temp.unlink(missing_ok=True)


_UMASK_LOCK = threading.Lock()


def umask() -> int:
    """The process's umask: read from ``/proc/self/status`` where Linux shows it, else set and restored at once
    (``os.umask`` has no read-only form; a lock keeps two threads of this module from racing on it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def _new_temp(target: Path) -> Path:
    """A new, empty, hidden file beside ``target`` with its extension."""
    while True:
        temp = target.parent / f".{secrets.token_hex(4)}.tmp{target.suffix}"  # short: any valid target name fits
        try:
            with open(temp, "x"):
                return temp
        except FileExistsError:
            continue


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2  # <fcntl.h>, <linux/fs.h>


@functools.cache
def _renameat2() -> Callable[..., int] | None:
    """Linux's ``renameat2`` from the C library, or None (another system, or a C library without it)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def _exchange(a: Path, b: Path) -> bool:
    """Swap the existing ``a`` and ``b`` in one step (``renameat2(…, RENAME_EXCHANGE)``); False, with nothing
    changed, where the system or the file system cannot."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM):  # EPERM: seccomp
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def replace_folder(new: Path, target: Path) -> None:
    """Move the finished folder ``new`` onto ``target`` (in the same folder), so that at every moment either the old
    or the new folder stands at ``target``; ``new``'s files are flushed to disk first, and the parent folder after.

    Where ``target`` exists, Linux swaps the two in one step (``renameat2`` with ``RENAME_EXCHANGE``) and then
    removes the old folder, now at ``new``. Elsewhere (another system, or a file system without the exchange) the
    old folder is renamed aside to ``.<target>.<8 characters>.old`` first, ``new`` onto ``target``, then the old one
    removed: a process killed between those two renames leaves no folder at ``target``, and :func:`clean_leftovers`
    puts the old one back."""
    new, target = Path(new), Path(target)
    _fsync_tree(new)
    if not os.path.lexists(target):
        os.replace(new, target)
        _fsync_folder(target.parent)
        return
    if _exchange(new, target):
        _fsync_folder(target.parent)
        shutil.rmtree(new, ignore_errors=True)
        return
    old = _new_aside(target)
    os.replace(target, old)  # onto the empty folder just made: atomic
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old, target)
        raise
    _fsync_folder(target.parent)
    shutil.rmtree(old, ignore_errors=True)


def _new_aside(target: Path) -> Path:
    """A new, empty, hidden folder ``.<target>.<8 hex digits>.old`` beside ``target``."""
    while True:
        old = target.parent / f".{target.name}.{secrets.token_hex(4)}.old"
        try:
            old.mkdir()
            return old
        except FileExistsError:
            continue


_TEMP_FILE = re.compile(r"\.[0-9a-f]{8}\.tmp(\.[^.]*)?")  # atomic_paths'
# the folders the trainer replaces (a full student's unet/, a pixel pipeline's scheduler/, checkpoints): aside
# copies by replace_folder (mkdtemp's tags in earlier releases) and the exporters' mkdtemp folders
_OURS = r"(?P<name>unet|scheduler|step-\d{8,})"
_ASIDE = re.compile(rf"\.{_OURS}\.[a-z0-9_]{{8}}\.old")
_TEMP_FOLDER = re.compile(r"\.(unet|scheduler)\.[a-z0-9_]{8}\.tmp")
_TEMP_STEP = re.compile(r"\.tmp-step-\d{8,}")  # save_checkpoint's, in a folder named "checkpoints"
#: The subfolders of a run's output folder that :func:`clean_leftovers` looks into (besides the folder itself).
RUN_SUBFOLDERS = ("checkpoints", "validation", "encodings")


def clean_leftovers(folder: str | Path, subfolders: tuple[str, ...] = RUN_SUBFOLDERS) -> list[Path]:
    """Tidy up what killed runs of ours left in a run's output ``folder`` and its ``subfolders`` (default
    :data:`RUN_SUBFOLDERS`), no deeper: remove the temporary files and folders of the module docstring's names, and
    put back a folder that :func:`replace_folder` had renamed aside when it was killed before its second rename
    (``.<name>.<8 characters>.old`` where ``<name>`` — ``unet``, ``scheduler`` or a checkpoint's ``step-…`` — is
    missing); an aside folder whose ``<name>`` stands is removed. Nothing else is touched: no other name (a user's
    ``.notes.20240101.old`` stays), no symbolic link (none followed), a temporary name only of its kind (file or
    folder). Call it only while no other process writes there. Returns the leftovers removed or moved back, in the
    order handled; one that cannot be removed is left (and not returned)."""
    handled: list[Path] = []
    root = Path(folder)
    if not root.is_dir() or root.is_symlink():
        return handled
    places = [root, *(root / name for name in subfolders)]
    for parent in places:
        if not parent.is_dir() or parent.is_symlink():
            continue
        for entry in sorted(os.scandir(parent), key=lambda e: e.name):
            path, name = Path(entry.path), entry.name
            if entry.is_symlink():
                continue
            if entry.is_dir():
                aside = _ASIDE.fullmatch(name)
                temporary = _TEMP_FOLDER.fullmatch(name) or (
                    parent.name == "checkpoints" and _TEMP_STEP.fullmatch(name)
                )
                if aside and not os.path.lexists(parent / aside["name"]):
                    try:
                        os.replace(path, parent / aside["name"])
                    except OSError:
                        continue
                    handled.append(path)
                elif aside or temporary:
                    shutil.rmtree(path, ignore_errors=True)
                    if not path.exists():
                        handled.append(path)
            elif entry.is_file() and _TEMP_FILE.fullmatch(name):
                try:
                    path.unlink()
                except OSError:
                    continue
                handled.append(path)
    return handled
