"""Loading a diffusers pipeline with the right TCD scheduler, and generating images with it (``tcd-sampler generate``).

The pipeline class comes from the model's ``model_index.json`` through diffusers' auto pipelines (text-to-image,
image-to-image or inpainting); the scheduler kind from the model's own scheduler config: flow-matching models
(SD3, FLUX) get :class:`FlowMatchTCDScheduler`, discrete VP models (SD1.5, SD2.1, SDXL) get :class:`TCDScheduler`,
and LCM pipelines get it in consistency-boundary mode.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import config_family, load_config_file

__all__ = ["GenerationRequest", "MissingModelError", "generate", "load_pipeline", "scheduler_for"]

#: Pipelines whose model is LCM-distilled: TCD runs them with the consistency boundary condition.
LCM_PIPELINES = ("LatentConsistencyModelPipeline", "LatentConsistencyModelImg2ImgPipeline")

#: Offset of the step-noise generator's seed from the latent generator's, so the two streams differ.
STEP_NOISE_SEED_OFFSET = 0x5EED


class MissingModelError(RuntimeError):
    """The model (or one of its files) is neither on disk nor obtainable from the Hugging Face Hub."""


@dataclass(frozen=True)
class GenerationRequest:
    """What ``tcd-sampler generate`` was asked for (see its ``--help`` for each field)."""

    model: str
    prompt: str
    output: Path
    negative_prompt: str | None = None
    lora: str | None = None
    steps: int = 4
    gamma: float = 0.3
    guidance: float = 0.0
    seed: int = 0
    width: int | None = None
    height: int | None = None
    image: Path | None = None
    strength: float = 0.8
    mask: Path | None = None
    device: str | None = None


def _diffusers() -> Any:
    try:
        import diffusers
    except ImportError:
        raise ImportError("tcd-sampler generate needs diffusers: pip install 'tcd-sampler[diffusers]'") from None
    return diffusers


def _read_config(model: str, name: str, subfolder: str | None = None) -> dict[str, Any]:
    """A JSON file of the model (:func:`load_config_file`), with errors that say what is missing."""
    local = Path(model)
    if local.is_dir():
        try:
            return load_config_file(model, subfolder, name=name)
        except FileNotFoundError:
            path = local / subfolder / name if subfolder else local / name
            raise MissingModelError(f"{path} is missing: {model} is not a complete diffusers model folder") from None
    if local.is_absolute() or model.startswith((".", "~")) or model.count("/") > 1 or local.exists():
        raise MissingModelError(f"{model} is not a folder: pass a diffusers model folder or a Hub id (org/name)")
    try:
        return load_config_file(model, subfolder, name=name)
    except Exception as err:  # network errors, missing repos, offline mode: all mean "not obtainable here"
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        raise MissingModelError(
            f"model {model!r} is not a local folder and its {subfolder + '/' if subfolder else ''}{name} could not "
            f"be fetched from the Hugging Face Hub{' (HF_HUB_OFFLINE is set)' if offline else ''}: "
            f"{type(err).__name__}. Download it where the Hub is reachable (e.g. `hf download {model}`) and pass the "
            "folder, or pass --model a local diffusers model folder."
        ) from None


def scheduler_for(model: str, pipeline_class: str, gamma: float) -> Any:
    """The TCD scheduler matching the model's own scheduler config (a diffusers component).

    The config's keys that diffusers' schedulers ignore (SD/SDXL's ``steps_offset=1``) are kept but not applied, so
    the schedule is the one TCD models were distilled on (see :class:`tcd_sampler.TCDScheduler`)."""
    from .diffusers import FlowMatchTCDScheduler, TCDScheduler

    config = _read_config(model, "scheduler_config.json", "scheduler")
    if config_family(config) == "flow":
        return FlowMatchTCDScheduler.from_config(config, gamma=gamma)
    if pipeline_class in LCM_PIPELINES:
        return TCDScheduler.from_config(config, consistency_boundary=True, eta=gamma)
    return TCDScheduler.from_config(config, eta=gamma)


def load_pipeline(
    model: str,
    gamma: float = 0.3,
    task: str = "text2image",
    lora: str | None = None,
    device: str | None = None,
    noise_seed: int | None = 0,
) -> Any:
    """Load ``model`` for ``task`` (``text2image``, ``image2image`` or ``inpaint``) with its TCD scheduler.

    Args:
        model: a local diffusers folder or a Hub repo id.
        gamma: TCD's stochasticity, stored in the scheduler's config (``eta`` / ``gamma``). Flow pipelines (SD3,
            FLUX) and LCM pipelines step with it. **SD/SDXL pipelines pass their own** ``eta`` **to the step** (0.0
            unless the call sets it), so call them with ``eta=gamma``: ``pipe(prompt, eta=0.3, ...)``
            (:func:`generate` does). Default 0.3.
        task: which auto pipeline to build. Default ``text2image``.
        lora: a LoRA (folder, file or repo id) to load and fuse, e.g. ``h1t/TCD-SDXL-LoRA``. Default None.
        device: where to run; default CUDA when available (float16), else CPU (float32).
        noise_seed: the scheduler's :attr:`~tcd_sampler.TCDScheduler.noise_seed`: the seed of the step noise of
            every call that passes no generator to the step (flow pipelines never do), so that two calls with the
            same pipeline generator give the same image. None: torch's global RNG. Default 0.
    """
    diffusers = _diffusers()
    index = _read_config(model, "model_index.json")
    pipeline_class = str(index.get("_class_name", ""))
    auto = {
        "text2image": diffusers.AutoPipelineForText2Image,
        "image2image": diffusers.AutoPipelineForImage2Image,
        "inpaint": diffusers.AutoPipelineForInpainting,
    }[task]
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    scheduler = scheduler_for(model, pipeline_class, gamma)
    scheduler.noise_seed = noise_seed
    try:
        pipe = auto.from_pretrained(model, scheduler=scheduler, torch_dtype=dtype)
    except OSError as err:
        raise MissingModelError(f"could not load the weights of {model!r}: {err}") from None
    except ValueError as err:
        raise ValueError(f"{pipeline_class or model} cannot run {task}: {err}") from None
    if lora:
        try:
            pipe.load_lora_weights(lora)
        except OSError as err:
            raise MissingModelError(f"could not load the LoRA {lora!r}: {err}") from None
        pipe.fuse_lora()
    return pipe.to(device)


def _open_image(path: Path, what: str) -> Any:
    from PIL import Image

    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    return Image.open(path).convert("RGB")


def generate(request: GenerationRequest) -> Path:
    """Run one generation and write the image to ``request.output``; returns that path."""
    if request.mask is not None and request.image is None:
        raise ValueError("--mask needs --image (inpainting repaints the masked part of an image)")
    task = "inpaint" if request.mask is not None else "image2image" if request.image is not None else "text2image"
    noise_seed = request.seed + STEP_NOISE_SEED_OFFSET  # the step noise, for pipelines that pass no generator
    pipe = load_pipeline(request.model, request.gamma, task, request.lora, request.device, noise_seed)
    generator = torch.Generator(device="cpu").manual_seed(request.seed)
    kwargs: dict[str, Any] = {
        "prompt": request.prompt,
        "num_inference_steps": request.steps,
        "guidance_scale": request.guidance,
        "generator": generator,
    }
    accepted = set(_call_parameters(pipe))
    optional = {
        "negative_prompt": request.negative_prompt,
        "width": request.width,
        "height": request.height,
        "eta": request.gamma,
    }
    kwargs.update({k: v for k, v in optional.items() if v is not None and k in accepted})
    if request.image is not None:
        kwargs["image"] = _open_image(request.image, "--image")
        kwargs["strength"] = request.strength
        if request.width is None and request.height is None and "width" in accepted:
            kwargs["width"], kwargs["height"] = kwargs["image"].size
    if request.mask is not None:
        kwargs["mask_image"] = _open_image(request.mask, "--mask")
    image = pipe(**kwargs).images[0]
    request.output.parent.mkdir(parents=True, exist_ok=True)
    image.save(request.output)
    return request.output


def _call_parameters(pipe: Any) -> list[str]:
    return list(inspect.signature(pipe.__call__).parameters)
