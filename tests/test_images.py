"""Images deeper than 8 bits (``tcd_sampler._images``): a 16-bit PNG and a float TIFF become the grey levels their
range says, in the trainer's data and in ``generate``'s ``--image``/``--mask``; a float or 32-bit image outside the
range it is read by is refused, naming the file, never turned black silently (Pillow's ``convert`` clips at 255)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tcd_sampler._images import deep_to_8bit
from tcd_sampler.distill.data import DataError, DataOptions, ImageCaptionDataset
from tcd_sampler.integrations.request import _open_image


def save(image: Image.Image, path: Path) -> Path:
    """``image`` at ``path`` (in TIFF, whatever the extension, where PNG cannot hold it), with a caption beside it."""
    image.save(path, format="PNG" if image.mode.startswith("I;16") else "TIFF")
    path.with_suffix(".txt").write_text(path.stem)
    return path


def grey(value: float, dtype: type) -> Image.Image:
    return Image.fromarray(np.full((20, 20), value, dtype=dtype))


@pytest.mark.parametrize(
    ("value", "dtype", "name", "expected"),
    [
        (0.5, np.float32, "half.tif", 128),  # float in [0, 1]: 0.5 · 255, not black
        (1.0, np.float32, "white.tif", 255),
        (32768, np.uint16, "half.png", 128),  # 16-bit by 65535
        (255, np.uint16, "dark.png", 1),  # a dark 16-bit image stays dark (not read as 8-bit white)
        (65535, np.int32, "white32.tif", 255),  # a 32-bit integer image within 16 bits
    ],
)
def test_deep_images_by_their_range(value: float, dtype: type, name: str, expected: int, tmp_path: Path) -> None:
    path = save(grey(value, dtype), tmp_path / name)
    assert Image.open(path).mode in ("F", "I", "I;16")
    data = tmp_path / "data"  # the trainer reads .png/.jpg/.jpeg/.webp/.bmp names, decoding whatever format is inside
    data.mkdir()
    save(grey(value, dtype), data / "image.png")
    sample = ImageCaptionDataset(data, DataOptions(16))[0]
    assert torch.allclose(sample["pixel_values"], torch.full((3, 16, 16), expected / 127.5 - 1), atol=1e-6)
    assert np.asarray(_open_image(path, "--image", "RGB")).tolist() == np.full((20, 20, 3), expected).tolist()
    assert np.asarray(_open_image(path, "--mask", "L")).max() == expected


@pytest.mark.parametrize(
    ("value", "dtype", "message"),
    [
        (2.0, np.float32, "a float image with values from 2 to 2; only float images in [0, 1] are read"),
        (-0.5, np.float32, "a float image with values from -0.5 to -0.5"),
        (np.nan, np.float32, "a float image holding NaN or infinite values"),
        (70000, np.int32, "a 32-bit integer image with values from 70000 to 70000; only 0 … 65535"),
    ],
)
def test_deep_images_out_of_range_are_refused(value: float, dtype: type, message: str, tmp_path: Path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    for i in range(9):
        save(grey(100, np.uint8), root / f"ok{i}.png")
    bad = save(grey(value, dtype), root / "bad.png")  # TIFF inside
    dataset = ImageCaptionDataset(root, DataOptions(16, max_bad_fraction=0.1))  # the scan finds it, decoding it
    assert len(dataset) == 9 and dataset.report.skipped == {"unreadable_image": 1}
    example = dataset.report.examples["unreadable_image"][0]
    assert example.startswith(f"{bad} (") and message in example
    with pytest.raises(DataError, match="unreadable_image"):
        ImageCaptionDataset(root, DataOptions(16))  # over the default 1 %: one error naming the file
    with pytest.raises(ValueError, match=rf"^--image {bad}: {message[:20]}"):
        _open_image(bad, "--image", "RGB")


def test_eight_bit_images_are_left_alone() -> None:
    image = Image.new("RGB", (4, 4), (1, 2, 3))
    assert deep_to_8bit(image, "x") is image
