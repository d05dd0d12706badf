"""The fused fast path (``fused_step=True``): a TCD step folded into at most two passes over the latents.

:func:`fold_row` turns a table row into float64 coefficients of two linear maps of ``(x_t, m)``;
:func:`linear_step` applies them. As accurate as :func:`tcd_sampler.core.step.tcd_step` against float64, but not
bit-identical to the reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .predictions import prediction
from .step import _as, working_dtype
from .table import StepRow

__all__ = ["LinearRow", "fold_row", "fused_x0", "linear_step"]


@dataclass(frozen=True)
class LinearRow:
    """One step folded into two linear maps of ``(x_t, m)`` with float64 coefficients:
    ``x̂0 = x0_x·x_t + x0_m·m`` and ``x_s = xs_x·x_t + xs_m·m`` (see :func:`fold_row`)."""

    x0_x: float
    x0_m: float
    xs_x: float
    xs_m: float


def fold_row(row: StepRow, prediction_type: str) -> LinearRow:
    """Fold a step without clipping/thresholding into :class:`LinearRow` coefficients, in float64.

    ``x̂0 = a·x + b·m`` by the prediction registry's ``x0_map`` (then the boundary condition ``c_out·x̂0 + c_skip·x``),
    and ``x_s = (σ_s/σ_t)·x + (α_s − σ_s·α_t/σ_t)·x̂0``, the DDIM jump with ``ε̂ = (x − α_t·x̂0)/σ_t``."""
    a_t, s_t, a_s, s_s = row.alpha_t, row.sigma_t, row.alpha_s, row.sigma_s
    a, b = prediction(prediction_type).x0_map(a_t, s_t)
    if row.boundary:
        a, b = row.c_out * a + row.c_skip, row.c_out * b
    if row.s == row.t:  # a last step at t = 0: x_s is x_t
        return LinearRow(a, b, 1.0, 0.0)
    keep = a_s - s_s * a_t / s_t
    return LinearRow(a, b, s_s / s_t + keep * a, keep * b)


def linear_step(
    model_output: torch.Tensor, sample: torch.Tensor, row: StepRow, lin: LinearRow, noise: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A TCD step as at most two fused passes: ``x_s = xs_x·x + xs_m·m``, then, when the row draws noise,
    ``x_t' = renoise·x_s + noise·z`` (computed in place in ``noise``, which the caller hands over, when the layouts
    allow). Returns ``(x_t', x_s)``. As accurate as :func:`tcd_step` against float64, but not bit-identical to the
    reference. Half-precision inputs are computed in float32 and rounded once, and the outputs keep the sample's
    memory format (channels_last stays channels_last)."""
    out_dtype = (
        sample.dtype if sample.dtype is model_output.dtype else torch.promote_types(model_output.dtype, sample.dtype)
    )
    work = working_dtype(out_dtype)
    x, m = _as(sample, work), _as(model_output, work)
    x_s = torch.add(x * lin.xs_x, m, alpha=lin.xs_m)
    prev = x_s
    if row.draws_noise and noise is not None:
        z = _as(noise, work)
        if z is noise and x_s.is_contiguous() and noise.is_contiguous():
            prev = z.mul_(row.noise).add_(x_s, alpha=row.renoise)
        else:  # x_s first, so that the result takes its layout
            prev = torch.add(x_s * row.renoise, z, alpha=row.noise)
    return _as(prev, out_dtype), _as(x_s, out_dtype)


def fused_x0(model_output: torch.Tensor, sample: torch.Tensor, lin: LinearRow) -> torch.Tensor:
    """``x̂0 = x0_x·x_t + x0_m·m`` of a folded step (what :func:`linear_step` leaves out), computed as it."""
    out_dtype = torch.promote_types(model_output.dtype, sample.dtype)
    work = working_dtype(out_dtype)
    return _as(torch.add(_as(sample, work) * lin.x0_x, _as(model_output, work), alpha=lin.x0_m), out_dtype)
