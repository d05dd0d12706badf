"""The folder sources (``"folder"``: caption files beside the images; ``"imagefolder"``: a ``metadata.jsonl``),
scanned up front by :class:`ImageCaptionDataset`, and the scan's index file (scanned once, read by the other
processes)."""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any, NamedTuple

from torch.utils.data import Dataset

from ..._files import atomic_paths
from ...core.checks import check_bool, check_choice, check_int
from .detect import _is_shard_name, _path_text, detect_source
from .images import _draws, _load_image, _pil, _probe, _to_sample
from .options import CAPTION_EXTENSIONS, IMAGE_EXTENSIONS, DataOptions, _options
from .report import DataError, DataReport, _Bad, _describe, log

#: What an index file says it is (its ``format`` and ``version`` keys).
INDEX_FORMAT, INDEX_VERSION = "tcd-sampler data index", 1


class SampleRecord(NamedTuple):
    """A sample of a folder source that passed the scan: the image's path and its caption."""

    path: str
    caption: str


def _read_caption_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig").strip()
    except UnicodeDecodeError as err:
        raise _Bad("missing_caption", f"{path.name} is not UTF-8 text: {_describe(err)}") from err
    except OSError as err:
        raise _Bad("missing_caption", f"{path.name} cannot be read: {_describe(err)}") from err


def _folder_candidates(root: Path, options: DataOptions, report: DataReport) -> tuple[list[SampleRecord], str]:
    """The images of a caption-file folder with their captions (bad captions counted in ``report``), and what else
    the folder holds (said when it holds no image)."""
    candidates: list[SampleRecord] = []
    others = shards = 0
    for directory, folders, files in os.walk(root):
        folders[:] = sorted(name for name in folders if not name.startswith("."))
        present = set(files)
        for name in sorted(files):
            stem, extension = os.path.splitext(name)
            if name.startswith(".") or extension.lower() not in IMAGE_EXTENSIONS:
                others += not name.startswith(".")
                shards += _is_shard_name(name)
                continue
            path = os.path.join(directory, name)
            caption_names = [stem + ext for ext in CAPTION_EXTENSIONS if stem + ext in present]
            try:
                if caption_names:
                    caption = _read_caption_file(Path(directory, caption_names[0]))
                    if not caption and options.require_captions:
                        raise _Bad("missing_caption", f"{caption_names[0]} is empty")
                elif options.require_captions:
                    raise _Bad(
                        "missing_caption", f"no {' or '.join(stem + ext for ext in CAPTION_EXTENSIONS)} beside it"
                    )
                else:
                    caption = ""
            except _Bad as bad:
                report.record_bad(bad.reason, path, bad.detail)
                continue
            candidates.append(SampleRecord(path, caption))
    elsewhere = f"{others} other files" + (f", {shards} of them shards: use source='webdataset'" if shards else "")
    return candidates, elsewhere


def _metadata_candidates(root: Path, options: DataOptions, report: DataReport) -> list[SampleRecord]:
    """The records of ``root/metadata.jsonl`` whose line, caption and image file are present (the rest counted)."""
    metadata = root / "metadata.jsonl"
    if not metadata.is_file():
        raise DataError(
            f"imagefolder {root}: no metadata.jsonl in it (a Hugging Face image folder has one JSON object a line "
            f"with 'file_name' and '{options.caption_column}')"
        )
    column = options.caption_column
    candidates: list[SampleRecord] = []
    with metadata.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            where = f"{metadata}:{number}"
            try:
                text = raw.decode("utf-8").lstrip("\ufeff").strip()
                if not text:
                    continue
                record = json.loads(text)
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                report.record_bad("bad_metadata", where, f"not a JSON line: {_describe(err)}")
                continue
            if not isinstance(record, dict):
                report.record_bad("bad_metadata", where, f"a JSON {type(record).__name__}, not an object")
                continue
            file_name = record.get("file_name")
            if not isinstance(file_name, str) or not file_name:
                report.record_bad("bad_metadata", where, f"no 'file_name' (keys: {sorted(record)[:5]})")
                continue
            caption = record.get(column)
            if caption is None or (isinstance(caption, str) and not caption.strip()):
                if options.require_captions:
                    report.record_bad("missing_caption", where, f"no '{column}'" if caption is None else "empty")
                    continue
                caption = ""
            if isinstance(caption, int) and not isinstance(caption, bool):  # a class label (HF's "label" column)
                caption = str(caption)
            if not isinstance(caption, str):
                report.record_bad("missing_caption", where, f"'{column}' is a {type(caption).__name__}, not text")
                continue
            path = root / file_name
            if not path.is_file():
                report.record_bad("missing_image", where, f"file_name {file_name!r} is not a file in {root}")
                continue
            candidates.append(SampleRecord(str(path), caption.strip()))
    return candidates


class ImageCaptionDataset(Dataset[dict[str, Any]]):
    """Images with captions from a folder source (``"folder"`` or ``"imagefolder"``), scanned up front.

    The constructor finds every sample, reads the captions, opens every image (decoding it with
    ``verify_images``), counts bad samples by reason in :attr:`report` and stops with one :class:`DataError` when
    the source is empty or above ``options.max_bad_fraction``; below it, the skipped samples are logged (a warning
    with the report's summary). Items are :func:`collate`-able dicts (see the package's docstring). One process
    scans and writes the index (:meth:`save_index`); the others, or a later run, read it (:meth:`from_index`).

    Args:
        path: the folder.
        options: how samples are made and bad data handled. Default None: ``DataOptions()``.
        source: ``"auto"`` (default: :func:`detect_source`), ``"folder"`` or ``"imagefolder"``; webdataset shards
            are :class:`WebDatasetShards` (:func:`open_dataset` picks the class).
        verify_images: decode every image during the scan (True, default), so that a truncated or corrupt file is
            skipped and counted; False reads only the headers (faster on a large folder; an image that fails later
            stops the run in ``__getitem__`` with a :class:`DataError` naming it).
        scan_workers: threads that open images during the scan, at least 1. Default None: ``min(8, CPUs)``.

    Raises:
        TypeError: an argument of the wrong type.
        ValueError: an invalid argument, a path that does not exist or is not a folder, a webdataset source;
            :class:`DataError`: an empty source, or more bad samples than allowed.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        options: DataOptions | None = None,
        *,
        source: str = "auto",
        verify_images: bool = True,
        scan_workers: int | None = None,
    ) -> None:
        self.options = _options(options)
        text = _path_text(path)
        check_choice("source", source, ("auto", "folder", "imagefolder", "webdataset"))
        check_bool("verify_images", verify_images)
        workers = min(8, os.cpu_count() or 1) if scan_workers is None else check_int("scan_workers", scan_workers, 1)
        kind = detect_source(text) if source == "auto" else source
        if kind == "webdataset":
            raise ValueError(
                f"data path {text} is webdataset shards: stream them with WebDatasetShards (an IterableDataset), or "
                "let open_dataset choose"
            )
        root = _folder(text)
        _pil()
        self.root, self.source, self.verify_images = root, kind, verify_images
        self.report = DataReport(kind, str(root), self.options.max_bad_fraction)
        self._epoch = 0
        self.records = self._scan(verify_images, workers)

    def _scan(self, decode: bool, workers: int) -> list[SampleRecord]:
        options, report = self.options, self.report
        if self.source == "folder":
            candidates, elsewhere = _folder_candidates(self.root, options, report)
            hint = f"no {'/'.join(IMAGE_EXTENSIONS)} files in it or its subfolders; {elsewhere}"
        else:
            candidates = _metadata_candidates(self.root, options, report)
            hint = "metadata.jsonl has no records"
        with ThreadPoolExecutor(max_workers=workers) as pool:
            problems = list(pool.map(lambda record: _probe(record.path, options.min_side, decode), candidates))
        records = []
        for record, problem in zip(candidates, problems, strict=True):
            if problem is None:
                report.record_used()
                records.append(record)
            else:
                report.record_bad(problem.reason, record.path, problem.detail)
        report.check(empty_hint=hint)
        if report.skipped_total:
            log.warning("%s", report.summary())
        return records

    def _made_with(self) -> dict[str, Any]:
        """What the scan depends on: the folder (resolved), its kind, the data options, whether images were decoded."""
        return {
            "root": str(self.root.resolve()),
            "source": self.source,
            "options": asdict(self.options),
            "verify_images": self.verify_images,
        }

    def _relative_records(self) -> list[list[str]]:
        return [[os.path.relpath(record.path, self.root), record.caption] for record in self.records]

    def fingerprint(self) -> str:
        """Which image and caption each index is: a SHA-256 digest (hex) of the folder (resolved), its kind and the
        records (paths relative to the folder, captions), in order. Equal datasets have equal fingerprints; what is
        kept by dataset index (:class:`~tcd_sampler.distill.cache.EncodingCache`'s latents) depends on it."""
        made = self._made_with()
        content = [made["root"], made["source"], self._relative_records()]
        return hashlib.sha256(json.dumps(content, ensure_ascii=False).encode("utf-8")).hexdigest()

    def save_index(self, file: str | os.PathLike[str]) -> Path:
        """Write the scan to ``file`` (JSON, atomically: a temporary file renamed into place; its folder is created),
        so that other processes or a later run construct the dataset with :meth:`from_index` without scanning.

        The file holds the records (paths relative to the folder, captions), the scan's report and what the scan was
        made with: the folder (resolved), its kind, the data options and ``verify_images``.

        Args:
            file: the index file to write (replaced if it exists).

        Returns:
            The path written.
        """
        target = Path(_path_text(file, "file"))
        report = self.report
        content = {
            "format": INDEX_FORMAT,
            "version": INDEX_VERSION,
            **self._made_with(),
            "report": {
                "total": report.total,
                "used": report.used,
                "skipped": report.skipped,
                "examples": report.examples,
            },
            "records": self._relative_records(),
        }
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_paths(target) as (temp,):
            temp.write_text(json.dumps(content, ensure_ascii=False), encoding="utf-8")
        return target

    @classmethod
    def from_index(
        cls,
        file: str | os.PathLike[str],
        path: str | os.PathLike[str],
        options: DataOptions | None = None,
        *,
        source: str = "auto",
        verify_images: bool = True,
    ) -> ImageCaptionDataset:
        """The dataset of folder ``path`` from an index :meth:`save_index` wrote, without scanning: the same records
        (in the same order), report and behaviour as the scan that wrote it.

        Args:
            file: the index file.
            path, options, source, verify_images: as the constructor's; the index must have been made with the same
                folder (compared resolved), data options and ``verify_images``, and the same kind of source unless
                ``source`` is ``"auto"``.

        Raises:
            TypeError: an argument of the wrong type.
            ValueError: a folder that does not exist; an index file that cannot be read, is not an index, or was made
                with another folder, kind, data options or ``verify_images`` (the message names the file and what
                differs: scan again).
        """
        options = _options(options)
        file_text, text = _path_text(file, "file"), _path_text(path)
        check_choice("source", source, ("auto", "folder", "imagefolder"))
        check_bool("verify_images", verify_images)
        root = _folder(text)
        content = _read_index(file_text)
        kind = content["source"] if source == "auto" else source
        want = {"root": str(root.resolve()), "source": kind, "options": asdict(options), "verify_images": verify_images}
        differs = [_difference(name, content[name], value) for name, value in want.items() if content[name] != value]
        if differs:
            raise ValueError(f"data index {file_text} was made with another {'; another '.join(differs)}: scan the "
                             "folder again (and write the index again)")  # fmt: skip
        dataset = cls.__new__(cls)
        dataset.options, dataset.root, dataset.verify_images = options, root, verify_images
        dataset.source = kind
        dataset.report = DataReport(kind, str(root), options.max_bad_fraction, **content["report"])
        dataset._epoch = 0
        dataset.records = [SampleRecord(os.path.join(text, rel), caption) for rel, caption in content["records"]]
        return dataset

    def set_epoch(self, epoch: int) -> None:
        """Draw this epoch's crops, flips and caption dropout (the draws are seeded by ``(seed, epoch, index)``).

        Args:
            epoch: a non-negative integer. Set it before the DataLoader's iterator is made (its workers copy the
                dataset then). The constructor starts at 0.
        """
        self._epoch = check_int("epoch", epoch, 0)

    def __len__(self) -> int:
        return len(self.records)

    def sample(self, index: int, epoch: int) -> dict[str, Any]:
        """Sample ``index`` as drawn in ``epoch`` (its random crop, flip and caption dropout), which becomes the
        current epoch."""
        self.set_epoch(epoch)
        return self[index]

    def caption(self, index: int, epoch: int | None = None) -> str:
        """Sample ``index``'s caption as ``__getitem__`` gives it in ``epoch`` (None: the current one), after the
        caption dropout, without reading the image."""
        index = range(len(self.records))[index]
        draws = _draws(self.options.seed, self._epoch if epoch is None else epoch, index)
        return "" if draws[3] < self.options.caption_dropout else self.records[index].caption

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = range(len(self.records))[index]  # out of range: IndexError, the Dataset protocol; -1 is the last
        record = self.records[index]
        try:
            image = _load_image(record.path)
        except Exception as err:
            raise DataError(
                f"{self.source} {self.root}: the image {record.path} cannot be read any more ({_describe(err)}); "
                "it passed the scan, so it changed since: restore or remove it and restart"
            ) from err
        return _to_sample(image, record.caption, self.options, _draws(self.options.seed, self._epoch, index))


def _folder(text: str) -> Path:
    root = Path(text)
    if not root.is_dir():
        raise ValueError(f"data path {text} " + ("is not a folder" if root.exists() else "does not exist"))
    return root


def _read_index(file: str) -> dict[str, Any]:
    """The content of an index file, its structure checked (ValueError naming the file otherwise)."""
    try:
        content = json.loads(Path(file).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"data index {file} cannot be read: {_describe(err)}") from err
    keys = ("root", "source", "options", "verify_images", "report", "records")
    if (
        not isinstance(content, dict)
        or (content.get("format"), content.get("version")) != (INDEX_FORMAT, INDEX_VERSION)
        or any(key not in content for key in keys)
        or content["source"] not in ("folder", "imagefolder")
    ):
        raise ValueError(f"data index {file} is not a {INDEX_FORMAT} of version {INDEX_VERSION}: scan the folder")
    records, report = content["records"], content["report"]
    if (
        not isinstance(records, list)
        or not all(isinstance(r, list) and len(r) == 2 and all(isinstance(x, str) for x in r) for r in records)
        or not isinstance(report, dict)
        or set(report) != {"total", "used", "skipped", "examples"}
    ):
        raise ValueError(f"data index {file} has malformed records or report: scan the folder again")
    return content


def _difference(name: str, have: Any, want: Any) -> str:
    """One item of an index's mismatch: the name, and for the options which of them differ."""
    if name == "options" and isinstance(have, dict):
        names = sorted(k for k in {*have, *want} if have.get(k) != want.get(k))
        return "data options (" + ", ".join(f"{k}={have.get(k)!r}, not {want.get(k)!r}" for k in names) + ")"
    return f"{name} ({have!r}, not {want!r})"
