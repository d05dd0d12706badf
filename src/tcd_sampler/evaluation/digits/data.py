"""The real data of the main job: the UCI handwritten digits scikit-learn ships (``sklearn.datasets.load_digits``:
1,797 grey images of 8 × 8 pixels, 17 levels, 10 classes), a fixed stratified split, and the split written as a
Hugging Face image folder that ``tcd-sampler train`` reads (8 × 8 PNGs, ``metadata.jsonl`` with the class as the
caption)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..._files import atomic_paths
from ...distill.validation import to_uint8 as pixels_uint8

__all__ = ["NUM_CLASSES", "SPLIT_SEED", "TEST_FRACTION", "DigitSplit", "load_digits_split", "write_imagefolder"]

NUM_CLASSES = 10
#: The share of every class held out as the test split, and the seed of the split (never changed).
TEST_FRACTION = 0.2
SPLIT_SEED = 0
#: The digits' largest value (their 17 grey levels are 0 … 16).
LEVELS = 16.0


@dataclass(frozen=True)
class DigitSplit:
    """One split of the digits.

    Attributes:
        images: float32 ``(N, 1, 8, 8)`` in [-1, 1] (0 → −1, 16 → 1).
        labels: int64 ``(N,)``, 0 … 9.
    """

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def load_digits_split(split: str) -> DigitSplit:
    """The ``"train"`` or ``"test"`` split: a stratified :data:`TEST_FRACTION` of every class is the test split,
    chosen by a permutation seeded with :data:`SPLIT_SEED` (the same on every machine)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ImportError("the digits come from scikit-learn: pip install 'tcd-sampler[eval]'") from err
    digits = load_digits()
    images, labels = np.asarray(digits.images, dtype=np.float64), np.asarray(digits.target, dtype=np.int64)
    rng = np.random.default_rng(SPLIT_SEED)
    test = np.zeros(len(labels), dtype=bool)
    for label in range(NUM_CLASSES):
        members = np.flatnonzero(labels == label)
        test[rng.permutation(members)[: round(TEST_FRACTION * len(members))]] = True
    keep = test if split == "test" else ~test
    pixels = torch.from_numpy(images[keep] / LEVELS * 2.0 - 1.0).to(torch.float32).unsqueeze(1)
    return DigitSplit(pixels, torch.from_numpy(labels[keep]))


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images in [-1, 1] ``(N, 1, H, W)`` as uint8 ``(N, H, W)`` (the 17 levels stay distinct)."""
    return pixels_uint8(images)[..., 0]


def write_imagefolder(folder: str | Path, split: str = "train") -> Path:
    """Write ``split`` as a Hugging Face image folder: ``<class>/<index>.png`` (8 × 8 grey) and ``metadata.jsonl``
    (``file_name``, ``text`` = the class, as the trainer's captions of a class-conditional teacher), the index
    written last and atomically. Returns the folder."""
    from PIL import Image

    data = load_digits_split(split)
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for index, (array, label) in enumerate(zip(to_uint8(data.images), data.labels.tolist(), strict=True)):
        name = f"{label}/{index:04d}.png"
        (root / str(label)).mkdir(exist_ok=True)
        Image.fromarray(array).save(root / name)
        lines.append(json.dumps({"file_name": name, "text": str(label)}))
    with atomic_paths(root / "metadata.jsonl") as (tmp,):
        Path(tmp).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root
