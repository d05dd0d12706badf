"""The forward process ``x_t = α_t·x0 + σ_t·ε`` of each scheduler, as diffusers' pipelines call it (img2img,
inpainting, training scripts): ``add_noise`` and ``get_velocity`` on the discrete VP path, ``scale_noise`` on the
flow path."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..core.checks import check_float_tensor
from ..core.step import working_dtype

__all__ = ["FlowForwardProcess", "VPForwardProcess"]


class VPForwardProcess:
    """``add_noise`` / ``get_velocity`` of :class:`~tcd_sampler.schedulers.vp.TCDScheduler`, read from its path."""

    _config: Any
    _path: Any

    def _path_coefficients(
        self, timesteps: torch.Tensor | Sequence[int] | int, like: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(α_t, σ_t)`` for ``timesteps``, shaped to broadcast against ``like`` (batch first)."""
        t = torch.as_tensor(timesteps)
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"timesteps must be integers, got dtype {t.dtype}")
        T = self._config["num_train_timesteps"]
        if t.device.type == "cpu" and t.numel() and (int(t.min()) < 0 or int(t.max()) >= T):
            raise ValueError(f"timesteps must lie in [0, {T - 1}], got {t.min().item()} … {t.max().item()}")
        shape = (-1,) + (1,) * (like.ndim - 1) if t.ndim else ()
        alpha, sigma = self._path.alpha_sigma(t, working_dtype(like.dtype))
        return alpha.to(like.device).reshape(shape), sigma.to(like.device).reshape(shape)

    def add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor | Sequence[int] | int
    ) -> torch.Tensor:
        """The forward process ``x_t = α_t·x0 + σ_t·ε`` for per-sample integer ``timesteps`` (which may live on the
        CPU while the samples are elsewhere)."""
        check_float_tensor("original_samples", original_samples)
        if noise.shape != original_samples.shape:
            raise ValueError(
                f"noise must have the shape of original_samples {tuple(original_samples.shape)}, "
                f"got {tuple(noise.shape)}"
            )
        a, s = self._path_coefficients(timesteps, original_samples)
        return (a * original_samples + s * noise).to(original_samples.dtype)

    def get_velocity(
        self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor | Sequence[int] | int
    ) -> torch.Tensor:
        """The v-prediction target ``v = α_t·ε − σ_t·x0`` (``sample`` is the clean ``x0``)."""
        check_float_tensor("sample", sample)
        a, s = self._path_coefficients(timesteps, sample)
        return (a * noise - s * sample).to(sample.dtype)


class FlowForwardProcess:
    """``scale_noise`` of :class:`~tcd_sampler.schedulers.flow.FlowMatchTCDScheduler`."""

    sigmas: torch.Tensor
    _begin_index: int | None
    _step_index: int | None

    index_for_timestep: Callable[[Any], int]  # the scheduler base's

    def scale_noise(
        self, sample: torch.Tensor, timestep: float | torch.Tensor, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The forward process ``σ·noise + (1 − σ)·sample`` at ``timestep`` (one per batch item), for img2img."""
        check_float_tensor("sample", sample)
        if noise is None:
            raise ValueError("scale_noise needs noise, a tensor shaped like sample")
        ts = torch.as_tensor(timestep).reshape(-1)
        if self._begin_index is None:
            indices = [self.index_for_timestep(t) for t in ts]
        else:
            indices = [self._step_index if self._step_index is not None else self._begin_index] * len(ts)
        sigma = self.sigmas.to(device=sample.device, dtype=sample.dtype)[indices].flatten()
        sigma = sigma.reshape(-1, *([1] * (sample.ndim - 1)))
        return sigma * noise + (1.0 - sigma) * sample
