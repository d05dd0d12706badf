"""The main job's metrics, in the feature space of the digit classifier (:mod:`.classifier`):

- FID: torchmetrics' ``FrechetInceptionDistance`` with the classifier's features as its custom extractor, the real
  statistics (the test split) computed once and kept;
- class accuracy: the share of samples the classifier assigns to the class they were asked for;
- precision and recall: Kynkäänniemi et al. (2019)'s k-nearest-neighbour manifolds — precision, the share of
  samples inside the union of the real features' k-NN balls; recall, the share of real features inside the
  samples' (k = 3, theirs).
"""

from __future__ import annotations

from typing import Any

import torch

from .classifier import DigitClassifier, DigitFeatures, accuracy

__all__ = ["DigitMetrics", "precision_recall"]

#: The neighbourhood size of precision and recall.
K = 3


#: Rows of a distance matrix computed at once (memory: CHUNK × N distances).
CHUNK = 1024


def _radii(features: torch.Tensor, k: int) -> torch.Tensor:
    """The distance of each row to its k-th nearest other row."""
    parts = [torch.cdist(rows, features).kthvalue(k + 1, dim=1).values for rows in features.split(CHUNK)]
    return torch.cat(parts)  # (the 0th neighbour is the row itself)


def _coverage(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor) -> float:
    """The share of ``points`` inside at least one ball (``centres``, ``radii``)."""
    inside = [(torch.cdist(rows, centres) <= radii[None, :]).any(dim=1) for rows in points.split(CHUNK)]
    return float(torch.cat(inside).double().mean())


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = K) -> tuple[float, float]:
    """Improved precision and recall of ``fake`` features against ``real`` ones (both ``(N, D)``)."""
    real, fake = real.double(), fake.double()
    return _coverage(fake, real, _radii(real, k)), _coverage(real, fake, _radii(fake, k))


class DigitMetrics:
    """The metrics of samples against one real set (the test split): FID, class accuracy, precision, recall.

    Args:
        classifier: the trained digit classifier.
        real: the real images ``(N, 1, 8, 8)`` in [-1, 1].
    """

    def __init__(self, classifier: DigitClassifier, real: torch.Tensor) -> None:
        try:
            from torchmetrics.image.fid import FrechetInceptionDistance
        except ImportError as err:
            raise ImportError("the digits metrics need torchmetrics: pip install 'tcd-sampler[eval]'") from err
        self.classifier = classifier.eval()
        self.extractor = DigitFeatures(classifier)
        self.fid = FrechetInceptionDistance(feature=self.extractor, reset_real_features=False)
        self.fid.update(real, real=True)
        self.real_features = self.extractor(real)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
        """``fid``, ``accuracy`` (on ``labels``), ``precision`` and ``recall`` of ``images``."""
        self.fid.reset()  # the fake statistics only
        self.fid.update(images, real=False)
        precision, recall = precision_recall(self.real_features, self.extractor(images))
        return {
            "fid": float(self.fid.compute()),
            "accuracy": accuracy(self.classifier, images, labels),
            "precision": precision,
            "recall": recall,
        }
