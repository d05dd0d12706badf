"""Loading a diffusers pipeline with the right TCD scheduler, and generating images with it (``tcd-sampler generate``).

The pipeline class comes from the model's ``model_index.json`` through diffusers' auto pipelines (text-to-image,
image-to-image or inpainting); the scheduler kind from the model's own scheduler config: flow-matching models
(SD3, FLUX) get :class:`FlowMatchTCDScheduler`, discrete VP models (SD1.5, SD2.1, SDXL) get :class:`TCDScheduler`,
and LCM pipelines get it in consistency-boundary mode.

:func:`generate` checks everything it can before it loads a model (:func:`prepare_request`: the input images, the
output path, the device, the LoRA, the number of image-to-image steps) and writes its image atomically. The request
and those checks live in :mod:`tcd_sampler.integrations.request`; this module re-exports them.
"""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .._files import atomic_paths
from ..schedulers.config_file import config_family, load_config_file
from ..schedulers.flow import FlowMatchTCDScheduler as FlowMatchScheduler
from .request import (
    GenerationRequest,
    PreparedRequest,
    _check_steps_and_strength,
    check_device,
    check_output_image,
    minimum_strength,
    prepare_request,
)

__all__ = [
    "GenerationRequest",
    "MissingModelError",
    "PreparedRequest",
    "check_device",
    "check_output_image",
    "generate",
    "hub_error_message",
    "load_pipeline",
    "minimum_strength",
    "prepare_request",
    "scheduler_for",
    "verify_local_files",
]

#: Pipelines whose model is LCM-distilled: TCD runs them with the consistency boundary condition.
LCM_PIPELINES = ("LatentConsistencyModelPipeline", "LatentConsistencyModelImg2ImgPipeline")

#: Offset of the step-noise generator's seed from the latent generator's, so the two streams differ.
STEP_NOISE_SEED_OFFSET = 0x5EED


class MissingModelError(RuntimeError):
    """The model (or one of its files) is neither on disk nor obtainable from the Hugging Face Hub."""


def _diffusers() -> Any:
    try:
        import diffusers
    except ImportError:
        raise ImportError("tcd-sampler generate needs diffusers: pip install 'tcd-sampler[diffusers]'") from None
    return diffusers


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() not in ("0", "", "false", "no", "off")


def hub_error_message(repo: str, what: str, err: BaseException, hint: str) -> str:
    """One line saying why the file ``what`` of the Hub repo ``repo`` could not be fetched (``err``), ending with
    ``hint`` (what to pass instead). When the Hub is unreachable it suggests ``HF_HUB_OFFLINE=1``."""
    names = {cls.__name__ for cls in type(err).__mro__}
    fetch = f"{repo!r} is not a local path and its {what} could not be fetched from the Hugging Face Hub"
    if _hub_offline():
        return f"{fetch} (HF_HUB_OFFLINE is set and it is not in the local cache): {hint}."
    if names & {"GatedRepoError", "RepositoryNotFoundError", "RevisionNotFoundError"}:
        return (
            f"{fetch}: the Hub has no such repo, or it is private or gated ({type(err).__name__}); check the id, "
            f"log in with `hf auth login` for a private or gated repo, or {hint}."
        )
    remote_missing = "EntryNotFoundError" in names and "LocalEntryNotFoundError" not in names
    if remote_missing or "RemoteEntryNotFoundError" in names:
        return f"{fetch}: the repo has no such file; {hint}."
    return (
        f"{fetch}: the Hub is unreachable ({type(err).__name__}). Without network access set HF_HUB_OFFLINE=1 to use "
        f"only the local Hugging Face cache (no retries), or {hint}."
    )


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
        what = f"{subfolder + '/' if subfolder else ''}{name}"
        hint = f"pass --model a local diffusers model folder (e.g. one made by `hf download {model} --local-dir DIR`)"
        raise MissingModelError(f"model {hub_error_message(model, what, err, hint)}") from None


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


def _model_configs(model: str) -> tuple[str, dict[str, Any]]:
    """The model's pipeline class (``model_index.json``) and its scheduler config, read from two small JSON files
    (local, or fetched from the Hub) without loading any weights."""
    index = _read_config(model, "model_index.json")
    scheduler = _read_config(model, "scheduler_config.json", "scheduler")
    return str(index.get("_class_name", "")), scheduler


#: diffusers' legacy scheduler-config FutureWarnings of the Stable Diffusion pipelines that are wrong for our
#: schedulers: the pipelines force ``steps_offset=1`` and ``skip_prk_steps=True`` (a PNDM key) into the config,
#: and our schedulers keep such foreign keys without applying them, so the advice and the "incorrect results"
#: they warn of do not apply. (The ``clip_sample`` check is left alone: TCD does clip when it is True.)
LEGACY_SCHEDULER_WARNINGS = r"(?s).*`(steps_offset|skip_prk_steps)` should be set to"


@contextmanager
def _quiet_legacy_scheduler_checks() -> Iterator[None]:
    """Silence exactly the FutureWarnings matched by :data:`LEGACY_SCHEDULER_WARNINGS` while a pipeline is built;
    nothing else is filtered, and only inside the block."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=LEGACY_SCHEDULER_WARNINGS, category=FutureWarning)
        yield


def _dtype_keyword() -> str:
    """``from_pretrained``'s dtype keyword: ``dtype`` where diffusers has it (``torch_dtype`` is deprecated there,
    with a FutureWarning), else ``torch_dtype`` (older versions ignore ``dtype``)."""
    try:
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401  (the versions that take dtype)
    except ImportError:
        return "torch_dtype"
    return "dtype"


def verify_local_files(path: str | Path) -> None:
    """Check a local model or LoRA (a folder, or a file in one) before it loads: a shipped file against the
    package's manifest (:func:`tcd_sampler.assets.verify`), a trainer's result against the ``files`` its
    ``card.json`` records (:func:`~tcd_sampler.distill.export.verify_card_files`). Hub ids and folders without a
    tcd-sampler card pass unchecked.

    Raises:
        ValueError: a file is damaged (the message names it).
    """
    from ..assets import verify
    from ..distill.export.card import verify_card_files

    local = Path(path)
    if not local.exists():
        return  # a Hub id
    verify(local)
    if local.is_dir():
        verify_card_files(local)
    else:
        verify_card_files(local.parent, only=[local.name])


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
        lora: a LoRA (folder, file or repo id) to load and fuse, e.g. ``h1t/TCD-SDXL-LoRA``; one whose card records
            its files' checksums (a ``tcd-sampler train`` output) is checked first (:func:`verify_local_files`).
            Default None.
        device: where to run (checked by :func:`check_device`); default CUDA when available (float16 for UNet
            models, bfloat16 for flow transformers such as FLUX and SD3), else CPU (float32).
        noise_seed: the scheduler's :attr:`~tcd_sampler.TCDScheduler.noise_seed`: the seed of the step noise of
            every call that passes no generator to the step (flow pipelines never do), so that two calls with the
            same pipeline generator give the same image. None: torch's global RNG. Default 0.
    """
    diffusers = _diffusers()
    device = check_device(device)
    index = _read_config(model, "model_index.json")
    pipeline_class = str(index.get("_class_name", ""))
    auto = {
        "text2image": diffusers.AutoPipelineForText2Image,
        "image2image": diffusers.AutoPipelineForImage2Image,
        "inpaint": diffusers.AutoPipelineForInpainting,
    }[task]
    scheduler = scheduler_for(model, pipeline_class, gamma)
    flow = isinstance(scheduler, FlowMatchScheduler)
    # half precision on CUDA: bfloat16 for flow transformers (FLUX overflows in float16), float16 for UNets
    dtype = (torch.bfloat16 if flow else torch.float16) if device.startswith("cuda") else torch.float32
    scheduler.noise_seed = noise_seed
    verify_local_files(model)
    if lora:
        verify_local_files(lora)
    try:
        with _quiet_legacy_scheduler_checks():
            pipe = auto.from_pretrained(model, scheduler=scheduler, **{_dtype_keyword(): dtype})
    except OSError as err:
        raise MissingModelError(f"could not load the weights of {model!r}: {err}") from None
    except ValueError as err:
        raise ValueError(f"{pipeline_class or model} cannot run {task}: {err}") from None
    if lora:
        if not hasattr(pipe, "load_lora_weights"):
            raise ValueError(f"--lora: {type(pipe).__name__} cannot load LoRAs")
        try:
            pipe.load_lora_weights(lora)
        except OSError as err:
            raise MissingModelError(f"could not load the LoRA {lora!r}: {err}") from None
        except Exception as err:  # safetensors' and peft's own errors: a file that is not a LoRA for this model
            raise ValueError(f"could not load the LoRA {lora!r} into {type(pipe).__name__}: {err}") from None
        pipe.fuse_lora()
    return pipe.to(device)


def generate(request: GenerationRequest) -> Path:
    """Run one generation and write the image to ``request.output`` (atomically: a temporary file in the same
    folder, moved into place once complete); returns that path.

    Everything checkable is checked before the model is loaded (:func:`prepare_request`), then the model's
    ``model_index.json`` and scheduler config are read to check the step count against the distillation grid and
    that image-to-image runs at least one step."""
    prepared = prepare_request(request)
    _, scheduler_config = _model_configs(request.model)
    if config_family(scheduler_config) != "flow":  # flow pipelines (SD3, FLUX) take any count, and round strength up
        strength = request.strength if prepared.task != "text2image" else None
        grid = scheduler_config.get("original_inference_steps", 50)
        _check_steps_and_strength(request.steps, strength, grid if isinstance(grid, int) and grid > 0 else 50)
    noise_seed = request.seed + STEP_NOISE_SEED_OFFSET  # the step noise, for pipelines that pass no generator
    pipe = load_pipeline(request.model, request.gamma, prepared.task, request.lora, prepared.device, noise_seed)
    generator = torch.Generator(device="cpu").manual_seed(request.seed)
    kwargs: dict[str, Any] = {
        "prompt": request.prompt,
        "num_inference_steps": request.steps,
        "guidance_scale": request.guidance,
        "generator": generator,
    }
    accepted = set(_call_parameters(pipe))
    width, height = request.width, request.height
    if prepared.image is not None:
        kwargs["image"] = prepared.image
        kwargs["strength"] = request.strength
        width, height = width or prepared.image.size[0], height or prepared.image.size[1]
    if prepared.mask is not None:
        kwargs["mask_image"] = prepared.mask
    optional = {"negative_prompt": request.negative_prompt, "width": width, "height": height, "eta": request.gamma}
    kwargs.update({k: v for k, v in optional.items() if v is not None and k in accepted})
    image = pipe(**kwargs).images[0]
    output = Path(request.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_paths(output) as (temp,):
        image.save(temp, format=prepared.image_format)
    return output


def _call_parameters(pipe: Any) -> list[str]:
    return list(inspect.signature(pipe.__call__).parameters)
