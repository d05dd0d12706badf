"""TCD (or LCM) distillation of a diffusers pipeline's UNet, LoRA or full, on accelerate — or, with the objective
``diffusion``, the training of the teacher itself.

:func:`train` checks the settings, scans the data (folder sources, before any model loads; webdataset shards are
streamed, :mod:`tcd_sampler.distill.batches`), loads the teacher pipeline and runs the objective of
:mod:`tcd_sampler.distill.objective` under an ``accelerate.Accelerator`` (one process, or many under ``accelerate
launch``: DDP, mixed precision, gradient accumulation, trackers). Every step is a function of the step number alone
— the global batch is the step's slice of a seeded permutation of the data, its draws come from a generator seeded
with ``(seed, step)`` and each process takes its rows of both — so a run with 2 processes ends with the weights of 1
process with the whole batch, and a run resumed from a checkpoint with those of an uninterrupted one (a streamed
run: the same resumed, not across process counts). Checkpoints (the student's trainable weights, the EMA target,
the optimizer, the step) are written to a temporary folder and renamed, every ``checkpoint_every`` steps.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..schedulers.config_file import looks_local
from .batches import FolderBatches, StreamBatches
from .cache import EncodingCache
from .checkpoints import check_checkpoint, find_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint
from .data import DataOptions, ImageCaptionDataset, detect_source
from .export import is_pixel_pipeline, save_full_student, save_lora, save_pixel_pipeline, scheduler_settings, write_card
from .losses import ema_update
from .models import Run, TeacherFacts, build_models, load_pipeline, make_optimizer, place, run_dtype, teacher_facts
from .objective import batch_loss, draw
from .sharding import full_state_dict, gradient_sync, is_sharded, shard
from .teachers import Conditioning, check_class_captions, conditions, teacher_path
from .train_config import OPTIMIZERS, TRACKERS, TrainConfig, teacher_identity
from .validation import validation_grid

__all__ = ["LOG_EVERY", "TrainConfig", "train"]

#: The folder index the main process writes for the others (in the output folder).
DATA_INDEX = "data-index.json"
#: Steps between reading the losses back from the device (the progress bar, the tracker; the card keeps every step's).
LOG_EVERY = 10


def _card(config: TrainConfig, teacher_config: Any, T: int, world: int, losses: list[float], prediction: str) -> Any:
    """The run's card: its configuration, processes, losses, and how to sample the result (a TCD student at γ = 0.3
    on the distillation grid; an LCM student in the consistency-boundary mode at η = 1; a diffusion model at γ = 0,
    DDIM, in 50 steps of a 50-point grid)."""
    extra: dict[str, Any] = {}
    method = config.objective.method
    if method == "lcm":
        extra = {"consistency_boundary": True, "timestep_scaling": config.objective.timestep_scaling}
    if method == "diffusion":
        scheduler = scheduler_settings(teacher_config, eta=0.0, num_inference_steps=50, original_inference_steps=50)
    else:
        objective = config.objective  # a guidance-conditioned student samples at the middle of its range
        omega = (objective.guidance_min + objective.guidance_max) / 2 if objective.guidance_embedding_dim else None
        scheduler = scheduler_settings(teacher_config, eta=1.0 if extra else 0.3, guidance_scale=omega,
                                       original_inference_steps=T // objective.skip, **extra)  # fmt: skip
    return {"config": json.loads(json.dumps(asdict(config), default=str)), "steps": config.steps, "processes": world,
            "losses": losses, "prediction_type": prediction, "scheduler": scheduler}  # fmt: skip


def _student_scheduler(config: TrainConfig, pipe: Any, card: dict[str, Any]) -> Any:
    """The sampler a pixel-space pipeline folder of the result holds: the teacher's own for a diffusion model,
    diffusers' ``TCDScheduler`` on the card's grid for a TCD student, diffusers' ``LCMScheduler`` on it for an LCM
    student."""
    from diffusers import LCMScheduler, TCDScheduler

    method, section = config.objective.method, card["scheduler"]["config"]
    if method == "diffusion":
        return pipe.scheduler
    if method == "lcm":
        grid = {k: section[k] for k in ("original_inference_steps", "timestep_scaling")}
        return LCMScheduler.from_config(pipe.scheduler.config, **grid)
    return TCDScheduler.from_config(pipe.scheduler.config, original_inference_steps=section["original_inference_steps"])


def _save_student(pipe: Any, student: Any, run: Run, config: TrainConfig, card: dict[str, Any]) -> None:
    """The usable result in ``config.output``: the LoRA (diffusers' and ComfyUI's formats), or the full student's
    (or the diffusion objective's) EMA target as a diffusers model folder (``unet/``) — with a pixel-space teacher,
    plus the scheduler and ``model_index.json``, so that the output folder loads as a pipeline."""
    if config.lora_rank and config.objective.method != "diffusion":
        save_lora(student, config.output)
    elif is_pixel_pipeline(pipe):  # its trained UNet and a scheduler make the output folder a whole pipeline
        save_pixel_pipeline(pipe, run.target, config.output, _student_scheduler(config, pipe, card))
    else:
        save_full_student(run.target, Path(config.output) / "unet")


def _rows(tensor: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    return tensor[lo:hi]


def _step(
    config: TrainConfig, accelerator: Any, run: Run, path: Any, prediction_type: str, latents: torch.Tensor,
    cond: Conditioning, uncond: Conditioning | None, draws: Any,
) -> torch.Tensor:  # fmt: skip
    """One optimizer step on this process's rows, in ``config.gradient_accumulation`` equal micro-batches (gradients
    synchronised across processes on the last); returns the rows' mean loss (detached)."""
    n = config.gradient_accumulation
    size = latents.shape[0] // n
    unwrapped = accelerator.unwrap_model(run.student)
    own_target = run.target is unwrapped  # a LoRA student (under DDP, run.student is its wrapper)
    run.optimizer.zero_grad()
    total = torch.zeros((), device=latents.device)
    for j in range(n):
        lo, hi = j * size, (j + 1) * size
        with gradient_sync(run.student, j == n - 1):  # synchronised on the last micro-batch
            part = functools.partial(_rows, lo=lo, hi=hi)
            rows = (cond.map(part), None if uncond is None else uncond.map(part))
            with accelerator.autocast():
                loss = batch_loss(config.objective, path, prediction_type, run.student, run.target, run.teacher,
                                  latents[lo:hi], *rows, draws.rows(lo, hi)) / n  # fmt: skip
            accelerator.backward(loss)
        total += loss.detach()
    if config.max_grad_norm:
        accelerator.clip_grad_norm_(run.trainable, config.max_grad_norm)
    run.optimizer.step()
    if not own_target:
        ema_update(run.target, unwrapped, config.ema_decay)
    return total


def _shard(run: Run, config: TrainConfig, dtype: torch.dtype | None) -> None:
    """Shard a full student and its EMA target with FSDP2 (the target resharded after each forward, so its
    parameters stay shards the EMA update reaches) and make the optimizer over the sharded parameters."""
    run.plain_class = type(run.target)
    shard(run.student, mixed_precision=dtype)
    shard(run.target, reshard_after_forward=True, mixed_precision=dtype)
    run.trainable = [p for p in run.student.parameters() if p.requires_grad]
    run.optimizer = make_optimizer(config, run.trainable)


def _gathered(target: Any, plain_class: Any) -> Any:
    """A sharded target gathered into a plain model of ``plain_class`` on the main process (every process takes part;
    the others get None)."""
    whole = full_state_dict(target)
    if not whole:
        return None
    plain = plain_class.from_config(target.config)
    plain.load_state_dict(whole, strict=True)
    return plain


def _check_engine() -> None:
    """ValueError, before accelerate starts, for a launch under accelerate's FSDP plugin (``--fsdp`` shards with
    FSDP2 itself) or DeepSpeed (its engine steps the optimizer on every
    backward and forces mixed precision off for the frozen models, which this trainer's own accumulation and casting
    do not fit): FSDP is the way to shard a full student."""
    import os

    for engine in ("DEEPSPEED", "FSDP"):
        if os.environ.get(f"ACCELERATE_USE_{engine}", "").lower() in ("1", "true", "yes"):
            raise ValueError(f"accelerate's {'DeepSpeed' if engine == 'DEEPSPEED' else 'FSDP plugin'} is not "
                             "supported by this trainer: to shard a full student pass --fsdp (FSDP2) under "
                             "accelerate launch --multi_gpu; a LoRA trains under DDP")  # fmt: skip


def _check_teacher(config: TrainConfig, unet_class: str | None) -> None:
    """ValueError for a LoRA on a UNet without attention projections, or a LoRA with the diffusion objective."""
    if config.lora_rank and config.objective.method == "diffusion":
        raise ValueError("the diffusion objective trains the whole UNet: pass --lora-rank 0")
    if config.objective.guidance_embedding_dim and unet_class not in (None, "UNet2DConditionModel"):
        raise ValueError(f"a guidance embedding needs a UNet2DConditionModel teacher, not a {unet_class}")
    if config.lora_rank and unet_class not in (None, "UNet2DConditionModel"):
        raise ValueError(f"a LoRA student needs a UNet2DConditionModel teacher (this one is a {unet_class}); "
                         "pass --lora-rank 0 to train it in full")  # fmt: skip


def _check_labels(dataset: Any, prompts: tuple[str, ...], null_class: int) -> tuple[str, ...]:
    """Check that every caption (of a scanned folder; a stream's are checked per batch) and validation prompt is a
    class label of a class-conditional teacher; returns the validation prompts (the default prompt becomes a row
    per class, at most 10)."""
    if dataset is not None:
        check_class_captions([record.caption for record in dataset.records], null_class)
    if prompts == TrainConfig.validation_prompts:
        prompts = tuple(str(label) for label in range(min(null_class, 10)))
    check_class_captions(list(prompts), null_class, "validation prompt")
    return prompts


def _data_options(config: TrainConfig, facts: TeacherFacts) -> DataOptions:
    """The run's data options, fitted to a local teacher: no captions needed by an unconditional one, grey images
    for a pixel-space one with one channel."""
    options = config.data_options
    if facts.text is False and facts.num_class_embeds is None:  # an unconditional teacher: no captions
        options = dataclasses.replace(options, require_captions=False)
    if facts.latent is False and facts.in_channels == 1:
        options = dataclasses.replace(options, channels=1)
    return options


def _tracked_settings(config: TrainConfig) -> dict[str, Any]:
    """The run's settings as flat scalars (what TensorBoard's hyper-parameters take)."""
    flat: dict[str, Any] = {}

    def add(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                add(f"{prefix}{key}.", item)
        else:
            flat[prefix[:-1]] = value if isinstance(value, (int, float, str, bool)) else str(value)

    add("", asdict(config))
    return flat


def _scan(accelerator: Any, config: TrainConfig, options: DataOptions) -> ImageCaptionDataset:
    """The scanned folder dataset: scanned by the main process, which writes its index (``<output>/data-index.json``)
    for the others to read; a process that fails stops every process with its error (none is left waiting)."""
    if accelerator.num_processes == 1:
        return ImageCaptionDataset(config.data, options)
    index = Path(config.output) / DATA_INDEX
    read = lambda: ImageCaptionDataset.from_index(index, config.data, options)  # noqa: E731
    dataset: ImageCaptionDataset = _main_first(accelerator, lambda: _scanned(config, options, index), read,
                                               "the data scan")  # fmt: skip
    return dataset


def _scanned(config: TrainConfig, options: DataOptions, index: Path) -> ImageCaptionDataset:
    dataset = ImageCaptionDataset(config.data, options)
    dataset.save_index(index)
    return dataset


def _main_first(accelerator: Any, main: Any, others: Any, what: str) -> Any:
    """``main()`` on the main process, then (once it succeeded) ``others()`` on the other processes; returns this
    process's result. A failure on any process stops every process (:func:`_everyone`): none is left waiting."""
    first = _everyone(accelerator, main if accelerator.is_main_process else lambda: None, what)
    return _everyone(accelerator, (lambda: first) if accelerator.is_main_process else others, what)


def _everyone(accelerator: Any, work: Any, what: str) -> Any:
    """Run ``work()`` on this process and stop every process, with a ValueError naming the first that failed, if
    any did (a collective: every process calls it, in the same order)."""
    from accelerate.utils import gather_object

    try:
        result, problem = work(), None
    except Exception as error:  # any failure: the other processes must hear of it, not wait
        result, problem = None, error
    problems = gather_object([None if problem is None else str(problem)])
    if problem is not None:
        raise problem
    for rank, message in enumerate(problems):
        if message:
            raise ValueError(f"{what} failed on process {rank}: {message}")
    return result


def _cache(accelerator: Any, config: TrainConfig, pipe: Any, dataset: ImageCaptionDataset) -> EncodingCache:
    """The encodings cache on disk (``config.cache_dir``, or ``<output>/encodings``), keyed by what the encodings
    depend on (the teacher and its files, the encoders' dtypes, the data and how it is cropped); the main process
    opens it first (it clears a folder made for another key), then the others."""
    folder = config.cache_dir or str(Path(config.output) / "encodings")
    options = config.data_options
    text = getattr(pipe, "text_encoder", None)
    key = {"teacher": config.teacher, "teacher_unet": teacher_identity(config.teacher), "data": dataset.fingerprint(),
           "vae_dtype": str(getattr(getattr(pipe, "vae", None), "dtype", None)),
           "text_dtype": str(getattr(text, "dtype", None)), "crop": options.crop,
           "channels": options.channels}  # fmt: skip

    def make() -> EncodingCache:
        return EncodingCache(pipe, accelerator.device, config.resolution, folder=folder, key=key,
                             rank=accelerator.process_index)  # fmt: skip

    cache: EncodingCache = _main_first(accelerator, make, make, "opening the encodings cache")
    return cache


def _resume(accelerator: Any, run: Run, config: TrainConfig, scaler: Any, schedule: Any) -> tuple[int, list[float]]:
    """Load the checkpoint to resume from into every process: the main process chooses it (``"latest"`` as it sees
    the output folder), the others are told; a process that cannot read it stops every process with a ValueError
    naming it (none is left waiting). Returns the step and the losses so far."""
    from accelerate.utils import broadcast_object_list

    world = accelerator.num_processes
    folder = find_checkpoint(config) if accelerator.is_main_process else None
    if world > 1:
        folder = broadcast_object_list([folder], from_process=0)[0]
    target = None if run.target is run.student else run.target
    if folder is not None:  # local checks on every process first: none enters the sharded load's collectives alone
        _everyone(accelerator, lambda: check_checkpoint(Path(folder), config), f"resume: reading checkpoint {folder}")
    found: tuple[int, list[float]] = _everyone(
        accelerator, lambda: load_checkpoint(folder, run.student, target, run.optimizer, config, scaler, schedule),
        f"resume: reading checkpoint {folder}",
    )  # fmt: skip
    return found


def train(config: TrainConfig, progress: bool = True) -> dict[str, Any]:
    """Run ``config``; returns the card (also written as ``card.json``, beside the LoRA or the ``unet/`` folder).
    See the module docstring."""
    from accelerate import Accelerator
    from diffusers.optimization import get_scheduler

    teacher = Path(config.teacher).expanduser()
    if (looks_local(config.teacher) or teacher.exists()) and not (teacher / "model_index.json").is_file():
        raise ValueError(f"teacher {config.teacher} is not a diffusers pipeline folder (no model_index.json)")
    facts = teacher_facts(config.teacher)
    if config.log_with and importlib.util.find_spec(TRACKERS[config.log_with]) is None:
        raise ValueError(f"log_with={config.log_with!r} needs the {TRACKERS[config.log_with]} package: pip install it, "
                         "or log nothing (the card keeps the loss curve)")  # fmt: skip
    if importlib.util.find_spec(OPTIMIZERS[config.optimizer]) is None:
        raise ValueError(f"optimizer={config.optimizer!r} needs the {OPTIMIZERS[config.optimizer]} package: pip "
                         "install it, or use optimizer='adamw'")  # fmt: skip
    _check_teacher(config, facts.unet_class)
    options = _data_options(config, facts)
    streamed = detect_source(config.data) == "webdataset"
    if streamed and config.cache_encodings:
        raise ValueError("cache_encodings needs a folder source (it keeps encodings by image); stream shards uncached")
    logs = str(Path(config.output) / "logs") if config.log_with else None
    _check_engine()
    # mixed precision None: the launcher's (accelerate launch --mixed_precision, or its config file)
    accelerator = Accelerator(mixed_precision=config.mixed_precision, log_with=config.log_with, project_dir=logs)
    config = dataclasses.replace(config, mixed_precision=str(accelerator.mixed_precision))  # the effective one
    world, rank = accelerator.num_processes, accelerator.process_index
    # a folder is scanned before any model loads (by the main process; the others read its index); shards are
    # checked as they stream
    dataset = None if streamed else _scan(accelerator, config, options)
    prompts = config.validation_prompts
    if facts.null_class is not None:
        prompts = _check_labels(dataset, prompts, facts.null_class)
    if config.batch_size % world:
        raise ValueError(f"batch_size={config.batch_size} must be a multiple of the {world} processes")
    local = config.batch_size // world
    if config.fsdp and world == 1:
        raise ValueError("fsdp shards across processes: launch several (accelerate launch --num_processes N)")
    if local % config.gradient_accumulation:
        raise ValueError(f"each process's {local} rows must split into gradient_accumulation="
                         f"{config.gradient_accumulation} equal micro-batches")  # fmt: skip
    if config.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    pipe = load_pipeline(config.teacher)
    _check_teacher(config, type(pipe.unet).__name__)
    classes = getattr(pipe.unet.config, "num_class_embeds", None)
    null_class = classes - 1 if classes and not hasattr(pipe, "encode_prompt") else None
    if facts.null_class is None and null_class is not None:  # a Hub teacher: checked now
        prompts = _check_labels(dataset, prompts, null_class)
    path, prediction_type = teacher_path(pipe.scheduler.config)
    run = build_models(config, pipe, run_dtype(accelerator.mixed_precision))  # trained weights float32
    place(pipe, run, accelerator)
    if config.fsdp:  # before the optimizer state exists and before a resume loads into the shards
        _shard(run, config, run_dtype(accelerator.mixed_precision))
    scaler = accelerator.scaler  # fp16's gradient scaler (None otherwise): part of the state a resume restores
    # stepped once per optimizer step here (accelerate's wrapper would step it once per process)
    name = config.lr_scheduler  # diffusers' "constant" ignores warm-up steps
    name = "constant_with_warmup" if name == "constant" and config.lr_warmup_steps else name
    schedule = get_scheduler(name, run.optimizer, num_warmup_steps=config.lr_warmup_steps,
                             num_training_steps=config.steps)  # fmt: skip
    start, losses = _resume(accelerator, run, config, scaler, schedule)
    if config.compile:
        run.student.compile()  # in place: the class (and the forward it inspects) stays the UNet's
    if config.fsdp:  # sharded by FSDP2 itself: accelerate prepares only the optimizer
        student, optimizer = run.student, accelerator.prepare(run.optimizer)
    else:
        student, optimizer = accelerator.prepare(run.student, run.optimizer)
    if config.log_with:
        accelerator.init_trackers("tcd-sampler", config=_tracked_settings(config))
    run.student, run.optimizer = student, optimizer
    device = accelerator.device
    config = dataclasses.replace(config, data_options=options, validation_prompts=prompts)  # the effective ones
    cache = None if dataset is None or not config.cache_encodings else _cache(accelerator, config, pipe, dataset)
    if dataset is None:
        batches: Any = StreamBatches(config.data, options, pipe, device, rank, world, local, start, null_class)
    else:
        batches = FolderBatches(dataset, pipe, device, config.batch_size, config.seed, rank, local, cache,
                                workers=config.data_workers, start=start, stop=config.steps)  # fmt: skip
    try:
        card = _loop(config, accelerator, run, pipe, path, prediction_type, batches, cache, start, losses, schedule,
                     prompts, progress)  # fmt: skip
    finally:
        for closing in (batches, cache):
            getattr(closing, "close", lambda: None)()
    return card


def _loop(
    config: TrainConfig, accelerator: Any, run: Run, pipe: Any, path: Any, prediction_type: str, batches: Any,
    cache: EncodingCache | None, start: int, losses: list[float], schedule: Any, prompts: tuple[str, ...],
    progress: bool,
) -> dict[str, Any]:  # fmt: skip
    """The steps from ``start``, the checkpoints, the validation grids; then the student and its card."""
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    local = config.batch_size // world
    student, optimizer = run.student, run.optimizer
    own_target = run.target is accelerator.unwrap_model(student)
    scaler = accelerator.scaler
    text = None if cache is None else cache.text
    T = int(path.num_train_timesteps)
    diffusion = config.objective.method == "diffusion"
    objective = config.objective
    guided = not diffusion and not objective.guidance_min == objective.guidance_max == 1.0  # needs uncond
    began = time.perf_counter()
    label = "train" if diffusion else "distill"
    bar = tqdm(range(start, config.steps), disable=not (progress and accelerator.is_main_process), desc=label)
    sharded = is_sharded(run.target)  # its validation forwards are collectives
    pending: list[torch.Tensor] = []  # the losses not yet read back (read every LOG_EVERY steps: no sync a step)

    def read_losses(done: int) -> None:
        if not pending:
            return
        values = torch.stack(pending).tolist()
        first = done - len(values)
        losses.extend(values)
        pending.clear()
        rate = (done - start) / (time.perf_counter() - began)
        bar.set_postfix(loss=f"{values[-1]:.4g}", it_s=f"{rate:.2f}")
        if config.log_with:
            for i, value in enumerate(values):
                accelerator.log({"loss": value}, step=first + i + 1)
            accelerator.log({"steps_per_second": rate, "images_per_second": rate * config.batch_size}, step=done)

    for step in bar:
        latents, batch = batches(step)
        cond, uncond = conditions(pipe, batch["caption"], batch, device, guided, text)
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
        draws = draw(config.objective, T, (config.batch_size, *latents.shape[1:]), generator)
        draws = draws.rows(rank * local, (rank + 1) * local)
        loss = _step(config, accelerator, run, path, prediction_type, latents, cond, uncond, draws)
        schedule.step()
        pending.append(accelerator.reduce(loss, reduction="mean"))
        done = step + 1
        checkpoint = (config.checkpoint_every and done % config.checkpoint_every == 0) or done == config.steps
        validate = config.validation_every and (done % config.validation_every == 0 or done == config.steps)
        if done % LOG_EVERY == 0 or checkpoint or validate:
            read_losses(done)
        if checkpoint:  # every process (a sharded student's shards are written by their owners)
            unwrapped = accelerator.unwrap_model(student)
            save_checkpoint(unwrapped, None if own_target else run.target, optimizer, config, done, losses, scaler,
                            schedule)  # fmt: skip
            if accelerator.is_main_process:
                prune_checkpoints(config, config.checkpoints_total_limit)
            accelerator.wait_for_everyone()
        if validate and (accelerator.is_main_process or sharded):  # a sharded target's forwards need every process
            card = _card(config, pipe.scheduler.config, T, world, losses, prediction_type)
            grid = Path(config.output) / "validation" / f"step-{done:08d}.png"
            shown = accelerator.unwrap_model(student) if own_target else run.target  # what is saved: the EMA
            with accelerator.autocast():  # float32 weights in a pipeline of half-precision encoders
                validation_grid(pipe, shown, card, prompts, grid, write=accelerator.is_main_process)
    card = _card(config, pipe.scheduler.config, T, world, losses, prediction_type)
    card["this_run"] = {"first_step": start, "seconds": round(time.perf_counter() - began, 1),
                        "device": str(accelerator.device), "torch_threads": torch.get_num_threads()}  # fmt: skip
    if accelerator.device.type == "cuda":  # this process's peak, weights included
        card["this_run"]["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(accelerator.device) / 2**30, 3)
    if is_sharded(run.target):  # gathered by every process, saved by the main one as a plain model
        run.target = _gathered(run.target, run.plain_class)
    if accelerator.is_main_process:
        _save_student(pipe, accelerator.unwrap_model(student), run, config, card)
        write_card(config.output, card)
    accelerator.wait_for_everyone()
    if config.log_with:
        accelerator.end_training()
    return card
