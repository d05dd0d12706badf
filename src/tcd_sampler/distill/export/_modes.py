"""The permissions a plain ``open()`` / ``mkdir()`` gives under the process's umask, for the exported files: writers
such as safetensors (0.7 and later) create their files with mode 0600, and ``tempfile.mkdtemp`` its folders with 0700,
which would leave a LoRA or a student unreadable to the group and others that can read its card."""

from __future__ import annotations

import os
from pathlib import Path

from ..._files import umask

__all__ = ["give_plain_mode", "give_plain_modes", "umask"]


def give_plain_mode(path: str | Path) -> None:
    """Give the file or folder ``path`` the mode a plain ``open()`` (``0o666``) or ``mkdir()`` (``0o777``) would
    have given it under the umask."""
    target = Path(path)
    os.chmod(target, (0o777 if target.is_dir() else 0o666) & ~umask())


def give_plain_modes(folder: str | Path) -> None:
    """:func:`give_plain_mode` for ``folder`` and everything in it (links left alone)."""
    root = Path(folder)
    give_plain_mode(root)
    for path in root.rglob("*"):
        if not path.is_symlink():
            give_plain_mode(path)
