"""Half-precision accuracy: full TCD loops in float16/bfloat16/float32, ours and diffusers', against a float64
reference of the TCD step with the same noise. Prints a markdown table of max|x − x64| / max|x64|.

Run: .venv/bin/python benchmarks/precision.py
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import diffusers

from helpers import half_precision_errors
from tcd_sampler import TCDScheduler


def main() -> None:
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, {torch.get_num_threads()} threads")
    print("| dtype | prediction | steps | eta | tcd-sampler | diffusers | ratio |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for dtype, pred, steps, eta in itertools.product(
        (torch.float16, torch.bfloat16, torch.float32), ("epsilon", "v_prediction"), (1, 4, 8), (0.0, 0.3)
    ):
        ours = max(half_precision_errors(TCDScheduler, dtype, steps, eta, pred, seed) for seed in range(3))
        ref = max(half_precision_errors(diffusers.TCDScheduler, dtype, steps, eta, pred, seed) for seed in range(3))
        name = str(dtype).removeprefix("torch.")
        print(f"| {name} | {pred} | {steps} | {eta} | {ours:.2e} | {ref:.2e} | {ours / ref:.2f} |")


if __name__ == "__main__":
    main()
