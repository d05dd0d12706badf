"""Sample-quality metrics against a known Gaussian mixture (:class:`~tcd_sampler.distill.teacher.GaussianMixture`).

Sliced Wasserstein-2 (POT), the total variation between generated and true mode weights, and sharpness (the
fraction of samples as close to some mode as 99.73 % of that mode's own samples, the "3 σ" radius).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..distill.teacher import GaussianMixture

__all__ = ["as_numpy", "evaluate", "mode_weight_tv", "sharpness", "sliced_w2"]


def sliced_w2(x: torch.Tensor, y: torch.Tensor, n_projections: int = 128, seed: int = 0) -> float:
    """Sliced Wasserstein-2 distance between two sample sets (POT's estimator, fixed projections).

    Args:
        x, y: the sample sets, ``(n, d)`` and ``(m, d)``.
        n_projections: the number of random directions. Default 128.
        seed: seeds the directions. Default 0.
    """
    try:
        import ot
    except ImportError:
        raise ImportError("the metrics need POT: pip install 'tcd-sampler[eval]'") from None
    a, b = x.detach().double().cpu().numpy(), y.detach().double().cpu().numpy()
    return float(ot.sliced_wasserstein_distance(a, b, n_projections=n_projections, p=2, seed=seed))


def _nearest_mode(x: torch.Tensor, mixture: GaussianMixture) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of the nearest mode in std units, and that distance, per sample."""
    dist = torch.cdist(x.double(), mixture.means) / mixture.stds[None, :]
    best, index = dist.min(dim=1)
    return index, best


def mode_weight_tv(x: torch.Tensor, mixture: GaussianMixture) -> float:
    """Total variation ``½ Σ_k |ŵ_k − w_k|`` between the generated mode weights (nearest mode) and the true ones.

    Args:
        x: the generated samples, ``(n, d)``.
        mixture: the true data.
    """
    index, _ = _nearest_mode(x, mixture)
    counts = torch.bincount(index, minlength=len(mixture.weights)).double()
    return float(0.5 * (counts / counts.sum() - mixture.weights).abs().sum())


def sharpness(x: torch.Tensor, mixture: GaussianMixture) -> float:
    """Fraction of samples within the "3 σ" radius of some mode: the radius holding 99.73 % of a component's own
    samples in ``d`` dimensions (3 in 1-D; √χ²_d(0.9973) in general). True data scores ≈ 0.997.

    Args:
        x: the generated samples, ``(n, d)``.
        mixture: the true data.
    """
    from scipy.stats import chi2

    radius = math.sqrt(chi2.ppf(math.erf(3 / math.sqrt(2)), mixture.dim))
    _, best = _nearest_mode(x, mixture)
    return float((best <= radius).double().mean())


def evaluate(x: torch.Tensor, mixture: GaussianMixture, reference: torch.Tensor, seed: int = 0) -> dict[str, float]:
    """The three metrics of ``x`` against ``mixture``, on its finite rows, and the fraction of rows that are finite.

    Args:
        x: the generated samples, ``(n, d)``.
        mixture: the true data.
        reference: true samples for the sliced W2.
        seed: seeds the sliced W2's directions. Default 0.

    Returns ``sliced_w2``, ``mode_tv``, ``sharpness`` and ``finite``."""
    finite = torch.isfinite(x).all(dim=1)
    x = x[finite]
    return {
        "sliced_w2": sliced_w2(x, reference, seed=seed) if len(x) else float("nan"),
        "mode_tv": mode_weight_tv(x, mixture) if len(x) else float("nan"),
        "sharpness": sharpness(x, mixture) if len(x) else 0.0,
        "finite": float(finite.double().mean()),
    }


def as_numpy(x: torch.Tensor) -> np.ndarray:
    """Float64 numpy copy of ``x`` (for plotting and JSON)."""
    return x.detach().double().cpu().numpy()
