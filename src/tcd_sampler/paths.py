"""Gaussian paths ``x_t = α_t·x0 + σ_t·ε``: the noise schedules a TCD step runs on.

- discrete variance-preserving (DDPM): ``α_t = √ᾱ_t``, ``σ_t = √(1 − ᾱ_t)`` on the integer grid ``0 … T−1``, with
  ``ᾱ`` built from a beta schedule. The float32 values of ``ᾱ`` are computed with the same operations as diffusers,
  so both libraries read bit-identical tables;
- VE / k-diffusion: ``α = 1``, ``σ`` itself the time;
- rectified flow: ``α = 1 − t``, ``σ = t``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "BETA_SCHEDULES",
    "VPDiscretePath",
    "flow_alpha_sigma",
    "make_betas",
    "rescale_zero_terminal_snr",
    "ve_alpha_sigma",
]

#: Names accepted for ``beta_schedule``.
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


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


@dataclass(frozen=True, eq=False)
class VPDiscretePath:
    """The discrete VP path: ``α_t = √ᾱ_t``, ``σ_t = √(1 − ᾱ_t)`` for integer ``t ∈ [0, T−1]``.

    Attributes:
        betas: float32 tensor ``(T,)``.
        alphas_cumprod: float32 tensor ``(T,)``, ``ᾱ_t = Π_{i≤t} (1 − β_i)`` as torch computes it in float32.
    """

    betas: torch.Tensor
    alphas_cumprod: torch.Tensor

    @classmethod
    def from_betas(cls, betas: torch.Tensor) -> VPDiscretePath:
        """Build the path from float32 betas of shape ``(T,)``."""
        return cls(betas, torch.cumprod(1.0 - betas, dim=0))

    @property
    def num_train_timesteps(self) -> int:
        """T, the number of grid points."""
        return int(self.betas.shape[0])

    def alpha_sigma(self, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
        """``(α, σ)`` on the whole grid, shape ``(T,)`` each, computed in ``dtype`` from the float32 ``ᾱ``."""
        acp = self.alphas_cumprod.to(dtype)
        return acp.sqrt(), (1 - acp).sqrt()


def ve_alpha_sigma(sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The VE (k-diffusion) path ``x = x0 + σ·ε``: ``(α, σ) = (1, σ)``, time = σ."""
    sigma = np.asarray(sigma, dtype=np.float64)
    return np.ones_like(sigma), sigma


def flow_alpha_sigma(t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rectified-flow path ``x = (1 − t)·x0 + t·ε``: ``(α, σ) = (1 − t, t)``, time = σ = t ∈ [0, 1]."""
    t = np.asarray(t, dtype=np.float64)
    return 1.0 - t, t
