"""Noise schedules and the timesteps a loop visits, as pure functions (like k-diffusion's ``get_sigmas_*``).

- the betas of a discrete VP path (linear, scaled-linear, cosine, zero terminal SNR);
- the discrete TCD schedule: the distillation grid, strength, the selection of N timesteps (leading, trailing,
  linspace), custom timesteps (descending ``int64`` numpy arrays);
- (the flow sigma pipeline is :mod:`tcd_sampler.core.flow_schedules`).

Input validation that needs the user's parameter names lives here too, since these functions are only called when a
schedule is set.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
import torch

from .checks import check_int, check_number

logger = logging.getLogger("tcd_sampler")

__all__ = [
    "BETA_SCHEDULES",
    "TIMESTEP_SPACINGS",
    "custom_schedule",
    "distillation_grid",
    "make_betas",
    "rescale_zero_terminal_snr",
    "tcd_schedule",
    "vp_timesteps",
]

#: Names accepted for ``beta_schedule``.
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")

#: Accepted values of ``timestep_spacing``.
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """Betas of the Glide/iDDPM cosine schedule ``ᾱ(t) = cos²((t + 0.008)/1.008 · π/2)``, capped at ``max_beta``."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [
        min(1 - alpha_bar((i + 1) / num_train_timesteps) / alpha_bar(i / num_train_timesteps), max_beta)
        for i in range(num_train_timesteps)
    ]
    return torch.tensor(betas, dtype=torch.float32)


def make_betas(
    num_train_timesteps: int,
    beta_start: float,
    beta_end: float,
    beta_schedule: str,
    trained_betas: Sequence[float] | np.ndarray | torch.Tensor | None = None,
) -> torch.Tensor:
    """The float32 betas of a discrete schedule.

    Args:
        num_train_timesteps: T, the length of the grid.
        beta_start: first beta of the ``linear`` / ``scaled_linear`` schedules.
        beta_end: last beta of those schedules.
        beta_schedule: one of :data:`BETA_SCHEDULES`; ignored when ``trained_betas`` is given.
        trained_betas: explicit betas (length T), taking precedence over the named schedule.

    Returns:
        Tensor of shape ``(T,)``, float32.
    """
    if trained_betas is not None:
        return torch.as_tensor(np.asarray(trained_betas, dtype=np.float64)).to(torch.float32)
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    if beta_schedule == "scaled_linear":
        # Linear in sqrt(beta): the latent-diffusion (Stable Diffusion) schedule.
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        return _cosine_betas(num_train_timesteps)
    raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {beta_schedule!r}")


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Rescale betas so that ᾱ_{T−1} = 0 (zero terminal SNR), keeping ᾱ_0 (Lin et al. 2023, Algorithm 1).

    The arithmetic is float32 in the order of the paper's algorithm, as the reference does it.
    """
    sqrt_acp = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_acp[0].clone(), sqrt_acp[-1].clone()
    sqrt_acp = (sqrt_acp - last) * (first / (first - last))
    acp = sqrt_acp**2
    alphas = torch.cat([acp[0:1], acp[1:] / acp[:-1]])
    return 1 - alphas


def distillation_grid(
    num_train_timesteps: int,
    original_inference_steps: int,
    strength: float = 1.0,
    full_grid: bool = False,
    steps_offset: int = 0,
) -> np.ndarray:
    """The ascending grid that inference timesteps are taken from.

    By default this is TCD's skip grid ``{k·i − 1 : i = 1 … ⌊N_orig·strength⌋}`` with ``k = T // N_orig``
    (``{19, 39, …, 999}`` for T = 1000, N_orig = 50). With ``full_grid`` (what diffusers does when
    ``original_inference_steps`` is passed explicitly to ``set_timesteps``) it is ``{0 … ⌊T·strength⌋ − 1}``.
    ``steps_offset`` shifts every point up, clamped to ``T − 1``; points that collapse onto the same value are merged.
    """
    if full_grid:
        grid = np.arange(0, int(num_train_timesteps * strength), dtype=np.int64)
    else:
        k = num_train_timesteps // original_inference_steps
        grid = np.arange(1, int(original_inference_steps * strength) + 1, dtype=np.int64) * k - 1
    if steps_offset:
        grid = np.unique(np.minimum(grid + steps_offset, num_train_timesteps - 1))
    return grid


def tcd_schedule(grid: np.ndarray, num_inference_steps: int, spacing: str = "leading") -> np.ndarray:
    """Pick ``num_inference_steps`` descending timesteps from an ascending ``grid``.

    ``leading`` takes the points at indices ``⌊i·len/n⌋`` of the reversed grid (TCD's selection, which starts at
    the grid's top); ``trailing`` is DDIM's trailing selection, the points at ``round(len − i·len/n) − 1``
    (meant for the full grid: ``[999, 749, 499, 249]`` for n = 4 of T = 1000); ``linspace`` spreads them evenly over
    the whole grid with both ends included (one step: the top).
    """
    if spacing == "trailing":
        # DDIM's own float arithmetic (np.arange with a float step), of which its first n points
        size = len(grid)
        picked = np.round(np.arange(size, 0, -size / num_inference_steps)).astype(np.int64)[:num_inference_steps] - 1
        return grid[picked]
    if spacing == "linspace":
        # from the top down, so that a single step starts at the top of the grid
        idx = np.round(np.linspace(len(grid) - 1, 0, num_inference_steps)).astype(np.int64)
        return grid[idx].copy()
    # ⌊i·(len/n)⌋ with the float64 product np.linspace(0, len, n, endpoint=False) forms, as the reference
    step = len(grid) / num_inference_steps
    top = len(grid) - 1
    return grid[[top - math.floor(i * step) for i in range(num_inference_steps)]]


def custom_schedule(timesteps: Sequence[int] | np.ndarray, num_train_timesteps: int) -> np.ndarray:
    """Validate user-given timesteps: integers in ``[0, T−1]``, strictly descending, at least one."""
    if isinstance(timesteps, (list, tuple)) and any(isinstance(t, bool) for t in timesteps):
        raise TypeError(f"timesteps must be integers, not bools: {list(timesteps)}")
    arr = np.asarray(timesteps)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"timesteps must be a non-empty 1-D sequence of integers, got shape {arr.shape}")
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
            raise ValueError(f"timesteps must be integers in [0, {num_train_timesteps - 1}], got {arr.tolist()}")
    elif arr.dtype.kind not in "iu":
        raise TypeError(f"timesteps must be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if np.any(np.diff(arr) >= 0):
        raise ValueError(f"timesteps must be strictly descending, got {arr.tolist()}")
    if arr[0] >= num_train_timesteps or arr[-1] < 0:
        raise ValueError(
            f"timesteps must lie in [0, num_train_timesteps - 1] = [0, {num_train_timesteps - 1}], "
            f"got {arr[0]} … {arr[-1]}"
        )
    return arr


def vp_timesteps(
    num_train_timesteps: int,
    num_inference_steps: int | None,
    timesteps: Sequence[int] | None,
    strength: float,
    original_inference_steps: int,
    full_grid: bool,
    spacing: str,
    steps_offset: int,
) -> np.ndarray:
    """The descending timesteps of a ``TCDScheduler`` loop (what its ``set_timesteps`` takes, checked here).

    Args:
        num_train_timesteps: T.
        num_inference_steps: N, exclusive with ``timesteps``.
        timesteps: custom timesteps (validated; ``strength`` keeps the last ``⌊N·strength⌋``), or None.
        strength: the fraction of the grid used, in ``(0, 1]``.
        original_inference_steps: the size of the distillation grid.
        full_grid: take the timesteps from the full grid ``0 … T−1`` (an explicit ``original_inference_steps``).
        spacing: ``timestep_spacing``; ``trailing`` selects on the full grid without ``steps_offset``.
        steps_offset: the grid's shift (``leading``/``linspace``).
    """
    T = num_train_timesteps
    if (num_inference_steps is None) == (timesteps is None):
        raise ValueError(
            "pass exactly one of num_inference_steps or timesteps, got "
            f"num_inference_steps={num_inference_steps!r} and timesteps={timesteps!r}"
        )
    strength = check_number("strength", strength, 0.0, 1.0, low_open=True)
    original_steps = check_int("original_inference_steps", original_inference_steps, 1, T)
    if timesteps is not None:
        arr = custom_schedule(timesteps, T)
        keep = min(int(len(arr) * strength), len(arr))
        if keep < 1:
            raise ValueError(
                f"strength={strength} keeps no timestep of the {len(arr)} custom timesteps; "
                f"strength must be at least {1 / len(arr):.4g}"
            )
        _warn_custom(arr, distillation_grid(T, original_steps, 1.0, full_grid), original_steps, strength)
        return arr[len(arr) - keep :]
    n = check_int("num_inference_steps", num_inference_steps, 1, T)
    trailing = spacing == "trailing"
    if n > original_steps and not (trailing or full_grid):
        raise ValueError(
            f"num_inference_steps={n} cannot exceed original_inference_steps={original_steps}: the schedule "
            "is a subset of the distillation grid"
        )
    offset = 0 if trailing else steps_offset
    grid = distillation_grid(T, original_steps, strength, full_grid or trailing, offset)
    if len(grid) < n:
        what = f"the full grid of T={T}" if full_grid or trailing else f"original_inference_steps={original_steps}"
        raise ValueError(
            f"num_inference_steps={n} exceeds the {len(grid)} points of the grid ({what}, strength={strength}"
            f", steps_offset={offset}); use fewer steps or a larger strength"
        )
    return tcd_schedule(grid, n, spacing)


def _warn_custom(arr: np.ndarray, grid: np.ndarray, original_steps: int, strength: float) -> None:
    """Warn (as diffusers does) about custom timesteps that the model was not distilled on."""
    if strength == 1.0 and arr[0] != grid[-1]:
        logger.warning("custom timesteps start at %d, not at the top of the grid (%d)", arr[0], grid[-1])
    off = [int(t) for t in arr if t not in set(grid.tolist())]
    if off:
        logger.warning("custom timesteps %s are not on the distillation grid; results may degrade", off)
    if len(arr) > original_steps:
        logger.warning("%d custom timesteps exceed original_inference_steps=%d", len(arr), original_steps)
