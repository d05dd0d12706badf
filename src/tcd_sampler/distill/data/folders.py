"""The folder sources (``"folder"``: caption files beside the images; ``"imagefolder"``: a ``metadata.jsonl``),
scanned up front by :class:`ImageCaptionDataset`."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

from torch.utils.data import Dataset

from ...core.checks import check_bool, check_choice, check_int
from .detect import _is_shard_name, _path_text, detect_source
from .images import _draws, _load_image, _pil, _probe, _to_sample
from .options import CAPTION_EXTENSIONS, IMAGE_EXTENSIONS, DataOptions, _options
from .report import DataError, DataReport, _Bad, _describe, log


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
    with the report's summary). Items are :func:`collate`-able dicts (see the package's docstring).

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
        root = Path(text)
        if not root.is_dir():
            raise ValueError(f"data path {text} " + ("is not a folder" if root.exists() else "does not exist"))
        _pil()
        self.root = root
        self.source = kind
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
