"""The models of a training run: what a local teacher pipeline is (read from its files before anything loads), the
pipeline, the student, its target and the optimizer, and their placement on the run's device.

A LoRA student and its teacher are one network: the teacher's passes are the student's with its adapters disabled
(:class:`AdaptersOff`, as diffusers' LCM-LoRA scripts do), so the frozen base is held once, in the run's precision,
and only the adapters (and their optimizer state) are float32. A full student is a float32 copy of the teacher, with
a float32 EMA copy as its target; the teacher is cast to the run's precision.

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

__all__ = [
    "ATTENTION_TARGETS",
    "LORA_TARGETS",
    "AdaptersOff",
    "Run",
    "TeacherFacts",
    "build_models",
    "load_pipeline",
    "lora_targets",
    "make_optimizer",
    "place",
    "run_dtype",
    "teacher_facts",
]

#: The modules a LoRA student adapts by default: the list of diffusers' LCM-LoRA training scripts, with which the
#: published LCM-LoRAs were trained (attention and feed-forward projections, the transformers' in/out projections,
#: the ResNet convolutions and time-embedding projections, the down/up-samplers): 196.8 M parameters at rank 64 on
#: SDXL, 67.5 M on SD1.5.
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")  # fmt: skip
#: The attention projections only (``--lora-targets attention``; this package's LoRAs before 0.2): 92.9 M
#: parameters at rank 64 on SDXL.
ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


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
        transformer_class: the class of its denoising transformer where it has one instead of a UNet (SD3's
            ``SD3Transformer2DModel``, FLUX's ``FluxTransformer2DModel``), else None.
    """

    text: bool | None = None
    unet_class: str | None = None
    in_channels: int | None = None
    num_class_embeds: int | None = None
    latent: bool | None = None
    transformer_class: str | None = None

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
        transformer_class=_component_class(index, "transformer") if "unet" not in index else None,
    )


def _component_class(index: dict[str, Any], name: str) -> str | None:
    """The class name ``model_index.json`` gives component ``name`` (``[library, class]``), or None."""
    entry = index.get(name)
    return str(entry[1]) if isinstance(entry, list) and len(entry) == 2 and entry[1] else None


class AdaptersOff:
    """A LoRA student's frozen base as the teacher: each call runs the network with its adapters disabled (diffusers'
    ``disable_adapters``/``enable_adapters``), so teacher and student share one copy of the base weights.

    Args:
        unet: the diffusers model carrying the adapters (unwrapped).
    """

    def __init__(self, unet: Any) -> None:
        self.module = unet  # what tcd_sampler.distill.teachers.network inspects, as it does a DDP wrapper

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.module.disable_adapters()
        try:
            return self.module(*args, **kwargs)
        finally:
            self.module.enable_adapters()


def run_dtype(mixed_precision: str | None) -> torch.dtype | None:
    """The dtype of the frozen weights under accelerate's ``mixed_precision`` (``"fp16"``, ``"bf16"``), or None
    (float32: no mixed precision)."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(str(mixed_precision))


@dataclass
class Run:
    """The models and the optimizer of a run.

    Attributes:
        student: the network trained (for the diffusion objective, the pipeline's own UNet; for a LoRA student, the
            pipeline's UNet with the adapters).
        target: the EMA target ``θ⁻`` (a full student, and the diffusion objective's result), or the student itself
            (a LoRA student).
        teacher: the frozen teacher: the pipeline's UNet (a full student), the student's base (a LoRA student,
            :class:`AdaptersOff`); None for the diffusion objective.
        optimizer: AdamW over ``trainable``.
        trainable: the parameters trained (float32).
        plain_class: a sharded target's class before sharding (what its export is built as); None unsharded.
    """

    student: Any
    target: Any
    teacher: Any
    optimizer: Any
    trainable: list[torch.nn.Parameter]
    plain_class: Any = None


def load_pipeline(teacher: str) -> Any:
    """The diffusers pipeline ``teacher`` (a folder or Hub id); ValueError when it has no UNet, or when a local
    folder's files differ from what its card records (a teacher trained here) or from the package's manifest (a
    shipped one): :func:`~tcd_sampler.integrations.pipelines.verify_local_files`."""
    from diffusers import DiffusionPipeline

    from ..integrations.pipelines import verify_local_files

    verify_local_files(teacher)
    pipe = DiffusionPipeline.from_pretrained(teacher)
    if not hasattr(pipe, "unet"):
        raise ValueError(f"teacher {teacher} is a {type(pipe).__name__}, not a UNet pipeline")
    return pipe


def lora_targets(config: TrainConfig) -> list[str]:
    """The module names a LoRA student of ``config`` adapts: ``config.lora_targets`` is ``"default"``
    (:data:`LORA_TARGETS`), ``"attention"`` (:data:`ATTENTION_TARGETS`) or the names themselves."""
    targets = config.lora_targets
    if isinstance(targets, str):
        return list({"default": LORA_TARGETS, "attention": ATTENTION_TARGETS}[targets])
    return list(targets)


def build_models(config: TrainConfig, pipe: Any, weight_dtype: torch.dtype | None = None) -> Run:
    """The student (a LoRA on the teacher's own network, or a full copy; for the diffusion objective the pipeline's
    UNet itself), its target and the optimizer (:func:`make_optimizer`).

    Args:
        config: the run.
        pipe: the teacher pipeline (float32, as loaded).
        weight_dtype: the dtype of the frozen weights (the teacher, a LoRA student's base; :func:`run_dtype`); None
            (default) leaves them float32. Trained parameters and the EMA target stay float32.
    """
    unet = pipe.unet
    if config.objective.method == "diffusion":
        student = unet.requires_grad_(True)
        target = copy.deepcopy(student).requires_grad_(False)
        trainable = list(student.parameters())
        return _run(config, student, target, None, trainable)
    unet.requires_grad_(False).eval()
    if config.lora_rank:  # one network: the base frozen in the run's precision, the adapters float32
        from peft import LoraConfig

        unet.to(weight_dtype)
        torch.manual_seed(config.seed)  # the LoRA's initial weights
        alpha = config.lora_alpha or config.lora_rank
        unet.add_adapter(LoraConfig(r=config.lora_rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                    target_modules=lora_targets(config)))  # fmt: skip
        trainable = [p for p in unet.parameters() if p.requires_grad]
        for p in trainable:
            p.data = p.data.float()
        return _run(config, unet, unet, AdaptersOff(unet), trainable)  # its own target, without gradients
    student = _guidance_conditioned(unet, config.objective.guidance_embedding_dim) or copy.deepcopy(unet)
    student.requires_grad_(True)
    target = copy.deepcopy(student).requires_grad_(False)  # the EMA of the student (as it starts)
    unet.to(weight_dtype)
    return _run(config, student, target, unet, list(student.parameters()))


def make_optimizer(config: TrainConfig, params: list[torch.nn.Parameter]) -> Any:
    """``config.optimizer`` over ``params`` at ``config.lr``: torch's AdamW, or bitsandbytes' 8-bit AdamW."""
    if config.optimizer == "adamw8bit":
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(params, lr=config.lr)
    return torch.optim.AdamW(params, lr=config.lr)


def _run(config: TrainConfig, student: Any, target: Any, teacher: Any, trainable: list[torch.nn.Parameter]) -> Run:
    if config.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    return Run(student.train(), target, teacher, make_optimizer(config, trainable), trainable)


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


def place(pipe: Any, run: Run, accelerator: Any, ema_device: str | None = None) -> None:
    """Move the models to the run's device and, with mixed precision, cast the text encoders to its dtype (the
    teacher was cast by :func:`build_models`; the VAE stays float32: SDXL's overflows in float16; the target stays
    float32, as the student). ``ema_device``: where a full student's EMA target goes instead (``"cpu"``); None
    (default): the run's device."""
    dtype = run_dtype(accelerator.mixed_precision)
    pipe.to(accelerator.device)
    if dtype is not None:
        for name in ("text_encoder", "text_encoder_2"):
            if getattr(pipe, name, None) is not None:
                getattr(pipe, name).to(dtype)
    run.student.to(accelerator.device)
    if run.target is not run.student:
        run.target.to(ema_device or accelerator.device)
