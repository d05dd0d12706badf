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

import copy
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..core.checks import check_choice, check_int, check_number
from ..schedulers.config_file import looks_local
from .data import DataOptions, ImageCaptionDataset, collate
from .export import save_full_student, save_lora, scheduler_settings, write_card
from .objective import Objective, batch_loss, draw
from .teachers import Conditioning, teacher_path

__all__ = ["TrainConfig", "train"]

CHECKPOINTS = "checkpoints"
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass(frozen=True)
class TrainConfig:
    """One training run. Invalid values raise a ValueError naming the parameter on construction.

    Attributes:
        teacher: the teacher pipeline's folder or Hub id (a diffusers text-to-image pipeline with a UNet).
        data: the image folder (captions beside the images, or a ``metadata.jsonl``).
        output: the run's folder (checkpoints, the student, the card).
        objective: the loss (method, skip, guidance range, distance). Default ``Objective()`` (TCD, huber).
        lora_rank: the LoRA rank; 0 trains the full UNet. Default 64 (LCM-LoRA's).
        lora_alpha: the LoRA alpha. Default None: the rank.
        resolution: the image side the data is cropped to. Default 512.
        batch_size: the global batch (split evenly across processes). Default 4.
        steps: optimizer steps. Default 1000.
        lr: AdamW's learning rate. Default 1e-4 (LoRA; use 1e-6 for a full student).
        ema_decay: ``μ`` of the full student's EMA target ``θ⁻ ← μ·θ⁻ + (1 − μ)·θ``; a LoRA student is its own
            target (LCM-LoRA's recipe). Default 0.95.
        checkpoint_every: write a checkpoint every this many steps (0: only at the end). Default 500.
        resume: None (default), ``"latest"`` or a checkpoint folder.
        mixed_precision: ``"no"`` (default), ``"fp16"`` or ``"bf16"`` (accelerate's).
        max_grad_norm: clip the gradient norm to this (0: no clipping). Default 1.0 (LCM's).
        seed: seeds the data order, the draws and the LoRA's initialisation. Default 0.
        data_options: how images are cropped and bad data handled (its resolution is replaced by ``resolution``).
    """

    teacher: str
    data: str
    output: str
    objective: Objective = field(default_factory=Objective)
    lora_rank: int = 64
    lora_alpha: int | None = None
    resolution: int = 512
    batch_size: int = 4
    steps: int = 1000
    lr: float = 1e-4
    ema_decay: float = 0.95
    checkpoint_every: int = 500
    resume: str | None = None
    mixed_precision: str = "no"
    max_grad_norm: float = 1.0
    seed: int = 0
    data_options: DataOptions = field(default_factory=DataOptions)

    def __post_init__(self) -> None:
        for name in ("teacher", "data", "output"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{name} must be a non-empty path or id")
        check_int("lora_rank", self.lora_rank, 0)
        if self.lora_alpha is not None:
            check_int("lora_alpha", self.lora_alpha, 1)
        check_int("batch_size", self.batch_size, 1)
        check_int("steps", self.steps, 1)
        check_number("lr", self.lr, 0.0, 1.0, low_open=True)
        check_number("ema_decay", self.ema_decay, 0.0, 1.0)
        check_int("checkpoint_every", self.checkpoint_every, 0)
        check_choice("mixed_precision", self.mixed_precision, ("no", "fp16", "bf16"))
        check_number("max_grad_norm", self.max_grad_norm, 0.0, float("inf"))
        check_int("seed", self.seed, 0)
        object.__setattr__(self, "data_options", _with_resolution(self.data_options, self.resolution))

    def fingerprint(self) -> dict[str, Any]:
        """What a checkpoint must share with the run that resumes it."""
        return {"teacher": self.teacher, "objective": asdict(self.objective), "lora_rank": self.lora_rank,
                "lora_alpha": self.lora_alpha, "batch_size": self.batch_size, "seed": self.seed}  # fmt: skip


def _with_resolution(options: DataOptions, resolution: int) -> DataOptions:
    return DataOptions(**{**asdict(options), "resolution": resolution})


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
    if not hasattr(pipe, "unet") or not hasattr(pipe, "encode_prompt"):
        raise ValueError(f"teacher {teacher} is a {type(pipe).__name__}, not a text-to-image UNet pipeline")
    return pipe


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
        if hasattr(pipe, "text_encoder_2"):  # SDXL
            empty = [""] * len(captions)
            embeds, neg, pooled, neg_pooled = pipe.encode_prompt(captions, device=device, negative_prompt=empty)
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
    with torch.no_grad():
        return pipe.vae.encode(pixels.to(pipe.vae.dtype)).latent_dist.mode() * pipe.vae.config.scaling_factor


def _order(n: int, step: int, batch: int, seed: int) -> list[int]:
    """The dataset indices of the global batch of ``step``: consecutive slices of a permutation seeded per epoch."""
    out: list[int] = []
    start = step * batch
    while len(out) < batch:
        epoch, offset = divmod(start + len(out), n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch)).tolist()
        out.extend(perm[offset : offset + batch - len(out)])
    return out


def _checkpoint(run: _Run, accelerator: Any, config: TrainConfig, step: int, losses: list[float]) -> None:
    """Write the state after ``step`` steps to ``checkpoints/step-<step>`` (a temporary folder, renamed)."""
    if not accelerator.is_main_process:
        return
    root = Path(config.output) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final, tmp = root / f"step-{step:08d}", root / f".tmp-step-{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    student = accelerator.unwrap_model(run.student)
    state = {"student": {n: p.detach().cpu() for n, p in student.named_parameters() if p.requires_grad},
             "optimizer": run.optimizer.state_dict(), "step": step, "losses": losses}  # fmt: skip
    if run.target is not run.student:
        state["target"] = {k: v.detach().cpu() for k, v in run.target.state_dict().items()}
    torch.save(state, tmp / "state.pt")
    (tmp / "checkpoint.json").write_text(json.dumps({"step": step, **config.fingerprint()}, indent=2))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def _resume(run: _Run, accelerator: Any, config: TrainConfig) -> tuple[int, list[float]]:
    """Load the checkpoint ``config.resume`` names; ValueError where it is missing or from another run."""
    if config.resume is None:
        return 0, []
    root = Path(config.output) / CHECKPOINTS
    if config.resume == "latest":
        found = sorted(root.glob("step-*")) if root.is_dir() else []
        if not found:
            return 0, []  # nothing written yet: start from the beginning
        folder = found[-1]
    else:
        folder = Path(config.resume)
    meta_path = folder / "checkpoint.json"
    if not meta_path.is_file():
        raise ValueError(f"resume: {folder} is not a checkpoint folder (no checkpoint.json)")
    meta = json.loads(meta_path.read_text())
    expected = json.loads(json.dumps(config.fingerprint()))
    changed = sorted(k for k in expected if meta.get(k) != expected[k])
    if changed:
        raise ValueError(f"resume: checkpoint {folder} is from another run (its {', '.join(changed)} differ)")
    state = torch.load(folder / "state.pt", map_location="cpu", weights_only=False)
    student = accelerator.unwrap_model(run.student)
    params = dict(student.named_parameters())
    with torch.no_grad():
        for name, value in state["student"].items():
            params[name].copy_(value)
        if "target" in state:
            run.target.load_state_dict(state["target"])
    run.optimizer.load_state_dict(state["optimizer"])
    return int(state["step"]), list(state["losses"])


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


def train(config: TrainConfig, progress: bool = True) -> dict[str, Any]:
    """Run ``config``; returns the card (also written as ``card.json``, beside the LoRA or the ``unet/`` folder).
    See the module docstring."""
    from accelerate import Accelerator

    teacher = Path(config.teacher).expanduser()
    if (looks_local(config.teacher) or teacher.exists()) and not (teacher / "model_index.json").is_file():
        raise ValueError(f"teacher {config.teacher} is not a diffusers pipeline folder (no model_index.json)")
    dataset = ImageCaptionDataset(config.data, config.data_options)  # scanned before any model loads
    accelerator = Accelerator(mixed_precision=config.mixed_precision)
    world, rank = accelerator.num_processes, accelerator.process_index
    if config.batch_size % world:
        raise ValueError(f"batch_size={config.batch_size} must be a multiple of the {world} processes")
    local = config.batch_size // world
    pipe = _pipeline(config.teacher)
    path, prediction_type = teacher_path(pipe.scheduler.config)
    run = _models(config, pipe)
    start, losses = _resume(run, accelerator, config)
    student, optimizer = accelerator.prepare(run.student, run.optimizer)
    run.student, run.optimizer = student, optimizer
    T = int(path.num_train_timesteps)
    began = time.perf_counter()
    bar = tqdm(range(start, config.steps), disable=not (progress and accelerator.is_main_process), desc="distill")
    for step in bar:
        rows = _order(len(dataset), step, config.batch_size, config.seed)[rank * local : (rank + 1) * local]
        batch = collate([dataset[i] for i in rows])
        latents = _latents(pipe, batch["pixel_values"].to(accelerator.device))
        cond, uncond = _conditions(pipe, batch["caption"], batch, accelerator.device)
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
        draws = draw(config.objective, T, (config.batch_size, *latents.shape[1:]), generator)
        draws = draws.rows(rank * local, (rank + 1) * local)
        target = run.target if config.lora_rank == 0 else accelerator.unwrap_model(student)
        with accelerator.autocast():
            loss = batch_loss(config.objective, path, prediction_type, student, target, run.teacher, latents, cond,
                              uncond, draws)  # fmt: skip
        optimizer.zero_grad()
        accelerator.backward(loss)
        if config.max_grad_norm:
            accelerator.clip_grad_norm_(run.trainable, config.max_grad_norm)
        optimizer.step()
        if config.lora_rank == 0:
            with torch.no_grad():
                for p_t, p in zip(run.target.parameters(), accelerator.unwrap_model(student).parameters(), strict=True):
                    p_t.lerp_(p, 1 - config.ema_decay)
        mean_loss = accelerator.reduce(loss.detach(), reduction="mean").item()
        losses.append(mean_loss)
        bar.set_postfix(loss=f"{mean_loss:.4g}", it_s=f"{(step + 1 - start) / (time.perf_counter() - began):.2f}")
        done = step + 1
        if (config.checkpoint_every and done % config.checkpoint_every == 0) or done == config.steps:
            _checkpoint(run, accelerator, config, done, losses)
            accelerator.wait_for_everyone()
    card = _card(config, pipe.scheduler.config, T, world, losses, prediction_type)
    if accelerator.is_main_process:
        _save_student(accelerator.unwrap_model(student), run, config)
        write_card(config.output, card)
    accelerator.wait_for_everyone()
    return card
