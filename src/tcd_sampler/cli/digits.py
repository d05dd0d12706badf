"""``tcd-sampler demo`` (the main job: the digits teacher and its TCD and LCM students, measured), ``tcd-sampler
demo-2d`` (the 2-D analytic-teacher study) and ``tcd-sampler digits`` (the steps that rebuild the digits models:
the training data, the untrained teacher, the classifier)."""

from __future__ import annotations

import argparse
from typing import Any

from .arguments import positive_int, seed
from .commands import _check_output_folder, _cmd_demo, _demo_checks, _require

__all__ = ["add_demo_parsers"]


def add_demo_parsers(sub: Any) -> None:
    """Add ``demo``, ``demo-2d`` and ``digits`` to the subcommand parsers ``sub``."""
    demo = sub.add_parser(
        "demo",
        description="the main job: a digits teacher trained here and its TCD and LCM students at 1-8 NFE, with FID, "
        "class accuracy, precision and recall against the test split",
    )
    demo.add_argument("--output-dir", default="demo_out",
                      help="folder for digits.json and digits.png (created; default demo_out)")  # fmt: skip
    demo.add_argument("--samples", type=positive_int, default=500, help="images per method, NFE and seed (500)")
    demo.add_argument("--seeds", type=seed, nargs="+", default=[0, 1, 2], help="seeds (default 0 1 2)")
    demo.add_argument("--models", help="a folder of digits models (default: the shipped ones)")
    demo.add_argument("--no-figure", action="store_true", help="skip the PNG (no matplotlib needed)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    demo.set_defaults(func=_cmd_digits_demo)

    toy = sub.add_parser("demo-2d", description="the 2-D study: TCD vs LCM vs the exact teacher on a toy model")
    toy.add_argument(
        "--output-dir", default="demo_out", help="folder for demo.json and demo.png (created; default demo_out)"
    )
    toy.add_argument("--samples", type=positive_int, default=4000, help="samples per method and NFE (default 4000)")
    toy.add_argument("--seed", type=seed, default=0, help="seed of the initial noise and data (default 0)")
    toy.add_argument("--no-figure", action="store_true", help="skip the PNG (no matplotlib needed)")
    toy.set_defaults(func=_cmd_demo)

    digits = sub.add_parser("digits", description="prepare the digits models' ingredients (see docs/evaluation.md)")
    digits.add_argument("what", choices=["data", "init-teacher", "classifier"],
                        help="data: the training split as an image folder; init-teacher: the untrained teacher "
                        "pipeline; classifier: train the metrics' classifier")  # fmt: skip
    digits.add_argument("--output", required=True, help="the folder to write (created if missing)")
    digits.add_argument(
        "--seed",
        type=seed,
        default=0,
        help="seed of the weights (init-teacher, classifier; the data split is fixed) (default 0)",
    )
    digits.set_defaults(func=_cmd_digits)


def _cmd_digits_demo(args: argparse.Namespace) -> int:
    _demo_checks("demo", {"sklearn": "scikit-learn", "torchmetrics": "torchmetrics", "diffusers": "diffusers"}, args)
    from ..evaluation.digits.demo import run_digits_demo
    from ..evaluation.digits.models import DIGITS_ASSETS

    if args.samples < 20:
        raise ValueError(f"--samples must be at least 20 (two of each class), got {args.samples}")
    run_digits_demo(args.output_dir, samples=args.samples, seeds=tuple(args.seeds), figure=not args.no_figure,
                    progress=not args.no_progress, models_root=args.models or DIGITS_ASSETS)  # fmt: skip
    return 0


def _cmd_digits(args: argparse.Namespace) -> int:
    _require("digits", {"sklearn": "scikit-learn", "diffusers": "diffusers", "PIL": "Pillow"}, "eval")
    _check_output_folder("--output", args.output)
    if args.what == "data":
        from ..evaluation.digits.data import write_imagefolder

        print(f"wrote the training split to {write_imagefolder(args.output, 'train')}")
    elif args.what == "init-teacher":
        from ..evaluation.digits.teacher import write_initial_teacher

        print(f"wrote the untrained teacher to {write_initial_teacher(args.output, args.seed)}")
    else:
        from ..evaluation.digits.classifier import accuracy, save_classifier, train_classifier, write_classifier_card
        from ..evaluation.digits.data import load_digits_split

        model = train_classifier(load_digits_split("train"), seed=args.seed)
        test = load_digits_split("test")
        score = accuracy(model, test.images, test.labels)
        save_classifier(model, args.output)
        write_classifier_card(args.output, {"seed": args.seed, "test_accuracy": score, "test_images": len(test)})
        print(f"wrote the classifier to {args.output}: test accuracy {score:.4f} on {len(test)} images")
    return 0
