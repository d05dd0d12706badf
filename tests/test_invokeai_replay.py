"""InvokeAI's use of diffusers' ``TCDScheduler``, replayed with ours in its place: the latents must be bit-identical.

InvokeAI (invoke-ai/InvokeAI) does not run diffusers pipelines: its SD/SDXL denoise node builds the scheduler itself
from the model's stock scheduler config and drives it from its own loops. This module re-implements (in our own code)
the calls those loops make on the scheduler, in their order, and runs every workflow twice, once with
``diffusers.TCDScheduler`` and once with ``tcd_sampler.integrations.diffusers.TCDScheduler``, on the SDXL stock
scheduler config and a tiny deterministic stand-in UNet. Every latent the loop produces (float32, CPU) must be equal.

Replayed (by InvokeAI's names):

- ``SCHEDULER_MAP["tcd"]`` (``backend/stable_diffusion/schedulers/schedulers.py``): ``(TCDScheduler, {})``.
- ``get_scheduler`` (``app/invocations/denoise_latents.py``): the model's scheduler config (un-nested from
  ``_backup`` if present), ``from_config({**config, **extra, "_backup": config})`` with ``prediction_type`` from the
  UNet's model config, the ``uses_inpainting_model`` attribute hack, ``isinstance(scheduler, SchedulerMixin)``.
- ``DenoiseLatentsInvocation.init_scheduler``: ``set_timesteps(steps, device=...)``, slicing the timesteps by
  ``denoising_start``/``denoising_end`` against ``config["num_train_timesteps"]`` and ``scheduler.order``, a
  ``generator`` seeded ``seed ^ 0xFFFFFFFF`` when ``step`` takes one, and ``eta=1.0`` exactly when
  ``isinstance(scheduler, TCDScheduler)`` (diffusers' class) holds.
- ``StableDiffusionGeneratorPipeline.latents_from_embeddings`` / ``.step`` with ``AddsMaskGuidance`` and
  ``add_inpainting_channels_to_latents`` (``backend/stable_diffusion/diffusers_pipeline.py``): the default backend
  (``DenoiseLatentsInvocation._old_invoke``), with its mask inversion.
- ``StableDiffusionBackend.latents_from_embeddings`` / ``.step`` (``backend/stable_diffusion/diffusion_backend.py``)
  with ``InpaintExt`` and ``InpaintModelExt`` (``backend/stable_diffusion/extensions/``): the modular backend
  (``_new_invoke``, under ``USE_MODULAR_DENOISE``).
- ``MultiDiffusionPipeline.multi_diffusion_denoise`` (``backend/stable_diffusion/multi_diffusion_pipeline.py``, used by
  the tiled multi-diffusion node): one ``copy.deepcopy(scheduler)`` per region, all sharing the step kwargs.

Along the way: ``add_noise`` with a batched init timestep and with 0-d timesteps repeated to the batch (mask
guidance, also at ``scheduler.timesteps[-1]``), ``scale_model_input``, ``step(noise_pred, t, latents, **kwargs)`` with
``t`` a 0-d view of the (sliced) schedule, ``config.num_train_timesteps`` in the gradient-mask threshold, and the
assignment of ``step_output.pred_original_sample`` (or ``.denoised``) that the inpainting code does for previews.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import diffusers
import pytest
import torch
from diffusers.configuration_utils import ConfigMixin
from diffusers.schedulers.scheduling_tcd import TCDScheduler as DiffusersTCDScheduler  # InvokeAI's import
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from tcd_sampler.integrations.diffusers import TCDScheduler as OurTCDScheduler
from test_config import SDXL_EULER_CONFIG

# stabilityai/stable-diffusion-xl-base-1.0, scheduler/scheduler_config.json (the SDXL stock scheduler)
SDXL_SCHEDULER_CONFIG: dict[str, Any] = SDXL_EULER_CONFIG

CLASSES = {"diffusers": DiffusersTCDScheduler, "ours": OurTCDScheduler}
DEVICE = torch.device("cpu")
DTYPE = torch.float32
SEED = 123454321
CFG_SCALE = 1.5
SHAPE = (1, 4, 16, 16)
BACKENDS = ["pipeline", "modular"]


# ------------------------------------------------------------------------------------------------ model and inputs


def model_scheduler_config(source: str) -> Mapping[str, Any]:
    """``orig_scheduler.config`` in ``get_scheduler``: the model manager loads the model's own (Euler) scheduler
    ("loaded"); "json" is the file's dict as it stands."""
    if source == "loaded":
        return diffusers.EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG).config
    return dict(SDXL_SCHEDULER_CONFIG)


class FakeUNet:
    """A deterministic ε-model on ``(sample, timestep, conditioning)``; ``in_channels=9`` is an inpainting model
    (latents + mask + masked-image latents)."""

    def __init__(self, in_channels: int = 4) -> None:
        self.in_channels = in_channels

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        assert sample.shape[1] == self.in_channels
        x = sample[:, :4]
        t = torch.as_tensor(timestep).to(sample.dtype).reshape(-1, 1, 1, 1) / 1000
        eps = 0.1 * x + 0.01 * t + 0.05 * cond.reshape(-1, 1, 1, 1) * torch.tanh(x)
        if self.in_channels == 9:
            eps = eps + 0.02 * sample[:, 4:5] - 0.01 * sample[:, 5:]
        return eps


def seeded_randn(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """How InvokeAI draws latent noise: float32 on the CPU from a seeded generator."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(shape, dtype=torch.float32, device="cpu", generator=g).to(device=DEVICE, dtype=DTYPE)


def image_latents(batch: int = 1) -> torch.Tensor:
    return 0.6 * seeded_randn((batch, *SHAPE[1:]), 7)


def make_mask(kind: str) -> torch.Tensor:
    """A latent-size denoise mask as ``prep_inpaint_mask`` hands it over: a binary half or a horizontal ramp."""
    h, w = SHAPE[2:]
    if kind == "binary":
        mask = torch.zeros(1, 1, h, w)
        mask[..., w // 2 :] = 1.0
        return mask
    return torch.linspace(0.0, 1.0, w).expand(1, 1, h, w).clone()


# ----------------------------------------------------------------------------------- get_scheduler / init_scheduler


def get_scheduler(tcd_class: Any, orig_config: Mapping[str, Any], unet_prediction_type: str = "epsilon") -> Any:
    """``get_scheduler`` with ``scheduler_name="tcd"``."""
    scheduler_map: dict[str, tuple[Any, dict[str, Any]]] = {"tcd": (tcd_class, {})}
    scheduler_class, extra_config = scheduler_map["tcd"]
    config: Mapping[str, Any] = orig_config
    if "_backup" in config:
        config = config["_backup"]
    scheduler_config = {**config, **extra_config, "_backup": config}
    scheduler_config["prediction_type"] = unet_prediction_type  # the UNet's model config has a prediction_type
    scheduler = scheduler_class.from_config(scheduler_config)
    if not hasattr(scheduler, "uses_inpainting_model"):
        scheduler.uses_inpainting_model = lambda: False
    assert isinstance(scheduler, SchedulerMixin)
    return scheduler


def init_scheduler(
    scheduler: Any, steps: int, denoising_start: float, denoising_end: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """``DenoiseLatentsInvocation.init_scheduler``."""
    assert isinstance(scheduler, ConfigMixin)
    if scheduler.config.get("cpu_only", False):
        scheduler.set_timesteps(steps, device="cpu")
        timesteps = scheduler.timesteps.to(device=DEVICE)
    else:
        scheduler.set_timesteps(steps, device=DEVICE)
        timesteps = scheduler.timesteps

    order = scheduler.order
    first_order = timesteps[::order]
    train_steps = scheduler.config["num_train_timesteps"]
    start_value = round(train_steps * (1 - denoising_start))
    start = sum(1 for ts in first_order if ts >= start_value)
    end_value = round(train_steps * (1 - denoising_end))
    end = sum(1 for ts in first_order[start:] if ts >= end_value)
    start *= order
    end *= order
    init_timestep = timesteps[start : start + 1]
    timesteps = timesteps[start : start + end]

    step_kwargs: dict[str, Any] = {}
    if "generator" in inspect.signature(scheduler.step).parameters:
        step_kwargs["generator"] = torch.Generator(device=DEVICE).manual_seed(seed ^ 0xFFFFFFFF)
    if isinstance(scheduler, DiffusersTCDScheduler):
        step_kwargs["eta"] = 1.0
    return timesteps, init_timestep, step_kwargs


# ------------------------------------------------------------------------------- the default (pipeline) backend


def repeat_batch(x: torch.Tensor, batch: int) -> torch.Tensor:
    """einops ``"b c h w -> (repeat b) c h w"``."""
    return x.repeat(batch, 1, 1, 1)


def batch_timestep(t: torch.Tensor, batch: int) -> torch.Tensor:
    """einops ``"-> batch"`` on a 0-d timestep (dims > 0 pass through, as the callers check)."""
    return t.reshape(1).expand(batch)


@dataclass
class MaskGuidance:
    """``AddsMaskGuidance`` (mask already inverted by ``_old_invoke``: 1 = regenerate)."""

    mask: torch.Tensor
    mask_latents: torch.Tensor
    scheduler: Any
    noise: torch.Tensor
    is_gradient_mask: bool

    def __call__(self, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        batch = latents.size(0)
        mask = repeat_batch(self.mask, batch)
        if t.dim() == 0:
            t = batch_timestep(t, batch)
        mask_latents = repeat_batch(self.scheduler.add_noise(self.mask_latents, self.noise, t), batch)
        if self.is_gradient_mask:
            threshold = t.item() / self.scheduler.config.num_train_timesteps
            return torch.where(mask > threshold, latents, mask_latents)
        return torch.lerp(mask_latents.to(dtype=latents.dtype), latents, mask.to(dtype=latents.dtype))


def add_inpainting_channels(latents: torch.Tensor, masked_image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``add_inpainting_channels_to_latents``."""
    batch = latents.shape[0]
    return torch.cat([latents, mask.expand(batch, -1, -1, -1), masked_image.expand(batch, -1, -1, -1)], dim=1)


@dataclass
class Trace:
    """What the loop hands on: the latents after every step (the progress callback's ``latents``) and whether a
    preview prediction was there to read (``predicted_original``)."""

    latents: list[torch.Tensor]
    previews: list[bool]


def pipeline_step(
    scheduler: Any,
    unet: FakeUNet,
    t: torch.Tensor,
    latents: torch.Tensor,
    step_kwargs: dict[str, Any],
    guidance: MaskGuidance | None,
    mask: torch.Tensor | None,
    masked_latents: torch.Tensor | None,
) -> Any:
    """``StableDiffusionGeneratorPipeline.step`` (``t`` batched; the scheduler gets its first element)."""
    timestep = t[0]
    if guidance is not None:
        latents = guidance(latents, timestep)  # before scale_model_input, as InvokeAI notes
    model_input = scheduler.scale_model_input(latents, timestep)
    if unet.in_channels == 9:
        if mask is not None:
            assert masked_latents is not None
            model_input = add_inpainting_channels(model_input, masked_latents, mask)
        else:
            model_input = add_inpainting_channels(
                model_input, torch.zeros_like(model_input[:1]), torch.ones_like(model_input[:1, :1])
            )
    # InvokeAIDiffuserComponent.do_unet_step: unconditioned and conditioned halves in one batch, then _combine
    both = unet(torch.cat([model_input] * 2), torch.cat([t] * 2), cond_batch(model_input.shape[0]))
    uncond, cond = both.chunk(2)
    noise_pred = uncond + (cond - uncond) * CFG_SCALE
    step_output = scheduler.step(noise_pred, timestep, latents, **step_kwargs)
    if guidance is not None:
        # the preview patch: mask whichever prediction the output carries
        if hasattr(step_output, "denoised"):
            assigned = guidance(step_output.denoised, scheduler.timesteps[-1])
        elif hasattr(step_output, "pred_original_sample"):
            assigned = guidance(step_output.pred_original_sample, scheduler.timesteps[-1])
        else:
            assigned = guidance(latents, scheduler.timesteps[-1])
        step_output.pred_original_sample = assigned
        assert step_output.pred_original_sample is assigned
    return step_output


def cond_batch(batch: int) -> torch.Tensor:
    """The stand-in conditioning: -1 for the negative half, +1 for the positive half."""
    return torch.cat([torch.full((batch,), -1.0), torch.full((batch,), 1.0)]).to(DTYPE)


def pipeline_denoise(
    scheduler: Any,
    unet: FakeUNet,
    latents: torch.Tensor,
    noise: torch.Tensor | None,
    timesteps: torch.Tensor,
    init_timestep: torch.Tensor,
    step_kwargs: dict[str, Any],
    mask: torch.Tensor | None = None,
    masked_latents: torch.Tensor | None = None,
    is_gradient_mask: bool = False,
    seed: int = SEED,
) -> tuple[torch.Tensor, Trace]:
    """``StableDiffusionGeneratorPipeline.latents_from_embeddings``."""
    trace = Trace([], [])
    if init_timestep.shape[0] == 0:
        return latents, trace
    orig_latents = latents.clone()
    batch = latents.shape[0]
    if noise is not None:
        latents = scheduler.add_noise(latents, noise, init_timestep.expand(batch))

    guidance = None
    if mask is not None and unet.in_channels != 9:
        if noise is None:
            noise = seeded_randn(tuple(orig_latents.shape), seed)
        guidance = MaskGuidance(mask, orig_latents, scheduler, noise, is_gradient_mask)

    trace.latents.append(latents)
    for t in timesteps:
        step_output = pipeline_step(
            scheduler, unet, t.expand(batch), latents, step_kwargs, guidance, mask, masked_latents
        )
        latents = step_output.prev_sample
        trace.latents.append(latents)
        trace.previews.append(getattr(step_output, "pred_original_sample", None) is not None)

    if mask is not None:
        if is_gradient_mask:
            latents = torch.where(mask > 0, latents, orig_latents)
        else:
            latents = torch.lerp(orig_latents, latents.to(dtype=orig_latents.dtype), mask.to(dtype=orig_latents.dtype))
    return latents, trace


# ---------------------------------------------------------------------------------------- the modular backend


class InpaintExtension:
    """``InpaintExt`` (normal models; mask as ``prep_inpaint_mask`` returns it)."""

    def __init__(self, mask: torch.Tensor, is_gradient_mask: bool) -> None:
        self.mask = mask
        self.is_gradient_mask = is_gradient_mask
        self.noise: torch.Tensor | None = None

    def apply_mask(self, scheduler: Any, orig: torch.Tensor, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        batch = latents.size(0)
        mask = repeat_batch(self.mask, batch)
        if t.dim() == 0:
            t = batch_timestep(t, batch)
        assert self.noise is not None
        mask_latents = repeat_batch(scheduler.add_noise(orig, self.noise, t), batch)
        if self.is_gradient_mask:
            threshold = t.item() / scheduler.config.num_train_timesteps
            return torch.where(mask < 1 - threshold, latents, mask_latents)
        return torch.lerp(latents, mask_latents.to(dtype=latents.dtype), mask.to(dtype=latents.dtype))

    def init_tensors(self, latents: torch.Tensor, noise: torch.Tensor | None, seed: int) -> None:  # pre_denoise_loop
        self.mask = self.mask.to(device=latents.device, dtype=latents.dtype)
        self.noise = noise if noise is not None else seeded_randn(tuple(latents.shape), seed)

    def pre_step(self, scheduler: Any, orig: torch.Tensor, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.apply_mask(scheduler, orig, latents, t)

    def post_step(self, scheduler: Any, orig: torch.Tensor, step_output: Any) -> None:
        timestep = scheduler.timesteps[-1]
        if hasattr(step_output, "denoised"):
            step_output.denoised = self.apply_mask(scheduler, orig, step_output.denoised, timestep)
        elif hasattr(step_output, "pred_original_sample"):
            masked = self.apply_mask(scheduler, orig, step_output.pred_original_sample, timestep)
            step_output.pred_original_sample = masked
            assert step_output.pred_original_sample is masked
        else:
            masked = self.apply_mask(scheduler, orig, step_output.prev_sample, timestep)
            step_output.pred_original_sample = masked
            assert step_output.pred_original_sample is masked

    def restore(self, orig: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:  # post_denoise_loop
        if self.is_gradient_mask:
            return torch.where(self.mask < 1, latents, orig)
        return torch.lerp(latents, orig, self.mask)


class InpaintModelExtension:
    """``InpaintModelExt`` (inpainting models: the mask and masked image ride along as UNet input channels)."""

    def __init__(self, mask: torch.Tensor, masked_latents: torch.Tensor, is_gradient_mask: bool) -> None:
        self.mask = 1 - mask
        self.masked_latents = masked_latents
        self.is_gradient_mask = is_gradient_mask

    def init_tensors(self, latents: torch.Tensor, noise: torch.Tensor | None, seed: int) -> None:
        self.mask = self.mask.to(device=latents.device, dtype=latents.dtype)
        self.masked_latents = self.masked_latents.to(device=latents.device, dtype=latents.dtype)

    def pre_unet(self, sample: torch.Tensor) -> torch.Tensor:
        batch = sample.shape[0]
        return torch.cat([sample, torch.cat([self.mask] * batch), torch.cat([self.masked_latents] * batch)], dim=1)

    def restore(self, orig: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        if self.is_gradient_mask:
            return torch.where(self.mask > 0, latents, orig)
        return torch.lerp(orig, latents, self.mask)


def backend_denoise(
    scheduler: Any,
    unet: FakeUNet,
    orig_latents: torch.Tensor,
    noise: torch.Tensor | None,
    timesteps: torch.Tensor,
    init_timestep: torch.Tensor,
    step_kwargs: dict[str, Any],
    extension: InpaintExtension | InpaintModelExtension | None = None,
    seed: int = SEED,
) -> tuple[torch.Tensor, Trace]:
    """``StableDiffusionBackend.latents_from_embeddings`` with its ``step`` and ``run_unet`` (batched guidance)."""
    trace = Trace([], [])
    if init_timestep.shape[0] == 0:
        return orig_latents, trace
    latents = orig_latents.clone()
    if noise is not None:
        latents = scheduler.add_noise(latents, noise, init_timestep.expand(latents.shape[0]))
    if timesteps.shape[0] == 0:
        return latents, trace

    if extension is not None:
        extension.init_tensors(latents, noise, seed)
    trace.latents.append(latents)
    for timestep in timesteps:
        if isinstance(extension, InpaintExtension):
            latents = extension.pre_step(scheduler, orig_latents, latents, timestep)
        model_input = scheduler.scale_model_input(latents, timestep)
        sample = torch.cat([model_input] * 2)
        if isinstance(extension, InpaintModelExtension):
            sample = extension.pre_unet(sample)
        negative, positive = unet(sample, timestep, cond_batch(model_input.shape[0])).chunk(2)
        noise_pred = torch.lerp(negative, positive, CFG_SCALE)
        step_output = scheduler.step(noise_pred, timestep, latents, **step_kwargs)
        if isinstance(extension, InpaintExtension):
            extension.post_step(scheduler, orig_latents, step_output)
        latents = step_output.prev_sample
        trace.latents.append(latents)
        trace.previews.append(getattr(step_output, "pred_original_sample", None) is not None)

    if extension is not None:
        latents = extension.restore(orig_latents, latents)
    return latents, trace


# ------------------------------------------------------------------------------------------------- the workflows


@dataclass
class Job:
    """One denoise node: its inputs as ``prepare_noise_and_latents`` and ``prep_inpaint_mask`` produce them."""

    backend: str = "pipeline"
    steps: int = 4
    denoising_start: float = 0.0
    denoising_end: float = 1.0
    latents: torch.Tensor | None = None  # None: txt2img (zeros like the noise)
    noise: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    is_gradient_mask: bool = False
    inpaint_model: bool = False
    orig_config: str = "loaded"
    seed: int = SEED


def denoise(tcd_class: type, job: Job) -> tuple[torch.Tensor, Trace, torch.Tensor]:
    """``DenoiseLatentsInvocation`` (``_old_invoke`` or ``_new_invoke``) with a TCD scheduler; returns the result,
    the per-step trace and the timesteps it ran."""
    latents = job.latents if job.latents is not None else torch.zeros_like(job.noise)  # type: ignore[arg-type]
    latents = latents.to(device=DEVICE, dtype=DTYPE)
    noise = job.noise.to(device=DEVICE, dtype=DTYPE) if job.noise is not None else None
    unet = FakeUNet(9 if job.inpaint_model else 4)
    mask, masked_latents = job.mask, None
    if mask is not None:
        masked_latents = torch.where(mask < 0.5, 0.0, latents)

    scheduler = get_scheduler(tcd_class, model_scheduler_config(job.orig_config))
    timesteps, init_timestep, step_kwargs = init_scheduler(
        scheduler, job.steps, job.denoising_start, job.denoising_end, job.seed
    )
    if job.backend == "pipeline":
        if mask is not None:
            mask = 1 - mask  # _old_invoke inverts the mask for the old backend
        result, trace = pipeline_denoise(
            scheduler,
            unet,
            latents,
            noise,
            timesteps,
            init_timestep,
            step_kwargs,
            mask,
            masked_latents,
            job.is_gradient_mask,
            job.seed,
        )
    else:
        extension: InpaintExtension | InpaintModelExtension | None = None
        if job.inpaint_model and mask is not None:
            assert masked_latents is not None
            extension = InpaintModelExtension(mask, masked_latents, job.is_gradient_mask)
        elif mask is not None:
            extension = InpaintExtension(mask, job.is_gradient_mask)
        result, trace = backend_denoise(
            scheduler, unet, latents, noise, timesteps, init_timestep, step_kwargs, extension, job.seed
        )
    return result, trace, timesteps


def assert_same_run(run: Callable[[type], tuple[torch.Tensor, Trace, torch.Tensor]]) -> Trace:
    """Run with diffusers' class and with ours; everything must be equal bit for bit."""
    ref_result, ref_trace, ref_timesteps = run(CLASSES["diffusers"])
    result, trace, timesteps = run(CLASSES["ours"])
    assert torch.equal(timesteps, ref_timesteps), (timesteps, ref_timesteps)
    assert len(trace.latents) == len(ref_trace.latents)
    for i, (ours, ref) in enumerate(zip(trace.latents, ref_trace.latents, strict=True)):
        assert ours.dtype == ref.dtype and torch.equal(ours, ref), f"latents differ after step {i}"
    assert result.dtype == ref_result.dtype
    assert torch.equal(result, ref_result), (result - ref_result).abs().max().item()
    assert torch.isfinite(result).all()
    return trace


def noise_for(batch: int = 1, seed: int = SEED) -> torch.Tensor:
    return seeded_randn((batch, *SHAPE[1:]), seed)


# ----------------------------------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_get_and_init_scheduler_give_tcd_its_eta_and_generator(name: str) -> None:
    """InvokeAI forces eta=1.0 by ``isinstance(scheduler, TCDScheduler)`` (diffusers' class) and seeds the generator
    it passes to every step: a scheduler that fails the check silently runs at its default eta (0.3)."""
    assert DiffusersTCDScheduler is diffusers.TCDScheduler
    scheduler = get_scheduler(CLASSES[name], model_scheduler_config("loaded"))
    passes_gate = isinstance(scheduler, DiffusersTCDScheduler)  # what init_scheduler asks
    assert passes_gate, f"{type(scheduler).__module__}.{type(scheduler).__name__} fails InvokeAI's TCD check"
    assert scheduler.uses_inpainting_model() is False
    assert scheduler.order == 1
    timesteps, init_timestep, kwargs = init_scheduler(scheduler, 4, 0.0, 1.0, SEED)
    assert sorted(kwargs) == ["eta", "generator"]
    assert kwargs["eta"] == 1.0
    assert timesteps.tolist() == [999, 759, 499, 259]  # steps_offset=1 of the Euler config moves nothing
    assert init_timestep.tolist() == [999]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("steps", [1, 2, 4, 8])
@pytest.mark.parametrize("batch", [1, 2])
def test_txt2img(backend: str, steps: int, batch: int) -> None:
    job = Job(backend=backend, steps=steps, noise=noise_for(batch))
    assert_same_run(lambda cls: denoise(cls, job))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("orig_config", ["loaded", "json"])
@pytest.mark.parametrize("seed", [0, SEED, 2**32 - 1])
def test_txt2img_config_source_and_seed(backend: str, orig_config: str, seed: int) -> None:
    job = Job(backend=backend, noise=noise_for(1, seed), orig_config=orig_config, seed=seed)
    assert_same_run(lambda cls: denoise(cls, job))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("denoising_start", [0.1, 0.3, 0.5, 0.75, 0.99])
@pytest.mark.parametrize("denoising_end", [1.0, 0.6])
@pytest.mark.parametrize("steps", [4, 8])
def test_img2img(backend: str, denoising_start: float, denoising_end: float, steps: int) -> None:
    """denoising_start > 0 starts the loop inside the schedule (and 0.99 leaves no step to run)."""
    job = Job(
        backend=backend,
        steps=steps,
        denoising_start=denoising_start,
        denoising_end=denoising_end,
        latents=image_latents(),
        noise=noise_for(),
    )
    assert_same_run(lambda cls: denoise(cls, job))


@pytest.mark.parametrize("backend", BACKENDS)
def test_sdxl_base_then_refiner(backend: str) -> None:
    """The base stops at denoising_end, the refiner goes on from the same point with no new noise."""

    def run(cls: type) -> tuple[torch.Tensor, Trace, torch.Tensor]:
        base, base_trace, base_timesteps = denoise(cls, Job(backend=backend, denoising_end=0.6, noise=noise_for()))
        refined, trace, timesteps = denoise(cls, Job(backend=backend, denoising_start=0.6, latents=base))
        assert base_timesteps.tolist() == [999, 759, 499] and timesteps.tolist() == [259]
        return refined, Trace(base_trace.latents + trace.latents, base_trace.previews + trace.previews), timesteps

    assert_same_run(run)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask_kind", ["binary", "gradient"])
@pytest.mark.parametrize("inpaint_model", [False, True], ids=["normal-model", "inpaint-model"])
@pytest.mark.parametrize("denoising_start", [0.0, 0.5])
def test_inpaint(backend: str, mask_kind: str, inpaint_model: bool, denoising_start: float) -> None:
    """Masked denoising: mask guidance re-noises the kept region with add_noise at every step (0-d timesteps
    repeated to the batch), and the step output's preview prediction is masked and assigned back."""
    job = Job(
        backend=backend,
        denoising_start=denoising_start,
        latents=image_latents(),
        noise=noise_for(),
        mask=make_mask(mask_kind),
        is_gradient_mask=mask_kind == "gradient",
        inpaint_model=inpaint_model,
    )
    trace = assert_same_run(lambda cls: denoise(cls, job))
    if not inpaint_model:  # the preview patch assigned a prediction on every step, for both classes
        assert trace.previews and all(trace.previews)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask_kind", ["binary", "gradient"])
def test_inpaint_without_noise_draws_it_from_the_seed(backend: str, mask_kind: str) -> None:
    """An already-noised input (refiner-style, ``noise=None``): the mask guidance draws its noise from the seed."""
    job = Job(
        backend=backend,
        denoising_start=0.5,
        latents=image_latents(),
        mask=make_mask(mask_kind),
        is_gradient_mask=mask_kind == "gradient",
    )
    assert_same_run(lambda cls: denoise(cls, job))


def multi_diffusion_denoise(tcd_class: type, target_overlap: int = 2) -> tuple[torch.Tensor, Trace, torch.Tensor]:
    """``MultiDiffusionPipeline.multi_diffusion_denoise`` on two overlapping tiles: each tile steps its own deep copy
    of the scheduler at the same timestep (with the timestep a view of the original's schedule), and the shared
    generator in the step kwargs; the tiles' outputs are blended."""
    height, width = SHAPE[2:]
    # (top, bottom, left, right) and the overlap with the neighbours (top, left): the second tile overlaps by 4
    regions = [((0, height, 0, 10), (0, 0)), ((0, height, 6, width), (0, 4))]
    scheduler = get_scheduler(tcd_class, model_scheduler_config("loaded"))
    timesteps, init_timestep, step_kwargs = init_scheduler(scheduler, 4, 0.25, 1.0, SEED)
    unet = FakeUNet()
    latents = image_latents()
    trace = Trace([], [])
    if init_timestep.shape[0] == 0 or timesteps.shape[0] == 0:
        return latents, trace, timesteps
    batch = latents.shape[0]
    latents = scheduler.add_noise(latents, noise_for(), init_timestep.expand(batch))
    region_schedulers = [copy.deepcopy(scheduler) for _ in regions]
    trace.latents.append(latents)
    for t in timesteps:
        merged = torch.zeros_like(latents)
        weights = torch.zeros((1, 1, height, width), dtype=latents.dtype)
        merged_preview: torch.Tensor | None = None
        for region_scheduler, ((top, bottom, left, right), (overlap_top, overlap_left)) in zip(
            region_schedulers, regions, strict=True
        ):
            region_latents = latents[:, :, top:bottom, left:right]
            step_output = pipeline_step(
                region_scheduler, unet, t.expand(batch), region_latents, step_kwargs, None, None, None
            )
            dy, dx = max(0, overlap_top - target_overlap), max(0, overlap_left - target_overlap)
            merged[:, :, top + dy : bottom, left + dx : right] += step_output.prev_sample[:, :, dy:, dx:]
            weights[:, :, top + dy : bottom, left + dx : right] += 1.0
            preview = getattr(step_output, "pred_original_sample", None)  # blended for the progress image
            if preview is not None:
                if merged_preview is None:
                    merged_preview = torch.zeros_like(latents)
                merged_preview[:, :, top + dy : bottom, left + dx : right] += preview[:, :, dy:, dx:]
        latents = torch.where(weights > 0, merged / weights, merged)
        trace.latents.append(latents)
        trace.previews.append(merged_preview is not None)
    return latents, trace, timesteps


def test_multi_diffusion_steps_a_deep_copy_per_region() -> None:
    assert_same_run(multi_diffusion_denoise)
