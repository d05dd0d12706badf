"""The path interface (:class:`Path`), the time interfaces (:class:`TimeMap`, :class:`TCDTime`) and what several
paths share: TCD's float32 target on an integer grid and the closed-form table columns."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, TypeVar, runtime_checkable

import numpy as np
import torch

__all__ = [
    "Columns",
    "Path",
    "TCDTime",
    "TimeMap",
    "Times",
    "closed_form_coefficients",
    "target_timesteps",
    "working_dtype",
]

Times = TypeVar("Times", np.ndarray, torch.Tensor)
#: The six per-step columns of a table: α_t, σ_t, α_s, σ_s, renoise (α_t'/α_s), noise (√(σ_t'² − renoise²·σ_s²)).
Columns = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


class Path(Protocol):
    """A Gaussian path in its own time (see the module docstring)."""

    #: Whether times are integers on a grid ``0 … T−1`` (the table keeps them as ints).
    discrete: bool

    def alpha_sigma(self, t: Any) -> tuple[Any, Any]: ...

    def coefficients(
        self, t: np.ndarray, s: np.ndarray, t_prev: np.ndarray, dtype: torch.dtype, clean_end: bool = False
    ) -> Columns: ...

    def target(self, t_prev: np.ndarray, gamma: float) -> np.ndarray: ...

    def sigma_to_t(self, sigma: Any) -> Any: ...

    def t_to_sigma(self, t: Any) -> Any: ...


class TimeMap(Protocol):
    """A model's time ↔ sigma maps (k-diffusion's ``DiscreteSchedule`` has this interface)."""

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor: ...

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class TCDTime(Protocol):
    """A TCD time that gives ``σ_s`` itself for a loop's next sigmas (:mod:`tcd_sampler.core.paths.times`)."""

    def target_sigma(self, sigma_next: np.ndarray, gamma: float) -> np.ndarray: ...


def target_timesteps(t_prev: np.ndarray | Sequence[int], gamma: float) -> np.ndarray:
    """``s = ⌊(1 − γ)·t'⌋`` on the integer grid, in float32 exactly as the reference computes it (torch rounds
    ``1 − γ`` to float32 and multiplies in float32; numpy's float32 product is the same IEEE operation).

    float64 would give a different ``s`` at some points (γ = 0.3, t' = 90: 63 in float32, 62 in float64).
    """
    prev = np.asarray(t_prev, dtype=np.int64).astype(np.float32)
    return np.floor(np.float32(1 - gamma) * prev).astype(np.int64)


def closed_form_coefficients(path: Path, t: np.ndarray, s: np.ndarray, t_prev: np.ndarray) -> Columns:
    """The table columns of a path given in closed form, in float64 from its ``alpha_sigma``; the renoising of the
    forward transition ``s → t'`` is ``α_t'/α_s`` with noise ``√max(σ_t'² − (α_t'/α_s)²·σ_s², 0)``."""
    (a_t, s_t), (a_s, s_s), (a_p, s_p) = (
        path.alpha_sigma(torch.as_tensor(np.asarray(v, dtype=np.float64))) for v in (t, s, t_prev)
    )
    renoise = a_p / a_s
    return a_t, s_t, a_s, s_s, renoise, (s_p**2 - (renoise * s_s) ** 2).clamp(min=0.0).sqrt()


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision a step computes in: float32 for half-precision tensors, else the tensor's own."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
