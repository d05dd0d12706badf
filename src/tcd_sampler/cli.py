"""The ``tcd-sampler`` command.

- ``tcd-sampler schedule`` prints, for each requested number of steps, the timesteps of a TCD loop, the target ``s``
  of every step and its coefficients (``α_t, σ_t, α_s, σ_s`` and the re-noising scales), for a given ``gamma``.
- ``tcd-sampler demo`` (what ``make demo`` runs) samples the shipped TCD and LCM students and the exact teacher at
  1–8 NFE and prints, plots and saves the metrics (see :mod:`tcd_sampler.demo`).
- ``tcd-sampler distill`` trains a student with TCD (or LCM) distillation (see :mod:`tcd_sampler.distill`).
- ``tcd-sampler generate`` runs a diffusers model (local folder or Hub id, optionally with a LoRA) with TCD:
  text-to-image, image-to-image (``--image``) or inpainting (``--image`` and ``--mask``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

from ._frontend import check_int, check_number
from .integrations.pipelines import MissingModelError
from .scheduler import DEFAULT_ETA, TCDScheduler

__all__ = ["main"]


def _schedule_rows(scheduler: TCDScheduler, steps: int, gamma: float) -> list[dict[str, float | int | bool]]:
    scheduler.set_timesteps(steps)
    return [asdict(row) for row in scheduler.step_table(gamma).rows]


def _print_table(steps: int, gamma: float, rows: list[dict[str, float | int | bool]]) -> None:
    print(f"\n{steps} step(s), gamma = {gamma}")
    head = f"{'i':>2} {'t':>4} {'t_prev':>6} {'s':>4} {'alpha_t':>9} {'sigma_t':>9} {'alpha_s':>9} {'sigma_s':>9}"
    print(head + f" {'renoise':>9} {'noise':>9}")
    for i, r in enumerate(rows):
        noise = f"{r['renoise']:9.5f} {r['noise']:9.5f}" if r["draws_noise"] else f"{'-':>9} {'-':>9}"
        print(
            f"{i:>2} {r['t']:>4} {r['t_prev']:>6} {r['s']:>4} {r['alpha_t']:9.5f} {r['sigma_t']:9.5f} "
            f"{r['alpha_s']:9.5f} {r['sigma_s']:9.5f} {noise}"
        )


def _cmd_schedule(args: argparse.Namespace) -> int:
    given = {"prediction_type": args.prediction_type, "timestep_spacing": args.spacing}
    overrides = {k: v for k, v in given.items() if v is not None}
    scheduler = TCDScheduler.from_pretrained(args.config, **overrides) if args.config else TCDScheduler(**overrides)
    result = {steps: _schedule_rows(scheduler, steps, args.gamma) for steps in args.steps}
    if args.json:
        json.dump({"gamma": args.gamma, "schedules": result}, sys.stdout, indent=2)
        print()
        return 0
    print(
        f"TCD schedules (T = {scheduler.config.num_train_timesteps}, "
        f"original_inference_steps = {scheduler.config.original_inference_steps}, "
        f"spacing = {scheduler.config.timestep_spacing})"
    )
    print("x_s = alpha_s*x0_hat + sigma_s*eps_hat;  x_next = renoise*x_s + noise*z  ('-': no noise, x_next = x_s)")
    for steps, rows in result.items():
        _print_table(steps, args.gamma, rows)
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .integrations.pipelines import GenerationRequest, generate  # imports diffusers when run

    request = GenerationRequest(
        model=args.model,
        prompt=args.prompt,
        output=Path(args.output),
        negative_prompt=args.negative_prompt,
        lora=args.lora,
        steps=args.steps,
        gamma=args.gamma,
        guidance=args.guidance,
        seed=args.seed,
        width=args.width,
        height=args.height,
        image=Path(args.image) if args.image else None,
        strength=args.strength,
        mask=Path(args.mask) if args.mask else None,
        device=args.device,
    )
    print(f"wrote {generate(request)}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.output_dir, samples=args.samples, seed=args.seed, figure=not args.no_figure)
    return 0


def _cmd_distill(args: argparse.Namespace) -> int:
    from .distill import DistillConfig, distill, save_student

    config = DistillConfig(
        method=args.method,
        data=args.data,
        steps=args.steps,
        warmup_steps=args.warmup_steps,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    model, card = distill(config)
    path = save_student(model, card, args.output)
    print(f"wrote {path} (final loss {card['loss'][-1]:.5f})" if card["loss"] else f"wrote {path}")
    return 0


def _argument(parse: Callable[[str], Any], check: Callable[..., Any], name: str, *bounds: Any, **kw: Any) -> Any:
    """An argparse ``type`` that parses, then validates with the library's own checks (same messages)."""

    def convert(text: str) -> Any:
        try:
            return check(name, parse(text), *bounds, **kw)
        except (TypeError, ValueError) as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return convert


_positive_int = _argument(int, check_int, "value", 1)
_strength = _argument(float, check_number, "strength", 0.0, 1.0, low_open=True)
_unit_float = _argument(float, check_number, "gamma", 0.0, 1.0)


def _multiple_of_8(text: str) -> int:
    value: int = _positive_int(text)
    if value % 8:
        raise argparse.ArgumentTypeError(f"must be a multiple of 8, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``tcd-sampler``."""
    parser = argparse.ArgumentParser(prog="tcd-sampler", description=__doc__.strip().splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sched = sub.add_parser("schedule", help="print TCD schedules, the targets s and the step coefficients")
    sched.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8], help="numbers of steps (default 1 2 4 8)")
    sched.add_argument(
        "--gamma", type=_unit_float, default=DEFAULT_ETA, help="stochasticity gamma in [0, 1] (default 0.3)"
    )
    sched.add_argument("--prediction-type", choices=["epsilon", "sample", "v_prediction"])
    sched.add_argument(
        "--spacing",
        choices=["leading", "trailing", "linspace"],
        help="timestep_spacing (default: the config's, leading)",
    )
    sched.add_argument("--config", help="a scheduler_config.json or a folder holding one (default: SD/SDXL values)")
    sched.add_argument("--json", action="store_true", help="print JSON instead of tables")
    sched.set_defaults(func=_cmd_schedule)

    demo = sub.add_parser("demo", help="the main job: TCD vs LCM vs the teacher on a toy model, measured")
    demo.add_argument("--output-dir", default="demo_out", help="where demo.json and demo.png go (default demo_out)")
    demo.add_argument("--samples", type=_positive_int, default=4000, help="samples per method and NFE (default 4000)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the initial noise and data (default 0)")
    demo.add_argument("--no-figure", action="store_true", help="skip the PNG (no matplotlib needed)")
    demo.set_defaults(func=_cmd_demo)

    dist = sub.add_parser("distill", help="distill a student from the exact teacher with TCD (or LCM)")
    dist.add_argument("--method", choices=["tcd", "lcm"], default="tcd")
    dist.add_argument("--data", choices=["ring2d", "gmm16"], default="ring2d")
    dist.add_argument("--steps", type=int, default=4000, help="distillation steps (default 4000)")
    dist.add_argument("--warmup-steps", type=int, default=3000, help="teacher-regression steps first (default 3000)")
    dist.add_argument("--batch-size", type=_positive_int, default=1024)
    dist.add_argument("--seed", type=int, default=0)
    dist.add_argument("--output", required=True, help="folder for student.safetensors and card.json")
    dist.set_defaults(func=_cmd_distill)

    gen = sub.add_parser("generate", help="generate an image with a diffusers model and TCD sampling")
    gen.add_argument("--model", required=True, help="a local diffusers model folder or a Hugging Face Hub id")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--negative-prompt", help="only used with --guidance > 1")
    gen.add_argument("--lora", help="a LoRA to load and fuse (folder, file or Hub id), e.g. h1t/TCD-SDXL-LoRA")
    gen.add_argument("--steps", type=_positive_int, default=4, help="number of model calls (default 4)")
    gen.add_argument("--gamma", type=_unit_float, default=DEFAULT_ETA, help="TCD's gamma / eta in [0, 1] (default 0.3)")
    gen.add_argument("--guidance", type=float, default=0.0, help="classifier-free guidance scale (default 0: off)")
    gen.add_argument("--seed", type=int, default=0, help="seed of the initial noise (default 0)")
    gen.add_argument("--width", type=_multiple_of_8, help="image width (default: the model's)")
    gen.add_argument("--height", type=_multiple_of_8, help="image height (default: the model's)")
    gen.add_argument("--image", help="an input image: image-to-image, or inpainting with --mask")
    gen.add_argument("--strength", type=_strength, default=0.8, help="how much of --image to redraw (default 0.8)")
    gen.add_argument("--mask", help="inpainting mask (white = repaint); needs --image")
    gen.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    gen.add_argument("--output", default="tcd.png", help="where to write the image (default tcd.png)")
    gen.set_defaults(func=_cmd_generate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tcd-sampler`` console command."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ValueError, TypeError, FileNotFoundError, ImportError) as err:
        print(f"tcd-sampler: error: {err}", file=sys.stderr)
        return 2
    except MissingModelError as err:  # what is missing and how to get it
        print(f"tcd-sampler: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
