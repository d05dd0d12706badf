"""The ``tcd-sampler`` command.

``tcd-sampler schedule`` prints, for each requested number of steps, the timesteps of a TCD loop, the target ``s``
of every step and its coefficients (``α_t, σ_t, α_s, σ_s`` and the re-noising scales), for a given ``gamma``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict

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


def _unit_float(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"gamma must be in [0, 1], got {text}")
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tcd-sampler`` console command."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"tcd-sampler: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
