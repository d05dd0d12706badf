"""tcd_sampler._files under failure: atomic writes flushed to disk before their rename; a folder replaced so that one
always stands at its place, also when killed between two renames (the leftover restored); the clean-up of killed
processes' temporary names that touches nothing else; free-space and full-disk messages."""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

from tcd_sampler import _files
from tcd_sampler._files import atomic_paths, clean_leftovers, replace_folder, space_problem, storage_problem

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's renameat2 and /proc")


def folder(path: Path, text: str) -> Path:
    path.mkdir()
    (path / "file.txt").write_text(text)
    return path


@linux
def test_atomic_paths_flushes_before_the_rename_and_the_folder_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # fmt: skip
    events: list[tuple[str, str]] = []
    fsync, replace = os.fsync, os.replace

    def logged_fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def logged_replace(a: Any, b: Any) -> None:
        events.append(("replace", str(a)))
        replace(a, b)

    monkeypatch.setattr(os, "fsync", logged_fsync)
    monkeypatch.setattr(os, "replace", logged_replace)
    with atomic_paths(tmp_path / "a.json", tmp_path / "b.png") as (a, b):
        a.write_text("{}")
        b.write_bytes(b"png")
    assert events == [("fsync", str(a)), ("fsync", str(b)), ("replace", str(a)), ("replace", str(b)),
                      ("fsync", str(tmp_path))]  # fmt: skip
    assert (tmp_path / "a.json").read_text() == "{}" and sorted(p.name for p in tmp_path.iterdir()) == [
        "a.json",
        "b.png",
    ]


@linux
def test_replace_folder_swaps_in_one_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Linux: the new folder and the old one are exchanged (no folder renamed aside); ``target`` stands at every
    call; the old one is removed, the files and the parent flushed."""
    target, new = folder(tmp_path / "unet", "old"), folder(tmp_path / ".unet.abcd1234.tmp", "new")
    moments: list[bool] = []
    rmtree = shutil.rmtree
    monkeypatch.setattr(shutil, "rmtree", lambda path, **kw: moments.append(target.is_dir()) or rmtree(path, **kw))
    monkeypatch.setattr(_files, "_new_aside", None)  # the fall-back is not taken
    replace_folder(new, target)
    assert moments == [True]
    assert (target / "file.txt").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["unet"]


class Killed(BaseException):
    """The process dies: every later call fails too (so no handler can put things right)."""


def test_a_kill_between_the_two_renames_is_undone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the folders cannot be exchanged (another system, or the file system refuses), a process killed after
    the old folder is renamed aside leaves no folder at ``target``; clean_leftovers puts the old one back (and
    removes the unfinished new one), so the old folder stands again."""
    monkeypatch.setattr(_files, "_exchange", lambda a, b: False)
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    target, new = folder(checkpoints / "step-00000002", "old"), folder(checkpoints / ".tmp-step-00000002", "new")
    calls: list[str] = []
    replace = os.replace

    def dying(a: Any, b: Any) -> None:
        if calls:
            raise Killed
        calls.append(str(a))
        replace(a, b)

    monkeypatch.setattr(os, "replace", dying)
    with pytest.raises(Killed):
        replace_folder(new, target)
    monkeypatch.setattr(os, "replace", replace)
    assert not target.exists()
    (aside,) = checkpoints.glob(".step-00000002.*.old")
    assert clean_leftovers(tmp_path) == [aside, new]
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-00000002"]
    assert (target / "file.txt").read_text() == "old"

    # not killed: the fall-back's two renames replace it
    replace_folder(folder(checkpoints / ".tmp-step-00000002", "new"), target)
    assert (target / "file.txt").read_text() == "new" and sorted(p.name for p in checkpoints.iterdir()) == [target.name]


@linux
def test_a_file_system_without_the_exchange_falls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """renameat2 failing with EINVAL (a file system without RENAME_EXCHANGE): the two renames; another error of it
    is raised."""

    def refusing(code: int) -> Any:
        def renameat2(*args: Any) -> int:
            ctypes.set_errno(code)
            return -1

        return renameat2

    target = folder(tmp_path / "unet", "old")
    monkeypatch.setattr(_files, "_renameat2", lambda: refusing(errno.EINVAL))
    replace_folder(folder(tmp_path / ".unet.abcd1234.tmp", "new"), target)
    assert (target / "file.txt").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["unet"]
    monkeypatch.setattr(_files, "_renameat2", lambda: refusing(errno.EACCES))
    with pytest.raises(PermissionError):
        replace_folder(folder(tmp_path / ".unet.abcd1234.tmp", "newer"), target)
    assert (target / "file.txt").read_text() == "new"


def test_clean_leftovers_removes_only_its_own_names(tmp_path: Path) -> None:
    """Our temporary names go (in the output folder and the run's subfolders, no deeper); look-alikes (a user's dated
    ``.notes.20240101.old``), the wrong kind (a file by a folder's name or the reverse), a .tmp-step folder outside
    checkpoints/, anything deeper (a data folder under the output) and symbolic links stay; no link is followed."""

    def paths(*names: str) -> list[Path]:
        return [tmp_path / name for name in names]

    ours = paths(".0123abcd.tmp.json", "encodings/.deadbeef.tmp", "validation/.89abcdef.tmp.png")
    our_folders = paths("checkpoints/.tmp-step-00000004", ".unet.k2_x9qzp.tmp", ".scheduler.abcd1234.tmp",
                        "checkpoints/.step-00000002.a1b2c3d4.old")  # fmt: skip
    others = paths("deadbeef.tmp", ".DEADBEEF.tmp", ".deadbee.tmp", ".deadbeef.tmpx", ".deadbeef.tmp.tar.gz",
                   ".deadbeef.temp", "checkpoints/.tmp-step-00000004.txt", ".unet.abcd1234.old", "unet/.x.tmp",
                   "notes.old", ".step-1.ab.old", "lora/.89abcdef.tmp.safetensors")  # fmt: skip
    other_folders = paths(".0123abcd.tmp", "other/.tmp-step-00000004", "checkpoints/.tmp-step-x", ".unet.abcd12345.tmp",
                          "unet.abcd1234.tmp", "checkpoints/step-00000002", "notes", ".notes.20240101.old",
                          ".config.backup_1.old", "data/imgs/.cache.v2_final.tmp", "unet/.scheduler.abcd1234.tmp",
                          "data/.unet.k2_x9qzp.tmp")  # fmt: skip
    for path in other_folders + our_folders:
        path.mkdir(parents=True, exist_ok=True)
        (path / "keep.txt").write_text("x")
    for path in ours + others:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    outside = folder(tmp_path.parent / f"{tmp_path.name}-outside", "x")
    (outside / ".0123abcd.tmp").write_text("not under the folder")
    (tmp_path / "linked").symlink_to(outside)
    (tmp_path / ".11111111.tmp").symlink_to(outside / ".0123abcd.tmp")
    (tmp_path / "checkpoints" / ".tmp-step-00000009").symlink_to(outside)

    removed = clean_leftovers(tmp_path)
    assert sorted(removed) == sorted(ours + our_folders)
    assert not any(os.path.lexists(p) for p in ours + our_folders)
    assert all(p.is_file() for p in others) and all((p / "keep.txt").is_file() for p in other_folders)
    assert (outside / ".0123abcd.tmp").is_file() and (tmp_path / ".11111111.tmp").is_symlink()
    assert (tmp_path / "checkpoints" / ".tmp-step-00000009").is_symlink()
    assert clean_leftovers(tmp_path) == [] and clean_leftovers(tmp_path / "missing") == []


def test_space_and_storage_messages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1_500_000_000))
    assert space_problem(tmp_path / "not" / "yet", 1_000_000_000) is None
    assert space_problem(tmp_path / "not" / "yet", 2_400_000_000) == (
        f"no space left on device (need ~2.4 GB, 1.5 GB free in {tmp_path / 'not' / 'yet'})"
    )
    full = f"no space left on device (need ~2.0 MB, 1.5 GB free in {tmp_path})"
    assert storage_problem(OSError(errno.ENOSPC, "No space left on device"), tmp_path, 2_000_000) == full
    assert storage_problem(RuntimeError("IoError(Os { code: 28, kind: StorageFull })"), tmp_path, 2_000_000) == full
    try:
        try:
            raise OSError(errno.EROFS, "Read-only file system")
        except OSError as error:
            raise ValueError("writing failed") from error
    except ValueError as chained:
        assert storage_problem(chained, tmp_path) == "the file system is read-only"
    assert storage_problem(OSError(errno.EDQUOT, "Disk quota exceeded"), tmp_path) == "disk quota exceeded"
    assert storage_problem(OSError(errno.EACCES, "Permission denied"), tmp_path) is None
    assert storage_problem(ValueError("bad value"), tmp_path) is None


def test_a_full_disk_in_an_atomic_write_names_the_file_and_leaves_nothing(tmp_path: Path) -> None:
    """The card's case: a writer that hits a full disk gives one line naming the target, the old file stays, no
    temporary file is left; an error that is not about the disk passes unchanged."""
    target = tmp_path / "card.json"
    target.write_text("old")
    full = pytest.raises(OSError, match=rf"cannot write {target}: no space left on device")
    with full as caught, atomic_paths(target) as (temp,):
        temp.write_text("new, partly")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert "\n" not in str(caught.value)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["card.json"]
    with pytest.raises(ValueError, match="not about the disk"), atomic_paths(target):
        raise ValueError("not about the disk")


def test_a_new_file_gets_a_plain_files_mode(tmp_path: Path) -> None:
    """safetensors writes 0600 files; through atomic_paths a new target gets what open() gives under the umask."""
    target = tmp_path / "weights.safetensors"
    with atomic_paths(target) as (temp,):
        temp.write_bytes(b"x")
        os.chmod(temp, 0o600)
    assert target.stat().st_mode & 0o777 == 0o666 & ~_files.umask()
