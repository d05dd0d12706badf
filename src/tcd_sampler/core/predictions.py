"""What a network predicts, in one registry: each prediction type says how its output ``m`` at ``x_t`` on a path with
``(α_t, σ_t)`` gives ``(x̂0, ε̂)``, the same as one linear map ``x̂0 = a·x_t + b·m``, and what ``m`` a clean ``x0`` and a
noise ``ε`` call for (the regression target).

``convert`` runs the reference's tensor operations in the reference's order (bit parity with diffusers depends on
it); ``x0_map`` gives the folded coefficients (the fused step, denoiser wrappers); ``target`` is what a model of the
type should output (teachers, training). Scalars or broadcastable tensors work for ``alpha`` and ``sigma`` alike.
A new prediction type is one more :class:`Prediction` in :data:`PREDICTIONS`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["FLOW", "PREDICTIONS", "PREDICTION_TYPES", "Prediction", "prediction"]

Scalar = Any  # a Python float or a tensor broadcastable against the sample


@dataclass(frozen=True)
class Prediction:
    """One prediction type.

    Attributes:
        name: the config value (``prediction_type``).
        convert: ``(m, x_t, α, σ) → (x̂0, ε̂)``.
        x0_map: ``(α, σ) → (a, b)`` with ``x̂0 = a·x_t + b·m`` (Python floats; ``±inf`` where ``x̂0`` is undefined).
        target: ``(x0, ε, α, σ) → m``, the output of an exact model of this type.
    """

    name: str
    convert: Callable[[torch.Tensor, torch.Tensor, Scalar, Scalar], tuple[torch.Tensor, torch.Tensor]]
    x0_map: Callable[[float, float], tuple[float, float]]
    target: Callable[[torch.Tensor, torch.Tensor, Scalar, Scalar], torch.Tensor]


def _epsilon_x0_map(alpha: float, sigma: float) -> tuple[float, float]:
    if alpha == 0:  # zero-SNR end: x̂0 is undefined for an ε model (the schedulers refuse to step there)
        return math.inf, -math.inf
    return 1.0 / alpha, -sigma / alpha


#: The prediction type of flow-matching models: the velocity ``u = ε − x0`` on ``x_t = (1 − t)·x0 + t·ε``.
FLOW = "flow"

PREDICTIONS: dict[str, Prediction] = {
    p.name: p
    for p in (
        Prediction(  # ε: x̂0 = (x − σ·m)/α
            "epsilon",
            convert=lambda m, x, a, s: ((x - s * m) / a, m),
            x0_map=_epsilon_x0_map,
            target=lambda x0, eps, a, s: eps,
        ),
        Prediction(  # x0 itself: ε̂ = (x − α·m)/σ
            "sample",
            convert=lambda m, x, a, s: (m, (x - a * m) / s),
            x0_map=lambda a, s: (0.0, 1.0),
            target=lambda x0, eps, a, s: x0,
        ),
        Prediction(  # v = α·ε − σ·x0: x̂0 = α·x − σ·m, ε̂ = α·m + σ·x
            "v_prediction",
            convert=lambda m, x, a, s: (a * x - s * m, a * m + s * x),
            x0_map=lambda a, s: (a, -s),
            target=lambda x0, eps, a, s: a * eps - s * x0,
        ),
        Prediction(  # Karras' F of EDM networks, on the unit-variance path (α² + σ² = 1): x̂0 = α·x + σ·m (−v)
            "edm",
            convert=lambda m, x, a, s: (a * x + s * m, s * x - a * m),
            x0_map=lambda a, s: (a, s),
            target=lambda x0, eps, a, s: s * x0 - a * eps,
        ),
        Prediction(  # u = ε − x0 (rectified flow, α = 1 − σ): x̂0 = x − σ·u, ε̂ = x + α·u
            FLOW,
            convert=lambda m, x, a, s: (x - s * m, x + a * m),
            x0_map=lambda a, s: (1.0, -s),
            target=lambda x0, eps, a, s: eps - x0,
        ),
    )
}

#: Accepted values of ``prediction_type`` on discrete VP paths (``TCDScheduler``).
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


def prediction(name: str) -> Prediction:
    """The registry entry of ``name``; ValueError listing the known types otherwise."""
    try:
        return PREDICTIONS[name]
    except KeyError:
        raise ValueError(f"prediction_type must be one of {tuple(PREDICTIONS)}, got {name!r}") from None
