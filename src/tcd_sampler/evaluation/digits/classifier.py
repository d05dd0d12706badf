"""The small digit classifier of the main job's metrics, trained here on the training split: its accuracy on the
requested class is the analogue of a CLIP score, and its penultimate layer is the feature space of FID, precision
and recall (as Inception's is for photographs).

A two-convolution network on 8 × 8 grey digits in [-1, 1]: conv 3×3 (32) → ReLU → conv 3×3 (64) → ReLU → 2×2 max
pool → linear (128) → ReLU → linear (:data:`FEATURES`) → ReLU = the features → linear (10) = the logits.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .data import NUM_CLASSES, DigitSplit

__all__ = [
    "FEATURES",
    "DigitClassifier",
    "DigitFeatures",
    "accuracy",
    "load_classifier",
    "save_classifier",
    "train_classifier",
    "write_classifier_card",
]

#: The width of the feature space.
FEATURES = 64
WEIGHTS_NAME = "classifier.safetensors"
CARD_NAME = "classifier.json"
ARCHITECTURE = "conv3x3(32)-relu-conv3x3(64)-relu-maxpool2-linear(128)-relu-linear(64)-relu [features]-linear(10)"


class DigitClassifier(nn.Module):
    """The classifier; :meth:`features` gives the feature space, ``forward`` the logits."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 16, 128), nn.ReLU(), nn.Linear(128, FEATURES), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Linear(FEATURES, NUM_CLASSES)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The features ``(N, FEATURES)`` of images ``(N, 1, 8, 8)`` in [-1, 1]."""
        return self.body(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The class logits ``(N, 10)``."""
        return self.head(self.body(images))


class DigitFeatures(nn.Module):
    """The classifier's feature extractor in the form torchmetrics' ``FrechetInceptionDistance(feature=...)`` takes:
    a module mapping images to ``(N, num_features)``, with ``num_features`` set."""

    def __init__(self, classifier: DigitClassifier) -> None:
        super().__init__()
        self.classifier = classifier.eval()
        self.num_features = FEATURES

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The features of images ``(N, 1, 8, 8)`` in [-1, 1] (clipped)."""
        return self.classifier.features(images.float().clamp(-1, 1))


def train_classifier(train: DigitSplit, epochs: int = 40, seed: int = 0, progress: bool = True) -> DigitClassifier:
    """Train the classifier on ``train`` (AdamW, weight decay 0.01, a one-cycle learning rate peaking at 3e-3,
    batches of 64, each batch shifted by up to one pixel as augmentation), seeded. About 8 s on one core."""
    torch.manual_seed(seed)
    model = DigitClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-2)
    generator = torch.Generator().manual_seed(seed)
    n = len(train)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 3e-3, total_steps=epochs * -(-n // 64))
    for _ in tqdm(range(epochs), desc="classifier", disable=not progress):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, 64):
            rows = order[start : start + 64]
            images = train.images[rows]
            dy, dx = torch.randint(-1, 2, (2,), generator=generator).tolist()
            shifted = torch.roll(images, shifts=(dy, dx), dims=(2, 3))  # the digits' borders are background
            loss = nn.functional.cross_entropy(model(shifted), train.labels[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: DigitClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    """The share of ``images`` that ``model`` assigns to ``labels``."""
    return float((model(images.float().clamp(-1, 1)).argmax(1) == labels).float().mean())


def save_classifier(model: DigitClassifier, folder: str | Path) -> Path:
    """Write the weights as ``classifier.safetensors`` in ``folder`` (atomically)."""
    from safetensors.torch import save_file

    from ..._files import atomic_paths

    path = Path(folder) / WEIGHTS_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_paths(path) as (tmp,):
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    return path


def load_classifier(folder: str | Path) -> DigitClassifier:
    """The classifier saved by :func:`save_classifier` in ``folder``; the shipped one is checked against the
    package's manifest first (:func:`tcd_sampler.assets.verify`: ValueError when it is damaged)."""
    from safetensors.torch import load_file

    from ...assets import verify

    verify(Path(folder) / WEIGHTS_NAME)
    model = DigitClassifier()
    model.load_state_dict(load_file(str(Path(folder) / WEIGHTS_NAME)))
    return model.eval()


def write_classifier_card(folder: str | Path, card: dict[str, object]) -> Path:
    """Write ``card`` (the seed, the test accuracy) as ``classifier.json`` in ``folder`` (atomically)."""
    import json

    from ..._files import atomic_paths

    path = Path(folder) / CARD_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_paths(path) as (tmp,):
        text = json.dumps({"architecture": ARCHITECTURE, "features": FEATURES, **card}, indent=2)
        Path(tmp).write_text(text + "\n", encoding="utf-8")
    return path
