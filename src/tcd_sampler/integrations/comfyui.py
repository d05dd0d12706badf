"""ComfyUI nodes for TCD: ``SamplerTCD`` (a SAMPLER for ``SamplerCustom`` / ``SamplerCustomAdvanced``),
``TCDScheduler`` (SIGMAS) and a ``tcd`` entry in the stock KSampler's sampler list.

Loaded by ComfyUI from a clone of this repository in ``ComfyUI/custom_nodes/`` (its top-level ``__init__.py``), or,
with the package pip-installed, from a one-file shim ``ComfyUI/custom_nodes/tcd_sampler_nodes.py`` containing
``from tcd_sampler.integrations.comfyui import *``. ComfyUI itself is imported only when a node runs.

**Where TCD's target is taken, per model sampling** (:func:`tcd_path`; the sampler reads the model's own
``model_sampling``). A TCD time must be non-negative, increasing in σ and 0 at the clean end, so that
``s = (1 − γ)·t' ≤ t'`` and ``σ_s ≤ σ'`` by construction; a violation is an error, never clamped:

- discrete VP (``ModelSamplingDiscrete``: EPS, V_PREDICTION, zero-SNR, X0, LCM's distilled grid): the model's own
  grid time, interpolated in log σ between grid points (as its ``sigma(t)``); on a grid point ``s = ⌊(1 − γ)·t'⌋``
  in float32, what ``TCDScheduler`` takes; ``s = 0`` is the clean end;
- EDM and V_PREDICTION_EDM (Playground v2.5, SVD, Cosmos 1): σ itself (their network time ``¼·ln σ`` is negative
  below σ = 1);
- continuous v (``ModelSamplingContinuousV``): its own time ``atan(σ)·2/π``;
- rectified flow (SD3, FLUX, AuraFlow: ``CONST``): the flow time σ, as ``FlowMatchTCDScheduler``; Cosmos' rectified
  flow (``ModelSamplingCosmosRFlow``, sampled in VE sigma): its flow time ``σ/(1 + σ)``;
- Stable Cascade: its cosine time (``StableCascadeSampling.timestep``).

γ = 0 is then ComfyUI's ``euler`` and γ = 1 its ``lcm`` (with the step noise of current ComfyUI, see
:func:`step_noise`) on every family, for any sigmas.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch

from ..core.paths import EDM, VE, Path, RectifiedFlow
from ..core.paths.times import ClosedFormTime, GridTime
from ..sampling import sample_tcd, sample_tcd_rf
from ..schedulers.vp import TCDScheduler as _TCDScheduler

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "SamplerTCD", "TCDScheduler", "sample_tcd_comfy",
           "step_noise", "tcd_path", "tcd_sigmas"]  # fmt: skip

GAMMA_TOOLTIP = (
    "TCD's stochasticity γ (diffusers calls it eta). 0: deterministic, the Euler sampler. 1: LCM's multistep "
    "sampling, all detail redrawn each step. In between, each step denoises to (1 − γ) of the next noise level and "
    "adds fresh noise for the rest: more γ, less accumulated error but softer detail. 0.3 is the paper's default at "
    "4 steps; raise it for more steps."
)


def _mro(obj: Any) -> set[str]:
    return {cls.__name__ for cls in type(obj).__mro__}


def _host(tensor: Any) -> np.ndarray:
    return torch.as_tensor(tensor).detach().double().cpu().numpy()


def tcd_path(model_sampling: Any) -> Path:
    """The path and TCD time a ComfyUI ``model_sampling`` is sampled on (see the module docstring); ValueError for
    a model sampling this does not know, naming it."""
    names = _mro(model_sampling)
    if "CONST" in names:
        return RectifiedFlow()
    if "ModelSamplingCosmosRFlow" in names:
        return VE(time=ClosedFormTime(lambda s: s / (1 + s), lambda t: t / (1 - t)))
    if "ModelSamplingContinuousV" in names:
        return VE(time=ClosedFormTime(lambda s: np.arctan(s) * 2 / math.pi, lambda t: np.tan(t * math.pi / 2)))
    if names & {"ModelSamplingContinuousEDM", "ModelSamplingDiscreteEDM"}:
        return EDM(sigma_data=float(getattr(model_sampling, "sigma_data", 0.5)))
    if "StableCascadeSampling" in names:
        # its sigma(t) shifts the log-SNR by −2·ln(shift), which its timestep(σ) does not undo: σ/shift does
        ms, shift = model_sampling, float(getattr(model_sampling, "shift", 1.0))
        return VE(time=ClosedFormTime(lambda s: _host(ms.timestep(torch.from_numpy(s / shift))),
                                      lambda t: _host(ms.sigma(torch.from_numpy(t)))))  # fmt: skip
    if "ModelSamplingDiscrete" in names:
        sigmas = model_sampling.sigmas.detach().float().cpu()
        return VE(time=GridTime(sigmas.double().numpy(), _host(model_sampling.timestep(sigmas))))
    raise ValueError(
        f"TCD does not know the model sampling {type(model_sampling).__name__} (its classes: {sorted(names)}); "
        "known: discrete VP, EDM, continuous v, rectified flow (CONST, Cosmos), Stable Cascade"
    )


@torch.no_grad()
def sample_tcd_comfy(
    model: Any,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: dict[str, Any] | None = None,
    callback: Any = None,
    disable: bool | None = None,
    gamma: float = 0.3,
    noise_sampler: Any = None,
) -> torch.Tensor:
    """ComfyUI's sampler-function convention around :func:`tcd_sampler.sample_tcd`: the path from the model's
    ``model_sampling`` (:func:`tcd_path`), the step noise from ComfyUI's seed (``extra_args["seed"]``, see
    :func:`step_noise`), previews get ``x̂0``. ``gamma`` in [0, 1], default 0.3."""
    if len(sigmas) < 2:  # nothing to do (denoise 0), as ComfyUI's samplers
        return x
    path = tcd_path(model.inner_model.inner_model.model_sampling)
    sampler = sample_tcd_rf if isinstance(path, RectifiedFlow) else sample_tcd
    seed = (extra_args or {}).get("seed")
    if noise_sampler is None and seed is not None:
        noise_sampler = step_noise(x, int(seed))
    return sampler(
        model, x, sigmas, extra_args=extra_args, callback=callback, disable=disable, gamma=gamma,
        noise_sampler=noise_sampler, path=path,
    )  # fmt: skip


def step_noise(x: torch.Tensor, seed: int) -> Any:
    """The step noise of a loop with ComfyUI's ``seed``: ``torch.randn`` of ``x``'s shape from a generator on ``x``'s
    device seeded with ``seed + 1`` on the CPU (``seed`` elsewhere), as current ComfyUI's ``default_noise_sampler``
    draws it. ComfyUI draws the initial noise on the CPU from ``seed`` itself; a step noise from the same seed would
    repeat it (ComfyUI 0.3.64 does), so the first step would add back the very noise it removes, and the latent would
    leave TCD's marginal (a flow step from σ = 0.9 to 0.5 at γ = 0.3 would land at noise 0.69, not 0.5)."""
    generator = torch.Generator(device=x.device).manual_seed(seed + 1 if x.device.type == "cpu" else seed)
    return lambda sigma, sigma_next: torch.randn(
        x.size(), dtype=x.dtype, layout=x.layout, device=x.device, generator=generator
    )


def tcd_sigmas(model_sampling: Any, steps: int, denoise: float = 1.0, original_inference_steps: int = 50) -> Any:
    """The sigmas of a TCD loop of ``steps`` model calls on ``model_sampling``, ending at 0.

    Discrete models: the timesteps ``TCDScheduler(original_inference_steps=…).set_timesteps(steps, strength=denoise)``
    picks on the model's grid, at the model's own sigmas. Flow models: ``FlowMatchTCDScheduler``'s (the FLUX
    pipelines') ``linspace(1, 1/N, N)`` through the model's shift. EDM and other continuous models: ComfyUI's
    ``karras`` schedule (Stable Cascade: ``simple``). For those, ``denoise < 1`` keeps the last ``steps`` of
    ``⌊steps/denoise⌋``, as ComfyUI's BasicScheduler. ``denoise ≤ 0`` gives no sigmas.
    """
    if denoise <= 0:
        return torch.FloatTensor([])
    path = tcd_path(model_sampling)
    time = getattr(path, "time", None)
    if isinstance(time, GridTime):
        T = int(getattr(model_sampling, "num_timesteps", len(time.sigmas)))
        scheduler = _TCDScheduler(num_train_timesteps=T, original_inference_steps=original_inference_steps)
        try:
            scheduler.set_timesteps(steps, strength=denoise)
        except ValueError as err:  # in the node's words: denoise, not strength
            raise ValueError(
                f"TCD Scheduler: {steps} steps at denoise {denoise} need more of the distillation grid than "
                f"original_inference_steps={original_inference_steps} × denoise leaves; use fewer steps or a higher "
                f"denoise ({err})"
            ) from None
        sig = time.t_to_sigma(scheduler.timesteps.numpy())  # the model's own sigmas on its grid
        return torch.cat([torch.from_numpy(sig).float(), torch.zeros(1)])
    total = steps if denoise >= 1 else int(steps / denoise)
    if isinstance(path, RectifiedFlow):
        scale = float(model_sampling.timestep(torch.tensor(1.0)))  # the model's timestep of σ = 1 (SD3: 1000)
        base = torch.linspace(1.0, 1.0 / total, total, dtype=torch.float64)
        shifted = torch.as_tensor(model_sampling.sigma(base * scale)).float().cpu()
        full = torch.cat([shifted, torch.zeros(1)])
    else:
        import comfy.samplers  # ComfyUI's own schedules

        name = "simple" if "StableCascadeSampling" in _mro(model_sampling) else "karras"
        full = comfy.samplers.calculate_sigmas(model_sampling, name, total).float().cpu()
    return full[-(steps + 1) :]


class SamplerTCD:
    """A SAMPLER running TCD's Strategic Stochastic Sampling, for ``SamplerCustom`` / ``SamplerCustomAdvanced``."""

    DESCRIPTION = "TCD sampler (Trajectory Consistency Distillation): gamma 0 is Euler, gamma 1 is LCM."
    CATEGORY = "sampling/custom_sampling/samplers"
    RETURN_TYPES = ("SAMPLER",)
    FUNCTION = "get_sampler"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        gamma = {"default": 0.3, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": GAMMA_TOOLTIP}
        return {"required": {"gamma": ("FLOAT", gamma)}}

    def get_sampler(self, gamma: float) -> tuple[Any]:
        """``(KSAMPLER,)`` of :func:`sample_tcd_comfy` with this ``gamma``."""
        import comfy.samplers

        if not 0.0 <= float(gamma) <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {gamma}")
        return (comfy.samplers.KSAMPLER(sample_tcd_comfy, extra_options={"gamma": float(gamma)}),)


class TCDScheduler:
    """SIGMAS of a TCD loop (:func:`tcd_sigmas`): for discrete models, the timesteps of the TCD distillation grid."""

    DESCRIPTION = "The sigmas TCD's own scheduler picks (the distillation grid of TCD/LCM LoRAs)."
    CATEGORY = "sampling/custom_sampling/schedulers"
    RETURN_TYPES = ("SIGMAS",)
    FUNCTION = "get_sigmas"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "model": ("MODEL",),
                "steps": ("INT", {"default": 4, "min": 1, "max": 1000, "tooltip": "model calls"}),
                "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}),
                "original_inference_steps": ("INT", {"default": 50, "min": 1, "max": 1000,
                                                     "tooltip": "points of the distillation grid (TCD, LCM: 50)"}),
            }
        }  # fmt: skip

    def get_sigmas(self, model: Any, steps: int, denoise: float, original_inference_steps: int = 50) -> tuple[Any]:
        """``(sigmas,)`` for the model's ``model_sampling``."""
        return (tcd_sigmas(model.get_model_object("model_sampling"), steps, denoise, original_inference_steps),)


NODE_CLASS_MAPPINGS = {"SamplerTCD": SamplerTCD, "TCDScheduler": TCDScheduler}
NODE_DISPLAY_NAME_MAPPINGS = {"SamplerTCD": "TCD Sampler", "TCDScheduler": "TCD Scheduler"}


def sample_tcd_ksampler(
    model: Any, x: torch.Tensor, sigmas: torch.Tensor, extra_args: Any = None, callback: Any = None,
    disable: bool | None = None,
) -> torch.Tensor:  # fmt: skip
    """The stock KSampler's ``tcd`` entry: :func:`sample_tcd_comfy` at γ = 0.3."""
    return sample_tcd_comfy(model, x, sigmas, extra_args, callback, disable, gamma=0.3)


def register_ksampler_entry() -> bool:
    """Add ``tcd`` to the stock KSampler's sampler list (and ``KSamplerSelect``'s), without touching ComfyUI's files:
    the names are appended to ``comfy.samplers``' lists and the function set on ``comfy.k_diffusion.sampling``, where
    ComfyUI looks samplers up by name. Does nothing outside ComfyUI or where ``tcd`` exists already; True if added."""
    try:
        import comfy.k_diffusion.sampling as k_sampling
        import comfy.samplers as samplers
    except Exception as err:  # not inside ComfyUI, or a comfy package that cannot start here
        if not isinstance(err, ImportError):
            logging.getLogger("tcd_sampler").warning("TCD: no `tcd` entry in the KSampler list: %s", err)
        return False
    if "tcd" in samplers.KSAMPLER_NAMES or hasattr(k_sampling, "sample_tcd"):
        return False
    k_sampling.sample_tcd = sample_tcd_ksampler
    samplers.KSAMPLER_NAMES.append("tcd")
    if "tcd" not in samplers.SAMPLER_NAMES:
        samplers.SAMPLER_NAMES.append("tcd")
    return True


register_ksampler_entry()
