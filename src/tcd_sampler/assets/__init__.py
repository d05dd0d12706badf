"""The files shipped with the package (the 2-D students ``ring2d_tcd``/``ring2d_lcm``, the digits models under
``digits/``) and their manifest, ``SHA256SUMS``: the SHA-256 of every shipped weight, config and card file, in
``sha256sum``'s format (``cd src/tcd_sampler/assets && sha256sum -c SHA256SUMS`` checks it too).

Every loader of a shipped file calls :func:`verify` first, so a damaged installation stops with an error naming the
file instead of sampling garbage. After retraining the shipped models, write the manifest again with
``python -m tcd_sampler.assets --write-manifest`` (``make digits-models`` does).
"""

from __future__ import annotations

import re
from pathlib import Path

from .._checksums import sha256_file
from .._files import atomic_paths

__all__ = ["MANIFEST_NAME", "ROOT", "SHIPPED_SUFFIXES", "read_manifest", "shipped_files", "verify", "write_manifest"]

#: The folder of the shipped files (this package's own).
ROOT = Path(__file__).resolve().parent
#: The manifest's file name, in :data:`ROOT`.
MANIFEST_NAME = "SHA256SUMS"
#: The endings of the files the manifest covers (what pyproject.toml ships as package data besides the code).
SHIPPED_SUFFIXES = (".safetensors", ".json")

_LINE = re.compile(r"([0-9a-f]{64}) [ *](\S(?:.*\S)?)")
_REINSTALL = "reinstall tcd-sampler"


def _root(root: str | Path | None) -> Path:
    return ROOT if root is None else Path(root).resolve()  # ROOT read at call time (tests point it elsewhere)


def shipped_files(root: str | Path | None = None) -> list[str]:
    """The shipped files under ``root``: the paths, relative to it and with ``/``, of every file whose name ends in
    one of :data:`SHIPPED_SUFFIXES`, hidden names and ``__pycache__`` left out, sorted.

    Args:
        root: the folder. Default None: :data:`ROOT`.
    """
    base = _root(root)
    names = []
    for file in base.rglob("*"):
        parts = file.relative_to(base).parts
        if file.is_file() and file.suffix in SHIPPED_SUFFIXES and not any(p.startswith((".", "__")) for p in parts):
            names.append("/".join(parts))
    return sorted(names)


def read_manifest(root: str | Path | None = None) -> dict[str, str]:
    """The manifest in ``root`` (default None: :data:`ROOT`): relative path → hex SHA-256.

    Raises:
        ValueError: there is no manifest, or a line of it is not ``<64 hex digits>  <path>``.
    """
    file = _root(root) / MANIFEST_NAME
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"the package manifest {file} is missing: {_REINSTALL}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"the package manifest {file} cannot be read ({err}): {_REINSTALL}") from None
    entries: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        match = _LINE.fullmatch(line.strip())
        if match is None:
            raise ValueError(f"the package manifest {file} is damaged at line {number}: {_REINSTALL}")
        entries[match.group(2)] = match.group(1)
    return entries


def write_manifest(root: str | Path | None = None) -> Path:
    """Write the manifest of every :func:`shipped_files` file in ``root`` (default None: :data:`ROOT`) as
    ``SHA256SUMS`` there, atomically; returns its path. Run it after changing a shipped file."""
    base = _root(root)
    lines = [f"{sha256_file(base / name)}  {name}\n" for name in shipped_files(base)]
    with atomic_paths(base / MANIFEST_NAME) as (temp,):
        temp.write_text("".join(lines), encoding="utf-8")
    return base / MANIFEST_NAME


def verify(path: str | Path) -> None:
    """Check a shipped file, or every shipped file in a shipped folder, against the manifest; nothing happens for a
    path outside :data:`ROOT` (a user's own model). Each file is hashed once per process while it stays unchanged.
    Call it before loading anything from ``tcd_sampler/assets``.

    Args:
        path: the file or folder about to be loaded. A missing one is left for the loader to report.

    Raises:
        ValueError: a file's SHA-256 differs from the manifest's, the file is not in the manifest, or the manifest
            is missing or damaged; the message names the file.
    """
    root = _root(None)
    target = Path(path).resolve()
    if not target.is_relative_to(root) or not target.exists():
        return
    prefix = target.relative_to(root).as_posix()
    if target.is_dir():
        names = [name if prefix == "." else f"{prefix}/{name}" for name in shipped_files(target)]
    elif target.suffix in SHIPPED_SUFFIXES:
        names = [prefix]
    else:
        return
    if not names:
        return
    manifest = read_manifest(root)
    for name in names:
        file = root / name
        expected = manifest.get(name)
        if expected is None:
            raise ValueError(
                f"shipped file {file} is not in the package manifest {root / MANIFEST_NAME}: {_REINSTALL} (after "
                "retraining the shipped models, run `python -m tcd_sampler.assets --write-manifest`)"
            )
        if sha256_file(file) != expected:
            raise ValueError(f"shipped file {file} is damaged (sha256 differs from the package manifest): {_REINSTALL}")
