"""Schedule construction on the discrete grid ``0 … T−1``: the TCD grid, strength, spacing and custom timesteps.

All functions are pure and return descending ``int64`` numpy arrays. Input validation that needs the user's
parameter names lives here too, since these functions are only called when a schedule is set.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["TIMESTEP_SPACINGS", "custom_schedule", "distillation_grid", "tcd_schedule"]

#: Accepted values of ``timestep_spacing``.
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


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
