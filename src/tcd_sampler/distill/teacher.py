"""The exact teacher: Gaussian-mixture data with its exact posterior-mean denoiser.

For data ``x0 ~ Σ_k w_k N(μ_k, s_k² I)`` on any Gaussian path ``x_t = α·x0 + σ·ε``, the noised data is again a
mixture, ``Σ_k w_k N(α·μ_k, v_k I)`` with ``v_k = α²s_k² + σ²``, and the denoiser is exact:
``E[x0 | x_t] = Σ_k r_k(x_t) (μ_k + α·s_k²/v_k·(x_t − α·μ_k))`` with responsibilities ``r_k ∝ w_k N(x_t; α μ_k, v_k)``.
From it every prediction type follows (ε̂, v, flow velocity), so the same teacher drives ``TCDScheduler``,
``sample_tcd``, ``FlowMatchTCDScheduler`` and diffusers' schedulers. The sample-quality metrics on these mixtures
live in :mod:`tcd_sampler.evaluation.metrics`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..core.predictions import prediction

__all__ = ["DATASETS", "GaussianMixture", "gmm16", "ring2d"]


@dataclass(frozen=True, eq=False)
class GaussianMixture:
    """Isotropic Gaussian mixture in ``d`` dimensions.

    Attributes:
        means: ``(K, d)`` float64 component means.
        stds: ``(K,)`` float64 component standard deviations (per coordinate).
        weights: ``(K,)`` float64 mixture weights, summing to 1.
        name: a label for reports. Default ``"mixture"``.
    """

    means: torch.Tensor
    stds: torch.Tensor
    weights: torch.Tensor
    name: str = "mixture"

    @property
    def dim(self) -> int:
        """``d``."""
        return int(self.means.shape[1])

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` samples ``(x0, component)``: float64 ``(n, d)`` and int64 ``(n,)``.

        Args:
            n: how many samples.
            generator: the generator of the draws (a component per sample, then the Gaussian noise); None (default)
                is torch's global RNG.
        """
        labels = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[labels] + self.stds[labels, None] * noise, labels

    def posterior_mean(self, x: torch.Tensor, alpha: Any, sigma: Any) -> torch.Tensor:
        """``E[x0 | x_t = x]`` for ``x_t = α·x0 + σ·ε``, in the dtype of ``x``.

        Args:
            x: the noisy samples, ``(n, d)``.
            alpha, sigma: the path's ``α, σ``: scalars or ``(n,)`` tensors.
        """
        xd = x.double()
        a = torch.as_tensor(alpha, dtype=torch.float64).reshape(-1, 1, 1)  # (n or 1, 1, 1)
        s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1, 1)
        var = a**2 * self.stds[None, :, None] ** 2 + s**2  # (n, K, 1)
        diff = xd[:, None, :] - a * self.means[None]  # (n, K, d)
        log_r = self.weights.log()[None, :] - 0.5 * (diff**2).sum(-1) / var[..., 0] - 0.5 * self.dim * var[..., 0].log()
        resp = torch.softmax(log_r, dim=1)[..., None]  # (n, K, 1)
        cond = self.means[None] + a * self.stds[None, :, None] ** 2 / var * diff
        return (resp * cond).sum(1).to(x.dtype)

    # ------------------------------------------------------------------ models in each convention

    def vp_model(
        self, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon"
    ) -> Callable[[torch.Tensor, Any], torch.Tensor]:
        """``model(x_t, t)`` for a discrete VP schedule (diffusers' UNet convention), at integer timesteps ``t``
        (scalar or per sample).

        Args:
            alphas_cumprod: the schedule's ``ᾱ_t``, indexed by timestep.
            prediction_type: what the model outputs: ``epsilon`` (default), ``sample`` or ``v_prediction``.
        """
        acp = alphas_cumprod.double()
        target = prediction(prediction_type).target

        def model(x: torch.Tensor, t: Any) -> torch.Tensor:
            tt = torch.as_tensor(t).long().reshape(-1)
            alpha, sigma = acp[tt].sqrt(), (1 - acp[tt]).sqrt()
            x0 = self.posterior_mean(x, alpha, sigma).double()
            a, s = alpha[:, None], sigma[:, None]
            eps = (x.double() - a * x0) / s
            return target(x0, eps, a, s).to(x.dtype)

        return model

    def ve_denoiser(self) -> Callable[..., torch.Tensor]:
        """``denoiser(x, sigma) → x̂0`` on the VE path ``x = x0 + σ·ε`` (k-diffusion / ``sample_tcd``)."""
        return lambda x, sigma, **kwargs: self.posterior_mean(x, 1.0, sigma)

    def flow_model(self, num_train_timesteps: int = 1000) -> Callable[[torch.Tensor, Any], torch.Tensor]:
        """``model(x, t)`` predicting the flow velocity ``u = ε − x0`` on ``x = (1 − σ)·x0 + σ·ε``, with diffusers'
        timesteps ``t = σ·T``.

        Args:
            num_train_timesteps: ``T``. Default 1000.
        """

        def model(x: torch.Tensor, t: Any) -> torch.Tensor:
            sigma = torch.as_tensor(t, dtype=torch.float64).reshape(-1) / num_train_timesteps
            x0 = self.posterior_mean(x, 1 - sigma, sigma).double()
            s = sigma[:, None]
            eps = (x.double() - (1 - s) * x0) / s
            return (eps - x0).to(x.dtype)

        return model


def ring2d(modes: int = 8, radius: float = 1.0, std: float = 0.1) -> GaussianMixture:
    """Sharp, well-separated modes on a circle, with unequal weights ``1 : 2 : … : modes`` (so mode-weight errors
    show).

    Args:
        modes: the number of modes. Default 8.
        radius: the circle's radius. Default 1.
        std: each mode's standard deviation. Default 0.1.
    """
    angles = torch.arange(modes, dtype=torch.float64) * (2 * math.pi / modes)
    means = radius * torch.stack([angles.cos(), angles.sin()], dim=1)
    weights = torch.arange(1, modes + 1, dtype=torch.float64)
    return GaussianMixture(means, torch.full((modes,), std, dtype=torch.float64), weights / weights.sum(), "ring2d")


def gmm16(modes: int = 6, dim: int = 16, std: float = 0.1, seed: int = 0) -> GaussianMixture:
    """A mixture in 16 dimensions with seeded random means (norm ≈ 1) and unequal weights.

    Args:
        modes: the number of modes. Default 6.
        dim: the dimension. Default 16.
        std: each mode's standard deviation. Default 0.1.
        seed: seeds the means and weights. Default 0.
    """
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(modes, dim, generator=g, dtype=torch.float64)
    means = means / means.norm(dim=1, keepdim=True)
    weights = torch.rand(modes, generator=g, dtype=torch.float64) + 0.5
    return GaussianMixture(means, torch.full((modes,), std, dtype=torch.float64), weights / weights.sum(), "gmm16")


#: The teachers' data sets by name (``DistillConfig.data``, ``tcd-sampler distill --data``).
DATASETS: dict[str, Callable[[], GaussianMixture]] = {"ring2d": ring2d, "gmm16": gmm16}
