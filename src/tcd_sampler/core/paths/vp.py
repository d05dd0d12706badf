"""The discrete VP (DDPM) path on an integer grid, also a discrete model's time map in VE sigma."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..predictions import PREDICTION_TYPES, prediction
from .base import Columns, target_timesteps, working_dtype

__all__ = ["DiscreteVPTime", "VPDiscrete", "VPDiscretePath"]


@dataclass(frozen=True, eq=False)
class VPDiscrete:
    """The discrete VP (DDPM) path ``α_t = √ᾱ_t``, ``σ_t = √(1 − ᾱ_t)`` on the integer grid ``t ∈ [0, T−1]``.

    As a time map it is the same model in VE form, ``σ_t = √((1 − ᾱ_t)/ᾱ_t)``: ``sigma_to_t`` rounds to the nearest
    grid point (in log σ; σ = 0 maps to 0), ``t_to_sigma`` reads the grid, and targets are ``s = ⌊(1 − γ)·t'⌋`` in
    float32 as diffusers computes them, so ``sample_tcd`` over :meth:`sigmas_for` of a ``TCDScheduler`` schedule
    reproduces that scheduler's loop (``DiscreteVPTime`` is this class).

    Attributes:
        alphas_cumprod: ``ᾱ`` on the grid, float32 ``(T,)``, as torch computes ``Π (1 − β)`` in float32.
        betas: the betas it was built from (:meth:`from_betas`), or None.
    """

    alphas_cumprod: torch.Tensor
    betas: torch.Tensor | None = None
    discrete = True
    _tables: dict[Any, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, init=False, repr=False)

    @classmethod
    def from_betas(cls, betas: torch.Tensor) -> VPDiscrete:
        """Build the path from float32 betas of shape ``(T,)``."""
        return cls(alphas_cumprod=torch.cumprod(1.0 - betas, dim=0), betas=betas)

    @property
    def num_train_timesteps(self) -> int:
        """T, the number of grid points."""
        return int(self.alphas_cumprod.shape[0])

    def _grid(self, key: str, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-grid-point pairs on ``device`` in ``dtype``, computed once on the CPU and cached: ``"alpha_sigma"``
        ``(√ᾱ, √(1 − ᾱ))`` in ``dtype`` from the float32 ``ᾱ``; ``"sigma"`` the VE ``(σ, log σ)`` in float64."""
        if (key, device, dtype) not in self._tables:
            if key == "alpha_sigma":
                acp = self.alphas_cumprod.detach().cpu().to(dtype)
                pair = (acp.sqrt(), (1 - acp).sqrt())
            else:
                acp = self.alphas_cumprod.detach().cpu().double()
                sig = ((1 - acp) / acp).sqrt()
                pair = (sig, sig.log())
            self._tables[(key, device, dtype)] = (pair[0].to(dtype).to(device), pair[1].to(dtype).to(device))
        return self._tables[(key, device, dtype)]

    def alpha_sigma(self, t: Any = None, dtype: torch.dtype = torch.float64) -> tuple[Any, Any]:
        """``(α_t, σ_t)`` at integer times: a tensor ``t`` gives tensors in ``dtype`` on its device (read from a
        cached grid); an array or a sequence gives float64 arrays; None (default) the whole grid, ``(T,)`` tensors
        in ``dtype``, computed from the float32 ``ᾱ`` (also ``alpha_sigma(dtype)``, the former signature)."""
        if isinstance(t, torch.dtype):
            t, dtype = None, t
        if t is None:
            return self._grid("alpha_sigma", torch.device("cpu"), dtype)
        if isinstance(t, torch.Tensor):
            alpha, sigma = self._grid("alpha_sigma", t.device, dtype)
            return alpha[t.long()], sigma[t.long()]
        alpha, sigma = self._grid("alpha_sigma", torch.device("cpu"), torch.float64)
        idx = torch.as_tensor(np.asarray(t, dtype=np.int64))
        return alpha[idx].numpy(), sigma[idx].numpy()

    def coefficients(
        self, t: np.ndarray, s: np.ndarray, t_prev: np.ndarray, dtype: torch.dtype, clean_end: bool = False
    ) -> Columns:
        """The table columns with torch's arithmetic in ``dtype`` on the CPU, as the reference takes them: one
        gather of ``ᾱ_t, ᾱ_s, ᾱ_t'`` and one square root each of ``ᾱ`` and ``1 − ᾱ`` (renoise ``√(ᾱ_t'/ᾱ_s)``,
        noise ``√(1 − ᾱ_t'/ᾱ_s)``); torch's float32 ``sqrt`` on the CPU is not always the correctly rounded one, so
        numpy would not reproduce it. With ``clean_end`` a target ``s = 0`` has ``ᾱ = 1`` (LCM's
        ``final_alpha_cumprod`` with ``set_alpha_to_one``)."""
        acp = self.alphas_cumprod.detach().cpu().to(dtype)
        n = len(t)
        gathered = acp[torch.from_numpy(np.concatenate([t, s, t_prev]).astype(np.int64))]
        a_t, a_s, a_p = gathered[:n], gathered[n : 2 * n], gathered[2 * n :]
        if clean_end:
            a_s = torch.where(torch.from_numpy(np.asarray(s) == 0), torch.ones((), dtype=dtype), a_s)
        values = torch.cat([a_t, a_s, a_p / a_s])
        roots, co_roots = values.sqrt(), (1 - values).sqrt()
        return roots[:n], co_roots[:n], roots[n : 2 * n], co_roots[n : 2 * n], roots[2 * n :], co_roots[2 * n :]

    def target(self, t_prev: np.ndarray, gamma: float) -> np.ndarray:
        """``s = ⌊(1 − γ)·t'⌋`` in float32, as the reference (:func:`target_timesteps`)."""
        return target_timesteps(t_prev, gamma)

    # ------------------------------------------------------------ as a time map in VE sigma

    @property
    def sigmas(self) -> torch.Tensor:
        """The VE σ on the grid, float64 ``(T,)``."""
        return self._grid("sigma", torch.device("cpu"), torch.float64)[0]

    @staticmethod
    def _work(device: torch.device) -> torch.dtype:
        """float64 on the CPU; float32 on accelerators (Apple's MPS has no float64)."""
        return torch.float64 if device.type == "cpu" else torch.float32

    def sigma_to_t(self, sigma: torch.Tensor | float) -> torch.Tensor:
        """The nearest grid timestep (int64) of each VE sigma; works on any device without a host sync."""
        sigma = torch.as_tensor(sigma)
        dtype = self._work(sigma.device)
        log_table = self._grid("sigma", sigma.device, dtype)[1]
        t = (sigma.to(dtype).clamp(min=1e-30).log().unsqueeze(-1) - log_table).abs().argmin(dim=-1)
        return torch.where(sigma > 0, t, torch.zeros_like(t))

    def t_to_sigma(self, t: torch.Tensor | int) -> torch.Tensor:
        """The VE σ at integer timesteps (float64 on the CPU, float32 elsewhere)."""
        t = torch.as_tensor(t)
        return self._grid("sigma", t.device, self._work(t.device))[0][t.long()]

    def sigmas_for(self, timesteps: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """The k-diffusion sigmas of a timestep schedule: ``[σ(t_0), …, σ(t_{N−1}), 0]`` (float32)."""
        ts = torch.as_tensor(timesteps).cpu().long()
        return torch.cat([self.t_to_sigma(ts), torch.zeros(1, dtype=torch.float64)]).float()

    def denoiser(
        self, model: Callable[..., torch.Tensor], prediction_type: str = "epsilon"
    ) -> Callable[..., torch.Tensor]:
        """Wrap a discrete VP network ``model(x_t, t, **kw)`` (diffusers' UNet convention) into a VE denoiser
        ``(x, sigma, **kw) → x̂0`` for the samplers; ``prediction_type`` as in ``TCDScheduler`` (default
        ``"epsilon"``)."""
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        convert = prediction(prediction_type).convert

        def denoise(x: torch.Tensor, sigma: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            t = self.sigma_to_t(sigma)
            work = working_dtype(x.dtype)  # σ² overflows half precision (zero-SNR σ ≈ 4.5e3)
            s = sigma.to(work).reshape((-1,) + (1,) * (x.ndim - 1))
            c_in = (s**2 + 1).rsqrt()  # α_t: x_vp = α_t·x_ve, σ_vp = σ·α_t
            x_vp = x.to(work) * c_in
            out = model(x_vp.to(x.dtype), t, **kwargs).to(work)
            return convert(out, x_vp, c_in, s * c_in)[0].to(x.dtype)  # x̂0 is the same in both scalings

        return denoise


#: The names this path had before: the discrete VP path, and its time map in VE sigma.
DiscreteVPTime = VPDiscrete


class VPDiscretePath(VPDiscrete):
    """The discrete VP path under its former name and constructor, ``VPDiscretePath(betas, alphas_cumprod)``."""

    def __init__(self, betas: torch.Tensor | None = None, alphas_cumprod: torch.Tensor | None = None) -> None:
        if alphas_cumprod is None:
            if betas is None:
                raise TypeError("VPDiscretePath needs betas or alphas_cumprod")
            alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        super().__init__(alphas_cumprod, betas)
