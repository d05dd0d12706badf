"""The data options (:class:`DataOptions`: how samples are made, how bad data is handled) and the constants of the
sources: their kinds and the file extensions each reads."""

from __future__ import annotations

from dataclasses import dataclass

from ...core.checks import check_bool, check_choice, check_int, check_number

SOURCES = ("folder", "imagefolder", "webdataset")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_EXTENSIONS = (".txt", ".caption")
SHARD_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
SHARD_CAPTION_EXTENSIONS = ("txt", "caption", "json")
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
CROPS = ("center", "random")
INTERPOLATIONS = ("bilinear", "bicubic", "lanczos", "nearest")


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
        channels: 3 (default: RGB) or 1 (grey, for a pixel-space teacher with one input channel; the trainer sets it
            from the teacher's ``in_channels``).
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
    channels: int = 3

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
        if self.channels not in (1, 3) or isinstance(self.channels, bool):
            raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {self.channels!r}")

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
