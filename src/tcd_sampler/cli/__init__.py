"""The ``tcd-sampler`` command.

- ``tcd-sampler schedule`` prints, for each requested number of steps, the timesteps of a TCD loop, the target ``s``
  of every step and its coefficients (``α_t, σ_t, α_s, σ_s`` and the re-noising scales), for a given ``gamma``.
- ``tcd-sampler demo`` (what ``make demo`` runs) samples the shipped digits teacher and its TCD and LCM students at
  1–8 NFE and prints, plots and saves FID, class accuracy, precision and recall (see
  :mod:`tcd_sampler.evaluation.digits.demo`); ``tcd-sampler demo-2d`` is the 2-D study with an exact teacher (see
  :mod:`tcd_sampler.evaluation.demo`); ``tcd-sampler digits`` prepares the digits models' ingredients.
- ``tcd-sampler distill`` trains a toy student with TCD (or LCM) distillation (see :mod:`tcd_sampler.distill`);
  ``tcd-sampler train`` trains or distills a diffusers pipeline's UNet (:mod:`tcd_sampler.distill.train`).
- ``tcd-sampler generate`` runs a diffusers model (local folder or Hub id, optionally with a LoRA) with TCD:
  text-to-image, image-to-image (``--image``) or inpainting (``--image`` and ``--mask``).

Every command checks its arguments before it loads a model or starts slow work. Any error it expects (a bad
argument, an unreadable input, an unwritable output, a model that cannot be found) ends the command with exit code 2
and exactly one line on stderr, ``tcd-sampler: error: <message>``, argparse's own errors included (no usage
block). Outputs are written atomically: a failed or interrupted run leaves no partial file.

This package holds the parser and :func:`main`; the argument types and the error format are in
:mod:`~tcd_sampler.cli.arguments`, the command bodies in :mod:`~tcd_sampler.cli.commands`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..integrations.pipelines import MissingModelError
from ..schedulers.config_file import package_version
from ..schedulers.vp import DEFAULT_ETA
from .arguments import (
    PROG,
    Parser,
    guidance,
    multiple_of_8,
    non_negative_int,
    positive_int,
    print_error,
    seed,
    strength,
    unit_float,
)
from .commands import _cmd_distill, _cmd_generate, _cmd_schedule
from .digits import add_demo_parsers
from .train import add_train_parser

__all__ = ["build_parser", "main", "version"]

DESCRIPTION = (
    "Few-step TCD (Trajectory Consistency Distillation) sampling for diffusion and flow-matching models: print TCD "
    "schedules, generate images with diffusers models (Stable Diffusion, SDXL, LCM, SD3, FLUX; with a LoRA such as "
    "h1t/TCD-SDXL-LoRA), distill a toy student, train TCD students of diffusers models, and run the demo."
)

EPILOG = """\
commands:
  schedule  print TCD schedules: timesteps, targets s and step coefficients for a gamma
  generate  generate an image with a diffusers model and TCD sampling (text-to-image, img2img, inpainting)
  distill   distill a student from the exact toy teacher with TCD (or LCM)
  train     distill a diffusers pipeline's UNet with TCD (or LCM), LoRA or full, on accelerate
  demo      the main job: a digits model trained here, its TCD and LCM students and the teacher's solvers at
            1-8 NFE, with FID, class accuracy, precision and recall
  demo-2d   the 2-D study: TCD vs LCM vs the exact teacher on a toy model at 1-8 NFE
  digits    prepare the digits models' ingredients (training data, untrained teacher, classifier)

Run `tcd-sampler COMMAND --help` for a command's options. Errors: exit code 2 and one line on stderr."""


def version() -> str:
    """The installed distribution's version, else the package's ``__version__`` (:func:`config.package_version`)."""
    return package_version()


# ------------------------------------------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``tcd-sampler`` (its errors print one line and exit with code 2)."""
    parser = Parser(
        prog=PROG, description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", help="one of the commands below")

    sched = sub.add_parser("schedule", description="print TCD schedules, the targets s and the step coefficients")
    sched.add_argument(
        "--steps", type=positive_int, nargs="+", default=[1, 2, 4, 8], help="numbers of steps (default 1 2 4 8)"
    )
    sched.add_argument(
        "--gamma", type=unit_float, default=DEFAULT_ETA, help="stochasticity gamma in [0, 1] (default 0.3)"
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

    gen = sub.add_parser("generate", description="generate an image with a diffusers model and TCD sampling")
    gen.add_argument("--model", required=True, help="a local diffusers model folder or a Hugging Face Hub id")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--negative-prompt", help="only used with --guidance > 1")
    gen.add_argument(
        "--lora", help="a LoRA to load and fuse (file, folder or Hub id), e.g. h1t/TCD-SDXL-LoRA; needs peft"
    )
    gen.add_argument(
        "--steps", type=positive_int, default=4, help="number of model calls, ≥ 1 (default 4; img2img: see --strength)"
    )
    gen.add_argument("--gamma", type=unit_float, default=DEFAULT_ETA, help="TCD's gamma / eta in [0, 1] (default 0.3)")
    gen.add_argument("--guidance", type=guidance, default=0.0, help="classifier-free guidance ≥ 0 (default 0: off)")
    gen.add_argument("--seed", type=seed, default=0, help="seed of the initial noise, ≥ 0 (default 0)")
    gen.add_argument("--width", type=multiple_of_8, help="image width, a multiple of 8 (default: the model's)")
    gen.add_argument("--height", type=multiple_of_8, help="image height, a multiple of 8 (default: the model's)")
    gen.add_argument(
        "--image",
        help="an input image (any format Pillow reads): image-to-image, or inpainting with --mask; the output takes "
        "its size unless --width/--height are given",
    )
    gen.add_argument(
        "--strength",
        type=strength,
        default=0.8,
        help="how much of --image to redraw, in (0, 1] (default 0.8); SD/SDXL/LCM pipelines run int(steps × "
        "strength) steps, so it must be ≥ 1/steps",
    )
    gen.add_argument("--mask", help="inpainting mask the size of --image (white = repaint); needs --image")
    gen.add_argument("--device", help="torch device: cpu, cuda, cuda:N or mps (default: cuda if available, else cpu)")
    gen.add_argument(
        "--output",
        default="tcd.png",
        help="the image file to write; its extension picks the format (.png, .jpg, .webp …); missing folders are "
        "created (default tcd.png)",
    )
    gen.set_defaults(func=_cmd_generate)

    dist = sub.add_parser("distill", description="distill a student from the exact teacher with TCD (or LCM)")
    dist.add_argument("--method", choices=["tcd", "lcm"], default="tcd", help="distillation method (default tcd)")
    dist.add_argument("--data", choices=["ring2d", "gmm16"], default="ring2d", help="toy data set (default ring2d)")
    dist.add_argument("--steps", type=positive_int, default=4000, help="distillation steps, ≥ 1 (default 4000)")
    dist.add_argument(
        "--warmup-steps", type=non_negative_int, default=3000, help="teacher-regression steps, ≥ 0 (default 3000)"
    )
    dist.add_argument("--batch-size", type=positive_int, default=1024, help="batch size, ≥ 1 (default 1024)")
    dist.add_argument("--seed", type=seed, default=0, help="seed of the initialisation and every draw (default 0)")
    dist.add_argument(
        "--output", required=True, help="folder for student.safetensors and card.json (created if missing)"
    )
    dist.set_defaults(func=_cmd_distill)

    add_train_parser(sub)

    add_demo_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tcd-sampler`` console command; returns the exit code.

    Args:
        argv: the arguments, without the program name. Default: ``sys.argv[1:]``.

    Returns 0 on success (``--help`` and ``--version`` included), 2 for a bad argument or any expected error (one
    line on stderr: ``tcd-sampler: error: <message>``), 130 when interrupted. Any ValueError, TypeError, OSError or
    ImportError counts as expected, also one raised while a model runs; other exceptions propagate."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # --help, --version, or an argument error already printed by Parser.error
        return done.code if isinstance(done.code, int) else 0 if done.code is None else 2
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError, ImportError, MissingModelError) as err:
        print_error(str(err) or type(err).__name__)
        return 2
