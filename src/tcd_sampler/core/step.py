"""The pure math of one TCD step (Zheng et al. 2024, Algorithm 4), with its coefficients computed per schedule.

A step from ``t`` to the next scheduled time ``t'`` with ``γ ∈ [0, 1]``:

1. ``s = (1 − γ)·t'``                       (on a discrete grid: ``⌊·⌋`` in float32, as the reference computes it)
2. ``(x̂0, ε̂)`` from the model output         (:func:`convert_output`; optional clipping/thresholding of ``x̂0``,
   after which ``ε̂ = (x_t − α_t·x̂0)/σ_t`` is recomputed so ``x_s`` stays on the line through ``x_t``)
3. ``x_s = α_s·x̂0 + σ_s·ε̂``                  (the trajectory consistency function: a DDIM jump t → s)
4. ``x_t' = (α_t'/α_s)·x_s + √(σ_t'² − (α_t'/α_s)²·σ_s²)·z``  (the exact forward transition s → t'), skipped on
   the last step and when ``γ = 0``.

A sampling step reads one :class:`~tcd_sampler.core.table.StepRow` of coefficients computed once per schedule:
:func:`tcd_step` runs the tensor operations in the reference's order, so float32 results are bit-identical to
diffusers' ``TCDScheduler`` (the fused fast path is :mod:`tcd_sampler.core.fused`). The training form,
:func:`consistency_function` / :func:`consistency_jump`, is steps 2–3 on tensors of per-sample times, differentiable:
the same function, equal to the sampling step row by row. Nothing here validates input: the front ends do that
once, at the boundary.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .paths import Path
from .paths.base import working_dtype
from .predictions import FLOW, prediction
from .table import StepRow, boundary_scalings

__all__ = [
    "GeneratorLike",
    "clip_x0",
    "consistency_function",
    "consistency_jump",
    "convert_output",
    "draw_noise",
    "dynamic_threshold_x0",
    "flow_x0",
    "tcd_step",
    "working_dtype",
]

#: Generator argument accepted by :func:`draw_noise`: one generator, one per batch item, or none.
GeneratorLike = torch.Generator | Sequence[torch.Generator] | None


def convert_output(
    prediction_type: str, model_output: torch.Tensor, sample: torch.Tensor, alpha: float, sigma: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Model output ``m`` at ``x_t = sample`` → ``(x̂0, ε̂)`` on a path with ``(α_t, σ_t) = (alpha, sigma)``, by the
    registry entry of ``prediction_type`` (:mod:`tcd_sampler.core.predictions`)."""
    return prediction(prediction_type).convert(model_output, sample, alpha, sigma)


def clip_x0(x0: torch.Tensor, clip_range: float) -> torch.Tensor:
    """Clamp ``x̂0`` to ``[−clip_range, clip_range]``."""
    return x0.clamp(-clip_range, clip_range)


def dynamic_threshold_x0(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Dynamic thresholding of ``x̂0`` (Imagen, Saharia et al. 2022, §2.3).

    Per sample, ``q`` is the ``ratio``-quantile of ``|x̂0|`` clamped to ``[1, max_value]``; ``x̂0`` is clamped to
    ``[−q, q]`` and divided by ``q``. Computed in float32 at least.
    """
    flat = x0.reshape(x0.shape[0], -1)
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    q = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1.0, max=max_value).unsqueeze(1)
    return (torch.clamp(flat, -q, q) / q).reshape(x0.shape).to(x0.dtype)


def draw_noise(
    shape: torch.Size | tuple[int, ...],
    generator: GeneratorLike,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``z ~ N(0, I)`` drawn with exactly the calls of diffusers' ``randn_tensor``.

    A CPU generator draws on the CPU and the result is moved to ``device``; a list of generators draws one
    ``(1, …)`` sample per batch item (so a sample's noise does not depend on its batch); a list of one generator is
    used as that generator.
    """
    if isinstance(generator, Sequence) and len(generator) == 1:
        generator = generator[0]
    if isinstance(generator, Sequence):
        gen_device = generator[0].device
    elif generator is not None:
        gen_device = generator.device
    else:
        gen_device = device
    rand_device = torch.device("cpu") if gen_device.type == "cpu" else device
    if isinstance(generator, Sequence):
        one = (1, *shape[1:])
        parts = [torch.randn(one, generator=g, device=rand_device, dtype=dtype) for g in generator]
        return torch.cat(parts, dim=0).to(device)
    return torch.randn(shape, generator=generator, device=rand_device, dtype=dtype).to(device)


def tcd_step(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    row: StepRow,
    prediction_type: str,
    noise: torch.Tensor | None = None,
    x0_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One TCD step from ``sample = x_t``; returns ``(x_t', x_s, x̂0)`` (``x̂0`` is None for a plain ``flow``
    step, see :func:`flow_x0`).

    Args:
        model_output: the network's output ``m`` at ``(x_t, t)``, shape of ``sample``.
        sample: ``x_t``.
        row: the coefficients of this step (from a table in the working precision of these tensors).
        prediction_type: how to read ``model_output`` (see :func:`convert_output`).
        noise: ``z`` for the diffusion sub-step, used when ``row.draws_noise``.
        x0_transform: optional clipping/thresholding of ``x̂0`` before ``x_s`` is formed.

    With a transform or the boundary condition, ``ε̂`` is recomputed from the final ``x̂0``. Half-precision inputs
    are computed in float32 and rounded once at the end; the outputs have the promoted dtype of ``model_output`` and
    ``sample``.
    """
    out_dtype = torch.promote_types(model_output.dtype, sample.dtype)
    work = working_dtype(out_dtype)
    x, m = _as(sample, work), _as(model_output, work)
    x0: torch.Tensor | None
    if prediction_type == FLOW and x0_transform is None and not row.boundary:
        # on the flow path the DDIM jump t → s is exactly an Euler step of the velocity to σ_s; x̂0 is left to the
        # caller (flow_x0), since the step itself does not need it
        x0 = None
        x_s = x + (row.sigma_s - row.sigma_t) * m
    else:
        x0, eps = convert_output(prediction_type, m, x, row.alpha_t, row.sigma_t)
        if x0_transform is not None or row.boundary:
            if x0_transform is not None:
                x0 = x0_transform(x0)
            if row.boundary:
                x0 = row.c_out * x0 + row.c_skip * x
            eps = (x - row.alpha_t * x0) / row.sigma_t
        x_s = row.alpha_s * x0 + row.sigma_s * eps
    prev = x_s
    if row.draws_noise and noise is not None:
        prev = row.renoise * x_s + row.noise * _as(noise, work)
    return _as(prev, out_dtype), _as(x_s, out_dtype), None if x0 is None else _as(x0, out_dtype)


def flow_x0(velocity: torch.Tensor, sample: torch.Tensor, sigma: float) -> torch.Tensor:
    """``x̂0 = x − σ·u`` on the flow path (what :func:`tcd_step` leaves out for ``flow``)."""
    return sample - sigma * velocity


def _as(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


# ------------------------------------------------------------------ the training form


def consistency_function(
    model_output: torch.Tensor,
    x_t: torch.Tensor,
    alpha_t: Any,
    sigma_t: Any,
    alpha_s: Any,
    sigma_s: Any,
    prediction_type: str = "epsilon",
    boundary: tuple[Any, Any] | None = None,
) -> torch.Tensor:
    """``x_s``, the jump from ``x_t`` at time ``t`` to time ``s`` along the model's predicted trajectory:
    ``f(x_t, t → s) = α_s·x̂0 + σ_s·ε̂`` (first order: the DDIM jump), with ``(x̂0, ε̂)`` from the prediction registry
    and, for LCM-style models, the boundary condition ``x̂0 ← c_out·x̂0 + c_skip·x_t`` (then
    ``ε̂ = (x_t − α_t·x̂0)/σ_t``). A distillation loss compares it at two times (Zheng et al. 2024).

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

    def per_sample(c: Any) -> Any:
        c = torch.as_tensor(c)
        return c.reshape(shape) if c.ndim else c

    a_t, s_t, a_s, s_s = (per_sample(c) for c in (alpha_t, sigma_t, alpha_s, sigma_s))
    x0, eps = prediction(prediction_type).convert(model_output, x_t, a_t, s_t)
    if boundary is not None:
        c_skip, c_out = (per_sample(c) for c in boundary)
        x0 = c_out * x0 + c_skip * x_t
        eps = (x_t - a_t * x0) / s_t
    return a_s * x0 + s_s * eps


def consistency_jump(
    model_output: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    s: torch.Tensor,
    path: Path,
    prediction_type: str = "epsilon",
    timestep_scaling: float | None = None,
    clean_end: bool = False,
) -> torch.Tensor:
    """:func:`consistency_function` between per-sample times ``t`` and ``s`` of ``path``: ``(α, σ)`` come from
    ``path.alpha_sigma`` on the tensors (a batch may mix times; on continuous paths they are differentiable in the
    times too).

    Args:
        model_output: the network's output at ``(x_t, t)``.
        x_t: the noisy input.
        t, s: the current and the target time per sample, ``(B,)``, in the path's time.
        path: the path (:mod:`tcd_sampler.core.paths`); discrete paths read their grid in the working precision
            (float32 for half-precision inputs, which are computed in float32 and rounded once, as the sampler).
        prediction_type: what the network predicts. Default ``"epsilon"``.
        timestep_scaling: LCM's boundary condition at ``t`` with this ``k`` (:func:`boundary_scalings`); None
            (default) is plain TCD.
        clean_end: a target ``s = 0`` is the clean end ``α = 1, σ = 0`` (as a table built with
            :class:`~tcd_sampler.core.table.Boundary` ``clean_end``) instead of the path's time 0. Default False.
    """
    if prediction_type == "edm":
        raise ValueError("'edm' outputs are read on EDM's unit-variance path: wrap the network with EDM.denoiser")
    work = working_dtype(torch.promote_types(model_output.dtype, x_t.dtype))
    if path.discrete:  # the grid in the working precision (float32 for half-precision inputs), as the sampler
        (a_t, s_t), (a_s, s_s) = (path.alpha_sigma(v, dtype=work) for v in (t, s))  # type: ignore[call-arg]
    else:
        (a_t, s_t), (a_s, s_s) = path.alpha_sigma(t), path.alpha_sigma(s)
    if clean_end:
        at_end = s == 0
        a_s, s_s = torch.where(at_end, torch.ones_like(a_s), a_s), torch.where(at_end, torch.zeros_like(s_s), s_s)
    boundary = None if timestep_scaling is None else boundary_scalings(t, timestep_scaling)
    out_dtype = torch.promote_types(model_output.dtype, x_t.dtype)
    m, x = model_output.to(work), x_t.to(work)
    return consistency_function(m, x, a_t, s_t, a_s, s_s, prediction_type, boundary).to(out_dtype)
