"""What ``tcd-sampler generate`` is asked for, and every check that can run before a model is loaded.

:class:`GenerationRequest` is the request; :func:`prepare_request` checks it without loading a model (the output
path and its format, the device, the LoRA, the input image and mask) and returns a :class:`PreparedRequest` with the
input images read. The checks that need the model's scheduler config (the number of steps against the distillation
grid, and image-to-image runs of at least one step: :func:`minimum_strength`) are here too; :func:`generate
<tcd_sampler.integrations.pipelines.generate>` runs them once it has read that config.
"""

from __future__ import annotations

import importlib.util
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .._files import folder_problem
from .._images import deep_to_8bit

__all__ = [
    "GenerationRequest",
    "PreparedRequest",
    "check_device",
    "check_output_image",
    "minimum_strength",
    "prepare_request",
]

#: Image extensions named in error messages (those of them Pillow can write here).
COMMON_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tiff")

#: File extensions that mark a ``--lora`` as a local file rather than a Hub id.
LORA_FILE_EXTENSIONS = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


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
            image = ImageOps.exif_transpose(opened)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(
            f"{option} {path} is not a readable image ({err}); pass a PNG, JPEG, WebP or another file Pillow can open"
        ) from None
    # 16-bit, 32-bit and float grey by their range (convert would clip them at 255); ValueError naming the file
    return deep_to_8bit(image, f"{option} {path}").convert(mode)


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
