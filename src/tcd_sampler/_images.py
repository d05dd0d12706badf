"""Images deeper than 8 bits (Pillow's modes ``I;16*``, ``I`` and ``F``) brought to 8-bit grey by their actual range,
for the trainer's data and the ``--image``/``--mask`` of ``generate``: Pillow's own ``convert`` clips them at 255
(a 16-bit image turns white, a float one in [0, 1] black).

The rule: 16-bit images (``I;16``, ``I;16L``, ``I;16B``, ``I;16N``) span 0 … 65535, so a value ``v`` becomes
``round(v · 255 / 65535)``; 32-bit integer images (``I``, what Pillow makes of some 16-bit PNG, PGM and TIFF files)
are read the same way when every value lies in 0 … 65535 and refused otherwise (their range is unknown); float images
(``F``) are read as 0 = black, 1 = white (``round(v · 255)``) when every value is finite and in [0, 1], and refused
otherwise, since no fixed range fits all float data and stretching each image to its own minimum and maximum would
change its contrast silently. Refused images raise a ValueError naming the file; convert them to 8 or 16 bits.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

__all__ = ["VALUE_MODES", "deep_to_8bit", "is_deep"]

#: The modes whose valid range depends on the values, checked by decoding (not from the header alone).
VALUE_MODES = ("I", "F")
_MAX_16 = 65535.0


def is_deep(mode: str) -> bool:
    """Whether images of Pillow ``mode`` hold more than 8 bits per value (``I;16*``, ``I``, ``F``)."""
    return mode in VALUE_MODES or mode.startswith("I;16")


def deep_to_8bit(image: PILImage, name: str) -> PILImage:
    """``image`` as 8-bit grey (mode ``L``) by the rule of this module when it is deeper than 8 bits, else itself.

    Args:
        image: a decoded Pillow image.
        name: how the error names the image (e.g. its path).

    Raises:
        ValueError: a float image with values outside [0, 1] (or NaN, infinities), or a 32-bit integer image with
            values outside 0 … 65535.
    """
    mode = image.mode
    if not is_deep(mode):
        return image
    from PIL import Image

    values = np.asarray(image, dtype=np.float64)
    if mode == "F":
        if not np.isfinite(values).all():
            raise ValueError(f"{name}: a float image holding NaN or infinite values; save it with 8 or 16 bits")
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if low < 0.0 or high > 1.0:
            raise ValueError(
                f"{name}: a float image with values from {low:g} to {high:g}; only float images in [0, 1] are read "
                "(0 black, 1 white): save it with 8 or 16 bits"
            )
        scaled = values * 255.0
    else:
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if low < 0.0 or high > _MAX_16:
            raise ValueError(
                f"{name}: a 32-bit integer image with values from {low:g} to {high:g}; only 0 … 65535 (16 bits) "
                "are read: save it with 8 or 16 bits"
            )
        scaled = values * (255.0 / _MAX_16)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))  # 2-D uint8: mode L
