"""The prediction registry: for every type, the model output an exact model gives (``target``) converts back to the
``(x0, ε)`` it came from, and the folded linear map agrees with the conversion."""

from __future__ import annotations

import math

import pytest
import torch

from tcd_sampler.core.predictions import FLOW, PREDICTION_TYPES, PREDICTIONS, prediction


@pytest.mark.parametrize("name", list(PREDICTIONS))
@pytest.mark.parametrize("alpha", [0.999, 0.6, 0.05])
def test_target_converts_back_and_the_linear_map_agrees(name: str, alpha: float) -> None:
    sigma = 1 - alpha if name == FLOW else math.sqrt(1 - alpha**2)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 5, generator=g, dtype=torch.float64), torch.randn(3, 5, generator=g, dtype=torch.float64)
    x = alpha * x0 + sigma * eps
    entry = prediction(name)
    m = entry.target(x0, eps, alpha, sigma)
    x0_hat, eps_hat = entry.convert(m, x, alpha, sigma)
    torch.testing.assert_close(x0_hat, x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(eps_hat, eps, rtol=1e-9, atol=1e-9)
    a, b = entry.x0_map(alpha, sigma)
    torch.testing.assert_close(a * x + b * m, x0, rtol=1e-9, atol=1e-9)


def test_tensor_coefficients_broadcast() -> None:
    """Per-sample α, σ (training, denoiser wrappers) work like scalars."""
    alpha = torch.tensor([0.9, 0.5], dtype=torch.float64).reshape(2, 1)
    sigma = (1 - alpha**2).sqrt()
    x0, eps = torch.randn(2, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    for name in PREDICTION_TYPES:
        entry = prediction(name)
        m = entry.target(x0, eps, alpha, sigma)
        torch.testing.assert_close(entry.convert(m, alpha * x0 + sigma * eps, alpha, sigma)[0], x0)


def test_unknown_type_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        prediction("x0")
