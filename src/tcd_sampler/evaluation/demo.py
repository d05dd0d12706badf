"""The 2-D study (``tcd-sampler demo-2d``; the main job before the digits): TCD sampling of a TCD-distilled model
whose teacher is exact, measured.

On the 2-D ring of :func:`tcd_sampler.distill.teacher.ring2d`, at NFE 1, 2, 4 and 8 from the same initial noise:

- the shipped TCD student with ``TCDScheduler`` at gamma 0, 0.3, 0.5 and 1;
- the shipped LCM student with LCM sampling (``TCDScheduler(consistency_boundary=True)`` at eta 1, which is
  diffusers' ``LCMScheduler`` exactly);
- the exact teacher with DDIM (our gamma = 0 path) and, when diffusers is installed, with its
  ``DPMSolverMultistepScheduler`` (DPM-Solver++, diffusers' defaults on the same betas).

Prints a table of sliced W2, mode-weight TV and sharpness, and writes ``demo.png`` (sample scatter grids by method ×
NFE, and metric-vs-NFE curves) and ``demo.json`` (every number).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .._files import atomic_paths, folder_problem
from ..distill.student import load_student
from ..distill.teacher import GaussianMixture, ring2d
from ..schedulers.vp import TCDScheduler
from .metrics import as_numpy, evaluate

__all__ = ["ASSETS", "run_demo"]

#: Where the shipped students live (``tcd_sampler/assets``, shipped as package data).
ASSETS = Path(__file__).resolve().parent.parent / "assets"
NFES = (1, 2, 4, 8)
STEP_SEED_OFFSET = 1000
GAMMAS = (0.0, 0.3, 0.5, 1.0)

Sampler = Callable[[int, torch.Tensor], torch.Tensor]  # (nfe, initial noise) → samples


def _scheduler_sampler(
    model: Callable[..., torch.Tensor], eta: float, boundary: bool = False, seed: int = 0
) -> Sampler:
    def sample(nfe: int, noise: torch.Tensor) -> torch.Tensor:
        sched = TCDScheduler(consistency_boundary=boundary)
        sched.set_timesteps(nfe)
        generator = torch.Generator().manual_seed(seed + STEP_SEED_OFFSET)  # the same step noise for every method
        x = noise
        with torch.no_grad():
            for t in sched.timesteps:
                x = sched.step(model(x, t), t, x, eta=eta, generator=generator).prev_sample
        return x

    return sample


def _dpm_sampler(teacher: Callable[..., torch.Tensor]) -> Sampler | None:
    try:
        from diffusers import DPMSolverMultistepScheduler
    except ImportError:
        return None
    reference = TCDScheduler()

    def sample(nfe: int, noise: torch.Tensor) -> torch.Tensor:
        sched: Any = DPMSolverMultistepScheduler(
            beta_start=reference.config.beta_start,
            beta_end=reference.config.beta_end,
            beta_schedule=reference.config.beta_schedule,
        )
        sched.set_timesteps(nfe)
        x = noise * sched.init_noise_sigma
        for t in sched.timesteps:
            x = sched.step(teacher(x, t), t, x).prev_sample
        return x

    return sample


def methods(mixture: GaussianMixture, students: dict[str, Any], seed: int = 0) -> dict[str, Sampler]:
    """The compared samplers, by display name, for the loaded ``students`` (``"tcd"``, ``"lcm"``); ``seed`` seeds
    the noise the stochastic ones inject."""
    tcd, lcm = students["tcd"].model, students["lcm"].model
    teacher = mixture.vp_model(TCDScheduler().alphas_cumprod)
    found: dict[str, Sampler] = {f"TCD γ={g}": _scheduler_sampler(tcd, g, seed=seed) for g in GAMMAS}
    found["LCM"] = _scheduler_sampler(lcm, 1.0, boundary=True, seed=seed)
    found["Teacher DDIM"] = _scheduler_sampler(teacher, 0.0, seed=seed)
    dpm = _dpm_sampler(teacher)
    if dpm is not None:
        found["Teacher DPM-Solver++"] = dpm
    return found


def run_demo(
    output_dir: str | Path = "demo_out",
    samples: int = 4000,
    seed: int = 0,
    nfes: tuple[int, ...] = NFES,
    figure: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Run every method at every NFE from the same noise; print the table, write ``demo.json`` (and ``demo.png``).

    Args:
        output_dir: the folder for ``demo.json`` and ``demo.png``, created if missing; checked before any sampling
            (``NotADirectoryError`` if it is a file or cannot be written). Both files are written atomically
            (temporary files, then renamed into place): a failed run leaves no partial file. Default ``demo_out``.
        samples: samples per method and NFE. Default 4000.
        seed: seeds the initial noise, the reference samples and the step noise. Default 0.
        nfes: the numbers of model calls compared. Default 1, 2, 4, 8.
        figure: also draw ``demo.png`` (needs matplotlib). Default True.
        progress: show a progress bar. Default True.

    Returns the JSON report."""
    start = time.perf_counter()
    out = Path(output_dir)
    problem = folder_problem(out)
    if problem:
        raise NotADirectoryError(f"cannot write the demo's files into {out}: {problem}")
    mixture = ring2d()
    reference = mixture.sample(samples, torch.Generator().manual_seed(seed + 1))[0].float()
    noise = torch.randn(samples, mixture.dim, generator=torch.Generator().manual_seed(seed))
    students = {kind: load_student(ASSETS / f"{mixture.name}_{kind}") for kind in ("tcd", "lcm")}
    samplers = methods(mixture, students, seed)
    results: dict[str, dict[int, dict[str, float]]] = {}
    points: dict[str, dict[int, torch.Tensor]] = {}
    jobs = [(name, nfe) for name in samplers for nfe in nfes]
    for name, nfe in tqdm(jobs, desc="sampling and scoring", disable=not progress):
        x = samplers[name](nfe, noise.clone()).float()
        results.setdefault(name, {})[nfe] = evaluate(x, mixture, reference, seed=seed)
        points.setdefault(name, {})[nfe] = x
    data = evaluate(mixture.sample(samples, torch.Generator().manual_seed(seed + 2))[0].float(), mixture, reference)
    report = {
        "data": mixture.name,
        "samples": samples,
        "seed": seed,
        "nfe": list(nfes),
        "metrics": {name: {str(n): m for n, m in by_nfe.items()} for name, by_nfe in results.items()},
        "true_samples": data,
        "students": {kind: student.card["config"] for kind, student in students.items()},
    }
    print(format_table(results, nfes, data))
    out.mkdir(parents=True, exist_ok=True)
    targets = [out / "demo.json", *([out / "demo.png"] if figure else [])]
    with atomic_paths(*targets) as temps:
        if figure:
            draw_figure(points, results, nfes, mixture, temps[1])
        report["seconds"] = round(time.perf_counter() - start, 1)
        temps[0].write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(
        f"\nwrote {out / 'demo.json'}" + (f" and {out / 'demo.png'}" if figure else "") + f" in {report['seconds']} s"
    )
    return report


def format_table(results: dict[str, dict[int, dict[str, float]]], nfes: tuple[int, ...], data: dict[str, float]) -> str:
    """A markdown table: one row per method, sliced W2 / mode TV / sharpness per NFE."""
    head = "| method | " + " | ".join(f"NFE {n}: W2 · TV · sharp" for n in nfes) + " |"
    lines = [head, "|---|" + "---:|" * len(nfes)]
    for name, by_nfe in results.items():
        cells = [f"{m['sliced_w2']:.3f} · {m['mode_tv']:.3f} · {m['sharpness']:.2f}" for m in by_nfe.values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append(
        f"| (true samples) | {data['sliced_w2']:.3f} · {data['mode_tv']:.3f} · {data['sharpness']:.2f} |"
        + " |" * (len(nfes) - 1)
    )
    return "\n".join(lines)


def draw_figure(
    points: dict[str, dict[int, torch.Tensor]],
    results: dict[str, dict[int, dict[str, float]]],
    nfes: tuple[int, ...],
    mixture: GaussianMixture,
    path: Path,
) -> None:
    """Scatter grids (methods × NFE) above three metric-vs-NFE panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(points)
    fig = plt.figure(figsize=(2.1 * len(nfes) + 0.5, 2.1 * len(names) + 3.2))
    grid = fig.add_gridspec(len(names) + 1, 3 * len(nfes), height_ratios=[1.0] * len(names) + [1.5])
    means = as_numpy(mixture.means)
    for r, name in enumerate(names):
        for c, nfe in enumerate(nfes):
            ax = fig.add_subplot(grid[r, 3 * c : 3 * c + 3])
            xy = as_numpy(points[name][nfe][:1500])
            ax.scatter(xy[:, 0], xy[:, 1], s=1, alpha=0.4, color="C0", rasterized=True)
            ax.scatter(means[:, 0], means[:, 1], s=8, color="C3", marker="x")
            ax.set(xlim=(-1.6, 1.6), ylim=(-1.6, 1.6), xticks=[], yticks=[], aspect="equal")
            if r == 0:
                ax.set_title(f"NFE {nfe}", fontsize=9)
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
    labels = {"sliced_w2": "sliced W2 ↓", "mode_tv": "mode-weight TV ↓", "sharpness": "sharpness ↑"}
    width = len(nfes)
    for i, (key, label) in enumerate(labels.items()):
        ax = fig.add_subplot(grid[len(names), i * width : (i + 1) * width])
        for j, name in enumerate(names):
            style = "-" if name.startswith("TCD") else "--"
            ax.plot(nfes, [results[name][n][key] for n in nfes], style, marker="o", ms=3, label=name, color=f"C{j}")
        ax.set(xscale="log", title=label, xlabel="NFE")
        ax.minorticks_off()
        ax.set_xticks(list(nfes), [str(n) for n in nfes])
        ax.tick_params(labelsize=7)
        ax.title.set_fontsize(9)
        if i == 0:
            ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
