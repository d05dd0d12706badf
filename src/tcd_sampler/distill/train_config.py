"""The settings of a real-model training run (:class:`TrainConfig`), checked on construction, before any model loads."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ..core.checks import check_bool, check_choice, check_int, check_number
from .data import DataOptions
from .objective import Objective

__all__ = ["CHANGEABLE", "LR_SCHEDULERS", "NONFINITE", "OPTIMIZERS", "TRACKERS", "TrainConfig", "resume_differences"]

MIB = 1 << 20
#: The accelerate trackers a run can log to, with the module each needs.
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "aim": "aim", "comet_ml": "comet_ml",
            "clearml": "clearml", "dvclive": "dvclive"}  # fmt: skip

#: The learning-rate schedules (diffusers' ``get_scheduler`` names, per optimizer step, after the warm-up).
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
#: The optimizers, with the module each needs: torch's AdamW, or bitsandbytes' 8-bit AdamW (its states in 8 bits).
OPTIMIZERS = {"adamw": "torch", "adamw8bit": "bitsandbytes"}
#: What a run does at a step whose loss or gradient is not finite: stop (naming it; nothing non-finite is saved) or
#: skip that step's update.
NONFINITE = ("stop", "skip")
#: The settings a resumed run may change from its checkpoint's, each only where named in ``allow_changes`` (they take
#: effect from the resume point and the card records them); the others of :meth:`TrainConfig.fingerprint` define the
#: run and never change. Settings outside the fingerprint (validation, logging, checkpointing, data workers, caching,
#: compile, TF32, gradient checkpointing and accumulation, FSDP) change freely: they do not change the result beyond
#: float32 rounding.
CHANGEABLE = ("lr", "lr_scheduler", "lr_warmup_steps", "steps", "max_grad_norm", "ema_decay", "mixed_precision",
              "data", "resolution", "data_options")  # fmt: skip


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
        lora_targets: the modules a LoRA adapts: ``"default"`` (diffusers' LCM-LoRA list,
            :data:`~tcd_sampler.distill.models.LORA_TARGETS`), ``"attention"`` (the attention projections only) or
            a tuple of module names (peft's ``target_modules``). Default ``"default"``.
        gradient_checkpointing: recompute the student's activations in its backward pass instead of keeping them
            (diffusers' gradient checkpointing): less memory, about a third more time per step. Default False.
        resolution: the image side the data is cropped to. Default 512.
        batch_size: the global batch (split evenly across processes). Default 4.
        steps: optimizer steps. Default 1000.
        lr: AdamW's learning rate. Default 1e-4 (LoRA; use 1e-6 for a full student).
        lr_scheduler: how the learning rate moves over the steps (:data:`LR_SCHEDULERS`, diffusers' names): after
            ``lr_warmup_steps`` of linear warm-up from 0, ``"constant"`` (default) holds it, ``"linear"`` and
            ``"cosine"`` take it to 0 at the last step.
        lr_warmup_steps: the steps of linear warm-up (``"constant"`` with warm-up steps is
            ``"constant_with_warmup"``). Default 0.
        optimizer: ``"adamw"`` (default, torch's) or ``"adamw8bit"`` (bitsandbytes', checked to be installed before
            any model loads; its moments in 8 bits: a quarter of AdamW's state memory).
        allow_tf32: let CUDA matmuls and convolutions use TF32 on Ampere and newer GPUs (faster float32; no effect on
            the CPU). Default False.
        fsdp: shard a full student, its EMA target and their optimizer state across the processes with torch's
            FSDP2 (``fully_shard`` per block; needs several processes and ``lora_rank=0``); checkpoints are then
            written by every process, and the student is gathered once for the export. Default False (DDP).
        compile: compile the student with ``torch.compile`` (in place: the first steps take longer, later ones
            less). Default False.
        ema_decay: ``μ`` of the full student's EMA target ``θ⁻ ← μ·θ⁻ + (1 − μ)·θ``; a LoRA student is its own
            target (LCM-LoRA's recipe). Default 0.95.
        checkpoint_every: write a checkpoint every this many steps (0: only at the end). Default 500.
        checkpoints_total_limit: keep only this many newest checkpoints (older ones are removed after each new one
            is written); 0 (default) keeps all.
        resume: None (default), ``"latest"`` or a checkpoint folder.
        mixed_precision: ``"no"``, ``"fp16"`` or ``"bf16"`` (accelerate's); None (default): the launcher's
            (``accelerate launch --mixed_precision``, or its config file; ``"no"`` without one). The frozen weights
            are held in this precision, the trained ones in float32.
        gradient_accumulation: micro-batches a process's rows are split into, one backward each (the same
            update, less memory). Default 1.
        validation_every: write a grid of TCD samples at 1/2/4/8 steps (one row a prompt) to
            ``validation/step-<n>.png`` every this many steps and at the end (0, default: never).
        validation_prompts: the grid's prompts. Default one astronaut.
        max_grad_norm: clip the gradient norm to this (0: no clipping). Default 1.0 (LCM's).
        seed: seeds the data order, the draws and the LoRA's initialisation. Default 0.
        log_with: an accelerate tracker that receives the loss and the throughput every step and the settings once
            (``"tensorboard"``: event files under ``<output>/logs``; also ``"wandb"``, ``"mlflow"``, ``"aim"``,
            ``"comet_ml"``, ``"clearml"``, ``"dvclive"``), checked to be installed before any model loads. Default
            None: no tracker (the card keeps the loss curve anyway).
        cache_encodings: encode each image's latents and each caption's text embeddings once and keep them on disk
            in ``cache_dir`` (safetensors shards, shared by the processes and reused by a later run with the same
            teacher, data and crops; :mod:`tcd_sampler.distill.cache`); needs fixed crops (``crop="center"``, no
            flip). Default False.
        cache_dir: the encodings' folder. Default None: ``<output>/encodings``.
        data_workers: DataLoader worker processes per training process that read and crop the images ahead of the
            steps (0: in the training process, when a step needs them). Default 2.
        data_options: how images are cropped and bad data handled (its resolution is replaced by ``resolution``).
        on_nonfinite: at a step whose loss or gradient is not finite (NaN or infinite): ``"stop"`` (default) ends the
            run with a ValueError naming the step and the tensor, before anything of that step or later is saved
            (the last checkpoint stays the one ``resume="latest"`` takes); ``"skip"`` drops that step's update (the
            step still counts) and lists it in the card's ``skipped_steps``; skip reads a flag back every step.
        overwrite: start a new run in an ``output`` folder that holds another run's checkpoints or results, removing
            them first (the encodings cache stays). Default False: such a folder is refused unless resumed.
        allow_changes: the settings of :data:`CHANGEABLE` a resumed run may change from its checkpoint's (they
            take effect from the resume point, the optimizer's learning rate included, and the card lists them as
            changes at that step). Default none: a resume with another such setting is refused, naming each.
        ema_device: where the diffusion objective's EMA target lives: None (default) on the run's device,
            ``"cpu"`` in host memory (a full float32 copy of the UNet less on the accelerator, for the copy of the
            model to the host and an update on the CPU every step; moved to the accelerator for validation). Only
            for ``method="diffusion"``: a TCD or LCM student's target runs in every step, so it must be on the
            accelerator; not with ``fsdp`` (which shards it).
        data_identity: what the data is, for the fingerprint: filled by :func:`~tcd_sampler.distill.train.train`
            (a scanned folder's :meth:`~tcd_sampler.distill.data.ImageCaptionDataset.fingerprint`, a stream's path).
            Default None.
    """

    teacher: str
    data: str
    output: str
    objective: Objective = field(default_factory=Objective)
    lora_rank: int = 64
    lora_alpha: int | None = None
    lora_targets: str | tuple[str, ...] = "default"
    gradient_checkpointing: bool = False
    resolution: int = 512
    batch_size: int = 4
    steps: int = 1000
    lr: float = 1e-4
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    optimizer: str = "adamw"
    allow_tf32: bool = False
    compile: bool = False
    fsdp: bool = False
    ema_decay: float = 0.95
    checkpoint_every: int = 500
    checkpoints_total_limit: int = 0
    resume: str | None = None
    mixed_precision: str | None = None
    gradient_accumulation: int = 1
    validation_every: int = 0
    validation_prompts: tuple[str, ...] = ("a photograph of an astronaut riding a horse",)
    max_grad_norm: float = 1.0
    seed: int = 0
    data_options: DataOptions = field(default_factory=DataOptions)
    log_with: str | None = None
    cache_encodings: bool = False
    cache_dir: str | None = None
    data_workers: int = 2
    on_nonfinite: str = "stop"
    overwrite: bool = False
    allow_changes: tuple[str, ...] = ()
    ema_device: str | None = None
    data_identity: str | None = None

    def __post_init__(self) -> None:
        for name in ("teacher", "data", "output"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{name} must be a non-empty path or id")
        check_int("lora_rank", self.lora_rank, 0)
        if self.lora_alpha is not None:
            check_int("lora_alpha", self.lora_alpha, 1)
        if isinstance(self.lora_targets, str):
            check_choice("lora_targets", self.lora_targets, ("default", "attention"))
        elif not self.lora_targets or not all(isinstance(t, str) and t for t in self.lora_targets):
            raise ValueError("lora_targets must be 'default', 'attention' or a non-empty sequence of module names")
        else:
            object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        check_bool("gradient_checkpointing", self.gradient_checkpointing)
        check_int("batch_size", self.batch_size, 1)
        check_int("steps", self.steps, 1)
        check_number("lr", self.lr, 0.0, 1.0, low_open=True)
        check_choice("lr_scheduler", self.lr_scheduler, LR_SCHEDULERS)
        check_int("lr_warmup_steps", self.lr_warmup_steps, 0)
        check_choice("optimizer", self.optimizer, tuple(OPTIMIZERS))
        check_bool("allow_tf32", self.allow_tf32)
        check_bool("compile", self.compile)
        check_bool("fsdp", self.fsdp)
        if self.fsdp and self.lora_rank and self.objective.method != "diffusion":
            raise ValueError("fsdp shards a full student: pass lora_rank=0 (a LoRA student trains under DDP)")
        check_number("ema_decay", self.ema_decay, 0.0, 1.0)
        check_int("checkpoint_every", self.checkpoint_every, 0)
        check_int("checkpoints_total_limit", self.checkpoints_total_limit, 0)
        if self.mixed_precision is not None:
            check_choice("mixed_precision", self.mixed_precision, ("no", "fp16", "bf16"))
        check_int("gradient_accumulation", self.gradient_accumulation, 1)
        check_int("validation_every", self.validation_every, 0)
        if not self.validation_prompts or not all(isinstance(p, str) for p in self.validation_prompts):
            raise ValueError("validation_prompts must be a non-empty sequence of strings")
        object.__setattr__(self, "validation_prompts", tuple(self.validation_prompts))
        check_number("max_grad_norm", self.max_grad_norm, 0.0, float("inf"))
        check_int("seed", self.seed, 0)
        check_bool("cache_encodings", self.cache_encodings)
        if self.cache_dir is not None and (not isinstance(self.cache_dir, str) or not self.cache_dir):
            raise ValueError("cache_dir must be a non-empty path or None")
        check_int("data_workers", self.data_workers, 0)
        if self.objective.guidance_embedding_dim and self.lora_rank:
            raise ValueError("a guidance embedding (guidance_embedding_dim) needs a full student: lora_rank=0")
        if self.cache_encodings and (self.data_options.crop != "center" or self.data_options.random_flip):
            raise ValueError("cache_encodings needs fixed crops (crop='center', random_flip=False): a random crop or "
                             "flip changes an image's latents every epoch")  # fmt: skip
        if self.log_with is not None:
            check_choice("log_with", self.log_with, tuple(TRACKERS))
        check_choice("on_nonfinite", self.on_nonfinite, NONFINITE)
        check_bool("overwrite", self.overwrite)
        if isinstance(self.allow_changes, str) or not all(isinstance(n, str) for n in self.allow_changes):
            raise ValueError(f"allow_changes must be a sequence of setting names from {CHANGEABLE}")
        for name in self.allow_changes:
            check_choice("allow_changes", name, CHANGEABLE)
        object.__setattr__(self, "allow_changes", tuple(self.allow_changes))
        if self.ema_device is not None:
            check_choice("ema_device", self.ema_device, ("cpu",))
            if self.fsdp or self.objective.method != "diffusion":
                raise ValueError("ema_device='cpu' is for the EMA of the diffusion objective, which the steps never "
                                 "run: TCD's and LCM's target network runs in every step, on the accelerator (with "
                                 "fsdp the EMA is sharded instead)")  # fmt: skip
        object.__setattr__(self, "data_options", replace(self.data_options, resolution=self.resolution))

    def fingerprint(self) -> dict[str, Any]:
        """Every setting that changes the result, as JSON values: what a checkpoint records and a resume compares
        (:func:`resume_differences`). The teacher is identified by its content where it is a local folder
        (:func:`teacher_identity`: the same teacher by another path is the same) and its schedule
        (:func:`schedule_identity`), by its id otherwise; the data by ``data_identity`` (its path where unset)."""
        options = {k: v for k, v in asdict(self.data_options).items() if k not in ("resolution", "seed")}
        own_target = bool(self.lora_rank) and self.objective.method != "diffusion"  # a LoRA: no EMA
        found = {"teacher": teacher_identity(self.teacher) or self.teacher,
                 "teacher_schedule": schedule_identity(self.teacher), "objective": asdict(self.objective),
                 "lora_rank": self.lora_rank, "lora_alpha": self.lora_alpha, "lora_targets": self.lora_targets,
                 "optimizer": self.optimizer, "batch_size": self.batch_size, "seed": self.seed, "lr": self.lr,
                 "lr_scheduler": self.lr_scheduler, "lr_warmup_steps": self.lr_warmup_steps, "steps": self.steps,
                 "max_grad_norm": self.max_grad_norm, "ema_decay": None if own_target else self.ema_decay,
                 "mixed_precision": self.mixed_precision, "data": self.data_identity or self.data,
                 "resolution": self.resolution, "data_options": options}  # fmt: skip
        result: dict[str, Any] = json.loads(json.dumps(found, default=str))
        return result


def resume_differences(saved: dict[str, Any], config: TrainConfig) -> tuple[dict[str, str], dict[str, str]]:
    """How ``config`` differs from a checkpoint's recorded fingerprint ``saved``: the settings that define another
    run (a resume is refused) and the :data:`CHANGEABLE` ones (a resume applies them where ``allow_changes`` names
    them), each by name as ``"saved → now"``; a setting the checkpoint does not record (one of the previous release,
    whose fingerprint held fewer) is not compared."""
    now = config.fingerprint()
    if "teacher_unet" in saved:  # a checkpoint of the previous release: its teacher by digest where it had one
        saved = {**saved, "teacher": saved["teacher_unet"] or saved.get("teacher")}
    other: dict[str, str] = {}
    changed: dict[str, str] = {}
    for key in sorted(now):
        if key not in saved:  # not recorded (an earlier release's checkpoint): nothing to compare
            continue
        if saved[key] != now[key]:
            (changed if key in CHANGEABLE else other)[key] = _difference(saved.get(key), now[key])
    return other, changed


def _difference(saved: Any, now: Any) -> str:
    """``"saved → now"``; for two dicts (the objective, the data options), only their entries that differ, by name."""
    if isinstance(saved, dict) and isinstance(now, dict):
        keys = [k for k in dict.fromkeys([*saved, *now]) if saved.get(k) != now.get(k)]
        return ", ".join(f"{k} {_short(saved.get(k))} → {_short(now.get(k))}" for k in keys)
    return f"{_short(saved)} → {_short(now)}"


def _short(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 60 else text[:28] + "…" + text[-28:]


def schedule_identity(teacher: str) -> str | None:
    """A digest of a local teacher's noise schedule (``scheduler/scheduler_config.json``: its betas, prediction
    type, …, which the objective reads), so that a checkpoint is not resumed against a teacher whose schedule was
    changed; None for a Hub id or a folder without one."""
    path = Path(teacher).expanduser() / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        return None
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    if isinstance(settings, dict):  # diffusers' bookkeeping is not the schedule
        settings = {k: v for k, v in settings.items() if k != "_diffusers_version"}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def teacher_identity(teacher: str) -> str | None:
    """A digest of a local teacher's UNet (its ``config.json``, and each weights file's size, first and last MiB),
    so that a checkpoint is not resumed against a retrained teacher of the same path; None for a Hub id."""
    unet = Path(teacher).expanduser() / "unet"
    if not unet.is_dir():
        return None
    digest = hashlib.sha256()
    for path in sorted(unet.iterdir()):
        if not path.is_file():
            continue
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with path.open("rb") as file:
            digest.update(file.read(MIB))
            if size > MIB:
                file.seek(max(MIB, size - MIB))
                digest.update(file.read(MIB))
    return digest.hexdigest()[:16]
