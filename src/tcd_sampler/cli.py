"""The ``tcd-sampler`` command.

- ``tcd-sampler schedule`` prints, for each requested number of steps, the timesteps of a TCD loop, the target ``s``
  of every step and its coefficients (``α_t, σ_t, α_s, σ_s`` and the re-noising scales), for a given ``gamma``.
- ``tcd-sampler demo`` (what ``make demo`` runs) samples the shipped TCD and LCM students and the exact teacher at
  1–8 NFE and prints, plots and saves the metrics (see :mod:`tcd_sampler.demo`).
- ``tcd-sampler distill`` trains a student with TCD (or LCM) distillation (see :mod:`tcd_sampler.distill`).
- ``tcd-sampler generate`` runs a diffusers model (local folder or Hub id, optionally with a LoRA) with TCD:
  text-to-image, image-to-image (``--image``) or inpainting (``--image`` and ``--mask``).

Every command checks its arguments before it loads a model or starts slow work. Any error it expects (a bad
argument, an unreadable input, an unwritable output, a model that cannot be found) ends the command with exit code 2
and exactly one line on stderr, ``tcd-sampler: error: <message>``, argparse's own errors included (no usage
block). Outputs are written atomically: a failed or interrupted run leaves no partial file.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, NoReturn

from ._files import folder_problem
from .core.checks import check_int, check_number
from .integrations.pipelines import MissingModelError
from .schedulers.config_file import package_version
from .schedulers.vp import DEFAULT_ETA, TCDScheduler

__all__ = ["build_parser", "main", "version"]

PROG = "tcd-sampler"

DESCRIPTION = (
    "Few-step TCD (Trajectory Consistency Distillation) sampling for diffusion and flow-matching models: print TCD "
    "schedules, generate images with diffusers models (Stable Diffusion, SDXL, LCM, SD3, FLUX; with a LoRA such as "
    "h1t/TCD-SDXL-LoRA), distill a toy student, and run the demo."
)

EPILOG = """\
commands:
  schedule  print TCD schedules: timesteps, targets s and step coefficients for a gamma
  generate  generate an image with a diffusers model and TCD sampling (text-to-image, img2img, inpainting)
  distill   distill a student from the exact toy teacher with TCD (or LCM)
  demo      the main job: TCD vs LCM vs the teacher on a toy model at 1-8 NFE, measured

Run `tcd-sampler COMMAND --help` for a command's options. Errors: exit code 2 and one line on stderr."""


def version() -> str:
    """The installed distribution's version, else the package's ``__version__`` (:func:`config.package_version`)."""
    return package_version()


def _one_line(text: str) -> str:
    """``text`` on one line: its lines stripped and joined by spaces."""
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def _print_error(message: str) -> None:
    print(f"{PROG}: error: {_one_line(message) or 'unknown error'}", file=sys.stderr)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, ``tcd-sampler: error: <message> (see `<prog> --help`)``, with
    exit code 2 (argparse's code; its usage block is left out)."""

    def error(self, message: str) -> NoReturn:
        _print_error(f"{message} (see `{self.prog} --help`)")
        raise SystemExit(2)


# ------------------------------------------------------------------------------------------------ argument types


def _argument(parse: Callable[[str], Any], check: Callable[..., Any], *bounds: Any, **kw: Any) -> Any:
    """An argparse ``type`` that parses, then validates with the library's own checks (same messages, less the
    parameter name, since argparse names the option)."""
    kind = "an integer" if parse is int else "a number"

    def convert(text: str) -> Any:
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}") from None
        try:
            return check("value", value, *bounds, **kw)
        except (TypeError, ValueError) as err:
            raise argparse.ArgumentTypeError(str(err).removeprefix("value ")) from None

    return convert


_positive_int = _argument(int, check_int, 1)
_non_negative_int = _argument(int, check_int, 0)
_seed = _argument(int, check_int, 0, 2**63 - 1)
_strength = _argument(float, check_number, 0.0, 1.0, low_open=True)
_unit_float = _argument(float, check_number, 0.0, 1.0)
_non_negative_float = _argument(float, check_number, 0.0, math.inf)


def _guidance(text: str) -> float:
    value: float = _non_negative_float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number ≥ 0, got {text}")
    return value


#: The largest --width/--height accepted (16384 px: far beyond what the supported models generate).
MAX_SIDE = 16384


def _multiple_of_8(text: str) -> int:
    value: int = _positive_int(text)
    if value % 8 or value > MAX_SIDE:
        raise argparse.ArgumentTypeError(f"must be a positive multiple of 8 up to {MAX_SIDE}, got {text}")
    return value


# ---------------------------------------------------------------------------------------------------- commands


def _require(command: str, modules: dict[str, str], extra: str) -> None:
    """ImportError naming the missing distributions (``modules``: import name → distribution) of ``command``."""
    missing = [dist for module, dist in modules.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise ImportError(f"{PROG} {command} needs {', '.join(missing)}: pip install 'tcd-sampler[{extra}]'")


def _check_output_folder(option: str, folder: str) -> None:
    problem = folder_problem(folder)
    if problem:
        raise ValueError(f"{option} {folder}: {problem}; pass a folder (created if missing)")


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


def _load_schedule_config(config: str, overrides: dict[str, Any]) -> TCDScheduler:
    """``TCDScheduler.from_pretrained(config)``; a Hub lookup that fails says why and what to do instead."""
    from .integrations.pipelines import hub_error_message
    from .schedulers.config_file import looks_local

    try:
        return TCDScheduler.from_pretrained(config, **overrides)
    except OSError as err:
        if Path(config).exists() or looks_local(config):
            raise
        hint = "pass --config a local scheduler_config.json or a folder holding one"
        raise MissingModelError(hub_error_message(config, "scheduler_config.json", err, hint)) from None


def _cmd_schedule(args: argparse.Namespace) -> int:
    given = {"prediction_type": args.prediction_type, "timestep_spacing": args.spacing}
    overrides = {k: v for k, v in given.items() if v is not None}
    scheduler = _load_schedule_config(args.config, overrides) if args.config else TCDScheduler(**overrides)
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
    from .integrations.pipelines import GenerationRequest, generate  # imports diffusers when run

    if args.output.endswith(("/", os.sep)):  # Path() would drop the slash and write a file
        raise ValueError(f"--output {args.output} names a folder; pass an image file path such as {args.output}tcd.png")
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
    print(f"wrote {generate(request)}")  # generate checks the request before it loads the model
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    needed = {"ot": "pot", "scipy": "scipy", "safetensors": "safetensors"}
    if not args.no_figure:
        needed["matplotlib"] = "matplotlib (or pass --no-figure)"
    _require("demo", needed, "eval")
    _check_output_folder("--output-dir", args.output_dir)
    from .demo import run_demo

    run_demo(args.output_dir, samples=args.samples, seed=args.seed, figure=not args.no_figure)
    return 0


def _cmd_distill(args: argparse.Namespace) -> int:
    _require("distill", {"safetensors": "safetensors"}, "eval")
    _check_output_folder("--output", args.output)
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


# ------------------------------------------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``tcd-sampler`` (its errors print one line and exit with code 2)."""
    parser = _Parser(
        prog=PROG, description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", help="one of the commands below")

    sched = sub.add_parser("schedule", description="print TCD schedules, the targets s and the step coefficients")
    sched.add_argument(
        "--steps", type=_positive_int, nargs="+", default=[1, 2, 4, 8], help="numbers of steps (default 1 2 4 8)"
    )
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

    gen = sub.add_parser("generate", description="generate an image with a diffusers model and TCD sampling")
    gen.add_argument("--model", required=True, help="a local diffusers model folder or a Hugging Face Hub id")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--negative-prompt", help="only used with --guidance > 1")
    gen.add_argument(
        "--lora", help="a LoRA to load and fuse (file, folder or Hub id), e.g. h1t/TCD-SDXL-LoRA; needs peft"
    )
    gen.add_argument(
        "--steps", type=_positive_int, default=4, help="number of model calls, ≥ 1 (default 4; img2img: see --strength)"
    )
    gen.add_argument("--gamma", type=_unit_float, default=DEFAULT_ETA, help="TCD's gamma / eta in [0, 1] (default 0.3)")
    gen.add_argument("--guidance", type=_guidance, default=0.0, help="classifier-free guidance ≥ 0 (default 0: off)")
    gen.add_argument("--seed", type=_seed, default=0, help="seed of the initial noise, ≥ 0 (default 0)")
    gen.add_argument("--width", type=_multiple_of_8, help="image width, a multiple of 8 (default: the model's)")
    gen.add_argument("--height", type=_multiple_of_8, help="image height, a multiple of 8 (default: the model's)")
    gen.add_argument(
        "--image",
        help="an input image (any format Pillow reads): image-to-image, or inpainting with --mask; the output takes "
        "its size unless --width/--height are given",
    )
    gen.add_argument(
        "--strength",
        type=_strength,
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
    dist.add_argument("--steps", type=_positive_int, default=4000, help="distillation steps, ≥ 1 (default 4000)")
    dist.add_argument(
        "--warmup-steps", type=_non_negative_int, default=3000, help="teacher-regression steps, ≥ 0 (default 3000)"
    )
    dist.add_argument("--batch-size", type=_positive_int, default=1024, help="batch size, ≥ 1 (default 1024)")
    dist.add_argument("--seed", type=_seed, default=0, help="seed of the initialisation and every draw (default 0)")
    dist.add_argument(
        "--output", required=True, help="folder for student.safetensors and card.json (created if missing)"
    )
    dist.set_defaults(func=_cmd_distill)

    demo = sub.add_parser("demo", description="the main job: TCD vs LCM vs the teacher on a toy model, measured")
    demo.add_argument(
        "--output-dir", default="demo_out", help="folder for demo.json and demo.png (created; default demo_out)"
    )
    demo.add_argument("--samples", type=_positive_int, default=4000, help="samples per method and NFE (default 4000)")
    demo.add_argument("--seed", type=_seed, default=0, help="seed of the initial noise and data (default 0)")
    demo.add_argument("--no-figure", action="store_true", help="skip the PNG (no matplotlib needed)")
    demo.set_defaults(func=_cmd_demo)
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
    except SystemExit as done:  # --help, --version, or an argument error already printed by _Parser.error
        return done.code if isinstance(done.code, int) else 0 if done.code is None else 2
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError, ImportError, MissingModelError) as err:
        _print_error(str(err) or type(err).__name__)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
