"""The models of a training run: what a local teacher pipeline is (read from its files before anything loads), the
pipeline, the student, its target and the optimizer, and their placement on the run's device.

diffusers and peft are imported when called.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .train_config import TrainConfig

__all__ = ["LORA_TARGETS", "Run", "TeacherFacts", "build_models", "load_pipeline", "place", "teacher_facts"]

#: The attention projections a LoRA student adapts (LCM-LoRA's).
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass(frozen=True)
class TeacherFacts:
    """What a local teacher pipeline folder is, from its ``model_index.json`` and ``unet/config.json`` (None where a
    fact cannot be read before loading: a Hub id).

    Attributes:
        text: whether it has a text encoder (captions condition it).
        unet_class: its UNet's class name (``UNet2DConditionModel``, ``UNet2DModel``).
        in_channels: the UNet's input channels (a pixel-space teacher's image channels).
        num_class_embeds: a class-conditional UNet's number of class embeddings (the classes and, last, the null
            class of classifier-free guidance).
        latent: whether it has a VAE (the UNet works on latents).
    """

    text: bool | None = None
    unet_class: str | None = None
    in_channels: int | None = None
    num_class_embeds: int | None = None
    latent: bool | None = None

    @property
    def null_class(self) -> int | None:
        """The class label of "no class" (classifier-free guidance's unconditional input): the last embedding."""
        return None if self.num_class_embeds is None else self.num_class_embeds - 1


def _json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    value = json.loads(path.read_text(encoding="utf-8"))
    return value if isinstance(value, dict) else None


def teacher_facts(teacher: str) -> TeacherFacts:
    """What the pipeline folder ``teacher`` is (all None for a Hub id or an unreadable folder)."""
    root = Path(teacher).expanduser()
    index = _json(root / "model_index.json")
    if index is None:
        return TeacherFacts()
    unet = _json(root / "unet" / "config.json") or {}
    classes = unet.get("num_class_embeds")
    return TeacherFacts(
        text="text_encoder" in index,
        unet_class=unet.get("_class_name"),
        in_channels=unet.get("in_channels"),
        num_class_embeds=int(classes) if isinstance(classes, int) and classes > 1 else None,
        latent="vae" in index,
    )


@dataclass
class Run:
    """The models and the optimizer of a run.

    Attributes:
        student: the network trained (for the diffusion objective, the pipeline's own UNet).
        target: the EMA target ``θ⁻`` (a full student, and the diffusion objective's result), or the student itself
            (a LoRA student).
        teacher: the frozen teacher UNet; None for the diffusion objective.
        optimizer: AdamW over ``trainable``.
        trainable: the parameters trained.
    """

    student: Any
    target: Any
    teacher: Any
    optimizer: Any
    trainable: list[torch.nn.Parameter]


def load_pipeline(teacher: str) -> Any:
    """The diffusers pipeline ``teacher`` (a folder or Hub id); ValueError when it has no UNet."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(teacher)
    if not hasattr(pipe, "unet"):
        raise ValueError(f"teacher {teacher} is a {type(pipe).__name__}, not a UNet pipeline")
    return pipe


def build_models(config: TrainConfig, pipe: Any) -> Run:
    """The student (a LoRA on a copy of the teacher, or a full copy; for the diffusion objective the pipeline's UNet
    itself), its target and the optimizer."""
    if config.objective.method == "diffusion":
        student = pipe.unet.requires_grad_(True)
        target = copy.deepcopy(student).requires_grad_(False)
        trainable = list(student.parameters())
        return Run(student.train(), target, None, torch.optim.AdamW(trainable, lr=config.lr), trainable)
    teacher = pipe.unet.requires_grad_(False).eval()
    student = _guidance_conditioned(teacher, config.objective.guidance_embedding_dim) or copy.deepcopy(teacher)
    if config.lora_rank:
        from peft import LoraConfig

        torch.manual_seed(config.seed)  # the LoRA's initial weights
        alpha = config.lora_alpha or config.lora_rank
        student.add_adapter(LoraConfig(r=config.lora_rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                       target_modules=list(LORA_TARGETS)))  # fmt: skip
        target = student  # its own target: evaluated without gradients
    else:
        student.requires_grad_(True)
        target = copy.deepcopy(student).requires_grad_(False)  # the EMA of the student (as it starts)
    trainable = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr)
    return Run(student.train(), target, teacher, optimizer, trainable)


def _guidance_conditioned(teacher: Any, dim: int) -> Any:
    """A copy of ``teacher`` that also takes a guidance-scale embedding of width ``dim`` (``time_cond_proj_dim``;
    the new projection starts at zero, so the student starts as the teacher), or None when ``dim`` is 0."""
    if not dim:
        return None
    if getattr(teacher.config, "time_cond_proj_dim", None) is not None:
        raise ValueError("the teacher's UNet already takes a guidance embedding (time_cond_proj_dim); distill it "
                         "with guidance_embedding_dim=0")  # fmt: skip
    student = type(teacher).from_config({**teacher.config, "time_cond_proj_dim": dim})
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    if unexpected or any(not name.startswith("time_embedding.cond_proj") for name in missing):
        raise ValueError(f"the guidance-conditioned student does not take the teacher's weights ({missing[:3]})")
    torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
    return student.to(next(teacher.parameters()).dtype)


def place(pipe: Any, run: Run, accelerator: Any) -> None:
    """Move the frozen models to the run's device and, with mixed precision, cast the teacher and the text encoders
    to its dtype (the VAE stays float32: SDXL's overflows in float16; the target stays float32, as the student)."""
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(str(accelerator.mixed_precision))
    pipe.to(accelerator.device)
    if dtype is not None:
        if run.teacher is not None:
            run.teacher.to(dtype)
        for name in ("text_encoder", "text_encoder_2"):
            if getattr(pipe, name, None) is not None:
                getattr(pipe, name).to(dtype)
    if run.target is not run.student:
        run.target.to(accelerator.device)
