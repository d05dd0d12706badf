"""Encoding each training image and caption once (``TrainConfig.cache_encodings``): the data latents by dataset
index (the VAE runs once per image, and the image is read once) and the text encodings by caption (the text
encoders run once per distinct caption, the empty prompt of guidance and dropout included), gathered per step. Only
for fixed crops (center, no flip): a random crop or flip changes an image's latents every epoch. A cached run
computes what an uncached one does, up to the floating-point effect of encoding in batches of another composition.

Kept in CPU memory, or, with a ``folder``, on disk as safetensors shards that the processes of a run share and a
later run reuses:

- ``key.json``: what the encodings depend on (the caller's key: the teacher, its VAE's dtype, the data's
  fingerprint, the data options…, and the resolution). A folder made for another key is cleared (its shards
  removed, one warning logged) and filled again.
- ``latents-r{rank}-{token}-{n}.safetensors``: ``index`` (int64 ``(N,)``, dataset indices), ``latents``
  ``(N, …)`` as the VAE gave them, ``sizes`` (int64 ``(N, 4)``: SDXL's original size and crop corner).
- ``text-r{rank}-{token}-{n}.safetensors``: ``embeds`` ``(N, …)`` and, for SDXL, ``pooled`` ``(N, …)``; the
  captions, in order, as a JSON list in the header's metadata (``captions``).

Each process writes its own shards (``token`` is random per cache, so two caches never write the same name), each
atomically (a temporary file renamed into place), once ``shard_size`` new entries are waiting and at
:meth:`EncodingCache.flush`; it reads every shard present when it starts and, for latents, again when a batch holds
images it has not seen (another process may have encoded them). Entries not yet written when a process stops are
encoded again by the next run. Latents on disk are read per batch (only the index and SDXL's sizes stay in memory);
text encodings are kept in memory, as the text encoders' cache needs them there.
"""

from __future__ import annotations

import json
import logging
import secrets
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple

import torch

from .._files import atomic_paths
from ..core.checks import check_int
from .data import collate
from .teachers import encode_latents

__all__ = ["KEY_FILE", "Decoded", "EncodingCache", "TextEncodings"]

log = logging.getLogger(__name__)

#: The file of a cache folder that says what its encodings depend on.
KEY_FILE = "key.json"
_FORMAT, _VERSION = "tcd-sampler encodings", 1
_LATENTS, _TEXT = "latents", "text"
# the files a cache folder holds besides key.json (temporary ones are atomic_paths' hidden names)
_OURS = (f"{_LATENTS}-r*.safetensors", f"{_TEXT}-r*.safetensors", ".*.tmp.safetensors", ".*.tmp.json")

Sizes = tuple[tuple[int, int], tuple[int, int]]


class Decoded(NamedTuple):
    """Samples decoded ahead (by a DataLoader's workers): their dataset indices and their :func:`collate`-d batch."""

    indices: list[int]
    batch: dict[str, Any]


class TextEncodings(dict[str, tuple[torch.Tensor, torch.Tensor | None]]):
    """The text encodings (embeddings, SDXL's pooled embeddings or None) by caption, on the CPU: what
    :func:`tcd_sampler.distill.teachers.conditions` takes as its ``cache``. Remembers the captions set since the
    last write (:attr:`fresh`)."""

    def __init__(self) -> None:
        super().__init__()
        self.fresh: list[str] = []

    def __setitem__(self, caption: str, value: tuple[torch.Tensor, torch.Tensor | None]) -> None:
        if caption not in self:
            self.fresh.append(caption)
        super().__setitem__(caption, value)


class EncodingCache:
    """The latents (and SDXL's size conditions) of the images seen so far, by dataset index, and the text encodings
    by caption (:attr:`text`, what :func:`tcd_sampler.distill.teachers.conditions` takes as its ``cache``); in memory,
    or in a folder (see the module's docstring). Usable as a context manager (:meth:`close` at the end).

    Args:
        pipe: the teacher pipeline (its VAE encodes; a pixel-space one caches the pixels).
        device: the device the latents are encoded on and returned to.
        resolution: the training resolution (SDXL's target size condition).
        folder: the folder the encodings are kept in (created if missing), or None (default): in memory only.
            With several processes, let one (rank 0) construct its cache first, then the others: a folder made for
            another key is cleared by the first process that opens it.
        key: with a folder, what the encodings depend on, a JSON-able dict (e.g. the teacher, the VAE's dtype,
            :meth:`~tcd_sampler.distill.data.ImageCaptionDataset.fingerprint`, the data options).
        rank: this process's rank (in the names of the shards it writes).
        shard_size: entries (images or captions) a shard holds, at least 1; fewer at :meth:`flush`. Default 256.

    Raises:
        TypeError: a key that is not a dict of JSON values.
        ValueError: a folder without a key, an invalid rank or shard size.
    """

    def __init__(self, pipe: Any, device: Any, resolution: int, *, folder: str | Path | None = None,
                 key: dict[str, Any] | None = None, rank: int = 0, shard_size: int = 256) -> None:  # fmt: skip
        self.pipe, self.device, self.resolution = pipe, device, resolution
        self.latents: dict[int, torch.Tensor] = {}  # in memory: all of them; with a folder: those not yet written
        self.sizes: dict[int, Sizes] = {}
        self.text = TextEncodings()
        self.folder = None if folder is None else Path(folder)
        self.rank, self.shard_size = check_int("rank", rank, 0), check_int("shard_size", shard_size, 1)
        self._stored: dict[int, tuple[Path, int]] = {}  # written latents: their shard and row
        self._read: set[str] = set()  # the shards read or written
        self._token, self._written = secrets.token_hex(4), 0
        self._captions: set[str] | None = None  # the data's distinct captions (by :meth:`complete`)
        if self.folder is not None:
            if key is None:
                raise ValueError("key is needed with a folder: what the encodings depend on (teacher, data, …)")
            self._claim(key)
            self._refresh()

    def has(self, index: int) -> bool:
        """Whether the latents of dataset index ``index`` are cached (in memory or in the folder)."""
        return index in self.latents or index in self._stored

    def complete(self, dataset: Any, empty: bool = True) -> bool:
        """Whether every image of ``dataset`` has its latents cached (in memory or, after a look at the folder, in
        it) and, for a pipeline with a text encoder, every caption and (with ``empty``, default True: the steps
        encode the empty prompt, for caption dropout or guidance) the empty one their encodings: no encoder is
        needed for a batch from now on. Cheap while incomplete (counts compared first)."""
        n = len(dataset)
        if len(self.latents) + len(self._stored) < n and self.folder is not None:
            self._refresh()
        if len(self.latents) + len(self._stored) < n or not all(self.has(i) for i in range(n)):
            return False
        if getattr(self.pipe, "text_encoder", None) is None:
            return True
        if self._captions is None:
            self._captions = {record.caption for record in dataset.records} | ({""} if empty else set())
        return len(self.text) >= len(self._captions) and self._captions <= self.text.keys()

    def batch(
        self, dataset: Any, rows: list[tuple[int, int]], decoded: Decoded | None = None
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """The latents ``(B, …)`` on the device and the batch fields (``caption`` after the epoch's dropout,
        ``original_size``, ``crop_top_left``, ``resolution``) of ``rows`` (``(index, epoch)`` pairs); images not
        seen before are encoded, in one batch: taken from ``decoded`` where it has them, else read now."""
        missing = self._missing(rows)
        if missing and self.folder is not None:
            self._refresh()  # another process may have encoded them
            missing = self._missing(rows)
        if missing:
            fresh = _samples(dataset, rows, missing, decoded)
            encoded = encode_latents(self.pipe, fresh["pixel_values"].to(self.device, non_blocking=True)).cpu()
            for j, index in enumerate(missing):
                self.latents[index] = encoded[j]
                (h, w), (top, left) = fresh["original_size"][j].tolist(), fresh["crop_top_left"][j].tolist()
                self.sizes[index] = ((h, w), (top, left))
        indices = [index for index, _ in rows]
        latents = self._gather(indices).to(self.device)
        if self.folder is not None:
            self._write(everything=False)
        batch = {
            "caption": [dataset.caption(index, epoch) for index, epoch in rows],
            "original_size": torch.tensor([self.sizes[i][0] for i in indices], dtype=torch.int64),
            "crop_top_left": torch.tensor([self.sizes[i][1] for i in indices], dtype=torch.int64),
            "resolution": self.resolution,
        }
        return latents, batch

    def flush(self) -> None:
        """Write every entry not yet written (nothing without a folder)."""
        if self.folder is not None:
            self._write(everything=True)

    def close(self) -> None:
        """:meth:`flush`; the cache stays usable."""
        self.flush()

    def __enter__(self) -> EncodingCache:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def _missing(self, rows: list[tuple[int, int]]) -> list[int]:
        return list(dict.fromkeys(index for index, _ in rows if not self.has(index)))

    def _gather(self, indices: list[int]) -> torch.Tensor:
        """The latents of ``indices`` stacked on the CPU: from memory, or read from their shards."""
        found: list[torch.Tensor | None] = [self.latents.get(index) for index in indices]
        by_shard: dict[Path, list[int]] = {}
        for position, index in enumerate(indices):
            if found[position] is None:
                by_shard.setdefault(self._stored[index][0], []).append(position)
        if by_shard:
            from safetensors import safe_open

            for shard, positions in by_shard.items():
                with safe_open(str(shard), framework="pt") as opened:
                    block = opened.get_slice("latents")
                    for position in positions:
                        found[position] = block[self._stored[indices[position]][1]]
        return torch.stack(found)  # type: ignore[arg-type]

    def _claim(self, key: dict[str, Any]) -> None:
        """Make the folder hold encodings for ``key``: kept if its key.json says so, else cleared and claimed."""
        assert self.folder is not None
        if not isinstance(key, dict):
            raise TypeError(f"key must be a dict, got {type(key).__name__}")
        try:
            wanted = {"format": _FORMAT, "version": _VERSION, "resolution": self.resolution,
                      "key": json.loads(json.dumps(key))}  # fmt: skip
        except (TypeError, ValueError) as err:
            raise TypeError(f"key must hold JSON values (str, numbers, bools, None, lists, dicts): {err}") from err
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / KEY_FILE
        try:
            found: Any = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            found = None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            found = "unreadable"
        if found == wanted:
            return
        stale = sorted({file for pattern in _OURS for file in self.folder.glob(pattern)})
        if found is not None or stale:
            log.warning("encoding cache %s: %s; removing its %d shard files and encoding again", self.folder,
                        _what_differs(found, wanted), len(stale))  # fmt: skip
        for file in stale:
            file.unlink(missing_ok=True)
        with atomic_paths(path) as (temp,):
            temp.write_text(json.dumps(wanted, indent=1, sort_keys=True), encoding="utf-8")

    def _refresh(self) -> None:
        """Read the shards not read yet: the index and sizes of latents shards, the whole of text shards."""
        assert self.folder is not None
        from safetensors import safe_open

        for shard in sorted(self.folder.glob(f"{_LATENTS}-r*.safetensors")):
            if shard.name in self._read:
                continue
            self._read.add(shard.name)
            with safe_open(str(shard), framework="pt") as opened:
                indices, sizes = opened.get_tensor("index").tolist(), opened.get_tensor("sizes").tolist()
            for row, (index, (h, w, top, left)) in enumerate(zip(indices, sizes, strict=True)):
                if not self.has(index):
                    self._stored[index] = (shard, row)
                    self.sizes[index] = ((h, w), (top, left))
        for shard in sorted(self.folder.glob(f"{_TEXT}-r*.safetensors")):
            if shard.name in self._read:
                continue
            self._read.add(shard.name)
            with safe_open(str(shard), framework="pt") as opened:
                captions = json.loads(opened.metadata()["captions"])
                embeds = opened.get_tensor("embeds")
                pooled = opened.get_tensor("pooled") if "pooled" in opened.keys() else None  # noqa: SIM118
            for j, caption in enumerate(captions):
                if caption not in self.text:  # not a fresh entry: it is on disk already
                    dict.__setitem__(self.text, caption, (embeds[j], None if pooled is None else pooled[j]))

    def _write(self, everything: bool) -> None:
        """Write the waiting latents and text encodings as shards, each once ``shard_size`` wait (any number with
        ``everything``)."""
        waiting = list(self.latents)
        if waiting and (everything or len(waiting) >= self.shard_size):
            sizes = [[*self.sizes[i][0], *self.sizes[i][1]] for i in waiting]
            shard = self._save(_LATENTS, {"index": torch.tensor(waiting, dtype=torch.int64),
                                          "latents": torch.stack([self.latents[i] for i in waiting]),
                                          "sizes": torch.tensor(sizes, dtype=torch.int64)})  # fmt: skip
            for row, index in enumerate(waiting):
                self._stored[index] = (shard, row)
            self.latents.clear()
        fresh = self.text.fresh
        if fresh and (everything or len(fresh) >= self.shard_size):
            groups: dict[tuple[Any, ...], list[str]] = {}  # a shard stacks encodings of one shape and dtype
            for caption in fresh:
                embeds, pooled = self.text[caption]
                shape = None if pooled is None else (pooled.shape, pooled.dtype)
                groups.setdefault((embeds.shape, embeds.dtype, shape), []).append(caption)
            for captions in groups.values():
                tensors = {"embeds": torch.stack([self.text[c][0] for c in captions])}
                if self.text[captions[0]][1] is not None:
                    tensors["pooled"] = torch.stack([self.text[c][1] for c in captions])  # type: ignore[misc]
                self._save(_TEXT, tensors, {"captions": json.dumps(captions, ensure_ascii=False)})
            self.text.fresh = []

    def _save(self, kind: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
        """Write one shard atomically; its path."""
        from safetensors.torch import save_file

        assert self.folder is not None
        shard = self.folder / f"{kind}-r{self.rank}-{self._token}-{self._written:05d}.safetensors"
        self._written += 1
        with atomic_paths(shard) as (temp,):
            save_file({name: t.contiguous() for name, t in tensors.items()}, str(temp), metadata=metadata)
        self._read.add(shard.name)
        return shard


def _what_differs(found: Any, wanted: dict[str, Any]) -> str:
    """Why a folder's key.json is not ``wanted``, in a few words."""
    if found is None:
        return f"no {KEY_FILE} beside its shards"
    if not isinstance(found, dict) or (found.get("format"), found.get("version")) != (_FORMAT, _VERSION):
        return f"{KEY_FILE} is not a key of this version"
    names = [name for name in ("resolution",) if found.get(name) != wanted[name]]
    key: dict[str, Any] = found["key"] if isinstance(found.get("key"), dict) else {}
    names += sorted(f"key[{name!r}]" for name in {*key, *wanted["key"]} if key.get(name) != wanted["key"].get(name))
    return "made for another " + ", ".join(names or ["key"])


def _samples(dataset: Any, rows: list[tuple[int, int]], missing: list[int], decoded: Decoded | None) -> dict[str, Any]:
    """The :func:`collate`-d samples of the dataset indices ``missing``, in that order: ``decoded``'s where it has
    them (all of them, in that order: its batch as it is), else read now in the epoch of their row."""
    if decoded is not None and decoded.indices == missing:
        return decoded.batch
    at = {} if decoded is None else {index: j for j, index in enumerate(decoded.indices)}
    epochs = dict(rows)
    samples = []
    for index in missing:
        if index in at and decoded is not None:
            j, got = at[index], decoded.batch
            samples.append({"pixel_values": got["pixel_values"][j], "caption": got["caption"][j],
                            "original_size": got["original_size"][j].tolist(),
                            "crop_top_left": got["crop_top_left"][j].tolist()})  # fmt: skip
        else:
            samples.append(dataset.sample(index, epochs[index]))
    return collate(samples)
