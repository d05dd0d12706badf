"""The bodies of the ``tcd-sampler`` commands, one ``_cmd_<name>(args) → exit code`` each, and the checks they run
before any slow work. Each imports what it runs (diffusers, the trainer, the demo) only when it runs."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .._files import folder_problem
from ..integrations.pipelines import MissingModelError
from ..schedulers.vp import TCDScheduler
from .arguments import PROG


def _require(command: str, modules: dict[str, str], extra: str) -> None:
    """ImportError naming the missing distributions (``modules``: import name → distribution) of ``command``, with
    the install command of the package's ``extra``."""
    missing = [dist for module, dist in modules.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise ImportError(f"{PROG} {command} needs {', '.join(missing)}: pip install 'tcd-sampler[{extra}]'")


def _demo_checks(command: str, needed: dict[str, str], args: argparse.Namespace) -> None:
    """A demo's checks before it loads anything: its extras (and matplotlib unless ``--no-figure``), its
    ``--output-dir``."""
    if not args.no_figure:
        needed = {**needed, "matplotlib": "matplotlib (or pass --no-figure)"}
    _require(command, needed, "eval")
    _check_output_folder("--output-dir", args.output_dir)


def _check_output_folder(option: str, folder: str) -> None:
    """ValueError naming ``option`` when files cannot be written into ``folder`` (created if missing)."""
    problem = folder_problem(folder)
    if problem:
        raise ValueError(f"{option} {folder}: {problem}; pass a folder (created if missing)")


def _schedule_rows(scheduler: TCDScheduler, steps: int, gamma: float) -> list[dict[str, float | int | bool]]:
    """The step table of ``scheduler`` set to ``steps`` steps at ``gamma``, one dict per step."""
    scheduler.set_timesteps(steps)
    return [asdict(row) for row in scheduler.step_table(gamma).rows]


def _print_table(steps: int, gamma: float, rows: list[dict[str, float | int | bool]]) -> None:
    """Print the ``rows`` of one schedule (``steps`` steps at ``gamma``) as a text table."""
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
    from ..integrations.pipelines import hub_error_message
    from ..schedulers.config_file import looks_local

    try:
        return TCDScheduler.from_pretrained(config, **overrides)
    except OSError as err:
        if Path(config).exists() or looks_local(config):
            raise
        hint = "pass --config a local scheduler_config.json or a folder holding one"
        raise MissingModelError(hub_error_message(config, "scheduler_config.json", err, hint)) from None


def _cmd_schedule(args: argparse.Namespace) -> int:
    """``tcd-sampler schedule``: print (or dump as JSON) the step tables of ``args.steps`` at ``args.gamma``."""
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
    """``tcd-sampler generate``: one image from ``args`` (a :class:`GenerationRequest`), written to ``--output``."""
    from ..integrations.pipelines import GenerationRequest, generate  # imports diffusers when run

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
    """``tcd-sampler demo-2d``: the 2-D study (:func:`tcd_sampler.evaluation.demo.run_demo`) into ``--output-dir``."""
    _demo_checks("demo-2d", {"ot": "pot", "scipy": "scipy", "safetensors": "safetensors"}, args)
    from ..evaluation.demo import run_demo

    run_demo(args.output_dir, samples=args.samples, seed=args.seed, figure=not args.no_figure)
    return 0


def _cmd_distill(args: argparse.Namespace) -> int:
    """``tcd-sampler distill``: train a student (:func:`tcd_sampler.distill.distill`) and save it to ``--output``."""
    _require("distill", {"safetensors": "safetensors"}, "eval")
    _check_output_folder("--output", args.output)
    from ..distill.config import DistillConfig
    from ..distill.student import save_student
    from ..distill.trainer import distill

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
