"""The pure math of one TCD step (Zheng et al. 2024, Algorithm 4), with its coefficients computed per schedule.

A step from ``t`` to the next scheduled time ``t'`` with ``γ ∈ [0, 1]``:

1. ``s = (1 − γ)·t'``                       (on a discrete grid: ``⌊·⌋`` in float32, as the reference computes it)
2. ``(x̂0, ε̂)`` from the model output         (:func:`convert_output`; optional clipping/thresholding of ``x̂0``,
   after which ``ε̂ = (x_t − α_t·x̂0)/σ_t`` is recomputed so ``x_s`` stays on the line through ``x_t``)
3. ``x_s = α_s·x̂0 + σ_s·ε̂``                  (the trajectory consistency function: a DDIM jump t → s)
4. ``x_t' = (α_t'/α_s)·x_s + √(σ_t'² − (α_t'/α_s)²·σ_s²)·z``  (the exact forward transition s → t'), skipped on
   the last step and when ``γ = 0``.

Everything that depends only on the schedule and ``γ`` is computed once into a :class:`StepTable`; a step reads one
:class:`StepRow`. Two ways to take it: :func:`tcd_step` computes the scalars with torch's own CPU arithmetic in the
working precision and runs the tensor operations in the reference's order, so float32 results are bit-identical to
diffusers' ``TCDScheduler``; :func:`linear_step` folds the step into at most two fused passes (:func:`fold_row`,
float64), faster but only as close as rounding allows. Nothing here validates input: the front ends do that once,
at the boundary.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .core.predictions import FLOW, PREDICTION_TYPES, prediction

__all__ = [
    "FLOW",
    "PREDICTION_TYPES",
    "SIGMA_DATA",
    "LinearRow",
    "StepRow",
    "StepTable",
    "boundary_scalings",
    "build_table",
    "build_vp_table",
    "clip_x0",
    "convert_output",
    "draw_noise",
    "dynamic_threshold_x0",
    "flow_x0",
    "fold_row",
    "fused_x0",
    "linear_step",
    "target_timesteps",
    "tcd_step",
    "working_dtype",
]


#: ``σ_d`` of the consistency boundary condition (LCM).
SIGMA_DATA = 0.5

#: Generator argument accepted by :func:`draw_noise`: one generator, one per batch item, or none.
GeneratorLike = torch.Generator | Sequence[torch.Generator] | None


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision a step computes in: float32 for half-precision tensors, else the tensor's own."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


@dataclass(frozen=True)
class StepRow:
    """The coefficients of one step (see the module docstring for the formulas).

    Attributes:
        t: current time (an integer timestep on discrete grids, σ or the model's time in sigma space).
        t_prev: next scheduled time ``t'`` (0 after the last step).
        s: the denoising target ``s``.
        alpha_t, sigma_t: ``α_t, σ_t``.
        alpha_s, sigma_s: ``α_s, σ_s``.
        renoise: ``α_t'/α_s``, the scale of ``x_s`` in the diffusion sub-step.
        noise: ``√(σ_t'² − renoise²·σ_s²)``, the scale of ``z``.
        draws_noise: whether this step draws ``z`` (``γ > 0`` and not the last step, as the reference does);
            when False, ``x_t' = x_s``.
        boundary: apply the consistency boundary condition ``x̂0 ← c_out·x̂0 + c_skip·x_t`` (LCM).
        c_skip, c_out: its scalings at ``t``.
    """

    t: float
    t_prev: float
    s: float
    alpha_t: float
    sigma_t: float
    alpha_s: float
    sigma_s: float
    renoise: float
    noise: float
    draws_noise: bool
    boundary: bool = False
    c_skip: float = 0.0
    c_out: float = 1.0


@dataclass(frozen=True)
class StepTable:
    """The per-step coefficients of one schedule, one ``γ`` and one working precision: ``rows[i]`` drives step i."""

    gamma: float
    dtype: torch.dtype
    rows: tuple[StepRow, ...]

    def __len__(self) -> int:
        return len(self.rows)


def target_timesteps(t_prev: np.ndarray | Sequence[int], gamma: float) -> np.ndarray:
    """``s = ⌊(1 − γ)·t'⌋`` on the integer grid, in float32 exactly as the reference computes it (torch rounds
    ``1 − γ`` to float32 and multiplies in float32; numpy's float32 product is the same IEEE operation).

    float64 would give a different ``s`` at some points (γ = 0.3, t' = 90: 63 in float32, 62 in float64).
    """
    prev = np.asarray(t_prev, dtype=np.int64).astype(np.float32)
    return np.floor(np.float32(1 - gamma) * prev).astype(np.int64)


def build_vp_table(
    alphas_cumprod: torch.Tensor,
    timesteps: Sequence[int] | np.ndarray,
    gamma: float,
    boundary: tuple[torch.Tensor, float] | None = None,
) -> StepTable:
    """Coefficients of a TCD loop over ``timesteps`` on a discrete VP path.

    The square roots are taken by torch in the working precision, as the reference takes them (torch's float32
    ``sqrt`` on the CPU is not always the correctly rounded one, so numpy would not reproduce it).

    Args:
        alphas_cumprod: ``ᾱ`` on the grid, shape ``(T,)``, in the working precision (float32 or float64).
        timesteps: descending integer timesteps of the loop.
        gamma: stochasticity ``γ ∈ [0, 1]`` (``eta`` in diffusers).
        boundary: ``(final_alpha_cumprod, timestep_scaling)`` for the consistency-boundary mode: every step applies
            LCM's ``c_skip, c_out`` (``σ_d = 0.5``) to ``x̂0``, and a target ``s = 0`` is the clean endpoint with
            ``ᾱ = final_alpha_cumprod``. None (default) is plain TCD.
    """
    acp = alphas_cumprod.detach().cpu()
    t = np.asarray(timesteps, dtype=np.int64)
    n = len(t)
    t_prev = np.append(t[1:], 0)
    s = target_timesteps(t_prev, gamma)
    gathered = acp[torch.from_numpy(np.concatenate([t, s, t_prev]))]  # one gather: ᾱ_t, ᾱ_s, ᾱ_t'
    a_t, a_s, a_p = gathered[:n], gathered[n : 2 * n], gathered[2 * n :]
    if boundary is not None:  # s = 0 is the clean endpoint
        a_s = torch.where(torch.from_numpy(s == 0), boundary[0].to(acp.dtype), a_s)
    values = torch.cat([a_t, a_s, a_p / a_s])
    roots = values.sqrt().tolist()  # α_t, α_s, √(ᾱ_t'/ᾱ_s)
    co_roots = (1 - values).sqrt().tolist()  # σ_t, σ_s, √(1 − ᾱ_t'/ᾱ_s)
    columns = {
        "alpha_t": roots[:n],
        "alpha_s": roots[n : 2 * n],
        "renoise": roots[2 * n :],
        "sigma_t": co_roots[:n],
        "sigma_s": co_roots[n : 2 * n],
        "noise": co_roots[2 * n :],
    }
    if boundary is not None:
        c_skip, c_out = boundary_scalings(torch.from_numpy(t), boundary[1])
        columns["c_skip"] = c_skip.to(acp.dtype).tolist()
        columns["c_out"] = c_out.to(acp.dtype).tolist()
    draws = [gamma > 0 and i != n - 1 for i in range(n)]
    return _table(gamma, acp.dtype, t.tolist(), t_prev.tolist(), s.tolist(), columns, draws, boundary is not None)


def boundary_scalings(t: torch.Tensor, timestep_scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """LCM's consistency boundary condition at integer timesteps ``t``: ``(c_skip, c_out)`` with
    ``c_skip = σ_d²/((k·t)² + σ_d²)``, ``c_out = k·t/√((k·t)² + σ_d²)``, ``k = timestep_scaling``, computed in
    float32 as the reference scales the integer timestep."""
    scaled = t * timestep_scaling
    return SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2), scaled / (scaled**2 + SIGMA_DATA**2) ** 0.5


def build_table(
    t: Sequence[float] | np.ndarray,
    t_prev: Sequence[float] | np.ndarray,
    s: Sequence[float] | np.ndarray,
    alpha_sigma: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
    gamma: float,
    draws_noise: Sequence[bool],
    dtype: torch.dtype = torch.float64,
) -> StepTable:
    """Coefficients of a TCD loop on any path given in closed form, computed in float64.

    Args:
        t, t_prev, s: per step, the current time, the next time and the denoising target, in the path's time.
        alpha_sigma: the path: times → ``(α, σ)`` (float64 arrays).
        gamma: the stochasticity the targets were made with (recorded in the table).
        draws_noise: per step, whether the diffusion sub-step runs.
        dtype: the working precision the table is meant for (recorded; values are float64).
    """
    a_t, s_t = alpha_sigma(np.asarray(t, dtype=np.float64))
    a_s, s_s = alpha_sigma(np.asarray(s, dtype=np.float64))
    a_p, s_p = alpha_sigma(np.asarray(t_prev, dtype=np.float64))
    with np.errstate(divide="ignore", invalid="ignore"):
        renoise = np.where(draws_noise, a_p / a_s, 1.0)
        noise = np.where(draws_noise, np.sqrt(np.maximum(s_p**2 - (renoise * s_s) ** 2, 0.0)), 0.0)
    columns = {
        "alpha_t": a_t, "sigma_t": s_t, "alpha_s": a_s, "sigma_s": s_s, "renoise": renoise, "noise": noise
    }  # fmt: skip
    now, nxt, target = (np.asarray(v, dtype=np.float64).tolist() for v in (t, t_prev, s))
    return _table(gamma, dtype, now, nxt, target, {k: v.tolist() for k, v in columns.items()}, list(draws_noise))


def _table(
    gamma: float,
    dtype: torch.dtype,
    t: list[Any],
    t_prev: list[Any],
    s: list[Any],
    columns: dict[str, list[float]],
    draws: list[bool],
    boundary: bool = False,
) -> StepTable:
    rows = tuple(
        StepRow(
            t=t[i],
            t_prev=t_prev[i],
            s=s[i],
            **{k: v[i] for k, v in columns.items()},
            draws_noise=bool(draws[i]),
            boundary=boundary,
        )
        for i in range(len(t))
    )
    return StepTable(gamma=float(gamma), dtype=dtype, rows=rows)


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


def flow_x0(velocity: torch.Tensor, sample: torch.Tensor, sigma: float) -> torch.Tensor:
    """``x̂0 = x − σ·u`` on the flow path (what :func:`tcd_step` leaves out for ``flow``)."""
    return sample - sigma * velocity


def _as(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor if tensor.dtype == dtype else tensor.to(dtype)
