"""The trajectory consistency function on tensors: the training form of the TCD step.

``f(x_t, t → s) = α_s·x̂0 + σ_s·ε̂`` (first order: the DDIM jump), with ``(x̂0, ε̂)`` from the network's output by the
prediction registry and, for LCM-style models, the consistency boundary condition ``x̂0 ← c_out·x̂0 + c_skip·x_t``
(then ``ε̂ = (x_t − α_t·x̂0)/σ_t``). It is the same function the sampling step takes on one row of a table
(:func:`tcd_sampler.step.tcd_step`), here with a coefficient per sample, so a batch can mix times, and
differentiable: a distillation loss compares it at two times (Zheng et al. 2024, the training algorithm).
"""

from __future__ import annotations

import torch

from .predictions import prediction

__all__ = ["consistency_function"]


def consistency_function(
    model_output: torch.Tensor,
    x_t: torch.Tensor,
    alpha_t: torch.Tensor,
    sigma_t: torch.Tensor,
    alpha_s: torch.Tensor,
    sigma_s: torch.Tensor,
    prediction_type: str = "epsilon",
    boundary: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``x_s``, the jump from ``x_t`` at time ``t`` to time ``s`` along the model's predicted trajectory.

    Args:
        model_output: the network's output at ``(x_t, t)``, shape ``(B, …)``.
        x_t: the noisy input, shape of ``model_output``.
        alpha_t, sigma_t: the path's ``α, σ`` at ``t``, one per sample ``(B,)`` (or scalars).
        alpha_s, sigma_s: the same at the target ``s``.
        prediction_type: what the network predicts (a key of the prediction registry). Default ``"epsilon"``.
        boundary: ``(c_skip, c_out)`` per sample for the consistency boundary condition (LCM); None (default) is
            plain TCD.

    Returns:
        ``x_s``, shape of ``x_t``; gradients flow to ``model_output`` (and to the coefficients, if they need them).
    """
    shape = (-1,) + (1,) * (x_t.ndim - 1)

    def per_sample(c: torch.Tensor) -> torch.Tensor:
        c = torch.as_tensor(c)
        return c.reshape(shape) if c.ndim else c

    a_t, s_t, a_s, s_s = (per_sample(c) for c in (alpha_t, sigma_t, alpha_s, sigma_s))
    x0, eps = prediction(prediction_type).convert(model_output, x_t, a_t, s_t)
    if boundary is not None:
        c_skip, c_out = (per_sample(c) for c in boundary)
        x0 = c_out * x0 + c_skip * x_t
        eps = (x_t - a_t * x0) / s_t
    return a_s * x0 + s_s * eps
