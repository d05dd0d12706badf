"""The main job (``tcd-sampler demo`` / ``make demo``): TCD on a real image model, measured as the paper measures
SDXL — FID, a class score, precision and recall at 1–8 NFE against LCM and the teacher's solvers.

The shipped teacher (a class-conditional ``UNet2DModel`` trained here on scikit-learn's handwritten digits) and its
TCD and LCM students (distilled by ``tcd-sampler train``; :mod:`.models`) sample the same class labels (0–9 in turn)
from the same initial noise, seed by seed, at NFE 1, 2, 4 and 8: the TCD student with ``TCDScheduler`` at several
gammas, the LCM student with diffusers' ``LCMScheduler``, the teacher with DDIM, DPM-Solver++ and Euler (at the
guidance scale chosen on the teacher alone, :data:`.models.GUIDANCE`), and the teacher's 50-step DDIM as the
reference row. The metrics (:mod:`.metrics`) are in
the feature space of the shipped digit classifier, against the test split. Writes ``digits.json`` (every number,
per seed), ``digits.png`` (an image grid, method × NFE, same noise, and metric-vs-NFE curves) and prints the table.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..._files import atomic_paths, folder_problem
from .data import NUM_CLASSES, load_digits_split
from .metrics import DigitMetrics
from .models import DIGITS_ASSETS, GUIDANCE, load_models, samplers

__all__ = ["GAMMAS", "METRICS", "NFES", "REFERENCE", "run_digits_demo"]

NFES = (1, 2, 4, 8)
GAMMAS = (0.0, 0.3, 0.5, 1.0)
#: The reference row: the teacher's DDIM at this many steps.
REFERENCE = ("DDIM", 50)
#: The metrics, each with whether higher is better.
METRICS = {"fid": False, "accuracy": True, "precision": True, "recall": True}
#: Offset of the step-noise generator's seed from the initial noise's.
STEP_SEED_OFFSET = 1000
#: Images per (method, NFE) kept for the figure's grid (seed 0's first, one per class).
GRID_IMAGES = NUM_CLASSES


def _balanced(labels: torch.Tensor, n: int) -> torch.Tensor:
    """The indices of ``n`` images, the classes in turn as the generated sets (a fixed seeded draw in each class;
    all of a class when it has fewer)."""
    generator = torch.Generator().manual_seed(0)
    members = [torch.nonzero(labels == c).flatten() for c in range(NUM_CLASSES)]
    members = [m[torch.randperm(len(m), generator=generator)] for m in members]
    counts = [len(range(c, n, NUM_CLASSES)) for c in range(NUM_CLASSES)]
    return torch.cat([m[:count] for m, count in zip(members, counts, strict=True)])


def _summary(values: list[float]) -> dict[str, float]:
    mean = statistics.fmean(values)
    return {"mean": mean, "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def run_digits_demo(
    output_dir: str | Path = "demo_out",
    samples: int = 500,
    seeds: tuple[int, ...] = (0, 1, 2),
    nfes: tuple[int, ...] = NFES,
    figure: bool = True,
    progress: bool = True,
    models_root: str | Path = DIGITS_ASSETS,
) -> dict[str, Any]:
    """Run every method at every NFE for every seed; print the table, write ``digits.json`` (and ``digits.png``).

    Args:
        output_dir: the folder for the files, created if missing; checked before any sampling
            (``NotADirectoryError``); the files are written atomically. Default ``demo_out``.
        samples: images per method, NFE and seed, the class labels 0–9 in turn. Default 500.
        seeds: seeds of the initial noise (and, offset, of the step noise); one run each, the spread reported.
            Default 0, 1, 2.
        nfes: the numbers of model calls compared. Default 1, 2, 4, 8.
        figure: also draw ``digits.png`` (needs matplotlib). Default True.
        progress: show a progress bar. Default True.
        models_root: the models' folder (default: the shipped ones; see :func:`.models.load_models`).

    Returns the JSON report.
    """
    start = time.perf_counter()
    if samples < 2 * NUM_CLASSES:
        raise ValueError(f"samples must be at least {2 * NUM_CLASSES} (two of each class), got {samples}")
    if not seeds:
        raise ValueError("seeds must name at least one seed")
    out = Path(output_dir)
    problem = folder_problem(out)
    if problem:
        raise NotADirectoryError(f"cannot write the demo's files into {out}: {problem}")
    with torch.random.fork_rng():  # nothing here should draw from the global generator; if anything does, seeded
        torch.manual_seed(0)
        return _run(out, samples, seeds, nfes, figure, progress, models_root, start)


def _run(out: Path, samples: int, seeds: tuple[int, ...], nfes: tuple[int, ...], figure: bool, progress: bool,
         models_root: str | Path, start: float) -> dict[str, Any]:  # fmt: skip
    models = load_models(models_root)
    test = load_digits_split("test")
    metrics = DigitMetrics(models.classifier, test.images)
    methods = samplers(models, GAMMAS)
    jobs = list(dict.fromkeys([(name, nfe) for name in methods for nfe in nfes] + [REFERENCE]))
    labels = torch.arange(samples) % NUM_CLASSES
    per_seed: dict[str, dict[int, list[dict[str, float]]]] = {}
    grid: dict[str, dict[int, torch.Tensor]] = {}
    bar = tqdm(total=len(jobs) * len(seeds), desc="sampling and scoring", disable=not progress)
    for seed in seeds:
        noise = torch.randn((samples, 1, 8, 8), generator=torch.Generator().manual_seed(seed))
        for name, nfe in jobs:
            generator = torch.Generator().manual_seed(seed + STEP_SEED_OFFSET)
            images = methods[name](nfe, noise.clone(), labels, generator).float().clamp(-1, 1)
            per_seed.setdefault(name, {}).setdefault(nfe, []).append(metrics(images, labels))
            if seed == seeds[0]:
                grid.setdefault(name, {})[nfe] = images[:GRID_IMAGES]
            bar.update()
    bar.close()
    summary = {
        name: {nfe: {key: _summary([run[key] for run in runs]) for key in METRICS} for nfe, runs in by_nfe.items()}
        for name, by_nfe in per_seed.items()
    }
    train = load_digits_split("train")  # scored at the generated sets' size (FID and recall depend on it)
    rows = _balanced(train.labels, samples)
    data = metrics(train.images[rows], train.labels[rows])
    report = {
        "data": "scikit-learn digits (8x8), test split",
        "real_images": len(test),
        "samples": samples,
        "seeds": list(seeds),
        "nfe": list(nfes),
        "reference": {"method": REFERENCE[0], "nfe": REFERENCE[1]},
        "guidance_scale": GUIDANCE,
        "summary": {n: {str(k): v for k, v in by.items()} for n, by in summary.items()},
        "per_seed": {n: {str(k): v for k, v in by.items()} for n, by in per_seed.items()},
        "train_split_vs_test": {**data, "images": int(rows.numel())},
        "students": {kind: card["config"] for kind, card in (("tcd", models.tcd_card), ("lcm", models.lcm_card))},
    }
    print(format_tables(summary, nfes, data))
    out.mkdir(parents=True, exist_ok=True)
    targets = [out / "digits.json", *([out / "digits.png"] if figure else [])]
    with atomic_paths(*targets) as temps:
        if figure:
            from .figure import draw_figure

            draw_figure(grid, summary, nfes, temps[1])
        report["seconds"] = round(time.perf_counter() - start, 1)
        temps[0].write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    names = " and ".join(str(t) for t in targets)
    print(f"\nwrote {names} in {report['seconds']} s")
    return report


def format_tables(summary: dict[str, dict[int, dict[str, dict[str, float]]]], nfes: tuple[int, ...],
                  data: dict[str, float]) -> str:  # fmt: skip
    """Markdown tables, one per metric: a row per method, mean ± std over the seeds per NFE."""
    ref_name, ref_nfe = REFERENCE
    blocks = []
    for key, higher in METRICS.items():
        arrow = "↑" if higher else "↓"
        lines = [f"**{key} {arrow}**", "", "| method | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
                 "|---|" + "---:|" * len(nfes)]  # fmt: skip
        for name, by_nfe in summary.items():
            cells = [f"{by_nfe[n][key]['mean']:.3g} ± {by_nfe[n][key]['std']:.2g}" if n in by_nfe else "" for n in nfes]
            if name == ref_name and ref_nfe not in nfes:
                ref = by_nfe[ref_nfe][key]
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
                lines.append(f"| {name} {ref_nfe} steps (reference) | {ref['mean']:.3g} ± {ref['std']:.2g} |"
                             + " |" * (len(nfes) - 1))  # fmt: skip
                continue
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append(f"| (training images, as many) | {data[key]:.3g} |" + " |" * (len(nfes) - 1))
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)
