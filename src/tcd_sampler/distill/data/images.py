"""Images and samples: decoding an image (EXIF-oriented, in RGB), probing it in a scan, the seeded draws, the
transform of an image and caption to the model's input, and :func:`collate`."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import default_collate

from ..._images import VALUE_MODES, deep_to_8bit
from .options import DataOptions
from .report import _Bad, _describe

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

# the domains of the seeded draws, so that no two uses share a stream
_DRAW_SAMPLE, _DRAW_SHARDS, _DRAW_BUFFER = 0, 1, 2


def _pil() -> tuple[ModuleType, ModuleType]:
    """PIL's ``Image`` and ``ImageOps``, imported on first use (Pillow is an optional dependency)."""
    try:
        from PIL import Image, ImageOps
    except ImportError as err:  # pragma: no cover - Pillow is installed wherever the trainer runs
        raise ImportError("reading training images needs Pillow: pip install Pillow") from err
    return Image, ImageOps


def _draws(seed: int, epoch: int, *ids: int) -> np.ndarray:
    """Four uniforms for one sample: crop top, crop left, flip, caption dropout (always all four, so that one option
    never changes another's draw)."""
    return np.random.default_rng((_DRAW_SAMPLE, seed, epoch, *ids)).random(4)


def _load_image(source: str | bytes, min_side: int | None = None) -> PILImage:
    """The image at ``source`` (a path or encoded bytes) decoded, EXIF-oriented and in RGB. An image deeper than
    8 bits (16-bit, 32-bit integer or float grey) is brought to 8 bits by its actual range
    (:func:`tcd_sampler._images.deep_to_8bit`: 16-bit by 65535, float by [0, 1]), or refused.

    Raises:
        _Bad: too small (when ``min_side`` is given; checked on the header, before decoding), or a float or 32-bit
            integer image outside the range it is read by (``unreadable_image``).
        Exception: whatever Pillow raises for a file it cannot read.
    """
    image_module, image_ops = _pil()
    with image_module.open(io.BytesIO(source) if isinstance(source, bytes) else source) as opened:
        width, height = opened.size
        if min_side is not None and min(width, height) < min_side:
            raise _Bad("too_small", f"{width}x{height}, shorter side {min(width, height)} < min_size {min_side}")
        opened.load()
        image: PILImage = image_ops.exif_transpose(opened)
    image = _to_8bit(image)  # convert("L") would clip a 16-bit or float image at 255
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image if image.mode == "RGB" else image.convert("RGB")


def _to_8bit(image: PILImage) -> PILImage:
    """:func:`~tcd_sampler._images.deep_to_8bit`, its refusal as a bad sample."""
    try:
        return deep_to_8bit(image, "the image")
    except ValueError as err:
        raise _Bad("unreadable_image", str(err).removeprefix("the image: ")) from None


def _probe(path: str, min_side: int, decode: bool) -> _Bad | None:
    """None if the image at ``path`` passes the scan, else why not (the header only, unless ``decode``; a float or
    32-bit integer image is always decoded, to check its values' range)."""
    image_module, _ = _pil()
    try:
        with image_module.open(path) as opened:
            width, height = opened.size
            if min(width, height) < min_side:
                return _Bad("too_small", f"{width}x{height}, shorter side {min(width, height)} < min_size {min_side}")
            if decode or opened.mode in VALUE_MODES:
                opened.load()
            if opened.mode in VALUE_MODES:
                _to_8bit(opened)
    except _Bad as bad:
        return bad
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
    if options.channels == 1:
        window = window.convert("L")
    array = np.array(window, dtype=np.uint8)
    array = np.ascontiguousarray(array[None] if array.ndim == 2 else array.transpose(2, 0, 1))
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
        samples: the samples, each a dict with ``pixel_values`` ``(C, R, R)``, ``caption``, ``original_size`` and
            ``crop_top_left``.

    Returns:
        ``pixel_values`` stacked ``(B, C, R, R)``, ``caption`` a list of B strings, ``original_size`` and
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
        # default_collate stacks as torch.stack does; in a DataLoader worker, straight into shared memory (no copy
        # when the batch is sent to the main process)
        "pixel_values": default_collate([sample["pixel_values"] for sample in samples]),
        "caption": [sample["caption"] for sample in samples],
        "original_size": torch.tensor([list(sample["original_size"]) for sample in samples], dtype=torch.int64),
        "crop_top_left": torch.tensor([list(sample["crop_top_left"]) for sample in samples], dtype=torch.int64),
    }
