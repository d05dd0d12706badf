"""Per-step coefficients, computed once per schedule: :class:`StepRow`, :class:`StepTable` and the one builder,
:func:`build_table` (any :class:`~tcd_sampler.core.paths.Path`, any working precision, optionally with LCM's
consistency boundary condition).

A step from ``t`` to the next scheduled time ``t'`` with ``γ ∈ [0, 1]`` reads one row: the target
``s = path.target(t', γ)``, ``α, σ`` at ``t`` and ``s``, and the forward transition ``s → t'``
(``x_t' = renoise·x_s + noise·z``), drawn unless the step is the loop's last and ends at time 0, or ``γ = 0``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .paths import Path, VPDiscrete

__all__ = ["SIGMA_DATA", "Boundary", "StepRow", "StepTable", "boundary_scalings", "build_table", "build_vp_table"]

#: ``σ_d`` of the consistency boundary condition (LCM).
SIGMA_DATA = 0.5


@dataclass(frozen=True)
class StepRow:
    """The coefficients of one step.

    Attributes:
        t: current time (an integer timestep on discrete grids, σ or the model's time in sigma space).
        t_prev: next scheduled time ``t'`` (0 after the last step).
        s: the denoising target ``s``.
        alpha_t, sigma_t: ``α_t, σ_t``.
        alpha_s, sigma_s: ``α_s, σ_s``.
        renoise: ``α_t'/α_s``, the scale of ``x_s`` in the diffusion sub-step (1 where no noise is drawn).
        noise: ``√(σ_t'² − renoise²·σ_s²)``, the scale of ``z`` (0 where no noise is drawn).
        draws_noise: whether this step draws ``z``; when False, ``x_t' = x_s``.
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


@dataclass(frozen=True)
class Boundary:
    """LCM's consistency boundary condition (the consistency-boundary mode of ``TCDScheduler``).

    Attributes:
        timestep_scaling: ``k`` in ``c_skip = σ_d²/((k·t)² + σ_d²)``, ``c_out = k·t/√((k·t)² + σ_d²)``.
        clean_end: a target ``s = 0`` is the clean end ``α = 1, σ = 0`` (``set_alpha_to_one``) rather than the
            path's value at time 0.
    """

    timestep_scaling: float
    clean_end: bool = True


def boundary_scalings(t: torch.Tensor, timestep_scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """LCM's consistency boundary condition at times ``t``: ``(c_skip, c_out)`` with ``c_skip = σ_d²/((k·t)² + σ_d²)``,
    ``c_out = k·t/√((k·t)² + σ_d²)``, ``k = timestep_scaling``, computed in ``t``'s precision (float32 for integer
    timesteps, as the reference scales them)."""
    scaled = t * timestep_scaling
    return SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2), scaled / (scaled**2 + SIGMA_DATA**2) ** 0.5


def build_table(
    path: Path,
    times: Sequence[float] | np.ndarray,
    gamma: float,
    boundary: Boundary | None = None,
    dtype: torch.dtype = torch.float64,
) -> StepTable:
    """The coefficients of a TCD loop over ``times`` on ``path``.

    Args:
        path: the path and its TCD time (see :mod:`tcd_sampler.core.paths`).
        times: the loop's times, descending, with the end the last step goes to: ``[t_0, …, t_{N−1}, t_N]``
            (``TCDScheduler``: its timesteps and 0; samplers: the sigmas, usually ending at 0).
        gamma: the stochasticity ``γ ∈ [0, 1]``.
        boundary: the consistency boundary condition (LCM), or None (default) for plain TCD.
        dtype: the working precision: discrete paths compute in it, as the reference does; closed-form ones in
            float64 (recorded in the table). Default float64.
    """
    grid = np.asarray(times, dtype=np.int64 if path.discrete else np.float64)
    t, t_prev = grid[:-1], grid[1:]
    n = len(t)
    s = np.asarray(path.target(t_prev, gamma))
    clean_end = boundary is not None and boundary.clean_end
    a_t, s_t, a_s, s_s, renoise, noise = path.coefficients(t, s, t_prev, dtype, clean_end)
    draws = [gamma > 0 and (i < n - 1 or bool(grid[-1] > 0)) for i in range(n)]
    mask = torch.tensor(draws, dtype=torch.bool)
    renoise, noise = torch.where(mask, renoise, 1.0), torch.where(mask, noise, 0.0)
    columns = {"alpha_t": a_t, "sigma_t": s_t, "alpha_s": a_s, "sigma_s": s_s, "renoise": renoise, "noise": noise}
    values = {k: v.tolist() for k, v in columns.items()}
    if boundary is not None:
        scale = torch.from_numpy(t) if path.discrete else torch.from_numpy(t).to(dtype)
        c_skip, c_out = boundary_scalings(scale, boundary.timestep_scaling)
        values["c_skip"], values["c_out"] = c_skip.to(dtype).tolist(), c_out.to(dtype).tolist()
    now, nxt, target = t.tolist(), t_prev.tolist(), s.tolist()
    rows = tuple(
        StepRow(
            t=now[i],
            t_prev=nxt[i],
            s=target[i],
            **{k: v[i] for k, v in values.items()},
            draws_noise=draws[i],
            boundary=boundary is not None,
        )
        for i in range(n)
    )
    return StepTable(gamma=float(gamma), dtype=dtype, rows=rows)


def build_vp_table(
    alphas_cumprod: torch.Tensor,
    timesteps: Sequence[int] | np.ndarray,
    gamma: float,
    boundary: Boundary | tuple[Any, float] | None = None,
) -> StepTable:
    """:func:`build_table` on the discrete VP path of ``alphas_cumprod`` over integer ``timesteps`` (ending at 0),
    in the precision of ``alphas_cumprod`` (float32 for diffusers' numbers, float64 for a reference). ``boundary``
    also takes the former ``(final_alpha_cumprod, timestep_scaling)`` pair (a clean end where it is 1)."""
    times = [*np.asarray(timesteps, dtype=np.int64).tolist(), 0]
    if isinstance(boundary, tuple):  # the former (final_alpha_cumprod, timestep_scaling) form
        final, scaling = boundary
        boundary = Boundary(float(scaling), clean_end=bool(float(final) == 1.0))
    return build_table(VPDiscrete(alphas_cumprod.detach().cpu()), times, gamma, boundary, alphas_cumprod.dtype)
