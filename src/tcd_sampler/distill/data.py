"""Training data for the real-model distillation trainer: images and captions from three kinds of source, turned
into the model's input and SDXL's added conditions, under one policy for bad data.

Sources (:func:`detect_source` tells them apart; ``source=`` selects one explicitly):

- ``"folder"``: a folder of images (``.png .jpg .jpeg .webp .bmp``, searched recursively; hidden files and folders
  skipped) with a caption file beside each: ``a.png`` + ``a.txt`` (or ``a.caption``; ``.txt`` wins when both exist).
- ``"imagefolder"``: a Hugging Face ``datasets`` image folder: images plus a ``metadata.jsonl`` at the folder's root,
  one JSON object a line with ``file_name`` (relative to the folder) and a caption column (``text`` by default).
  The file is read here; the ``datasets`` package is not needed. Images without a metadata line are not used.
- ``"webdataset"``: ``.tar`` shards (a file, a folder of them, a brace pattern ``data-{000..009}.tar`` or a glob,
  or a list of these) where a sample is the consecutive files sharing a key (webdataset's rule: the member name up
  to the first dot of its base name): ``key.jpg|jpeg|png|webp`` + ``key.txt|caption|json``. Streamed by
  :class:`WebDatasetShards`, an ``IterableDataset`` that splits the shards across distributed ranks and then across
  each rank's DataLoader workers; read with Python's :mod:`tarfile` (``.tar.gz`` too).

Every sample becomes ``{"pixel_values", "caption", "original_size", "crop_top_left"}``: the image in RGB (EXIF
orientation applied), its shorter side resized to ``resolution`` (as torchvision's ``Resize(resolution)``),
optionally flipped, then center- or randomly cropped to ``resolution`` × ``resolution`` (SDXL's training recipe:
flip, then crop, the crop's corner measured in the flipped image), as a float32 tensor ``(3, R, R)`` in [-1, 1];
``original_size`` is ``(height, width)`` before the resize and ``crop_top_left`` is ``(top, left)`` in the resized
image (SDXL's ``add_time_ids`` are ``original_size + crop_top_left + (R, R)``). The random crop, the flip and the
caption dropout are drawn from a generator seeded by ``(seed, epoch, sample)``: the same for any number of workers
or ranks, different each epoch (:meth:`ImageCaptionDataset.set_epoch`).

Bad data, the one policy (:class:`DataReport`): an unreadable image, a missing or empty caption, an image whose
shorter side is below ``min_size`` (default ``resolution // 2``), a caption or metadata record without its image, a
metadata line that is not a JSON object with a ``file_name``, an unreadable shard — each is one bad sample, skipped
and counted by reason with a few example paths. When the bad fraction exceeds ``max_bad_fraction`` (default 0.01;
0 refuses any bad sample, 1 skips any number), or nothing is usable, the source stops with one :class:`DataError`
(a ``ValueError``) listing the counts by reason and examples. Folder sources are scanned up front, in the
constructor, before any model loads (``verify_images`` decodes every image, so a truncated file is caught too). A
stream counts as it goes and stops once ``min_samples`` samples have been seen and the running fraction exceeds the
threshold, or at the end of a pass over its shards. An image that fails in ``__getitem__`` after passing the scan
(the file changed) stops with a :class:`DataError` naming it. A :class:`DataError` raised in a DataLoader worker
reaches the main process as a :class:`DataError` with the same message, the worker's traceback kept aside.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import re
import tarfile
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from ..core.checks import check_bool, check_choice, check_int, check_number

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

__all__ = [
    "CAPTION_EXTENSIONS",
    "IMAGE_EXTENSIONS",
    "REASONS",
    "SHARD_CAPTION_EXTENSIONS",
    "SHARD_IMAGE_EXTENSIONS",
    "SOURCES",
    "DataError",
    "DataOptions",
    "DataReport",
    "ImageCaptionDataset",
    "SampleRecord",
    "WebDatasetShards",
    "collate",
    "detect_source",
    "expand_shards",
    "open_dataset",
]

log = logging.getLogger(__name__)

SOURCES = ("folder", "imagefolder", "webdataset")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_EXTENSIONS = (".txt", ".caption")
SHARD_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
SHARD_CAPTION_EXTENSIONS = ("txt", "caption", "json")
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
CROPS = ("center", "random")
INTERPOLATIONS = ("bilinear", "bicubic", "lanczos", "nearest")

REASONS: dict[str, str] = {
    "unreadable_image": "the image cannot be opened or decoded",
    "too_small": "the image's shorter side is below min_size",
    "missing_caption": "no usable caption: none, empty, or not text",
    "missing_image": "a caption or metadata record without its image",
    "bad_metadata": "a metadata.jsonl line that is not a JSON object with a 'file_name'",
    "unreadable_shard": "a shard that cannot be read as a tar file (the rest of it is lost)",
}
"""The reasons a sample is skipped, in report order, with the rule each stands for."""

_MAX_EXAMPLES = 3
_SHARD_MEMBER = re.compile(r"^((?:.*/|)[^./][^.]*)\.([^/]*)$")  # webdataset's key/extension split; hidden files fail
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"(-?\d+)\.\.(-?\d+)")
_TAR_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error)
# the domains of the seeded draws, so that no two uses share a stream
_DRAW_SAMPLE, _DRAW_SHARDS, _DRAW_BUFFER = 0, 1, 2

T = TypeVar("T")


class DataError(ValueError):
    """Bad data or a bad source: one clear message naming the file or folder and the rule it broke.

    A DataLoader worker's exception reaches the main process as ``type(err)(text)`` with the worker's whole traceback
    in ``text``; this class takes the original message back out of it, so the error the training loop sees reads as
    it was raised. The worker's text is kept in :attr:`worker_traceback` (None for an error raised in-process).

    Args:
        message: the message.
    """

    worker_traceback: str | None

    def __init__(self, message: str) -> None:
        self.worker_traceback = None
        name = type(self).__name__
        if isinstance(message, str) and message.startswith(f"Caught {name} ") and "\nOriginal Traceback" in message:
            marker = f"\n{type(self).__module__}.{type(self).__qualname__}: "
            at = message.rfind(marker)
            if at >= 0:
                self.worker_traceback = message
                message = message[at + len(marker) :].rstrip("\n")
        super().__init__(message)


class _Bad(Exception):
    """A bad sample found while reading: its reason (a key of :data:`REASONS`) and what exactly is wrong."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _pil() -> tuple[ModuleType, ModuleType]:
    """PIL's ``Image`` and ``ImageOps``, imported on first use (Pillow is an optional dependency)."""
    try:
        from PIL import Image, ImageOps
    except ImportError as err:  # pragma: no cover - Pillow is installed wherever the trainer runs
        raise ImportError("reading training images needs Pillow: pip install Pillow") from err
    return Image, ImageOps


def _describe(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".replace("\n", " ")
    return text if len(text) <= 160 else text[:157] + "..."


def _percent(fraction: float) -> str:
    return f"{100.0 * fraction:.3g}%"


# --- options -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataOptions:
    """How samples are made and how bad data is handled; the same for every source. Invalid values raise a
    TypeError/ValueError naming the parameter and its accepted range on construction.

    Attributes:
        resolution: the side ``R`` of the square model input, a positive multiple of 8. Default 512.
        crop: ``"center"`` (default) or ``"random"``: where the ``R`` × ``R`` window is cut from the resized image.
        random_flip: flip each sample horizontally with probability 1/2 (seeded). Default False.
        caption_dropout: the probability, in [0, 1], that a sample's caption is replaced with ``""`` (the
            unconditional input of classifier-free guidance; seeded). Default 0.
        caption_column: the caption's key in ``metadata.jsonl`` records and in webdataset ``.json`` files (which
            fall back to ``"caption"``). Default ``"text"``.
        require_captions: whether a sample without a caption is bad data (True, default) or gets ``""`` (False:
            unconditional teachers, which need no caption files).
        min_size: images whose shorter side is below this many pixels are bad data; smaller images that pass are
            upscaled. Default None: ``resolution // 2``.
        max_bad_fraction: the largest fraction, in [0, 1], of bad samples that are skipped (and counted) rather than
            stopping with a :class:`DataError`. 0 refuses any bad sample; 1 skips any number (a source with nothing
            usable still stops). Default 0.01.
        interpolation: the resize filter, one of ``"bilinear"`` (default, as diffusers' training scripts),
            ``"bicubic"``, ``"lanczos"``, ``"nearest"``.
        seed: seeds the random crop, the flip and the caption dropout (with the epoch and the sample's index),
            and the order of shuffled shards; a non-negative integer. Default 0.
    """

    resolution: int = 512
    crop: str = "center"
    random_flip: bool = False
    caption_dropout: float = 0.0
    caption_column: str = "text"
    require_captions: bool = True
    min_size: int | None = None
    max_bad_fraction: float = 0.01
    interpolation: str = "bilinear"
    seed: int = 0

    def __post_init__(self) -> None:
        check_int("resolution", self.resolution, 8)
        if self.resolution % 8:
            raise ValueError(f"resolution must be a positive multiple of 8, got {self.resolution}")
        check_choice("crop", self.crop, CROPS)
        check_bool("random_flip", self.random_flip)
        check_number("caption_dropout", self.caption_dropout, 0.0, 1.0)
        if not isinstance(self.caption_column, str) or not self.caption_column:
            raise TypeError(f"caption_column must be a non-empty string, got {self.caption_column!r}")
        check_bool("require_captions", self.require_captions)
        if self.min_size is not None:
            check_int("min_size", self.min_size, 1)
        check_number("max_bad_fraction", self.max_bad_fraction, 0.0, 1.0)
        check_choice("interpolation", self.interpolation, INTERPOLATIONS)
        check_int("seed", self.seed, 0)

    @property
    def min_side(self) -> int:
        """The smallest accepted shorter side: ``min_size``, or ``resolution // 2`` when it is None."""
        return self.min_size if self.min_size is not None else self.resolution // 2


def _options(options: DataOptions | None) -> DataOptions:
    if options is None:
        return DataOptions()
    if not isinstance(options, DataOptions):
        raise TypeError(f"options must be a DataOptions or None, got {type(options).__name__}")
    return options


# --- the report --------------------------------------------------------------------------------------------------


@dataclass
class DataReport:
    """What a source held: how many samples it had, how many are used, and the skipped ones by reason with a few
    example locations (a path, ``metadata.jsonl:LINE``, or ``SHARD:MEMBER``).

    Attributes:
        kind: the source kind (one of :data:`SOURCES`).
        source: the folder, or the shards as given.
        max_bad_fraction: the threshold the report is checked against.
        total: samples seen (used + skipped).
        used: samples that pass.
        skipped: the number of skipped samples by reason (keys of :data:`REASONS`).
        examples: up to three example locations a reason, each with what is wrong.
    """

    kind: str
    source: str
    max_bad_fraction: float
    total: int = 0
    used: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def record_used(self) -> None:
        """Count one usable sample."""
        self.total += 1
        self.used += 1

    def record_bad(self, reason: str, where: str, detail: str = "") -> None:
        """Count one skipped sample.

        Args:
            reason: a key of :data:`REASONS`.
            where: the file (or ``metadata.jsonl:LINE``, ``SHARD:MEMBER``) it concerns.
            detail: what exactly is wrong, shown with the example.
        """
        if reason not in REASONS:
            raise ValueError(f"reason must be one of {tuple(REASONS)}, got {reason!r}")
        self.total += 1
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < _MAX_EXAMPLES:
            examples.append(f"{where} ({detail})" if detail else where)

    @property
    def skipped_total(self) -> int:
        """The number of skipped samples, all reasons together."""
        return sum(self.skipped.values())

    @property
    def bad_fraction(self) -> float:
        """Skipped samples as a fraction of all samples seen (0 when none was seen)."""
        return self.skipped_total / self.total if self.total else 0.0

    @property
    def exceeds(self) -> bool:
        """Whether the bad fraction is above ``max_bad_fraction``."""
        return self.bad_fraction > self.max_bad_fraction

    def _reason_lines(self) -> list[str]:
        lines = []
        for reason, rule in REASONS.items():
            count = self.skipped.get(reason, 0)
            if count:
                lines.append(f"  {reason} ({rule}): {count}, e.g. " + "; ".join(self.examples.get(reason, [])))
        return lines

    def summary(self) -> str:
        """The report as text: one line of counts, then a line a reason with examples."""
        head = (
            f"{self.kind} {self.source}: {self.used} of {self.total} samples used, {self.skipped_total} skipped "
            f"({_percent(self.bad_fraction)}; max_bad_fraction {self.max_bad_fraction:g})"
        )
        return "\n".join([head, *self._reason_lines()])

    def check(self, *, empty_hint: str = "", scope: str = "") -> None:
        """Stop with one :class:`DataError` if the source is empty, has nothing usable, or has more bad samples than
        ``max_bad_fraction`` allows.

        Args:
            empty_hint: what was looked for, said when nothing was found.
            scope: where the counts come from, when not the whole source (e.g. a stream so far).

        Raises:
            DataError: the counts by reason and examples, and what to do.
        """
        where = f"{self.kind} {self.source}{scope}"
        if self.total == 0:
            raise DataError(f"{where}: no samples found" + (f" ({empty_hint})" if empty_hint else ""))
        if self.used == 0 or self.exceeds:
            if self.used == 0:
                head = f"{where}: none of the {self.total} samples is usable"
            else:
                head = (
                    f"{where}: {self.skipped_total} of {self.total} samples are bad ({_percent(self.bad_fraction)}), "
                    f"above max_bad_fraction={self.max_bad_fraction:g}"
                )
            tail = "fix or remove these files, or raise max_bad_fraction to skip them"
            raise DataError("\n".join([head + ":", *self._reason_lines(), tail]))


# --- images and samples ------------------------------------------------------------------------------------------


def _draws(seed: int, epoch: int, *ids: int) -> np.ndarray:
    """Four uniforms for one sample: crop top, crop left, flip, caption dropout (always all four, so that one option
    never changes another's draw)."""
    return np.random.default_rng((_DRAW_SAMPLE, seed, epoch, *ids)).random(4)


def _load_image(source: str | bytes, min_side: int | None = None) -> PILImage:
    """The image at ``source`` (a path or encoded bytes) decoded, EXIF-oriented and in RGB.

    Raises:
        _Bad: too small (when ``min_side`` is given; checked on the header, before decoding).
        Exception: whatever Pillow raises for a file it cannot read.
    """
    image_module, image_ops = _pil()
    with image_module.open(io.BytesIO(source) if isinstance(source, bytes) else source) as opened:
        width, height = opened.size
        if min_side is not None and min(width, height) < min_side:
            raise _Bad("too_small", f"{width}x{height}, shorter side {min(width, height)} < min_size {min_side}")
        opened.load()
        image: PILImage = image_ops.exif_transpose(opened)
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):  # 16-bit grey: convert("L") would clip at 255
        values = np.asarray(image, dtype=np.float64)
        if values.max(initial=0.0) > 255.0:
            values = values / 257.0
        image = image_module.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))  # 2-D uint8: mode L
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image if image.mode == "RGB" else image.convert("RGB")


def _probe(path: str, min_side: int, decode: bool) -> _Bad | None:
    """None if the image at ``path`` passes the scan, else why not (the header only, unless ``decode``)."""
    image_module, _ = _pil()
    try:
        with image_module.open(path) as opened:
            width, height = opened.size
            if min(width, height) < min_side:
                return _Bad("too_small", f"{width}x{height}, shorter side {min(width, height)} < min_size {min_side}")
            if decode:
                opened.load()
    except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        return _Bad("unreadable_image", _describe(err))
    return None


def _to_sample(image: PILImage, caption: str, options: DataOptions, draws: np.ndarray) -> dict[str, Any]:
    """One sample: ``image`` resized, flipped and cropped to the model's input; ``caption`` after the dropout."""
    image_module, _ = _pil()
    size = options.resolution
    width, height = image.size
    short, long = min(width, height), max(width, height)
    scaled = int(size * long / short)  # torchvision's Resize(size): the longer side truncated
    new_width, new_height = (size, scaled) if width <= height else (scaled, size)
    if (new_width, new_height) != (width, height):
        resample = getattr(image_module.Resampling, options.interpolation.upper())
        image = image.resize((new_width, new_height), resample=resample)
    if options.crop == "center":  # torchvision's CenterCrop
        top, left = round((new_height - size) / 2.0), round((new_width - size) / 2.0)
    else:
        top = min(int(draws[0] * (new_height - size + 1)), new_height - size)
        left = min(int(draws[1] * (new_width - size + 1)), new_width - size)
    flip = options.random_flip and bool(draws[2] < 0.5)
    # flip, then crop at (top, left) in the flipped image (SDXL's recipe) = crop the mirrored window, then flip it
    x0 = new_width - left - size if flip else left
    window = image.crop((x0, top, x0 + size, top + size))
    if flip:
        window = window.transpose(image_module.Transpose.FLIP_LEFT_RIGHT)
    array = np.ascontiguousarray(np.asarray(window, dtype=np.uint8).transpose(2, 0, 1))
    pixels = torch.from_numpy(array).to(torch.float32).div_(127.5).sub_(1.0)
    return {
        "pixel_values": pixels,
        "caption": "" if draws[3] < options.caption_dropout else caption,
        "original_size": (height, width),
        "crop_top_left": (top, left),
    }


def collate(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Batch samples of :class:`ImageCaptionDataset` or :class:`WebDatasetShards` (a DataLoader's ``collate_fn``).

    Args:
        samples: the samples, each a dict with ``pixel_values`` ``(3, R, R)``, ``caption``, ``original_size`` and
            ``crop_top_left``.

    Returns:
        ``pixel_values`` stacked ``(B, 3, R, R)``, ``caption`` a list of B strings, ``original_size`` and
        ``crop_top_left`` int64 tensors ``(B, 2)``.

    Raises:
        ValueError: no samples, or samples whose keys or shapes differ.
    """
    if len(samples) == 0:
        raise ValueError("collate needs at least one sample, got none")
    keys = ("pixel_values", "caption", "original_size", "crop_top_left")
    for sample in samples:
        if not isinstance(sample, Mapping) or any(key not in sample for key in keys):
            raise ValueError(f"collate takes samples with the keys {keys}, got {type(sample).__name__}")
    shapes = {tuple(sample["pixel_values"].shape) for sample in samples}
    if len(shapes) > 1:
        raise ValueError(f"collate needs pixel_values of one shape, got {sorted(shapes)}")
    return {
        "pixel_values": torch.stack([sample["pixel_values"] for sample in samples]),
        "caption": [sample["caption"] for sample in samples],
        "original_size": torch.tensor([list(sample["original_size"]) for sample in samples], dtype=torch.int64),
        "crop_top_left": torch.tensor([list(sample["crop_top_left"]) for sample in samples], dtype=torch.int64),
    }


# --- sources -----------------------------------------------------------------------------------------------------


def _is_shard_name(text: str) -> bool:
    return text.lower().endswith(SHARD_SUFFIXES)


def _path_text(path: Any, name: str = "path") -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name} must be a str or os.PathLike, got {type(path).__name__}")
    return os.fspath(path)


def detect_source(path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> str:
    """Which kind of source ``path`` is: ``"webdataset"`` for a list of shards, a brace pattern or glob, a ``.tar``
    file, or a folder of ``.tar`` files with no images beside them; ``"imagefolder"`` for a folder with a
    ``metadata.jsonl``; ``"folder"`` otherwise.

    Args:
        path: the data path (or a list of shards).

    Returns:
        One of :data:`SOURCES`.

    Raises:
        TypeError: ``path`` is not a path or a list of them.
        ValueError: the path does not exist, is a file that is not a shard, or holds a metadata file of a format
            that is not read (``metadata.csv``, ``metadata.parquet``).
    """
    if isinstance(path, (list, tuple)):
        return "webdataset"
    text = _path_text(path)
    if _BRACE.search(text) or glob.has_magic(text) or _is_shard_name(text):
        return "webdataset"
    root = Path(text)
    if not root.exists():
        raise ValueError(f"data path {text} does not exist")
    if not root.is_dir():
        raise ValueError(f"data path {text} is a file, not a folder or a {'/'.join(SHARD_SUFFIXES)} shard")
    if (root / "metadata.jsonl").is_file():
        return "imagefolder"
    for other in ("metadata.csv", "metadata.parquet"):
        if (root / other).is_file():
            raise ValueError(
                f"data folder {root} has {other}: only metadata.jsonl is read (one JSON object a line with "
                "'file_name' and a caption); convert it"
            )
    names = [child.name.lower() for child in root.iterdir() if child.is_file()]
    if any(_is_shard_name(name) for name in names) and not any(name.endswith(IMAGE_EXTENSIONS) for name in names):
        return "webdataset"
    return "folder"


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
    with the report's summary). Items are :func:`collate`-able dicts (see the module's docstring).

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


# --- webdataset shards -------------------------------------------------------------------------------------------


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


class _Group(NamedTuple):
    shard: int
    position: int
    key: str
    files: dict[str, bytes]


def _shuffled(items: Iterable[T], size: int, rng: np.random.Generator) -> Iterator[T]:
    """``items`` through a shuffle buffer of ``size``: each new item takes the place of a random one, which goes."""
    buffer: list[T] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        at = int(rng.integers(size))
        yield buffer[at]
        buffer[at] = item
    rng.shuffle(buffer)
    yield from buffer


def _distributed(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """``rank`` and ``world_size``, each defaulting to torch.distributed's when a process group is initialised."""
    initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
    if world_size is None:
        world_size = torch.distributed.get_world_size() if initialised else 1
    if rank is None:
        rank = torch.distributed.get_rank() if initialised else 0
    world_size = check_int("world_size", world_size, 1)
    return check_int("rank", rank, 0, world_size - 1), world_size


class WebDatasetShards(IterableDataset[dict[str, Any]]):
    """Webdataset ``.tar`` shards streamed as samples (the dicts of the module's docstring).

    Shards are split across ranks first (rank ``r`` of ``W`` takes every ``W``-th shard of the pass's order, starting
    at ``r``), then across the DataLoader workers of each rank the same way: every shard is read by exactly one
    worker of one rank in a pass. Give each rank at least as many shards as it has workers, or the extra workers
    idle; a rank's sample count follows its shards, so for DDP prefer ``repeat=True`` and a fixed number of steps.
    Do not pass its DataLoader through ``accelerator.prepare`` with batch dispatching or sharding (accelerate's
    default for an IterableDataset): the split is done here.

    Bad samples are counted as they stream, per worker (:attr:`report` holds the latest count of an iteration in
    this process, i.e. with ``num_workers=0``): the stream stops with one :class:`DataError` once ``min_samples``
    samples have been seen and the running bad fraction exceeds ``options.max_bad_fraction``, or at the end of a
    pass when the whole pass exceeds it or had no usable sample. A shard that breaks counts as one bad sample; the
    samples read before the break are kept.

    Args:
        shards: a ``.tar`` file, a folder of them (recursively), a brace pattern (``data-{000..009}.tar``) or glob,
            or a list of these.
        options: how samples are made and bad data handled. Default None: ``DataOptions()``.
        rank: this process's rank, in ``[0, world_size)``. Default None: torch.distributed's rank when a process
            group is initialised (build the dataset after ``Accelerator()``), else 0.
        world_size: the number of ranks, at least 1 and at most the number of shards. Default None:
            torch.distributed's world size when initialised, else 1.
        shuffle_shards: read the shards in an order shuffled each pass, seeded by ``(options.seed, epoch)`` and the
            same on every rank (True, default); False keeps the given order.
        shuffle_buffer: shuffle samples through a buffer of this many (encoded) samples, per worker; 0 or 1 keeps
            the shard order (default 0). Webdataset's recipes use about 1000.
        repeat: start a new pass (the next epoch) after the last, forever (default False: one pass).
        min_samples: the number of samples a worker must have seen before the running bad fraction can stop the
            stream, at least 1. Default 100.

    Raises:
        TypeError: an argument of the wrong type.
        ValueError: an invalid argument, a shard that does not exist, fewer shards than ranks.
    """

    def __init__(
        self,
        shards: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        options: DataOptions | None = None,
        *,
        rank: int | None = None,
        world_size: int | None = None,
        shuffle_shards: bool = True,
        shuffle_buffer: int = 0,
        repeat: bool = False,
        min_samples: int = 100,
    ) -> None:
        self.options = _options(options)
        self.rank, self.world_size = _distributed(rank, world_size)
        self.shuffle_shards = check_bool("shuffle_shards", shuffle_shards)
        self.shuffle_buffer = check_int("shuffle_buffer", shuffle_buffer, 0)
        self.repeat = check_bool("repeat", repeat)
        self.min_samples = check_int("min_samples", min_samples, 1)
        self.shards, self.source = _resolve_shards(shards)
        if len(self.shards) < self.world_size:
            raise ValueError(
                f"shards: {len(self.shards)} shards cannot be split across world_size={self.world_size} ranks; each "
                "rank needs at least one shard"
            )
        _pil()
        self._epoch = 0
        self.report = self._new_report()

    def _new_report(self) -> DataReport:
        return DataReport("webdataset", self.source, self.options.max_bad_fraction)

    def set_epoch(self, epoch: int) -> None:
        """Start the next iteration at this epoch (its shard order and its samples' draws).

        Args:
            epoch: a non-negative integer. Set it before the DataLoader's iterator is made (its workers copy the
                dataset then). The constructor starts at 0.
        """
        self._epoch = check_int("epoch", epoch, 0)

    def shards_for(self, worker: int = 0, num_workers: int = 1, epoch: int | None = None) -> list[int]:
        """The indices (into :attr:`shards`) that a worker of this rank reads in a pass.

        Args:
            worker: the DataLoader worker's id, in ``[0, num_workers)``. Default 0.
            num_workers: the number of workers of this rank (1 for ``num_workers=0``). Default 1.
            epoch: the pass's epoch (it sets the shuffled order). Default None: the current epoch.

        Returns:
            The shard indices, in reading order.
        """
        num_workers = check_int("num_workers", num_workers, 1)
        worker = check_int("worker", worker, 0, num_workers - 1)
        epoch = self._epoch if epoch is None else check_int("epoch", epoch, 0)
        count = len(self.shards)
        if self.shuffle_shards:
            order = np.random.default_rng((_DRAW_SHARDS, self.options.seed, epoch)).permutation(count).tolist()
        else:
            order = list(range(count))
        return order[self.rank :: self.world_size][worker::num_workers]

    def _bad(self, report: DataReport, reason: str, where: str, detail: str, scope: str) -> None:
        report.record_bad(reason, where, detail)
        if report.total >= self.min_samples and report.exceeds:
            report.check(scope=f" (running count after {report.total} samples{scope})")

    def _groups(self, indices: list[int], report: DataReport, scope: str) -> Iterator[_Group]:
        for shard in indices:
            path = self.shards[shard]
            groups = _tar_groups(path)
            position = 0
            while True:
                try:
                    key, files = next(groups)
                except StopIteration:
                    break
                except _Bad as bad:
                    self._bad(report, bad.reason, path, bad.detail, scope)
                    break
                position += 1
                if any(extension in files for extension in SHARD_IMAGE_EXTENSIONS + SHARD_CAPTION_EXTENSIONS):
                    yield _Group(shard, position - 1, key, files)

    def _caption(self, group: _Group) -> str:
        """The group's caption (the first of .txt, .caption, .json present), or ``""`` when none is required."""
        options = self.options
        extension = next((ext for ext in SHARD_CAPTION_EXTENSIONS if ext in group.files), None)
        if extension is None:
            if options.require_captions:
                listed = "|".join(SHARD_CAPTION_EXTENSIONS)
                raise _Bad("missing_caption", f"no {group.key}.{listed} beside it")
            return ""
        try:
            text = group.files[extension].decode("utf-8-sig")
            if extension == "json":
                record = json.loads(text)
                value = record.get(options.caption_column, record.get("caption")) if isinstance(record, dict) else None
                if not isinstance(value, str):
                    keys = f"'{options.caption_column}' or 'caption'"
                    raise _Bad("missing_caption", f"{group.key}.json has no {keys} text")
                text = value
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise _Bad("missing_caption", f"{group.key}.{extension} is not readable: {_describe(err)}") from err
        text = text.strip()
        if not text and options.require_captions:
            raise _Bad("missing_caption", f"{group.key}.{extension} is empty")
        return text

    def _sample(self, group: _Group, epoch: int, report: DataReport, scope: str) -> dict[str, Any] | None:
        shard = self.shards[group.shard]
        extension = next((ext for ext in SHARD_IMAGE_EXTENSIONS if ext in group.files), None)
        if extension is None:
            detail = f"no {group.key}.{'|'.join(SHARD_IMAGE_EXTENSIONS)}"
            self._bad(report, "missing_image", f"{shard}:{group.key}", detail, scope)
            return None
        where = f"{shard}:{group.key}.{extension}"
        try:
            caption = self._caption(group)
            image = _load_image(group.files[extension], self.options.min_side)
        except _Bad as bad:
            self._bad(report, bad.reason, where, bad.detail, scope)
            return None
        except Exception as err:  # whatever Pillow raises for bytes it cannot decode
            self._bad(report, "unreadable_image", where, _describe(err), scope)
            return None
        report.record_used()
        draws = _draws(self.options.seed, epoch, group.shard, group.position)
        return _to_sample(image, caption, self.options, draws)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        scope = f"; rank {self.rank}, worker {worker}" if self.world_size > 1 or workers > 1 else ""
        report = self._new_report()
        self.report = report
        epoch = self._epoch
        while True:
            indices = self.shards_for(worker, workers, epoch)
            if not indices:
                return  # more workers than this rank's shards: this one idles
            groups: Iterable[_Group] = self._groups(indices, report, scope)
            if self.shuffle_buffer > 1:
                seed = (_DRAW_BUFFER, self.options.seed, epoch, self.rank, worker)
                groups = _shuffled(groups, self.shuffle_buffer, np.random.default_rng(seed))
            for group in groups:
                sample = self._sample(group, epoch, report, scope)
                if sample is not None:
                    yield sample
            names = ", ".join(os.path.basename(self.shards[i]) for i in indices[:3])
            report.check(empty_hint=f"shards read: {names}{', ...' if len(indices) > 3 else ''}", scope=scope)
            if report.skipped_total:
                log.warning("%s", report.summary())
            if not self.repeat:
                return
            epoch += 1


def open_dataset(
    path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    options: DataOptions | None = None,
    *,
    source: str = "auto",
    rank: int | None = None,
    world_size: int | None = None,
) -> ImageCaptionDataset | WebDatasetShards:
    """The dataset of a data path: an :class:`ImageCaptionDataset` for a folder source (scanned now), a
    :class:`WebDatasetShards` for shards (with its defaults; build it directly for more control).

    Args:
        path: the folder, or the shards (see :class:`WebDatasetShards`).
        options: how samples are made and bad data handled. Default None: ``DataOptions()``.
        source: ``"auto"`` (default: :func:`detect_source`) or one of :data:`SOURCES`.
        rank: for shards, this process's rank. Default None: torch.distributed's, else 0.
        world_size: for shards, the number of ranks. Default None: torch.distributed's, else 1.

    Returns:
        The dataset.

    Raises:
        TypeError, ValueError, DataError: as the two classes.
    """
    check_choice("source", source, ("auto", *SOURCES))
    kind = detect_source(path) if source == "auto" else source
    if kind == "webdataset":
        return WebDatasetShards(path, options, rank=rank, world_size=world_size)
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"a {kind} source is one folder, got a {type(path).__name__} of paths")
    return ImageCaptionDataset(path, options, source=kind)
