"""TCD (or LCM) distillation of a diffusers text-to-image pipeline's UNet, LoRA or full, on accelerate.

:func:`train` loads the teacher pipeline, scans the data (folder sources, before any model loads), and runs the
objective of :mod:`tcd_sampler.distill.objective` under an ``accelerate.Accelerator`` (one process, or many under
``accelerate launch``: DDP, mixed precision, gradient accumulation). Every step is a function of the step number
alone — the global batch is the step's slice of a seeded permutation of the data, its draws come from a generator
seeded with ``(seed, step)`` and each process takes its rows of both — so a run with 2 processes ends with the
weights of 1 process with the whole batch, and a run resumed from a checkpoint with those of an uninterrupted one.
Checkpoints (the student's trainable weights, the EMA target, the optimizer, the step) are written to a temporary
folder and renamed, every ``checkpoint_every`` steps.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..schedulers.config_file import looks_local
from .checkpoints import load_checkpoint, save_checkpoint
from .data import DataOptions, ImageCaptionDataset, collate
from .export import save_full_student, save_lora, scheduler_settings, write_card
from .losses import ema_update
from .objective import batch_loss, draw
from .teachers import Conditioning, teacher_path
from .train_config import TrainConfig
from .validation import validation_grid

__all__ = ["TrainConfig", "train"]

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass
class _Run:
    """The models and the optimizer of a run."""

    student: Any
    target: Any
    teacher: Any
    optimizer: Any
    trainable: list[torch.nn.Parameter]


def _pipeline(teacher: str) -> Any:
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(teacher)
    if not hasattr(pipe, "unet"):
        raise ValueError(f"teacher {teacher} is a {type(pipe).__name__}, not a UNet pipeline")
    return pipe


def _place(pipe: Any, run: _Run, accelerator: Any) -> None:
    """Move the frozen models to the run's device and, with mixed precision, cast the teacher and the text encoders
    to its dtype (the VAE stays float32: SDXL's overflows in float16; the target stays float32, as the student)."""
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(str(accelerator.mixed_precision))
    pipe.to(accelerator.device)
    if dtype is not None:
        run.teacher.to(dtype)
        for name in ("text_encoder", "text_encoder_2"):
            if getattr(pipe, name, None) is not None:
                getattr(pipe, name).to(dtype)
    if run.target is not run.student:
        run.target.to(accelerator.device)


def _text_conditioned(teacher: str) -> bool | None:
    """Whether a local teacher pipeline has a text encoder (its ``model_index.json``); None where it cannot be read
    before loading (a Hub id)."""
    index = Path(teacher).expanduser() / "model_index.json"
    if not index.is_file():
        return None
    return "text_encoder" in json.loads(index.read_text(encoding="utf-8"))


def _models(config: TrainConfig, pipe: Any) -> _Run:
    teacher = pipe.unet.requires_grad_(False).eval()
    student = copy.deepcopy(teacher)
    if config.lora_rank:
        from peft import LoraConfig

        torch.manual_seed(config.seed)  # the LoRA's initial weights
        alpha = config.lora_alpha or config.lora_rank
        student.add_adapter(LoraConfig(r=config.lora_rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                       target_modules=list(LORA_TARGETS)))  # fmt: skip
        target = student  # its own target: evaluated without gradients
    else:
        student.requires_grad_(True)
        target = copy.deepcopy(teacher)
    trainable = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr)
    return _Run(student.train(), target, teacher, optimizer, trainable)


def _conditions(pipe: Any, captions: list[str], batch: dict[str, Any], device: Any) -> tuple[Any, Any]:
    """The text conditions (and SDXL's added ones) of ``captions`` and of the empty prompt."""
    with torch.no_grad():
        if not hasattr(pipe, "encode_prompt"):  # an unconditional UNet2DModel: no text, no guidance
            return Conditioning(), Conditioning()
        if hasattr(pipe, "text_encoder_2"):  # SDXL
            # no negative prompt: the pipeline's own unconditional input (zeros with force_zeros_for_empty_prompt)
            embeds, neg, pooled, neg_pooled = pipe.encode_prompt(captions, device=device)
            r = batch["pixel_values"].shape[-1]
            sizes = zip(batch["original_size"], batch["crop_top_left"], strict=True)
            ids = torch.tensor([[*o, *c, r, r] for o, c in sizes], dtype=embeds.dtype, device=device)
            return (
                Conditioning(embeds, {"text_embeds": pooled, "time_ids": ids}),
                Conditioning(neg, {"text_embeds": neg_pooled, "time_ids": ids}),
            )
        embeds, neg = pipe.encode_prompt(captions, device, 1, True, [""] * len(captions))
        return Conditioning(embeds), Conditioning(neg)


def _latents(pipe: Any, pixels: torch.Tensor) -> torch.Tensor:
    if getattr(pipe, "vae", None) is None:  # a pixel-space teacher: the images themselves
        return pixels
    with torch.no_grad():
        return pipe.vae.encode(pixels.to(pipe.vae.dtype)).latent_dist.mode() * pipe.vae.config.scaling_factor


def _order(n: int, step: int, batch: int, seed: int) -> list[tuple[int, int]]:
    """The ``(dataset index, epoch)`` of each row of the global batch of ``step``: consecutive slices of a
    permutation seeded per epoch."""
    out: list[tuple[int, int]] = []
    start = step * batch
    while len(out) < batch:
        epoch, offset = divmod(start + len(out), n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch)).tolist()
        out.extend((i, epoch) for i in perm[offset : offset + batch - len(out)])
    return out


def _sample(dataset: Any, index: int, epoch: int) -> Any:
    """Sample ``index`` as drawn in ``epoch`` (its random crop, flip and caption dropout are seeded by the epoch)."""
    dataset.set_epoch(epoch)
    return dataset[index]


def _card(config: TrainConfig, teacher_config: Any, T: int, world: int, losses: list[float], prediction: str) -> Any:
    """The run's card: its configuration, processes, losses, and how to sample the student (TCD at γ = 0.3 on the
    distillation grid; an LCM student in the consistency-boundary mode at η = 1)."""
    extra: dict[str, Any] = {}
    if config.objective.method == "lcm":
        extra = {"consistency_boundary": True, "timestep_scaling": config.objective.timestep_scaling}
    scheduler = scheduler_settings(
        teacher_config, eta=1.0 if extra else 0.3, original_inference_steps=T // config.objective.skip, **extra
    )
    return {"config": json.loads(json.dumps(asdict(config), default=str)), "steps": config.steps, "processes": world,
            "losses": losses, "prediction_type": prediction, "scheduler": scheduler}  # fmt: skip


def _save_student(student: Any, run: _Run, config: TrainConfig) -> None:
    """The usable result in ``config.output``: the LoRA (diffusers' and ComfyUI's formats), or the full student's
    EMA target as a diffusers model folder (``unet/``)."""
    if config.lora_rank:
        save_lora(student, config.output)
    else:
        save_full_student(run.target, Path(config.output) / "unet")


def _rows(tensor: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    return tensor[lo:hi]


def _step(
    config: TrainConfig, accelerator: Any, run: _Run, path: Any, prediction_type: str, latents: torch.Tensor,
    cond: Conditioning, uncond: Conditioning, draws: Any,
) -> torch.Tensor:  # fmt: skip
    """One optimizer step on this process's rows, in ``config.gradient_accumulation`` equal micro-batches (gradients
    synchronised across processes on the last); returns the rows' mean loss (detached)."""
    n = config.gradient_accumulation
    size = latents.shape[0] // n
    target = run.target if config.lora_rank == 0 else accelerator.unwrap_model(run.student)
    run.optimizer.zero_grad()
    total = torch.zeros((), device=latents.device)
    for j in range(n):
        lo, hi = j * size, (j + 1) * size
        sync = contextlib.nullcontext() if j == n - 1 else accelerator.no_sync(run.student)
        with sync:
            part = functools.partial(_rows, lo=lo, hi=hi)
            rows = (cond.map(part), uncond.map(part))
            with accelerator.autocast():
                loss = batch_loss(config.objective, path, prediction_type, run.student, target, run.teacher,
                                  latents[lo:hi], *rows, draws.rows(lo, hi)) / n  # fmt: skip
            accelerator.backward(loss)
        total += loss.detach()
    if config.max_grad_norm:
        accelerator.clip_grad_norm_(run.trainable, config.max_grad_norm)
    run.optimizer.step()
    if config.lora_rank == 0:
        ema_update(run.target, accelerator.unwrap_model(run.student), config.ema_decay)
    return total


def train(config: TrainConfig, progress: bool = True) -> dict[str, Any]:
    """Run ``config``; returns the card (also written as ``card.json``, beside the LoRA or the ``unet/`` folder).
    See the module docstring."""
    from accelerate import Accelerator

    teacher = Path(config.teacher).expanduser()
    if (looks_local(config.teacher) or teacher.exists()) and not (teacher / "model_index.json").is_file():
        raise ValueError(f"teacher {config.teacher} is not a diffusers pipeline folder (no model_index.json)")
    options = config.data_options
    if _text_conditioned(config.teacher) is False:  # an unconditional teacher: captions are not needed
        options = DataOptions(**{**asdict(options), "require_captions": False})
    dataset = ImageCaptionDataset(config.data, options)  # scanned before any model loads
    accelerator = Accelerator(mixed_precision=config.mixed_precision)
    world, rank = accelerator.num_processes, accelerator.process_index
    if config.batch_size % world:
        raise ValueError(f"batch_size={config.batch_size} must be a multiple of the {world} processes")
    local = config.batch_size // world
    if local % config.gradient_accumulation:
        raise ValueError(f"each process's {local} rows must split into gradient_accumulation="
                         f"{config.gradient_accumulation} equal micro-batches")  # fmt: skip
    pipe = _pipeline(config.teacher)
    if config.lora_rank and type(pipe.unet).__name__ != "UNet2DConditionModel":
        raise ValueError(f"a LoRA student needs a UNet2DConditionModel teacher (this one is a "
                         f"{type(pipe.unet).__name__}); pass --lora-rank 0 to train it in full")  # fmt: skip
    path, prediction_type = teacher_path(pipe.scheduler.config)
    run = _models(config, pipe)  # the student and the target: float32 copies, made before the teacher is cast
    _place(pipe, run, accelerator)
    own_target = run.target is run.student
    scaler = accelerator.scaler  # fp16's gradient scaler (None otherwise): part of the state a resume restores
    start, losses = load_checkpoint(run.student, None if own_target else run.target, run.optimizer, config, scaler)
    student, optimizer = accelerator.prepare(run.student, run.optimizer)
    run.student, run.optimizer = student, optimizer
    T = int(path.num_train_timesteps)
    began = time.perf_counter()
    bar = tqdm(range(start, config.steps), disable=not (progress and accelerator.is_main_process), desc="distill")
    for step in bar:
        rows = _order(len(dataset), step, config.batch_size, config.seed)[rank * local : (rank + 1) * local]
        batch = collate([_sample(dataset, index, epoch) for index, epoch in rows])
        latents = _latents(pipe, batch["pixel_values"].to(accelerator.device))
        cond, uncond = _conditions(pipe, batch["caption"], batch, accelerator.device)
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
        draws = draw(config.objective, T, (config.batch_size, *latents.shape[1:]), generator)
        draws = draws.rows(rank * local, (rank + 1) * local)
        loss = _step(config, accelerator, run, path, prediction_type, latents, cond, uncond, draws)
        mean_loss = accelerator.reduce(loss, reduction="mean").item()
        losses.append(mean_loss)
        bar.set_postfix(loss=f"{mean_loss:.4g}", it_s=f"{(step + 1 - start) / (time.perf_counter() - began):.2f}")
        done = step + 1
        if (config.checkpoint_every and done % config.checkpoint_every == 0) or done == config.steps:
            if accelerator.is_main_process:
                unwrapped = accelerator.unwrap_model(student)
                save_checkpoint(unwrapped, None if own_target else run.target, optimizer, config, done, losses, scaler)
            accelerator.wait_for_everyone()
        if (
            accelerator.is_main_process
            and config.validation_every
            and (done % config.validation_every == 0 or done == config.steps)
        ):
            card = _card(config, pipe.scheduler.config, T, world, losses, prediction_type)
            grid = Path(config.output) / "validation" / f"step-{done:08d}.png"
            validation_grid(pipe, accelerator.unwrap_model(student), card, config.validation_prompts, grid)
    card = _card(config, pipe.scheduler.config, T, world, losses, prediction_type)
    if accelerator.is_main_process:
        _save_student(accelerator.unwrap_model(student), run, config)
        write_card(config.output, card)
    accelerator.wait_for_everyone()
    return card
