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

import contextlib
import dataclasses
import errno
import functools
import importlib.util
import json
import math
import os
import shutil
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .._files import folder_problem
from ..schedulers.config_file import looks_local
from .batches import FolderBatches, StreamBatches
from .cache import EncodingCache
from .checkpoints import (
    CHECKPOINTS,
    CheckpointWarning,
    check_checkpoint,
    checkpoint_folders,
    find_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from .data import DataOptions, ImageCaptionDataset, detect_source
from .export import is_pixel_pipeline, save_full_student, save_lora, save_pixel_pipeline, scheduler_settings, write_card
from .export.lora import COMFYUI_SUFFIX
from .losses import ema_update
from .models import Run, TeacherFacts, build_models, load_pipeline, make_optimizer, place, run_dtype, teacher_facts
from .objective import batch_loss, draw
from .sharding import full_state_dict, gradient_sync, is_sharded, local_tensor, shard
from .teachers import Conditioning, check_class_captions, conditions, teacher_path
from .train_config import OPTIMIZERS, TRACKERS, TrainConfig, resume_differences, teacher_identity
from .validation import validation_grid

__all__ = ["LOG_EVERY", "NonFiniteError", "TrainConfig", "train"]

#: The folder index the main process writes for the others (in the output folder).
DATA_INDEX = "data-index.json"
#: Steps between reading the losses back from the device (the progress bar, the tracker; the card keeps every step's).
LOG_EVERY = 10
#: The lock file a run holds in its output folder (one run per folder).
LOCK = ".tcd-sampler.lock"
#: What a run writes into its output folder (removed by ``overwrite``; the encodings cache is kept).
RUN_OUTPUTS = ("checkpoints", "validation", "logs", "card.json", DATA_INDEX, "pytorch_lora_weights.safetensors",
               "unet", "scheduler", "model_index.json")  # fmt: skip


class NonFiniteError(ValueError):
    """A step's loss or gradient was not finite (NaN or infinite) and the run stopped (``on_nonfinite="stop"``);
    nothing of that step or later was saved."""


def _card(
    config: TrainConfig, teacher_config: Any, T: int, world: int, losses: list[float | None], prediction: str,
    changes: list[dict[str, Any]] | None = None,
) -> Any:  # fmt: skip
    """The run's card: its configuration, processes, losses (None: a step skipped for a non-finite loss or
    gradient; their steps also as ``skipped_steps``), the settings changed on resumes, and how to sample the result
    (a TCD student at γ = 0.3 on the distillation grid; an LCM student in the consistency-boundary mode at η = 1; a
    diffusion model at γ = 0, DDIM, in 50 steps of a 50-point grid)."""
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
    skipped = [i + 1 for i, loss in enumerate(losses) if loss is None]  # steps whose update was dropped
    return {"config": json.loads(json.dumps(asdict(config), default=str)), "steps": config.steps, "processes": world,
            "losses": losses, "skipped_steps": skipped, "changes": list(changes or []), "prediction_type": prediction,
            "scheduler": scheduler}  # fmt: skip


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
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """One optimizer step on this process's rows, in ``config.gradient_accumulation`` equal micro-batches (gradients
    synchronised across processes on the last). Returns the rows' mean loss (detached) and the step's finiteness
    flags on the device (:func:`_finite_flags`); with ``on_nonfinite="skip"`` a step whose flags are not all set is
    not applied (its flags read back: a host sync)."""
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
    # fp16's gradient scaler skips steps of overflowing gradients itself: there only the loss is checked
    flags = _finite_flags(accelerator, total, None if accelerator.scaler is not None else run.trainable)
    if config.on_nonfinite == "skip" and not bool(flags.all()):
        run.optimizer.zero_grad()
        return total, flags
    if config.max_grad_norm:
        accelerator.clip_grad_norm_(run.trainable, config.max_grad_norm)
    run.optimizer.step()
    if not own_target:
        ema_update(run.target, unwrapped, config.ema_decay)
    return total, flags


def _finite_flags(accelerator: Any, loss: torch.Tensor, params: list[torch.nn.Parameter] | None) -> torch.Tensor:
    """On the device, without a host sync: whether this step's loss and (where ``params`` are given) each
    parameter's gradient are finite (by its largest magnitude: a NaN or an infinity, never a large finite value) —
    a float vector ``[loss, grad 0, grad 1, …]`` of 1 (finite) and 0, the same on every process (a sharded
    gradient's shards are checked by their owners, then combined)."""
    checks = [torch.isfinite(loss).reshape(1)]
    grads = [] if params is None else [p.grad for p in params]
    if grads:
        present = [local_tensor(g) for g in grads if g is not None]
        norms = iter(torch._foreach_norm(present, math.inf) if present else [])
        checks += [torch.isfinite(next(norms)).reshape(1) if g is not None else checks[0].new_ones(1) for g in grads]
    flags = torch.cat(checks).float()
    if accelerator.num_processes > 1:  # a sharded gradient's shards differ; the loss here is this process's
        flags = (accelerator.reduce(flags, reduction="sum") == accelerator.num_processes).float()
    return flags


def _nonfinite_message(step: int, flags: torch.Tensor, names: list[str], saved: int) -> str:
    """What went wrong at ``step`` (its flags as read back) and what to do."""
    bad = [i for i, ok in enumerate(flags.tolist()) if not ok]
    if bad[0] == 0:
        what = "the loss is not finite (NaN or infinite)"
    else:
        first = names[bad[0] - 1]
        more = f" and {len(bad) - 1} more parameters'" if len(bad) > 1 else ""
        what = f"the gradient of {first}{more} is not finite (NaN or infinite)"
    last = f"the last checkpoint is step {saved}: resume it with --resume latest" if saved else "no checkpoint holds it"
    return (
        f"step {step}: {what}; the run stopped and saved nothing of this step or later ({last}); lower --lr or try "
        "another --mixed-precision (a resume then needs --allow-change lr or mixed_precision), check the data, or "
        "pass --on-nonfinite skip to drop such steps"
    )


def _all_finite(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Whether every element of ``tensors`` (on any devices) is finite, as a 0-d float tensor on the first's device
    (1 or 0): one largest magnitude per tensor (which a NaN or an infinity makes non-finite, and large finite values
    do not), one read per device."""
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for tensor in tensors:
        if tensor.numel():
            by_device.setdefault(tensor.device, []).append(tensor)
    ok = True
    for group in by_device.values():
        ok = ok and bool(torch.stack([torch.isfinite(n) for n in torch._foreach_norm(group, math.inf)]).all())
    device = tensors[0].device if tensors else torch.device("cpu")
    return torch.tensor(float(ok), device=device)


def _check_weights_finite(run: Run, own_target: bool, step: int) -> None:
    """NonFiniteError where a weight to be saved (the trained parameters, the EMA target) is not finite: a
    checkpoint or an export never holds one. Every process calls it (the verdict is combined)."""
    tensors = [local_tensor(p.detach()) for p in run.trainable]
    if not own_target:
        tensors += [local_tensor(p.detach()) for p in run.target.parameters()]
    ok = _all_finite(tensors)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
    if not bool(ok):
        raise NonFiniteError(f"step {step}: the weights are not finite (NaN or infinite); nothing was saved")


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


def _check_one_job(accelerator: Any) -> None:
    """ValueError where this process was launched as one of several (``WORLD_SIZE`` > 1) but runs alone: several
    separate runs that would write one output folder (``accelerate launch --multi_gpu`` on a machine without GPUs)."""
    launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if launched > 1 and accelerator.num_processes == 1:
        raise ValueError(f"this process was launched as one of {launched} (WORLD_SIZE={launched}) but runs alone: "
                         f"the {launched} processes would be {launched} separate runs into one output; on a machine "
                         "without GPUs launch with --cpu (or ACCELERATE_USE_CPU=1)")  # fmt: skip


class _Lock:
    """The output folder's lock (:data:`LOCK`), held by the main process for the run: a second run into the same
    folder is refused while this one lives; the lock of a process that died is released by the system (the file
    remains, naming the last holder). Where the platform has no ``fcntl``, or the file system no locks (NFS without
    lockd, Lustre mounted noflock), nothing is locked (with a warning in the latter case)."""

    def __init__(self, output: Path) -> None:
        self.file: Any = None
        try:
            import fcntl
        except ImportError:  # not a POSIX system
            return
        path = output / LOCK
        file = path.open("a+")
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):  # no locks on this file system
                file.close()
                warnings.warn(f"output {output}: this file system does not lock files ({error.strerror}); nothing "
                              "stops a second run from writing into the same folder", stacklevel=2)  # fmt: skip
                return
            file.seek(0)
            holder = file.read().strip() or "another process"
            file.close()
            raise ValueError(f"output {output} is in use by another run ({holder}); wait for it to end or pass "
                             "another --output") from None  # fmt: skip
        file.seek(0)
        file.truncate()
        file.write(f"pid {os.getpid()} on {os.uname().nodename if hasattr(os, 'uname') else 'this host'}")
        file.flush()
        self.file = file

    def release(self) -> None:
        if self.file is not None:
            self.file.close()  # closing releases the lock
            self.file = None


def _previous_run(output: Path) -> str | None:
    """What of another run ``output`` holds (its newest checkpoint, or a finished run's card), or None."""
    steps = checkpoint_folders(output / CHECKPOINTS)
    if steps:
        return f"another run's checkpoints (up to {steps[-1].name})"
    if (output / "card.json").is_file():
        return "a finished run's card.json"
    return None


def _prepare_output(config: TrainConfig) -> _Lock:
    """The main process's checks of the output folder, before anything slow: created (:func:`train` checked that it
    can be written), locked for
    this run, our own leftovers of killed runs removed, and another run's checkpoints or results refused (unless
    resumed, or removed with ``overwrite``). Returns the lock (held until released)."""
    output = Path(config.output)  # checked to be writable by train() before accelerate started
    output.mkdir(parents=True, exist_ok=True)
    lock = _Lock(output)
    try:
        _clean(output)
        found = _previous_run(output)
        if found and config.resume is None:
            if not config.overwrite:
                raise ValueError(f"output {output} holds {found}: pass --resume latest to continue it, "
                                 "--overwrite to start over (its checkpoints and results are removed), or another "
                                 "--output")  # fmt: skip
            for name in RUN_OUTPUTS:
                _remove(output / name)
            for comfy in output.glob(f"*{COMFYUI_SUFFIX}"):
                _remove(comfy)
    except BaseException:
        lock.release()
        raise
    return lock


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _clean(output: Path) -> None:
    """Remove the temporary files and folders killed runs of ours left in ``output``."""
    from .._files import clean_leftovers

    clean_leftovers(output)


#: The teachers the trainer takes, for the message that refuses another.
SUPPORTED_TEACHERS = ("UNet2DConditionModel pipelines (SD1.5, SD2.1, SDXL) and UNet2DModel pipelines (pixel space, "
                      "unconditional or class-conditional)")  # fmt: skip


def _check_family(config: TrainConfig, facts: TeacherFacts) -> None:
    """ValueError, before anything loads, for a local teacher whose denoiser is a transformer (a flow-matching
    SD3 or FLUX pipeline): the trainer distills UNets only so far."""
    if facts.transformer_class:
        raise ValueError(f"teacher {config.teacher} denoises with a {facts.transformer_class} (a flow-matching "
                         f"transformer): the trainer takes {SUPPORTED_TEACHERS} so far; flow models are sampled "
                         "with FlowMatchTCDScheduler but not yet distilled")  # fmt: skip


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


def _chosen_checkpoint(accelerator: Any, config: TrainConfig) -> tuple[Path | None, list[dict[str, Any]]]:
    """The checkpoint to resume from, before any model loads: the main process chooses it (``"latest"``: the newest
    good one as it sees the output folder), the others are told; every process checks its files and the settings
    (:func:`_check_settings`), and one that cannot stops all with a ValueError naming it. Returns the folder (None:
    start at step 0) and the settings changed so far (the checkpoint's, and this resume's)."""
    from accelerate.utils import broadcast_object_list

    folder = _everyone(accelerator, lambda: _found_checkpoint(config) if accelerator.is_main_process else None,
                       "resume: finding the checkpoint")  # fmt: skip
    if accelerator.num_processes > 1:
        folder = broadcast_object_list([folder], from_process=0)[0]
    if folder is None:
        return None, []
    # the files hashed once a machine (by its first process), their sizes checked by every process
    hashes = accelerator.local_process_index == 0
    changes: list[dict[str, Any]] = _everyone(accelerator, lambda: _check_settings(Path(folder), config, hashes),
                                              f"resume: reading checkpoint {folder}")  # fmt: skip
    return Path(folder), changes


def _found_checkpoint(config: TrainConfig) -> Path | None:
    """:func:`find_checkpoint`, its notes (a damaged checkpoint skipped, the one used instead) printed as lines."""
    with warnings.catch_warnings(record=True) as notes:
        warnings.simplefilter("always", CheckpointWarning)
        found = find_checkpoint(config)
    for note in notes:
        if issubclass(note.category, CheckpointWarning):
            tqdm.write(f"warning: {note.message}", file=sys.stderr)
        else:
            warnings.warn_explicit(note.message, note.category, note.filename, note.lineno)
    if found is not None:
        _supersede(Path(config.output) / CHECKPOINTS, Path(found))
    return found


def _supersede(root: Path, chosen: Path) -> None:
    """Rename the checkpoints of ``root`` newer than ``chosen`` (a resume from an older one, or past a damaged one)
    to ``<name>.superseded``: kept for inspection, but no longer what ``--resume latest`` or the pruning sees, so
    that a later resume cannot continue the abandoned branch."""
    if chosen.resolve().parent != root.resolve():
        return
    for newer in (p for p in checkpoint_folders(root) if p.name > chosen.name):
        aside = newer.with_name(f"{newer.name}.superseded")
        n = 1
        while aside.exists():
            n += 1
            aside = newer.with_name(f"{newer.name}.superseded-{n}")
        newer.rename(aside)
        tqdm.write(f"{newer.name} is newer than the checkpoint resumed: renamed {aside.name}", file=sys.stderr)


def _check_settings(folder: Path, config: TrainConfig, hashes: bool = True) -> list[dict[str, Any]]:
    """Check the checkpoint in ``folder`` (its files, and the settings that define a run: :func:`check_checkpoint`)
    and that ``config`` continues it: ValueError where ``steps`` is below the checkpoint's, or where a
    :data:`~tcd_sampler.distill.train_config.CHANGEABLE` setting differs that ``allow_changes`` does not name — each
    difference listed. Returns the changes so far, this resume's appended (each ``{"step", "setting", "change"}``)."""
    meta, _ = check_checkpoint(folder, config, hashes)
    step = int(meta["step"])
    _, changed = resume_differences(meta, config)
    if config.steps < step:
        raise ValueError(f"resume: checkpoint {folder} is at step {step}, beyond steps={config.steps}: pass --steps "
                         f"{step} or more (and --allow-change steps)")  # fmt: skip
    refused = [key for key in changed if key not in config.allow_changes]
    if refused:
        listed = "; ".join(f"{key}: {changed[key]}" for key in refused)
        raise ValueError(f"resume: settings differ from checkpoint {folder}'s ({listed}): pass --allow-change "
                         f"{','.join(refused)} to apply them from step {step} (the card records it), or resume with "
                         "the checkpoint's settings")  # fmt: skip
    earlier = list(meta.get("changes", []))
    return earlier + [{"step": step, "setting": key, "change": change} for key, change in changed.items()]


def _resume(
    accelerator: Any, run: Run, config: TrainConfig, folder: Path | None, scaler: Any, schedule: Any
) -> tuple[int, list[float | None]]:  # fmt: skip
    """Load the checkpoint in ``folder`` (:func:`_chosen_checkpoint`; None: start) into every process and set the
    learning rate from this run's settings (``lr`` and the schedule at the checkpoint's step: the same as saved,
    unless changed). Returns the step and the losses so far."""
    if folder is None:
        return 0, []
    target = None if run.target is run.student else run.target
    hashes = accelerator.local_process_index == 0  # verified by _chosen_checkpoint: cached there

    def load() -> tuple[int, list[float | None]]:
        return load_checkpoint(folder, run.student, target, run.optimizer, config, scaler, schedule, hashes=hashes)

    found: tuple[int, list[float | None]] = _everyone(accelerator, load, f"resume: reading checkpoint {folder}")
    schedule.base_lrs = [config.lr for _ in schedule.base_lrs]
    for group, base, factor in zip(run.optimizer.param_groups, schedule.base_lrs, schedule.lr_lambdas, strict=True):
        group["initial_lr"], group["lr"] = base, base * factor(schedule.last_epoch)
    schedule._last_lr = [group["lr"] for group in run.optimizer.param_groups]
    if accelerator.is_main_process:
        tqdm.write(f"resumed from {folder} at step {found[0]}", file=sys.stderr)
    return found


def train(config: TrainConfig, progress: bool = True) -> dict[str, Any]:
    """Run ``config``; returns the card (also written as ``card.json``, beside the LoRA or the ``unet/`` folder).
    See the module docstring."""
    from accelerate import Accelerator

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
    _check_family(config, facts)
    _check_teacher(config, facts.unet_class)
    for name in ("teacher", "data"):  # --overwrite removes result folders such as unet/ from the output
        given = Path(getattr(config, name)).expanduser()
        if given.exists() and given.resolve() == Path(config.output).resolve():
            raise ValueError(f"output {config.output} is the {name} folder: pass another --output")
    problem = folder_problem(config.output)
    if problem:
        raise ValueError(f"output {config.output}: {problem}")
    streamed = detect_source(config.data) == "webdataset"
    if streamed and config.cache_encodings:
        raise ValueError("cache_encodings needs a folder source (it keeps encodings by image); stream shards uncached")
    logs = str(Path(config.output) / "logs") if config.log_with else None
    _check_engine()
    # mixed precision None: the launcher's (accelerate launch --mixed_precision, or its config file)
    accelerator = Accelerator(mixed_precision=config.mixed_precision, log_with=config.log_with, project_dir=logs)
    _check_one_job(accelerator)
    config = dataclasses.replace(config, mixed_precision=str(accelerator.mixed_precision),  # the effective ones
                                 data_options=_data_options(config, facts))  # fmt: skip
    lock = _everyone(accelerator, (lambda: _prepare_output(config)) if accelerator.is_main_process else lambda: None,
                     "preparing the output folder")  # fmt: skip
    try:
        return _train(config, accelerator, facts, streamed, progress)
    finally:
        if lock is not None:
            lock.release()


def _train(config: TrainConfig, accelerator: Any, facts: TeacherFacts, streamed: bool, progress: bool) -> Any:
    """:func:`train` once the output folder is this run's."""
    from diffusers.optimization import get_scheduler

    world, rank = accelerator.num_processes, accelerator.process_index
    options = config.data_options
    # a folder is scanned before any model loads (by the main process; the others read its index); shards are
    # checked as they stream
    dataset = None if streamed else _scan(accelerator, config, options)
    config = dataclasses.replace(config, data_identity=config.data if dataset is None else dataset.fingerprint())
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
    folder, changes = _chosen_checkpoint(accelerator, config)  # before the teacher loads
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
    place(pipe, run, accelerator, ema_device=config.ema_device)
    if config.fsdp:  # before the optimizer state exists and before a resume loads into the shards
        _shard(run, config, run_dtype(accelerator.mixed_precision))
    scaler = accelerator.scaler  # fp16's gradient scaler (None otherwise): part of the state a resume restores
    # stepped once per optimizer step here (accelerate's wrapper would step it once per process)
    name = config.lr_scheduler  # diffusers' "constant" ignores warm-up steps
    name = "constant_with_warmup" if name == "constant" and config.lr_warmup_steps else name
    schedule = get_scheduler(name, run.optimizer, num_warmup_steps=config.lr_warmup_steps,
                             num_training_steps=config.steps)  # fmt: skip
    start, losses = _resume(accelerator, run, config, folder, scaler, schedule)
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
    config = dataclasses.replace(config, validation_prompts=prompts)  # the effective ones
    cache = None if dataset is None or not config.cache_encodings else _cache(accelerator, config, pipe, dataset)
    if dataset is None:
        batches: Any = StreamBatches(config.data, options, pipe, device, rank, world, local, start, null_class)
    else:
        batches = FolderBatches(dataset, pipe, device, config.batch_size, config.seed, rank, local, cache,
                                workers=config.data_workers, start=start, stop=config.steps)  # fmt: skip
    state = _State(start=start, losses=losses, changes=changes, step=start)
    try:
        card = _loop(config, accelerator, run, pipe, path, prediction_type, batches, cache, state, schedule, prompts,
                     progress)  # fmt: skip
    except KeyboardInterrupt:
        saved = _saved_step(config)
        if accelerator.is_main_process:
            where = f"the last checkpoint is step {saved}" if saved else "no checkpoint was written yet"
            tqdm.write(f"interrupted during step {state.step + 1}; {where}: continue with the same command and "
                       "--resume latest", file=sys.stderr)  # fmt: skip
        raise
    finally:
        for closing in (batches, cache):
            getattr(closing, "close", lambda: None)()
    return card


def _saved_step(config: TrainConfig) -> int:
    """The step of the newest checkpoint in the output folder (0: none)."""
    found = checkpoint_folders(Path(config.output) / CHECKPOINTS)
    return int(found[-1].name.split("-")[1]) if found else 0


@dataclasses.dataclass
class _State:
    """Where a run stands: its first step this time, the step being taken, the losses so far (None: a skipped
    step) and the settings changed on resumes."""

    start: int
    losses: list[float | None]
    changes: list[dict[str, Any]]
    step: int = 0


def _loop(
    config: TrainConfig, accelerator: Any, run: Run, pipe: Any, path: Any, prediction_type: str, batches: Any,
    cache: EncodingCache | None, state: _State, schedule: Any, prompts: tuple[str, ...], progress: bool,
) -> dict[str, Any]:  # fmt: skip
    """The steps from ``state.start``, the checkpoints, the validation grids; then the student and its card."""
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    local = config.batch_size // world
    student, optimizer = run.student, run.optimizer
    unwrapped = accelerator.unwrap_model(student)
    own_target = run.target is unwrapped
    names = {id(p): name for name, p in unwrapped.named_parameters()}
    trained_names = [names.get(id(p), f"parameter {i}") for i, p in enumerate(run.trainable)]
    scaler = accelerator.scaler
    text = None if cache is None else cache.text
    T = int(path.num_train_timesteps)
    diffusion = config.objective.method == "diffusion"
    objective = config.objective
    guided = not diffusion and not objective.guidance_min == objective.guidance_max == 1.0  # needs uncond
    start, losses = state.start, state.losses
    began = time.perf_counter()
    label = "train" if diffusion else "distill"
    bar = tqdm(range(start, config.steps), disable=not (progress and accelerator.is_main_process), desc=label)
    sharded = is_sharded(run.target)  # its validation forwards are collectives
    # the steps encode the empty prompt for dropped captions, and for guidance unless SDXL's zeros stand for it
    zeros = hasattr(pipe, "text_encoder_2") and pipe.config.get("force_zeros_for_empty_prompt", True)
    empty = config.data_options.caption_dropout > 0 or (guided and not zeros)
    encoders = _Encoders(pipe, cache, getattr(batches, "dataset", None), device, empty)
    # the losses and finiteness flags not yet read back (every LOG_EVERY steps, and before any save: no sync a step)
    pending: list[tuple[torch.Tensor, torch.Tensor]] = []

    def read_back(done: int) -> None:
        if not pending:
            return
        values: list[float | None] = torch.stack([loss for loss, _ in pending]).tolist()
        flags = torch.stack([f for _, f in pending]).cpu()
        first = done - len(values)
        pending.clear()
        for i, ok in enumerate(flags.all(dim=1).tolist()):
            if ok:
                continue
            if config.on_nonfinite == "stop":
                raise NonFiniteError(_nonfinite_message(first + i + 1, flags[i], trained_names, _saved_step(config)))
            values[i] = None  # skipped: its update was not applied
        losses.extend(values)
        rate = (done - start) / (time.perf_counter() - began)
        shown = [v for v in values if v is not None]
        bar.set_postfix(loss=f"{shown[-1]:.4g}" if shown else "skipped", it_s=f"{rate:.2f}")
        if config.log_with:
            for i, value in enumerate(values):
                if value is not None:
                    accelerator.log({"loss": value}, step=first + i + 1)
            accelerator.log({"steps_per_second": rate, "images_per_second": rate * config.batch_size}, step=done)

    def validate(done: int) -> None:
        if not (accelerator.is_main_process or sharded):  # a sharded target's forwards need every process
            return
        card = _card(config, pipe.scheduler.config, T, world, losses, prediction_type, state.changes)
        shown = unwrapped if own_target else run.target  # what is saved: the EMA
        with encoders.on_device(), _OnDevice(shown, device), accelerator.autocast():  # half-precision encoders
            validation_grid(pipe, shown, card, prompts, _grid_path(config, done), write=accelerator.is_main_process)

    for step in bar:
        state.step = step
        latents, batch = batches(step)
        cond, uncond = conditions(pipe, batch["caption"], batch, device, guided, text)
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
        draws = draw(config.objective, T, (config.batch_size, *latents.shape[1:]), generator)
        draws = draws.rows(rank * local, (rank + 1) * local).to(device)
        loss, flags = _step(config, accelerator, run, path, prediction_type, latents, cond, uncond, draws)
        schedule.step()
        pending.append((accelerator.reduce(loss, reduction="mean"), flags))
        done = step + 1
        checkpoint = (config.checkpoint_every and done % config.checkpoint_every == 0) or done == config.steps
        validating = config.validation_every and (done % config.validation_every == 0 or done == config.steps)
        if done % LOG_EVERY == 0 or checkpoint or validating:
            read_back(done)
            encoders.offload_when_cached()
        if checkpoint:  # every process (a sharded student's shards are written by their owners)
            _check_weights_finite(run, own_target, done)

            def write_checkpoint(done: int = done) -> None:
                save_checkpoint(unwrapped, None if own_target else run.target, optimizer, config, done, losses,
                                scaler, schedule, extra={"changes": state.changes})  # fmt: skip
                if accelerator.is_main_process:
                    prune_checkpoints(config, config.checkpoints_total_limit)

            # a failure (a full disk) on the process that writes stops every process, none left waiting
            _everyone(accelerator, write_checkpoint, f"writing the checkpoint of step {done}")
        if validating:
            validate(done)
    if config.validation_every and start == config.steps and not _grid_path(config, start).is_file():
        validate(start)  # a run killed after its last checkpoint, before its last grid
    card = _card(config, pipe.scheduler.config, T, world, losses, prediction_type, state.changes)
    card["this_run"] = {"first_step": start, "seconds": round(time.perf_counter() - began, 1),
                        "device": str(accelerator.device), "torch_threads": torch.get_num_threads()}  # fmt: skip
    if accelerator.device.type == "cuda":  # this process's peak, weights included
        card["this_run"]["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(accelerator.device) / 2**30, 3)
    _check_weights_finite(run, own_target, config.steps)
    if is_sharded(run.target):  # gathered by every process, saved by the main one as a plain model
        run.target = _gathered(run.target, run.plain_class)

    def export() -> None:
        if accelerator.is_main_process:
            _save_student(pipe, unwrapped, run, config, card)
            write_card(config.output, card)

    _everyone(accelerator, export, "writing the student and its card")  # a failure stops every process
    if config.log_with:
        accelerator.end_training()
    return card


def _grid_path(config: TrainConfig, step: int) -> Path:
    return Path(config.output) / "validation" / f"step-{step:08d}.png"


class _OnDevice:
    """A context within which ``model`` is on ``device`` (an EMA target or an encoder kept in host memory is moved
    there, and back after)."""

    def __init__(self, model: Any, device: torch.device) -> None:
        self.model, self.device = model, device
        self.home = next(model.parameters()).device

    def __enter__(self) -> None:
        if self.home != self.device:
            self.model.to(self.device)

    def __exit__(self, *exc: object) -> None:
        if self.home != self.device:
            self.model.to(self.home)


class _Encoders:
    """The VAE and text encoders of a run with ``cache_encodings``: once every image's latents and every caption's
    encodings are cached they leave the accelerator (for host memory), coming back for the validation grids."""

    NAMES = ("vae", "text_encoder", "text_encoder_2")

    def __init__(self, pipe: Any, cache: EncodingCache | None, dataset: Any, device: torch.device, empty: bool) -> None:
        self.pipe, self.cache, self.dataset, self.device, self.empty = pipe, cache, dataset, device, empty
        self.offloaded = False

    def _models(self) -> list[Any]:
        return [m for m in (getattr(self.pipe, n, None) for n in self.NAMES) if isinstance(m, torch.nn.Module)]

    def offload_when_cached(self) -> None:
        """Move the encoders to the CPU once the cache holds everything (checked at the logging interval)."""
        if self.offloaded or self.cache is None or self.device.type != "cuda":
            return
        if not self.cache.complete(self.dataset, self.empty):
            return
        for model in self._models():
            model.to("cpu")
        self.offloaded = True
        torch.cuda.empty_cache()

    def on_device(self) -> contextlib.ExitStack[bool | None]:
        """A context within which the encoders are on the run's device (the validation grid's pipeline needs them)."""
        stack = contextlib.ExitStack()
        if self.offloaded:
            for model in self._models():
                stack.enter_context(_OnDevice(model, self.device))
        return stack
