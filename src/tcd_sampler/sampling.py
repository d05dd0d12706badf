"""Functional TCD samplers in k-diffusion's convention (sigma space), for k-diffusion, A1111/Forge and ComfyUI.

``model(x, sigma * s_in, **extra_args)`` returns the denoised ``x̂0``; ``sigmas`` descend to 0. Two paths:

- :func:`sample_tcd`: the VE form ``x = x0 + σ·ε`` (k-diffusion, ComfyUI's epsilon/v models);
- :func:`sample_tcd_rf`: ComfyUI's rectified-flow form ``x = (1 − σ)·x0 + σ·ε`` (SD3, FLUX, …).

TCD's target ``s = (1 − γ)·t'`` is taken in the path's TCD time (:mod:`tcd_sampler.core.paths`). By default the time
is ``σ`` itself; pass ``time=`` an object with ``sigma_to_t`` and ``t_to_sigma`` (k-diffusion's wrapped models have
both) to use the model's own time, or :class:`DiscreteVPTime` for a discrete VP model, which reproduces a
``TCDScheduler`` loop exactly; or pass ``path=`` a path object (:class:`~tcd_sampler.core.paths.EDM`, …).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import trange

from .core.checks import check_float_tensor, check_number
from .core.paths import VE, DiscreteVPTime, Path, RectifiedFlow, TimeMap
from .core.step import tcd_step
from .core.table import StepTable, build_table

__all__ = ["DiscreteVPTime", "TimeMap", "sample_tcd", "sample_tcd_rf", "tcd_table"]

NoiseSampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def tcd_table(
    sigmas: Sequence[float],
    gamma: float,
    time: TimeMap | None = None,
    flow: bool = False,
    device: torch.device | str | None = None,
) -> StepTable:
    """The per-step coefficients of a sigma-space TCD loop (rows' times are sigmas): :func:`build_table` on the VE
    (or, with ``flow``, the rectified-flow) path whose TCD time is ``time`` (None: σ), its maps called on
    ``device`` (default CPU) and read back once."""
    path = (RectifiedFlow if flow else VE)(time=time, device=device)
    return build_table(path, np.asarray(sigmas, dtype=np.float64), gamma)


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
    path: Path,
    seed: int | None,
) -> torch.Tensor:
    gamma = check_number("gamma", gamma, 0.0, 1.0)
    # the schedule is read to the host once, here; the loop below reads no device value
    sig_host = torch.as_tensor(sigmas).detach().cpu().double().numpy()
    bad = sig_host.ndim != 1 or len(sig_host) < 2 or not np.all(np.isfinite(sig_host))
    if bad or np.any(np.diff(sig_host) >= 0) or sig_host[-1] < 0:
        raise ValueError(f"sigmas must be a strictly descending 1-D sequence ≥ 0 of length ≥ 2, got {sig_host}")
    if isinstance(path, RectifiedFlow) and sig_host[0] > 1:
        raise ValueError(f"rectified-flow sigmas must lie in [0, 1], got {sig_host[0]}")
    extra_args = {} if extra_args is None else dict(extra_args)  # the caller's dict is left as it was
    seed_from_args = extra_args.pop("seed", None)
    if seed_from_args is not None and _names_seed(model):  # ComfyUI's model wrappers take it, as its samplers pass it
        extra_args["seed"] = seed_from_args
    seed = _noise_seed(seed, seed_from_args, noise_sampler)
    table = build_table(path, sig_host, gamma)
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
    path: Path | None = None,
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
        path: the path and its TCD time as one object, instead of ``time`` (e.g. ``EDM()``); default: the VE path
            in the time ``time``.
        seed: seed of the default noise sampler; default ``extra_args["seed"]`` (ComfyUI passes it there, and it is
            taken out of the model's arguments), else None.
    """
    path = _loop_path(path, time, x, VE)
    return _sample(model, x, sigmas, extra_args, callback, disable, gamma, noise_sampler, path, seed)


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
    path: Path | None = None,
) -> torch.Tensor:
    """TCD on ComfyUI's rectified-flow path ``x = (1 − σ)·x0 + σ·ε`` (SD3, FLUX, …); arguments as
    :func:`sample_tcd`, with ``sigmas`` in [0, 1] (``path`` defaults to the rectified-flow path in the time
    ``time``). ``gamma = 0`` is the Euler sampler."""
    path = _loop_path(path, time, x, RectifiedFlow)
    return _sample(model, x, sigmas, extra_args, callback, disable, gamma, noise_sampler, path, seed)


def _loop_path(path: Path | None, time: TimeMap | None, x: torch.Tensor, default: type[VE | RectifiedFlow]) -> Path:
    """The path a sampler runs on: ``path``, else ``default`` in the time ``time`` with its maps called on ``x``'s
    device. A path of the other sampler's family, or a discrete one, is an error naming what to pass instead. Checks
    ``x`` first, for both samplers (it reads ``x.device``)."""
    check_float_tensor("x", x)
    if path is None:
        return default(time=time, device=x.device)
    if time is not None:
        raise ValueError("pass time or path, not both: a path carries its TCD time")
    if path.discrete:
        raise ValueError(
            f"{type(path).__name__} is a discrete path; a sampler in sigma space takes it as a time: "
            f"path={default.__name__}(time=…) or time=…"
        )
    other = RectifiedFlow if default is VE else VE
    if isinstance(path, other):
        fn = "sample_tcd_rf" if other is RectifiedFlow else "sample_tcd"
        raise ValueError(f"{type(path).__name__} is the path of {fn}, not of this sampler")
    return path
