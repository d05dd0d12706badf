"""The pure math of one TCD step (Zheng et al. 2024, Algorithm 4), with its coefficients computed per schedule.

A step from ``t`` to the next scheduled time ``t'`` with ``γ ∈ [0, 1]``:

1. ``s = (1 − γ)·t'``                       (on a discrete grid: ``⌊·⌋`` in float32, as the reference computes it)
2. ``(x̂0, ε̂)`` from the model output         (:func:`convert_output`; optional clipping/thresholding of ``x̂0``,
   after which ``ε̂ = (x_t − α_t·x̂0)/σ_t`` is recomputed so ``x_s`` stays on the line through ``x_t``)
3. ``x_s = α_s·x̂0 + σ_s·ε̂``                  (the trajectory consistency function: a DDIM jump t → s)
4. ``x_t' = (α_t'/α_s)·x_s + √(σ_t'² − (α_t'/α_s)²·σ_s²)·z``  (the exact forward transition s → t'), skipped on
   the last step and when ``γ = 0``.

Everything that depends only on the schedule and ``γ`` is computed once into a :class:`StepTable`; a step reads one
:class:`StepRow`. The scalars are computed with torch's own CPU arithmetic in the working precision, and the tensor
operations run in the reference's order, so float32 results are bit-identical to diffusers' ``TCDScheduler``.
Nothing here validates input: the front ends do that once, at the boundary.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "PREDICTION_TYPES",
    "StepRow",
    "StepTable",
    "build_vp_table",
    "clip_x0",
    "convert_output",
    "draw_noise",
    "dynamic_threshold_x0",
    "target_timesteps",
    "tcd_step",
    "working_dtype",
]

#: Accepted values of ``prediction_type``.
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")

#: Generator argument accepted by :func:`draw_noise`: one generator, one per batch item, or none.
GeneratorLike = torch.Generator | Sequence[torch.Generator] | None


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision a step computes in: float32 for half-precision tensors, else the tensor's own."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


@dataclass(frozen=True)
class StepRow:
    """The coefficients of one step (see the module docstring for the formulas).

    Attributes:
        t: current timestep.
        t_prev: next scheduled timestep ``t'`` (0 after the last step).
        s: the denoising target ``s``.
        alpha_t, sigma_t: ``α_t, σ_t``.
        alpha_s, sigma_s: ``α_s, σ_s``.
        renoise: ``α_t'/α_s``, the scale of ``x_s`` in the diffusion sub-step.
        noise: ``√(σ_t'² − renoise²·σ_s²)``, the scale of ``z``.
        draws_noise: whether this step draws ``z`` (``γ > 0`` and not the last step), as the reference does; when
            False, ``x_t' = x_s``.
    """

    t: int
    t_prev: int
    s: int
    alpha_t: float
    sigma_t: float
    alpha_s: float
    sigma_s: float
    renoise: float
    noise: float
    draws_noise: bool


@dataclass(frozen=True)
class StepTable:
    """The per-step coefficients of one schedule, one ``γ`` and one working precision: ``rows[i]`` drives step i."""

    gamma: float
    dtype: torch.dtype
    rows: tuple[StepRow, ...]

    def __len__(self) -> int:
        return len(self.rows)


def target_timesteps(t_prev: np.ndarray | Sequence[int], gamma: float) -> np.ndarray:
    """``s = ⌊(1 − γ)·t'⌋`` on the integer grid, in float32 torch arithmetic exactly as the reference computes it.

    float64 would give a different ``s`` at some points (γ = 0.3, t' = 90: 63 in float32, 62 in float64).
    """
    prev = torch.as_tensor(np.asarray(t_prev, dtype=np.int64))
    return torch.floor((1 - gamma) * prev).to(torch.long).numpy()


def build_vp_table(
    alphas_cumprod: torch.Tensor,
    timesteps: Sequence[int] | np.ndarray,
    gamma: float,
) -> StepTable:
    """Coefficients of a TCD loop over ``timesteps`` on a discrete VP path.

    Args:
        alphas_cumprod: ``ᾱ`` on the grid, shape ``(T,)``, in the working precision (float32 or float64).
        timesteps: descending integer timesteps of the loop.
        gamma: stochasticity ``γ ∈ [0, 1]`` (``eta`` in diffusers).
    """
    acp = alphas_cumprod.detach().cpu()
    t = torch.as_tensor(np.asarray(timesteps, dtype=np.int64))
    t_prev = torch.cat([t[1:], torch.zeros(1, dtype=torch.long)])
    s = torch.from_numpy(target_timesteps(t_prev.numpy(), gamma))
    a_t, a_s, a_p = acp[t], acp[s], acp[t_prev]
    ratio = a_p / a_s
    cols = {
        "alpha_t": a_t.sqrt(),
        "sigma_t": (1 - a_t).sqrt(),
        "alpha_s": a_s.sqrt(),
        "sigma_s": (1 - a_s).sqrt(),
        "renoise": ratio.sqrt(),
        "noise": (1 - ratio).sqrt(),
    }
    values = {k: v.tolist() for k, v in cols.items()}
    last = len(t) - 1
    rows = tuple(
        StepRow(
            t=int(t[i]),
            t_prev=int(t_prev[i]),
            s=int(s[i]),
            **{k: v[i] for k, v in values.items()},
            draws_noise=gamma > 0 and i != last,
        )
        for i in range(len(t))
    )
    return StepTable(gamma=float(gamma), dtype=acp.dtype, rows=rows)


def convert_output(
    prediction_type: str, model_output: torch.Tensor, sample: torch.Tensor, alpha: float, sigma: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Model output ``m`` at ``x_t = sample`` → ``(x̂0, ε̂)`` on a path with ``(α_t, σ_t) = (alpha, sigma)``.

    ``epsilon``: ``x̂0 = (x − σ·m)/α, ε̂ = m``; ``sample``: ``x̂0 = m, ε̂ = (x − α·m)/σ``;
    ``v_prediction``: ``x̂0 = α·x − σ·m, ε̂ = α·m + σ·x``.
    """
    if prediction_type == "epsilon":
        return (sample - sigma * model_output) / alpha, model_output
    if prediction_type == "sample":
        return model_output, (sample - alpha * model_output) / sigma
    if prediction_type == "v_prediction":
        return alpha * sample - sigma * model_output, alpha * model_output + sigma * sample
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One TCD step from ``sample = x_t``; returns ``(x_t', x_s, x̂0)``.

    Args:
        model_output: the network's output ``m`` at ``(x_t, t)``, shape of ``sample``.
        sample: ``x_t``.
        row: the coefficients of this step (from a table in the working precision of these tensors).
        prediction_type: how to read ``model_output`` (see :func:`convert_output`).
        noise: ``z`` for the diffusion sub-step, used when ``row.draws_noise``.
        x0_transform: optional clipping/thresholding of ``x̂0`` before ``x_s`` is formed.

    Half-precision inputs are computed in float32 and rounded once at the end; the outputs have the promoted dtype
    of ``model_output`` and ``sample``.
    """
    out_dtype = torch.promote_types(model_output.dtype, sample.dtype)
    work = working_dtype(out_dtype)
    x = sample.to(work)
    x0, eps = convert_output(prediction_type, model_output.to(work), x, row.alpha_t, row.sigma_t)
    if x0_transform is not None:
        x0 = x0_transform(x0)
        eps = (x - row.alpha_t * x0) / row.sigma_t
    x_s = row.alpha_s * x0 + row.sigma_s * eps
    prev = x_s
    if row.draws_noise and noise is not None:
        prev = row.renoise * x_s + row.noise * noise.to(work)
    return prev.to(out_dtype), x_s.to(out_dtype), x0.to(out_dtype)
