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
flip, then crop, the crop's corner measured in the flipped image), as a float32 tensor ``(3, R, R)`` in [-1, 1]
(grey ``(1, R, R)`` with ``channels=1``);
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
constructor, before any model loads (``verify_images`` decodes every image, so a truncated file is caught too); a
scan is written once to an index file (:meth:`ImageCaptionDataset.save_index`) that other processes or a later run
read without scanning (:meth:`ImageCaptionDataset.from_index`, which refuses an index of another folder or options). A
stream counts as it goes and stops once ``min_samples`` samples have been seen and the running fraction exceeds the
threshold, or at the end of a pass over its shards. An image that fails in ``__getitem__`` after passing the scan
(the file changed) stops with a :class:`DataError` naming it. A :class:`DataError` raised in a DataLoader worker
reaches the main process as a :class:`DataError` with the same message, the worker's traceback kept aside.
"""

from .detect import detect_source
from .folders import ImageCaptionDataset, SampleRecord
from .images import collate
from .options import (
    CAPTION_EXTENSIONS,
    IMAGE_EXTENSIONS,
    SHARD_CAPTION_EXTENSIONS,
    SHARD_IMAGE_EXTENSIONS,
    SOURCES,
    DataOptions,
)
from .options import CROPS as CROPS
from .options import INTERPOLATIONS as INTERPOLATIONS
from .options import SHARD_SUFFIXES as SHARD_SUFFIXES
from .report import REASONS, DataError, DataReport
from .shard_files import expand_shards
from .shards import WebDatasetShards
from .sources import open_dataset

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
