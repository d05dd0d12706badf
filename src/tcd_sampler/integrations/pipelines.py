"""Loading a diffusers pipeline with the right TCD scheduler, and generating images with it (``tcd-sampler generate``).

The pipeline class comes from the model's ``model_index.json`` through diffusers' auto pipelines (text-to-image,
image-to-image or inpainting); the scheduler kind from the model's own scheduler config: flow-matching models
(SD3, FLUX) get :class:`FlowMatchTCDScheduler`, discrete VP models (SD1.5, SD2.1, SDXL) get :class:`TCDScheduler`,
and LCM pipelines get it in consistency-boundary mode.

:func:`generate` checks everything it can before it loads a model (:func:`prepare_request`: the input images, the
output path, the device, the LoRA, the number of image-to-image steps) and writes its image atomically.
"""

from __future__ import annotations

import importlib.util
import inspect
import io
import math
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .._files import atomic_paths, folder_problem
from ..schedulers.config_file import config_family, load_config_file
from ..schedulers.flow import FlowMatchTCDScheduler as FlowMatchScheduler

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
]

#: Pipelines whose model is LCM-distilled: TCD runs them with the consistency boundary condition.
LCM_PIPELINES = ("LatentConsistencyModelPipeline", "LatentConsistencyModelImg2ImgPipeline")

#: Offset of the step-noise generator's seed from the latent generator's, so the two streams differ.
STEP_NOISE_SEED_OFFSET = 0x5EED

#: Image extensions named in error messages (those of them Pillow can write here).
COMMON_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tiff")

#: File extensions that mark a ``--lora`` as a local file rather than a Hub id.
LORA_FILE_EXTENSIONS = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


class MissingModelError(RuntimeError):
    """The model (or one of its files) is neither on disk nor obtainable from the Hugging Face Hub."""


@dataclass(frozen=True)
class GenerationRequest:
    """What ``tcd-sampler generate`` was asked for (see its ``--help`` for each field).

    Attributes:
        model: a local diffusers model folder or a Hub repo id.
        prompt: the text prompt.
        output: the image file to write (its extension picks the format; missing folders are created).
        negative_prompt: only used with ``guidance`` > 1. Default None.
        lora: a LoRA (folder, file or Hub id) to load and fuse. Default None.
        steps: number of model calls (image-to-image: before ``strength`` cuts them). Default 4.
        gamma: TCD's gamma (``eta``) in [0, 1]. Default 0.3.
        guidance: classifier-free guidance scale; 0 turns it off. Default 0.
        seed: the seed of the initial noise (the step noise uses ``seed + STEP_NOISE_SEED_OFFSET``). Default 0.
        width, height: the image size; default the model's, or the input image's with ``image``.
        image: an input image for image-to-image, or inpainting with ``mask``. Default None.
        strength: how much of ``image`` to redraw, in (0, 1]. Default 0.8.
        mask: an inpainting mask the size of ``image`` (white = repaint). Default None.
        device: a torch device string; default CUDA when available, else CPU.
    """

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


@dataclass(frozen=True)
class PreparedRequest:
    """A checked :class:`GenerationRequest` with its inputs read (what :func:`prepare_request` returns).

    Attributes:
        task: ``text2image``, ``image2image`` or ``inpaint``.
        device: the resolved torch device string.
        image: the input image (RGB, EXIF orientation applied) or None.
        mask: the inpainting mask (greyscale) or None.
        image_format: the Pillow format name the output is written in (from its extension).
    """

    task: str
    device: str
    image: Any = None
    mask: Any = None
    image_format: str = "PNG"


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


def check_device(device: str | None, option: str = "--device") -> str:
    """``device`` as a torch device string that can run here (default: ``cuda`` when available, else ``cpu``).

    Raises ValueError naming ``option`` when ``device`` is not a torch device string (``cpu``, ``cuda``,
    ``cuda:1``, ``mps`` …), when its backend is not available in this torch build or machine, or when a CUDA index
    is out of range."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(
            f"{option} {device!r} is not a torch device; use cpu, cuda, cuda:N or mps (default: cuda if available)"
        ) from None
    kind = parsed.type
    if kind == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"{option} {device}: CUDA is not available here ({why}); use --device cpu")
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise ValueError(f"{option} {device}: there are {count} CUDA device(s), indices 0 to {count - 1}")
    elif kind == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"{option} {device}: MPS is not available here (it needs Apple silicon); use --device cpu")
    elif kind == "meta":
        raise ValueError(f"{option} meta holds no data and cannot run a model; use cpu, cuda or mps")
    elif kind != "cpu":
        backend = getattr(torch, kind, None)
        available = getattr(backend, "is_available", None)
        if callable(available) and not available():
            raise ValueError(f"{option} {device}: the {kind} backend is not available here; use --device cpu")
    return device


def check_output_image(path: Path, option: str = "--output") -> str:
    """The Pillow format ``path`` will be written in; raises ValueError naming ``option`` when it cannot be.

    Checks that ``path`` is not a folder, that its extension is one Pillow can write an RGB image in (by encoding
    a tiny image), and that its folder (created if missing) can take a new file (:func:`folder_problem`)."""
    from PIL import Image

    if path.is_dir():
        raise ValueError(f"{option} {path} is a folder; pass an image file path such as {path / 'tcd.png'}")
    Image.init()
    writable = sorted(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.SAVE)
    examples = ", ".join(e for e in COMMON_IMAGE_EXTENSIONS if e in writable)
    ext = path.suffix.lower()
    if not ext:
        raise ValueError(f"{option} {path} has no file extension; the extension picks the format, e.g. {examples}")
    image_format = Image.registered_extensions().get(ext)
    if image_format not in Image.SAVE:
        raise ValueError(f"{option} {path}: Pillow cannot write {ext!r} files; use an image extension: {examples}")
    try:
        Image.new("RGB", (8, 8)).save(io.BytesIO(), format=image_format)
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(
            f"{option} {path}: Pillow cannot write an RGB image as {image_format} ({err}); use e.g. {examples}"
        ) from None
    problem = folder_problem(path.parent)
    if problem:
        raise ValueError(f"{option} {path}: {problem}")
    return str(image_format)


def _open_image(path: Path, option: str, mode: str) -> Any:
    """The image at ``path`` fully decoded (EXIF orientation applied, converted to ``mode``), else an error naming
    ``option``: FileNotFoundError when there is no such file, ValueError when it is not a readable image."""
    from PIL import Image, ImageOps

    if not path.exists():
        raise FileNotFoundError(f"{option} {path} does not exist")
    if not path.is_file():
        raise ValueError(f"{option} {path} is not a file")
    try:
        with Image.open(path) as opened:
            opened.load()  # decodes it all: truncated and corrupt files fail here, not in the pipeline
            return ImageOps.exif_transpose(opened).convert(mode)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(
            f"{option} {path} is not a readable image ({err}); pass a PNG, JPEG, WebP or another file Pillow can open"
        ) from None


def _model_configs(model: str) -> tuple[str, dict[str, Any]]:
    """The model's pipeline class (``model_index.json``) and its scheduler config, read from two small JSON files
    (local, or fetched from the Hub) without loading any weights."""
    index = _read_config(model, "model_index.json")
    scheduler = _read_config(model, "scheduler_config.json", "scheduler")
    return str(index.get("_class_name", "")), scheduler


def minimum_strength(steps: int) -> float:
    """The smallest ``strength`` for which ``int(steps * strength) ≥ 1``: diffusers' SD/SDXL/LCM image-to-image and
    inpainting pipelines run ``int(steps · strength)`` steps. Usually ``1/steps``; one float up where that rounds
    down (``49 · (1/49) < 1``)."""
    minimum = 1.0 / steps
    while int(steps * minimum) < 1:
        minimum = math.nextafter(minimum, 2.0)
    return minimum


def _min_steps(strength: float, max_steps: int) -> int | None:
    """The fewest steps up to ``max_steps`` for which ``int(steps * strength) ≥ 1``; None when there are none."""
    if strength * max_steps < 1:
        return None
    steps = max(1, math.floor(1.0 / strength))
    while int(steps * strength) < 1:  # at most a step or two past 1/strength
        steps += 1
    return steps if steps <= max_steps else None


def _check_steps_and_strength(steps: int, strength: float | None, max_steps: int) -> None:
    """ValueError naming ``--steps`` (and ``--strength``) when a discrete-VP run cannot be made: more steps than
    the distillation grid has, or an image-to-image run of ``int(steps · strength) = 0`` steps."""
    if steps > max_steps:
        raise ValueError(
            f"--steps {steps}: TCD takes its timesteps from the model's {max_steps}-point distillation grid "
            f"(original_inference_steps); use at most {max_steps}"
        )
    if strength is None or int(steps * strength) >= 1:
        return
    fewest = _min_steps(strength, max_steps)
    more = (
        f"or more --steps: at least {fewest} for --strength {strength}"
        if fewest is not None
        else f"no step count up to {max_steps} helps below --strength {minimum_strength(max_steps):.4g}"
    )
    raise ValueError(
        f"--strength {strength} with --steps {steps} runs int({steps} × {strength}) = 0 denoising steps: "
        f"image-to-image and inpainting need --strength ≥ 1/{steps} ≈ {minimum_strength(steps):.4g} for {steps} "
        f"steps ({more})"
    )


def _check_lora(lora: str) -> None:
    """A local LoRA must exist; a LoRA needs peft. Raises FileNotFoundError / ImportError naming ``--lora``."""
    path = Path(lora).expanduser()
    looks_local = (
        path.is_absolute() or lora.startswith((".", "~")) or lora.count("/") != 1 or lora.endswith(LORA_FILE_EXTENSIONS)
    )
    if not path.exists() and looks_local:
        raise FileNotFoundError(
            f"--lora {lora} does not exist; pass a LoRA file (.safetensors), a folder with one or a Hub id (org/name)"
        )
    if importlib.util.find_spec("peft") is None:
        raise ImportError("--lora needs peft (diffusers loads LoRAs with it): pip install 'tcd-sampler[diffusers]'")


def prepare_request(request: GenerationRequest) -> PreparedRequest:
    """Check ``request`` without loading a model, and read its input images.

    Raises ValueError, FileNotFoundError or ImportError with a message naming the ``tcd-sampler generate`` option
    at fault: ``--mask`` without ``--image``; a missing or unreadable ``--image`` / ``--mask``; a mask whose size is
    not the image's; an input image whose size (the output size unless ``--width``/``--height`` are given) is not a
    multiple of 8; an ``--output`` that is a folder, has no or an unwritable extension, or lies in a folder that
    cannot be written; a ``--device`` that is not a torch device or not available; a local ``--lora`` that does not
    exist, or a LoRA without peft installed; diffusers not installed."""
    if importlib.util.find_spec("diffusers") is None:
        raise ImportError("tcd-sampler generate needs diffusers: pip install 'tcd-sampler[diffusers]'")
    if request.mask is not None and request.image is None:
        raise ValueError("--mask needs --image (inpainting repaints the masked part of an image)")
    image_format = check_output_image(Path(request.output))
    device = check_device(request.device)
    if request.lora:
        _check_lora(request.lora)
    image = mask = None
    if request.image is not None:
        image = _open_image(Path(request.image), "--image", "RGB")
        width, height = image.size
        unsized = [name for name, value in (("width", request.width), ("height", request.height)) if value is None]
        if (request.width is None and width % 8) or (request.height is None and height % 8):
            raise ValueError(
                f"--image {request.image} is {width}x{height}: the output takes its {' and '.join(unsized)}, which "
                "must be a multiple of 8; pass --width and --height (multiples of 8) to resize it"
            )
    if request.mask is not None:
        mask = _open_image(Path(request.mask), "--mask", "L")
        if image is not None and mask.size != image.size:
            raise ValueError(
                f"--mask {request.mask} is {mask.size[0]}x{mask.size[1]} but --image {request.image} is "
                f"{image.size[0]}x{image.size[1]}: the mask must have the image's size (white = repaint)"
            )
    task = "inpaint" if mask is not None else "image2image" if image is not None else "text2image"
    return PreparedRequest(task=task, device=device, image=image, mask=mask, image_format=image_format)


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
