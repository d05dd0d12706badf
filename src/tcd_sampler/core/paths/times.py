"""TCD times of models sampled in sigma space: where ``s = (1 − γ)·t'`` is taken for each step of a sigma schedule.

A TCD time must be non-negative, increasing in σ and 0 at the clean end, so that ``s ≤ t'`` and ``σ_s ≤ σ'``. A
time object here has ``target_sigma(sigma_next, γ)``, which the sigma-space paths (:class:`~tcd_sampler.core.paths.VE`,
:class:`~tcd_sampler.core.paths.RectifiedFlow`) call with the loop's next sigmas (float64 host arrays):

- :class:`GridTime`: a discrete model's grid of sigmas, ``t`` the (fractional) grid time of a sigma, interpolated in
  log σ as ComfyUI's ``ModelSamplingDiscrete.sigma`` does. On a grid point the target is TCD's ``⌊(1 − γ)·t'⌋`` in
  float32 (what ``TCDScheduler`` takes); between grid points ``(1 − γ)·t'`` itself, so γ = 0 is exactly the Euler
  step on any sigmas. ``s = 0`` is the clean end (σ = 0), as every sigma-space sampler ends; a next sigma at the
  grid's bottom (Karras schedules end there), where the grid has no time left, takes ``(1 − γ)·σ'``.
- :class:`ClosedFormTime`: a time given by two functions (Stable Cascade's cosine time, ``atan σ`` of continuous
  v-models, the flow time ``σ/(1 + σ)`` of Cosmos' rectified flow in VE sigma).

In both, ``s = t'`` (γ = 0) gives ``σ_s = σ'`` exactly, ``s = 0`` gives 0, and a ``σ_s`` above ``σ'`` by more than
rounding (1e-5 relative) is a ValueError naming the step, never clamped silently.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .base import target_timesteps

__all__ = ["ClosedFormTime", "GridTime", "checked_target"]

#: How far a σ_s may lie above σ' and still count as rounding (relative).
ROUNDING = 1e-5


def checked_target(sigma_next: np.ndarray, s_time: np.ndarray, t_next: np.ndarray, to_sigma: Callable[..., Any]) -> Any:
    """``σ_s`` for targets ``s_time`` of next times ``t_next`` (sigmas ``sigma_next``): ``σ'`` where ``s = t'``, 0
    where ``s = 0``, else ``to_sigma(s)``; ValueError where a target lies above ``σ'`` by more than rounding."""
    sigma_next = np.asarray(sigma_next, dtype=np.float64)
    inner = (s_time > 0) & (s_time < t_next)
    mapped = np.asarray(to_sigma(np.where(inner, s_time, t_next)), dtype=np.float64)
    s_sigma = np.where(inner, mapped, np.where(s_time <= 0, 0.0, sigma_next))
    above = s_sigma > sigma_next * (1 + ROUNDING)
    if np.any(above):
        i = int(np.argmax(above))
        raise ValueError(
            f"TCD's target of step {i} lies above its next sigma: σ_s = {s_sigma[i]:.6g} > σ' = {sigma_next[i]:.6g} "
            "(the time is not increasing in sigma there)"
        )
    return np.minimum(s_sigma, sigma_next)  # within rounding of σ'


class GridTime:
    """The time of a discrete model: grid times ``times`` (ascending, e.g. ``0 … 999``, or an LCM model's
    ``19, 39, …, 999``) with their sigmas, interpolated in log σ between grid points.

    Args:
        sigmas: the grid's sigmas, ascending with ``times`` (VE sigma of a discrete VP model).
        times: the grid's times (integers); default ``0 … len(sigmas) − 1``.
        snap: how close to an integer a time must be to count as a grid point. Default 1e-4.
    """

    def __init__(self, sigmas: Sequence[float] | np.ndarray, times: Sequence[float] | np.ndarray | None = None,
                 snap: float = 1e-4) -> None:  # fmt: skip
        self.sigmas = np.asarray(sigmas, dtype=np.float64)
        self.times = np.arange(len(self.sigmas), dtype=np.float64) if times is None else np.asarray(times, np.float64)
        if self.sigmas.ndim != 1 or len(self.sigmas) < 2 or self.times.shape != self.sigmas.shape:
            raise ValueError("a grid time needs at least two sigmas and one time per sigma")
        if np.any(np.diff(self.sigmas) <= 0) or np.any(np.diff(self.times) <= 0) or self.sigmas[0] <= 0:
            raise ValueError("a grid time's sigmas and times must be positive and strictly ascending together")
        self.log_sigmas = np.log(self.sigmas)
        self.snap = float(snap)

    def sigma_to_t(self, sigma: Any) -> np.ndarray:
        """The grid time of each sigma: log-linear between grid points, linear from 0 at σ = 0 to the first grid
        point below it, the last grid time above the grid."""
        sig = np.asarray(sigma, dtype=np.float64)
        t = np.interp(np.log(np.maximum(sig, 1e-300)), self.log_sigmas, self.times)
        below = self.times[0] * np.maximum(sig, 0.0) / self.sigmas[0]
        return np.where(sig >= self.sigmas[0], t, below)

    def t_to_sigma(self, t: Any) -> np.ndarray:
        """The sigma at grid times ``t``: the grid's own sigma at a grid point, log-linear between grid points
        (ComfyUI's ``sigma(t)``), linear to 0 below the first grid point, the last sigma above the grid."""
        time = np.asarray(t, dtype=np.float64)
        at = np.minimum(np.searchsorted(self.times, time), len(self.times) - 1)
        on = np.where(self.times[at] == time, self.sigmas[at], np.exp(np.interp(time, self.times, self.log_sigmas)))
        if self.times[0] <= 0:
            return on
        return np.where(time >= self.times[0], on, self.sigmas[0] * np.maximum(time, 0.0) / self.times[0])

    def target_sigma(self, sigma_next: np.ndarray, gamma: float) -> np.ndarray:
        """``σ_s`` of each step: ``⌊(1 − γ)·t'⌋`` (float32, as the reference) where ``t'`` is a grid point, else
        ``(1 − γ)·t'``; at or below the first grid point, where no grid time is left, ``(1 − γ)·σ'``."""
        sig = np.asarray(sigma_next, dtype=np.float64)
        t_next = self.sigma_to_t(sig)
        nearest = np.round(t_next)
        on_grid = (np.abs(t_next - nearest) <= self.snap) & np.isin(nearest, self.times)
        on_grid &= sig > self.sigmas[0] * (1 + 1e-6)
        floored = target_timesteps(np.where(on_grid, nearest, 0).astype(np.int64), gamma).astype(np.float64)
        s_time = np.where(on_grid, floored, (1.0 - gamma) * t_next)
        s_sigma = checked_target(sig, s_time, np.where(on_grid, nearest, t_next), self.t_to_sigma)
        bottom = (sig > 0) & (sig <= self.sigmas[0] * (1 + 1e-6))
        return np.where(bottom, (1.0 - gamma) * sig, s_sigma)


class ClosedFormTime:
    """A time given in closed form: ``to_time(σ)`` and its inverse ``to_sigma(t)`` on float64 arrays; the target is
    ``(1 − γ)·t'``.

    Args:
        to_time: σ → t, non-negative, increasing, 0 at σ = 0.
        to_sigma: its inverse.
    """

    def __init__(self, to_time: Callable[[np.ndarray], Any], to_sigma: Callable[[np.ndarray], Any]) -> None:
        self.to_time, self.to_sigma = to_time, to_sigma

    def sigma_to_t(self, sigma: Any) -> np.ndarray:
        """The time of each sigma."""
        return np.asarray(self.to_time(np.asarray(sigma, dtype=np.float64)), dtype=np.float64)

    def t_to_sigma(self, t: Any) -> np.ndarray:
        """The sigma of each time."""
        return np.asarray(self.to_sigma(np.asarray(t, dtype=np.float64)), dtype=np.float64)

    def target_sigma(self, sigma_next: np.ndarray, gamma: float) -> np.ndarray:
        """``σ_s`` of each step, ``s = (1 − γ)·t'``."""
        sig = np.asarray(sigma_next, dtype=np.float64)
        t_next = np.where(sig > 0, self.sigma_to_t(np.maximum(sig, 1e-300)), 0.0)
        if np.any(t_next < 0) or np.any(np.diff(t_next) > 0):
            raise ValueError("a TCD time must be non-negative and increasing in sigma (0 at the clean end)")
        return checked_target(sig, (1.0 - gamma) * t_next, t_next, self.t_to_sigma)
