"""``tcd-sampler train``: TCD (or LCM) distillation of a diffusers pipeline's UNet (:mod:`tcd_sampler.distill.train`).
Run it under ``accelerate launch`` for several processes; every argument is checked before a model loads."""

from __future__ import annotations

import argparse
from typing import Any

from ..distill.train_config import CHANGEABLE, LR_SCHEDULERS, NONFINITE, OPTIMIZERS, TRACKERS, TrainConfig
from .arguments import guidance, multiple_of_8, non_negative_int, positive_int, positive_unit_float, seed, unit_float

__all__ = ["add_train_parser"]


def add_train_parser(sub: Any) -> None:
    """Add the ``train`` command to the subcommand parsers ``sub``."""
    p = sub.add_parser(
        "train",
        description="distill a diffusers pipeline's UNet with TCD (or LCM), LoRA or full, or train it (--method "
        "diffusion); run it under `accelerate launch` for several processes or GPUs",
    )
    p.add_argument("--teacher", required=True, help="the teacher pipeline: a local folder or a Hub id")
    p.add_argument("--data", required=True, help="an image folder with caption files, or with a metadata.jsonl")
    p.add_argument("--output", required=True, help="the run's folder: checkpoints/, card.json (created if missing)")
    p.add_argument(
        "--method",
        choices=["tcd", "lcm", "diffusion"],
        default="tcd",
        help="tcd or lcm distillation, or diffusion: train the teacher itself (default tcd)",
    )
    p.add_argument("--lora-rank", type=non_negative_int, default=64, help="LoRA rank; 0 trains the full UNet (64)")
    p.add_argument("--lora-alpha", type=positive_int, help="LoRA alpha (default: the rank)")
    p.add_argument("--lora-targets", type=_lora_targets, default=TrainConfig.lora_targets, metavar="MODULES",
                   help="the modules a LoRA adapts: default (diffusers' LCM-LoRA list), attention, or module names "
                   "separated by commas (default: default)")  # fmt: skip
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute the student's activations in "
                   "the backward pass: less memory, about a third more time")  # fmt: skip
    p.add_argument("--resolution", type=multiple_of_8, default=512, help="training image side (default 512)")
    p.add_argument("--batch-size", type=positive_int, default=4, help="global batch, split across processes (4)")
    p.add_argument("--steps", type=positive_int, default=1000, help="optimizer steps (default 1000)")
    p.add_argument("--lr", type=positive_unit_float, default=1e-4, help="learning rate in (0, 1] (default 1e-4)")
    p.add_argument("--lr-scheduler", choices=LR_SCHEDULERS, default=TrainConfig.lr_scheduler,
                   help="the learning rate over the steps, after the warm-up (default constant)")  # fmt: skip
    p.add_argument("--lr-warmup-steps", type=non_negative_int, default=TrainConfig.lr_warmup_steps,
                   help="steps of linear warm-up from 0 (default 0)")  # fmt: skip
    p.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default=TrainConfig.optimizer,
                   help="adamw, or adamw8bit (bitsandbytes; 8-bit moments) (default adamw)")  # fmt: skip
    p.add_argument("--allow-tf32", action="store_true", help="TF32 matmuls on Ampere and newer GPUs")
    p.add_argument("--compile", action="store_true", help="torch.compile the student (slower first steps)")
    p.add_argument("--fsdp", action="store_true", help="shard a full student, its EMA and optimizer state across "
                   "the processes (torch FSDP2; under accelerate launch, --lora-rank 0)")  # fmt: skip
    p.add_argument("--guidance-min", type=guidance, default=3.0, help="smallest guidance scale ω (default 3)")
    p.add_argument("--guidance-max", type=guidance, default=15.0, help="largest guidance scale ω (default 15)")
    p.add_argument("--loss", choices=["huber", "l2"], default="huber", help="the distance d (default huber)")
    p.add_argument("--ema-decay", type=unit_float, default=0.95, help="EMA of a full student's target (0.95)")
    p.add_argument("--checkpoint-every", type=non_negative_int, default=500, help="steps between checkpoints (500)")
    p.add_argument("--checkpoints-total-limit", type=non_negative_int, default=TrainConfig.checkpoints_total_limit,
                   metavar="N", help="keep only the N newest checkpoints (default 0: all)")  # fmt: skip
    p.add_argument("--resume", help="'latest' or a checkpoint folder to resume from")
    p.add_argument("--allow-change", type=_changes, default=(), metavar="SETTINGS", dest="allow_changes",
                   help="settings a resume may change from its checkpoint's, joined by commas, applied from the "
                   f"resume point and recorded in the card: {', '.join(CHANGEABLE)} (default: none)")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="start over in an output folder that holds another "
                   "run's checkpoints or results (they are removed; the encodings cache stays)")  # fmt: skip
    p.add_argument("--on-nonfinite", choices=NONFINITE, default=TrainConfig.on_nonfinite,
                   help="at a step with a NaN or infinite loss or gradient: stop (naming it; nothing of it is saved) "
                   "or skip its update (default stop)")  # fmt: skip
    p.add_argument("--ema-device", choices=["cpu"], help="keep the EMA of --method diffusion in host memory (less "
                   "accelerator memory, a copy to the host every step; not with --fsdp)")  # fmt: skip
    p.add_argument("--gradient-accumulation", type=positive_int, default=1, help="micro-batches per step (1)")
    p.add_argument("--validation-every", type=non_negative_int, default=0,
                   help="write a grid of TCD samples at 1/2/4/8 steps every N steps (default 0: never)")  # fmt: skip
    p.add_argument("--validation-prompt", action="append", dest="validation_prompts", metavar="PROMPT",
                   help="a prompt of the validation grid (repeat for more rows)")  # fmt: skip
    p.add_argument(
        "--mixed-precision",
        choices=["no", "fp16", "bf16"],
        help="the frozen weights' precision, under autocast (default: accelerate launch's, else no)",
    )
    p.add_argument("--caption-dropout", type=unit_float, default=0.1, help="empty-caption rate for CFG (0.1)")
    p.add_argument("--seed", type=seed, default=0, help="seed of the data order and every draw (default 0)")
    p.add_argument("--log-with", choices=sorted(TRACKERS), help="an accelerate tracker for the loss curve "
                   "(tensorboard: event files in OUTPUT/logs)")  # fmt: skip
    p.add_argument("--guidance-embedding", type=non_negative_int, default=0, metavar="DIM",
                   help="condition a full student on the guidance scale (LCM's w-embedding; 256 as LCM): it then "
                   "samples at any scale in the range without CFG (default 0: off)")  # fmt: skip
    p.add_argument("--cache-encodings", action="store_true", help="encode each image and caption once, kept on "
                   "disk for this and later runs (center crops, no flip)")  # fmt: skip
    p.add_argument("--cache-dir", help="the encodings' folder (default OUTPUT/encodings)")
    p.add_argument(
        "--data-workers",
        type=non_negative_int,
        default=TrainConfig.data_workers,
        metavar="N",
        help="processes that read images ahead of the steps, per training process (default 2)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train)


def _changes(text: str) -> tuple[str, ...]:
    """``--allow-change``: setting names of CHANGEABLE joined by commas."""
    names = tuple(name.strip() for name in text.split(","))
    unknown = [name for name in names if name not in CHANGEABLE]
    if unknown:
        raise argparse.ArgumentTypeError(f"expected settings from {', '.join(CHANGEABLE)} joined by commas, got "
                                         f"{', '.join(map(repr, unknown))}")  # fmt: skip
    return names


def _lora_targets(text: str) -> str | tuple[str, ...]:
    """``--lora-targets``: a preset name (default, attention) or module names separated by commas."""
    if text in ("default", "attention"):
        return text
    names = tuple(name.strip() for name in text.split(","))
    if not all(names):
        raise argparse.ArgumentTypeError(f"expected default, attention or module names joined by commas, got {text!r}")
    return names


def _cmd_train(args: argparse.Namespace) -> int:
    from ..distill.data import DataOptions
    from ..distill.objective import Objective
    from ..distill.train import TrainConfig, train

    prompts = tuple(args.validation_prompts or TrainConfig.validation_prompts)
    objective = Objective(method=args.method, guidance_min=args.guidance_min, guidance_max=args.guidance_max,
                          distance=args.loss, guidance_embedding_dim=args.guidance_embedding)  # fmt: skip
    config = TrainConfig(
        teacher=args.teacher, data=args.data, output=args.output, objective=objective, lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha, resolution=args.resolution, batch_size=args.batch_size, steps=args.steps,
        lr=args.lr, ema_decay=args.ema_decay, checkpoint_every=args.checkpoint_every, resume=args.resume,
        mixed_precision=args.mixed_precision, seed=args.seed, gradient_accumulation=args.gradient_accumulation,
        validation_every=args.validation_every, validation_prompts=prompts, log_with=args.log_with,
        cache_encodings=args.cache_encodings, cache_dir=args.cache_dir, data_workers=args.data_workers,
        lora_targets=args.lora_targets,
        gradient_checkpointing=args.gradient_checkpointing, lr_scheduler=args.lr_scheduler,
        lr_warmup_steps=args.lr_warmup_steps, optimizer=args.optimizer, allow_tf32=args.allow_tf32,
        compile=args.compile, fsdp=args.fsdp, checkpoints_total_limit=args.checkpoints_total_limit,
        allow_changes=args.allow_changes, overwrite=args.overwrite, on_nonfinite=args.on_nonfinite,
        ema_device=args.ema_device,
        data_options=DataOptions(resolution=args.resolution, caption_dropout=args.caption_dropout, seed=args.seed),
    )  # fmt: skip
    card = train(config, progress=not args.no_progress)
    done = [loss for loss in card["losses"] if loss is not None]
    if done:
        skipped = f" ({len(card['skipped_steps'])} skipped)" if card["skipped_steps"] else ""
        print(f"trained {card['steps']} steps{skipped} on {card['processes']} process(es); final loss {done[-1]:.5g}")
    return 0
