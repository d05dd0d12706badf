"""The main job's figure: an image grid (a row per method, a column per NFE, the same noise and classes in every
cell, the reference beside) above metric-vs-NFE curves (mean over the seeds, their spread as error bars, the
reference as a dashed line). Needs matplotlib."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

__all__ = ["draw_figure"]

LABELS = {"fid": "FID ↓", "accuracy": "class accuracy ↑", "precision": "precision ↑", "recall": "recall ↑"}


def _strip(images: torch.Tensor) -> np.ndarray:
    """Images ``(n, 1, 8, 8)`` in [-1, 1] side by side, a one-pixel gap between them, as floats in [0, 1]."""
    cells = [np.pad((im[0].numpy() + 1) / 2, ((0, 0), (0, 1)), constant_values=1.0) for im in images]
    return np.concatenate(cells, axis=1)


def draw_figure(
    grid: dict[str, dict[int, torch.Tensor]],
    summary: dict[str, dict[int, dict[str, dict[str, float]]]],
    nfes: tuple[int, ...],
    path: Path,
) -> None:
    """Write the figure to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .demo import REFERENCE

    ref_name, ref_nfe = REFERENCE
    names = list(grid)
    columns = len(nfes) + 1
    fig = plt.figure(figsize=(2.6 * columns, 0.42 * len(names) + 3.4))
    spec = fig.add_gridspec(len(names) + 1, 4 * columns, height_ratios=[0.42] * len(names) + [3.0], hspace=0.6)
    for r, name in enumerate(names):
        for c, nfe in enumerate([*nfes, ref_nfe]):
            if nfe not in grid[name]:
                continue
            ax = fig.add_subplot(spec[r, 4 * c : 4 * c + 4])
            ax.imshow(_strip(grid[name][nfe]), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
            ax.set(xticks=[], yticks=[])
            if r == 0 or (name == ref_name and nfe == ref_nfe):
                ax.set_title(f"NFE {nfe}" + (" (reference)" if nfe == ref_nfe else ""), fontsize=8)
            if c == 0:
                ax.set_ylabel(name, fontsize=7, rotation=0, ha="right", va="center")
    width = columns
    for i, (key, label) in enumerate(LABELS.items()):
        ax = fig.add_subplot(spec[len(names), i * width : (i + 1) * width])
        for j, name in enumerate(names):
            means = [summary[name][n][key]["mean"] for n in nfes]
            stds = [summary[name][n][key]["std"] for n in nfes]
            style = "-" if name.startswith("TCD") else "--"
            ax.errorbar(nfes, means, yerr=stds, fmt=style, marker="o", ms=3, capsize=2, label=name, color=f"C{j}")
        ref = summary[ref_name][ref_nfe][key]["mean"]
        ax.axhline(ref, color="k", linestyle=":", linewidth=1, label=f"{ref_name} {ref_nfe} steps")
        ax.set(xscale="log", title=label, xlabel="NFE")
        ax.minorticks_off()
        ax.set_xticks(list(nfes), [str(n) for n in nfes])
        ax.tick_params(labelsize=7)
        ax.title.set_fontsize(9)
        if key == "fid":
            ax.set_yscale("log")
        if i == 0:
            ax.legend(fontsize=6)
    fig.subplots_adjust(left=0.08, right=0.99, top=0.96, bottom=0.07, wspace=1.2)
    fig.savefig(path, dpi=110)
    plt.close(fig)
