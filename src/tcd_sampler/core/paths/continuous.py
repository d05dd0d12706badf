"""The paths of models sampled in sigma space: :class:`VE` (``x = x0 + σ·ε``), :class:`EDM` (VE with Karras'
preconditioning) and :class:`RectifiedFlow` (``x = (1 − t)·x0 + t·ε``), each with its TCD time (σ, a model's time
map, or a TCD time of its own)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..predictions import prediction
from .base import Columns, TCDTime, TimeMap, Times, closed_form_coefficients, working_dtype

__all__ = ["EDM", "VE", "RectifiedFlow"]


@dataclass(frozen=True, eq=False)
class _Continuous:
    """A path whose time is its sampler's sigma unless a model's time map is given: TCD's target is then taken in
    that time, ``s = (1 − γ)·t(σ')``, and mapped back (the last step of a loop ending at σ = 0 ends clean).

    Attributes:
        time: the model's time maps (k-diffusion's wrapped models have them) or a TCD time of its own
            (:class:`TCDTime`); None (default): the time is σ.
        device: where the time maps are called (their buffers may live on the model's device); default CPU.
    """

    time: TimeMap | TCDTime | None = None
    device: torch.device | str | None = None
    discrete = False

    def alpha_sigma(self, t: Any) -> tuple[Any, Any]:  # pragma: no cover - every path defines it
        raise NotImplementedError

    def coefficients(
        self, t: np.ndarray, s: np.ndarray, t_prev: np.ndarray, dtype: torch.dtype, clean_end: bool = False
    ) -> Columns:
        """Closed form in float64 (:func:`closed_form_coefficients`); ``dtype`` is recorded by the table only, and a
        target ``s = 0`` is the clean end already (``clean_end`` changes nothing)."""
        return closed_form_coefficients(self, t, s, t_prev)

    def target(self, t_prev: np.ndarray, gamma: float) -> np.ndarray:
        """``σ_s`` for next sigmas ``t_prev``: ``(1 − γ)·σ'``, or ``(1 − γ)·t'`` in the time map's time (its own
        ``target`` where it has one, as :class:`VPDiscrete`), read back once; a time with ``target_sigma``
        (:mod:`tcd_sampler.core.paths.times`) gives ``σ_s`` itself. ValueError where a target would lie
        above ``t'`` (a time map whose time is negative somewhere)."""
        nxt = np.asarray(t_prev, dtype=np.float64)
        if self.time is None:
            return (1.0 - gamma) * nxt
        if isinstance(self.time, TCDTime):  # a TCD time of its own (tcd_sampler.core.paths.times)
            return np.asarray(self.time.target_sigma(nxt, gamma), dtype=np.float64)
        where = torch.device(self.device) if self.device is not None else torch.device("cpu")
        dtype = torch.float64 if where.type == "cpu" else torch.float32  # no float64 on accelerators (MPS)

        def to_device(values: np.ndarray) -> torch.Tensor:
            tensor = torch.from_numpy(np.ascontiguousarray(values))
            return tensor.to(where) if not tensor.is_floating_point() else tensor.to(device=where, dtype=dtype)

        t_next = self.time.sigma_to_t(to_device(nxt)).detach().cpu().double().numpy()
        own_target = getattr(self.time, "target", None)
        s_time = own_target(t_next, gamma) if own_target is not None else (1.0 - gamma) * t_next
        above = (s_time > t_next) & (nxt > 0)  # a last step to σ = 0 ends clean whatever its time says
        if np.any(above):
            i = int(np.argmax(above))
            raise ValueError(
                f"the TCD target s = {s_time[i]} of step {i} lies above its next time t' = {t_next[i]}: a TCD time "
                "must be non-negative and 0 at the clean end (an EDM network's ¼·ln σ is not; use path=EDM())"
            )
        s_sigma = self.time.t_to_sigma(to_device(np.asarray(s_time))).detach().cpu().double().numpy()
        return s_sigma if own_target is not None else np.where(nxt > 0, s_sigma, 0.0)

    def sigma_to_t(self, sigma: Any) -> Any:
        """The path's time is its sigma."""
        return sigma

    def t_to_sigma(self, t: Any) -> Any:
        """The path's time is its sigma."""
        return t


@dataclass(frozen=True, eq=False)
class VE(_Continuous):
    """The variance-exploding path of k-diffusion and ComfyUI's ε/v models, ``x = x0 + σ·ε``: ``(α, σ) = (1, σ)``
    with time σ (see :class:`_Continuous` for ``time`` and ``device``)."""

    def alpha_sigma(self, t: Times) -> tuple[Times, Times]:
        """``(1, σ)``, as float64 arrays for arrays, tensors for tensors."""
        if isinstance(t, torch.Tensor):
            return torch.ones_like(t), t
        sigma = np.asarray(t, dtype=np.float64)
        return np.ones_like(sigma), sigma


@dataclass(frozen=True, eq=False)
class EDM(VE):
    """The path of EDM models (Karras et al. 2022: Playground v2.5, SVD, ComfyUI's continuous EDM sampling), the VE
    path ``x = x0 + σ·ε`` whose network is preconditioned with ``σ_data``.

    TCD's time on it is σ itself, so ``s = (1 − γ)·σ' ≤ σ'`` always and ``γ = 1`` targets the clean end: the
    network's own time ``c_noise = ¼·ln σ`` is negative below σ = 1, where ``(1 − γ)·t'`` would lie *above* ``t'``
    (a sigma-space port that takes it draws negative noise variances: black or NaN images for any ``γ > 0``).

    Attributes:
        sigma_data: the data's standard deviation the preconditioning assumes: 0.5 for Playground v2.5 and Cosmos 1
            (the default), 1.0 for SVD.
    """

    sigma_data: float = 0.5

    def denoiser(self, network: Callable[..., torch.Tensor], prediction_type: str = "edm") -> Callable[..., Any]:
        """Wrap a raw EDM network ``network(c_in·x, c_noise, **kw)`` into the denoiser ``(x, sigma, **kw) → x̂0``,
        with ``c_in = 1/√(σ² + σ_d²)``, ``c_noise = ¼·ln σ``. On the unit-variance path of ``x·c_in`` (with
        ``α = σ_d·c_in``, ``σ·c_in``, in units of ``σ_d``) the network's output is read by the prediction registry:
        ``"edm"`` (Karras' ``F``: ``x̂0 = c_skip·x + c_out·F``; Playground v2.5, ComfyUI's EDM), ``"v_prediction"``
        (``x̂0 = c_skip·x − c_out·F``; SVD, ComfyUI's V_PREDICTION with EDM sampling) or ``"epsilon"``
        (``x̂0 = x − σ·F``). Default ``"edm"``. Beware the names of diffusers' EDM schedulers: their
        ``prediction_type="epsilon"`` is ``"edm"`` here (Karras' F, not ε), their ``"v_prediction"`` is ours."""
        if prediction_type not in ("edm", "v_prediction", "epsilon"):
            raise ValueError(
                f"prediction_type must be one of ('edm', 'v_prediction', 'epsilon'), got {prediction_type!r}"
            )
        convert = prediction(prediction_type).convert
        sd = float(self.sigma_data)

        def denoise(x: torch.Tensor, sigma: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            work = working_dtype(x.dtype)  # σ² overflows half precision (SVD: σ_max = 700)
            s = sigma.to(work).reshape((-1,) + (1,) * (x.ndim - 1))
            c_in = (s**2 + sd**2).rsqrt()
            x_in = x.to(work) * c_in
            out = network(x_in.to(x.dtype), sigma.to(work).clamp(min=1e-30).log() / 4, **kwargs).to(work)
            return (convert(out, x_in, sd * c_in, s * c_in)[0] * sd).to(x.dtype)

        return denoise


@dataclass(frozen=True, eq=False)
class RectifiedFlow(_Continuous):
    """The rectified-flow path of SD3, FLUX and ComfyUI's flow models, ``x = (1 − t)·x0 + t·ε``: ``(α, σ) = (1 − t,
    t)`` with time ``t = σ ∈ [0, 1]`` (see :class:`_Continuous` for ``time`` and ``device``)."""

    def alpha_sigma(self, t: Times) -> tuple[Times, Times]:
        """``(1 − t, t)``, as float64 arrays for arrays, tensors for tensors."""
        if isinstance(t, torch.Tensor):
            return 1.0 - t, t
        time = np.asarray(t, dtype=np.float64)
        return 1.0 - time, time
