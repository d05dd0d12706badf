"""A full (not LoRA) student as a diffusers model folder, written beside its place and renamed into it.

diffusers and peft are imported when called.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..._files import atomic_paths, folder_problem, replace_folder, storage_problem
from ._models import _is_a, _unwrap
from ._modes import give_plain_modes
from .card import CARD_NAME

if TYPE_CHECKING:
    from diffusers import ModelMixin

# what save_pretrained writes into a model folder (a folder holding only these, and a card, may be replaced)
_MODEL_FILES = re.compile(
    r"config\.json|diffusion_pytorch_model.*\.(safetensors|bin)(\.index\.json)?|" + re.escape(CARD_NAME)
)


def save_full_student(unet: ModelMixin | torch.nn.Module, output_dir: str | Path) -> Path:
    """Write a full (not LoRA) student as a diffusers model folder, ``config.json`` plus safetensors weights, which
    ``UNet2DConditionModel.from_pretrained(output_dir)`` (or the model's own class) loads.

    ``save_pretrained`` writes into a temporary folder beside ``output_dir``, which is then renamed onto it, so the
    folder is never half-written. An existing ``output_dir`` is replaced only when it holds nothing but what
    ``save_pretrained`` writes (and a card, which described the old student; write the new card afterwards): it is
    renamed aside, the new folder renamed into place, and the old one removed (a crash between the two renames
    leaves the old folder under a hidden name beside it, never a partial one). The folder and its files get the
    permissions a plain ``mkdir()`` and ``open()`` give under the umask (a replaced folder keeps its own mode).

    Args:
        unet: a diffusers model (``ModelMixin``) without peft adapters; DDP and ``torch.compile`` wrappers are looked
            through.
        output_dir: the model folder.

    Returns:
        The folder.

    Raises:
        TypeError: not a diffusers model.
        ValueError: the model carries peft adapters (save those with :func:`save_lora`, or merge them first).
        FileExistsError: ``output_dir`` holds other files.
        NotADirectoryError: ``output_dir`` is a file, or its parent cannot be written.
        OSError: a full disk, a quota or a read-only file system while writing (one line naming the folder).
    """
    from diffusers import ModelMixin
    from peft.tuners.tuners_utils import BaseTunerLayer

    model = _unwrap(unet)
    if not _is_a(model, ModelMixin):
        raise TypeError(f"unet must be a diffusers model (ModelMixin), got {type(model).__name__}")
    if getattr(model, "peft_config", None) or any(isinstance(m, BaseTunerLayer) for m in model.modules()):
        raise ValueError(
            "the model carries peft adapters; save them with save_lora, or merge them into the weights first "
            "(unet.fuse_lora() / peft's merge_and_unload) and remove the adapters"
        )
    target = Path(output_dir)
    if target.exists():
        if not target.is_dir():
            raise NotADirectoryError(f"cannot save the student in {target}: it is a file, not a folder")
        foreign = sorted(p.name for p in target.iterdir() if not _MODEL_FILES.fullmatch(p.name))
        if foreign:
            raise FileExistsError(
                f"{target} holds files that are not a diffusers model's ({', '.join(foreign[:5])}); "
                "choose an empty or new folder for the student"
            )
    parent = target.absolute().parent
    problem = folder_problem(parent)
    if problem:
        raise NotADirectoryError(f"cannot save the student in {target}: {problem}")
    parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent))
    try:
        model.save_pretrained(temp, safe_serialization=True)
        _plain_modes(temp, target)
        replace_folder(temp, target)
    except Exception as error:  # a full or read-only disk: one line naming the folder
        problem = storage_problem(error, parent)
        if problem is None:
            raise
        raise OSError(f"cannot write the student {target}: {problem}") from None
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return target


def _plain_modes(temp: Path, target: Path) -> None:
    """Give the finished folder ``temp`` and its files the modes a plain ``mkdir()`` and ``open()`` give under the
    umask (``mkdtemp`` makes 0700, safetensors writes 0600), or, for the folder, the mode of the ``target`` it
    replaces."""
    give_plain_modes(temp)
    if target.is_dir():
        os.chmod(temp, target.stat().st_mode & 0o7777)


def is_pixel_pipeline(pipe: Any) -> bool:
    """Whether ``pipe`` is nothing but a UNet and its scheduler (a pixel-space ``DDPMPipeline``), which
    :func:`save_pixel_pipeline` writes whole."""
    return set(pipe.components) <= {"unet", "scheduler"}


def save_pixel_pipeline(
    pipe: Any, unet: ModelMixin | torch.nn.Module, output_dir: str | Path, scheduler: Any = None
) -> Path:
    """Make ``output_dir`` a complete pixel-space pipeline (a ``DDPMPipeline``: ``unet/``, ``scheduler/``,
    ``model_index.json``) with ``unet`` in place of ``pipe``'s UNet, so that ``DiffusionPipeline.from_pretrained(
    output_dir)`` loads it (and it can teach the next run); other files in ``output_dir`` (checkpoints, the card) are
    left alone. ``unet/`` is written by :func:`save_full_student`, the scheduler folder the same way, and
    ``model_index.json`` last, atomically (each part is whole; a crash between them can leave a new ``unet/`` beside
    an older index).

    Args:
        pipe: the pipeline, whose components must be only ``unet`` and ``scheduler``.
        unet: the trained UNet (a diffusers model, no adapters).
        output_dir: the folder (created if missing).
        scheduler: the scheduler to write (a distilled student's own sampler); default None: ``pipe``'s.

    Raises:
        ValueError: ``pipe`` has other components (a VAE or text encoders: save the UNet with
            :func:`save_full_student`).
    """
    if not is_pixel_pipeline(pipe):
        components = sorted(pipe.components)
        raise ValueError(f"save_pixel_pipeline takes a pipeline of a UNet and a scheduler, not {components}")
    target = Path(output_dir)
    save_full_student(unet, target / "unet")
    temp = Path(tempfile.mkdtemp(prefix=".scheduler.", suffix=".tmp", dir=target))
    scheduler = pipe.scheduler if scheduler is None else scheduler
    try:
        scheduler.save_pretrained(temp)
        _plain_modes(temp, target / "scheduler")
        replace_folder(temp, target / "scheduler")
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    index = {key: list(value) if isinstance(value, tuple) else value for key, value in pipe.config.items()}
    index["_class_name"] = type(pipe).__name__
    index["scheduler"] = [type(scheduler).__module__.split(".")[0], type(scheduler).__name__]
    with atomic_paths(target / "model_index.json") as (tmp,):
        Path(tmp).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return target
