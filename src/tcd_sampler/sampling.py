"""Functional TCD samplers in k-diffusion's convention (sigma space), for k-diffusion, A1111/Forge and ComfyUI.

``model(x, sigma * s_in, **extra_args)`` returns the denoised ``x̂0``; ``sigmas`` descend to 0. Two paths:

- :func:`sample_tcd`: the VE form ``x = x0 + σ·ε`` (k-diffusion, ComfyUI's epsilon/v models);
- :func:`sample_tcd_rf`: ComfyUI's rectified-flow form ``x = (1 − σ)·x0 + σ·ε`` (SD3, FLUX, …).

TCD's target ``s = (1 − γ)·t'`` is taken in the model's time. By default the time is ``σ`` itself; pass ``time=`` an
object with ``sigma_to_t`` and ``t_to_sigma`` (k-diffusion's wrapped models have both) to use the model's own time,
or :class:`DiscreteVPTime` for a discrete VP model, which reproduces a ``TCDScheduler`` loop exactly.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from tqdm.auto import trange

from ._frontend import check_float_tensor, check_number
from .core.predictions import PREDICTION_TYPES, prediction
from .paths import flow_alpha_sigma, ve_alpha_sigma
from .step import StepTable, build_table, target_timesteps, tcd_step

__all__ = ["DiscreteVPTime", "TimeMap", "sample_tcd", "sample_tcd_rf", "tcd_table"]

NoiseSampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class TimeMap(Protocol):
    """A model's time ↔ sigma maps (k-diffusion's ``DiscreteSchedule`` has this interface)."""

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor: ...

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True, eq=False)
class DiscreteVPTime:
    """Time ↔ sigma of a discrete VP model in VE form, ``σ_t = √((1 − ᾱ_t)/ᾱ_t)`` on the grid ``0 … T−1``.

    ``sigma_to_t`` rounds to the nearest grid point (in log σ; σ = 0 maps to 0), targets are
    ``s = ⌊(1 − γ)·t'⌋`` in float32 as diffusers computes them, and ``t_to_sigma`` reads the grid, so
    ``sample_tcd`` over :meth:`sigmas_for` of a ``TCDScheduler`` schedule reproduces that scheduler's loop.

    Attributes:
        alphas_cumprod: ``ᾱ`` on the grid, float32 ``(T,)`` (``TCDScheduler().alphas_cumprod``).
    """

    alphas_cumprod: torch.Tensor
    _tables: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=dict, init=False, repr=False
    )

    @property
    def sigmas(self) -> torch.Tensor:
        """σ on the grid, float64 ``(T,)``."""
        return self._table(torch.device("cpu"), torch.float64)[0]

    def _table(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(σ, log σ)`` on the grid on ``device`` in ``dtype``, computed once in float64 on the CPU and cached."""
        key = (device, dtype)
        if key not in self._tables:
            acp = self.alphas_cumprod.detach().cpu().double()
            sig = ((1 - acp) / acp).sqrt()
            self._tables[key] = (sig.to(dtype).to(device), sig.log().to(dtype).to(device))
        return self._tables[key]

    @staticmethod
    def _work(device: torch.device) -> torch.dtype:
        """float64 on the CPU; float32 on accelerators (Apple's MPS has no float64)."""
        return torch.float64 if device.type == "cpu" else torch.float32

    def sigma_to_t(self, sigma: torch.Tensor | float) -> torch.Tensor:
        """The nearest grid timestep (int64) of each sigma; works on any device without a host sync."""
        sigma = torch.as_tensor(sigma)
        dtype = self._work(sigma.device)
        _, log_table = self._table(sigma.device, dtype)
        log_sigma = sigma.to(dtype).clamp(min=1e-30).log()
        t = (log_sigma.unsqueeze(-1) - log_table).abs().argmin(dim=-1)
        return torch.where(sigma > 0, t, torch.zeros_like(t))

    def t_to_sigma(self, t: torch.Tensor | int) -> torch.Tensor:
        """σ at integer timesteps (float64 on the CPU, float32 elsewhere)."""
        t = torch.as_tensor(t)
        return self._table(t.device, self._work(t.device))[0][t.long()]

    def target(self, t_prev: np.ndarray, gamma: float) -> np.ndarray:
        """``s = ⌊(1 − γ)·t'⌋`` in float32, as the reference."""
        return target_timesteps(np.asarray(t_prev, dtype=np.int64), gamma)

    def sigmas_for(self, timesteps: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """The k-diffusion sigmas of a timestep schedule: ``[σ(t_0), …, σ(t_{N−1}), 0]`` (float32)."""
        ts = torch.as_tensor(timesteps).cpu().long()
        return torch.cat([self.t_to_sigma(ts), torch.zeros(1, dtype=torch.float64)]).float()

    def denoiser(
        self, model: Callable[..., torch.Tensor], prediction_type: str = "epsilon"
    ) -> Callable[..., torch.Tensor]:
        """Wrap a discrete VP network ``model(x_t, t, **kw)`` (diffusers' UNet convention) into a VE denoiser
        ``(x, sigma, **kw) → x̂0`` for the samplers here; ``prediction_type`` as in ``TCDScheduler``."""

        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        convert = prediction(prediction_type).convert

        def denoise(x: torch.Tensor, sigma: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            t = self.sigma_to_t(sigma)
            shape = (-1,) + (1,) * (x.ndim - 1)
            s = sigma.to(x.dtype).reshape(shape)
            c_in = (s**2 + 1).rsqrt()  # α_t: x_vp = α_t·x_ve, σ_vp = σ·α_t
            x_vp = x * c_in
            return convert(model(x_vp, t, **kwargs), x_vp, c_in, s * c_in)[0]  # x̂0 is the same in both scalings

        return denoise


def tcd_table(
    sigmas: Sequence[float],
    gamma: float,
    time: TimeMap | None = None,
    flow: bool = False,
    device: torch.device | str | None = None,
) -> StepTable:
    """The per-step coefficients of a sigma-space TCD loop (rows' times are sigmas).

    Args:
        sigmas: descending sigmas, usually ending at 0.
        gamma: stochasticity in [0, 1].
        time: the model's time maps (None: time = σ); with ``target`` (as :class:`DiscreteVPTime`) it also fixes
            how ``s`` is rounded.
        flow: the rectified-flow path instead of VE.
        device: where the time maps are called (a k-diffusion model's maps hold buffers on the model's device);
            their results are read back once. Default: CPU.
    """
    sig = np.asarray(sigmas, dtype=np.float64)
    now, nxt = sig[:-1], sig[1:]
    if time is None:
        s_sigma = (1.0 - gamma) * nxt
    else:
        where = torch.device(device) if device is not None else torch.device("cpu")
        dtype = torch.float64 if where.type == "cpu" else torch.float32  # no float64 on accelerators (MPS)

        def to_device(values: np.ndarray) -> torch.Tensor:
            tensor = torch.from_numpy(np.ascontiguousarray(values))
            return tensor.to(where) if not tensor.is_floating_point() else tensor.to(device=where, dtype=dtype)

        t_next = time.sigma_to_t(to_device(nxt)).detach().cpu().double().numpy()
        target = getattr(time, "target", None)
        s_time = target(t_next, gamma) if target is not None else (1.0 - gamma) * t_next
        s_sigma = time.t_to_sigma(to_device(np.asarray(s_time))).detach().cpu().double().numpy()
        if target is None:
            s_sigma = np.where(nxt > 0, s_sigma, 0.0)  # a continuous model's last step ends clean
    draws = [gamma > 0 and bool(n > 0) for n in nxt]
    path = flow_alpha_sigma if flow else ve_alpha_sigma
    return build_table(now, nxt, s_sigma, path, gamma, draws)


def _names_seed(model: Callable[..., Any]) -> bool:
    """Whether ``model`` has a parameter called ``seed`` (ComfyUI's ``KSamplerX0Inpaint`` has; a k-diffusion
    denoiser, which hands every keyword to the network, has not)."""
    try:
        return "seed" in inspect.signature(model).parameters
    except (TypeError, ValueError):  # no signature (some builtins)
        return False


def _noise_seed(seed: Any, seed_from_args: Any, noise_sampler: NoiseSampler | None) -> int | None:
    """The seed of the default noise sampler: ``seed=``, or ComfyUI's ``extra_args["seed"]`` (consumed there, not
    passed to the model). A ``noise_sampler`` decides the noise itself: with ``seed=`` too it is an error, while
    ComfyUI's seed, which it always sends, is then unused (ComfyUI's own samplers do the same)."""
    for name, value in (("seed", seed), ('extra_args["seed"]', seed_from_args)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))):
            raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if seed is not None and noise_sampler is not None:
        raise ValueError("pass seed or noise_sampler, not both: a noise_sampler draws the noise itself")
    if seed is not None and seed_from_args is not None and int(seed) != int(seed_from_args):
        raise ValueError(f'seed={seed} and extra_args["seed"]={seed_from_args} disagree; pass one of them')
    chosen = seed if seed is not None else seed_from_args
    return None if chosen is None or noise_sampler is not None else int(chosen)


def _sample(
    model: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: dict[str, Any] | None,
    callback: Callable[[dict[str, Any]], Any] | None,
    disable: bool | None,
    gamma: float,
    noise_sampler: NoiseSampler | None,
    time: TimeMap | None,
    seed: int | None,
    flow: bool,
) -> torch.Tensor:
    check_float_tensor("x", x)
    gamma = check_number("gamma", gamma, 0.0, 1.0)
    # the schedule is read to the host once, here; the loop below reads no device value
    sig_host = torch.as_tensor(sigmas).detach().cpu().double().numpy()
    bad = sig_host.ndim != 1 or len(sig_host) < 2 or not np.all(np.isfinite(sig_host))
    if bad or np.any(np.diff(sig_host) >= 0) or sig_host[-1] < 0:
        raise ValueError(f"sigmas must be a strictly descending 1-D sequence ≥ 0 of length ≥ 2, got {sig_host}")
    if flow and sig_host[0] > 1:
        raise ValueError(f"rectified-flow sigmas must lie in [0, 1], got {sig_host[0]}")
    extra_args = {} if extra_args is None else dict(extra_args)  # the caller's dict is left as it was
    seed_from_args = extra_args.pop("seed", None)
    if seed_from_args is not None and _names_seed(model):  # ComfyUI's model wrappers take it, as its samplers pass it
        extra_args["seed"] = seed_from_args
    seed = _noise_seed(seed, seed_from_args, noise_sampler)
    table = tcd_table(sig_host.tolist(), gamma, time, flow, device=x.device)
    if noise_sampler is None:
        generator = None if seed is None else torch.Generator(device=x.device).manual_seed(seed)

        def noise_sampler(sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
            return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)

    s_in = x.new_ones([x.shape[0]])
    for i in trange(len(table), disable=disable):
        row = table.rows[i]
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        noise = noise_sampler(sigmas[i], sigmas[i + 1]) if row.draws_noise else None
        x = tcd_step(denoised, x, row, "sample", noise)[0]
    return x


@torch.no_grad()
def sample_tcd(
    model: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: dict[str, Any] | None = None,
    callback: Callable[[dict[str, Any]], Any] | None = None,
    disable: bool | None = None,
    gamma: float = 0.3,
    noise_sampler: NoiseSampler | None = None,
    time: TimeMap | None = None,
    seed: int | None = None,
) -> torch.Tensor:
    """Strategic Stochastic Sampling (TCD, Zheng et al. 2024, Alg. 4) on the VE path ``x = x0 + σ·ε``.

    Each step denoises to ``σ_s`` (``s = (1 − γ)·t'`` in the model's time), ``x_s = x̂0 + σ_s·ε̂``, then re-noises
    to the next sigma: ``x' = x_s + √(σ'² − σ_s²)·z`` (no noise when ``σ' = 0``).

    Args:
        model: ``model(x, sigma * s_in, **extra_args) → x̂0`` (a k-diffusion/ComfyUI denoiser).
        x: the starting latent, already scaled to ``sigmas[0]`` (``noise * sigmas[0]``), ``(B, …)``.
        sigmas: descending sigmas, usually ending at 0.
        extra_args: keyword arguments for the model (conditioning). A ``"seed"`` key (ComfyUI sends one) is the
            noise seed; it is passed on only to a model with a ``seed`` parameter (ComfyUI's own wrappers).
        callback: called after each model call with ``{"x", "i", "sigma", "sigma_hat", "denoised"}``.
        disable: disable the tqdm progress bar.
        gamma: stochasticity in [0, 1]: 0 deterministic (DDIM-like), 1 LCM's multistep sampling. Default 0.3.
        noise_sampler: ``noise_sampler(sigma, sigma_next) → z``; default: ``torch.randn`` of ``x``'s shape on
            ``x``'s device, from a generator seeded with ``seed`` (reproducible), else the global RNG. Exclusive
            with ``seed``.
        time: the model's time maps (see the module docstring); default: the time is σ.
        seed: seed of the default noise sampler; default ``extra_args["seed"]`` (ComfyUI passes it there, and it is
            taken out of the model's arguments), else None.
    """
    return _sample(model, x, sigmas, extra_args, callback, disable, gamma, noise_sampler, time, seed, flow=False)


@torch.no_grad()
def sample_tcd_rf(
    model: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: dict[str, Any] | None = None,
    callback: Callable[[dict[str, Any]], Any] | None = None,
    disable: bool | None = None,
    gamma: float = 0.3,
    noise_sampler: NoiseSampler | None = None,
    time: TimeMap | None = None,
    seed: int | None = None,
) -> torch.Tensor:
    """TCD on ComfyUI's rectified-flow path ``x = (1 − σ)·x0 + σ·ε`` (SD3, FLUX, …); arguments as
    :func:`sample_tcd`, with ``sigmas`` in [0, 1]. ``gamma = 0`` is the Euler sampler."""
    return _sample(model, x, sigmas, extra_args, callback, disable, gamma, noise_sampler, time, seed, flow=True)
