"""Golden values from diffusers' own TCDScheduler test suite, run on our scheduler alone."""

from __future__ import annotations

import pytest
import torch

from helpers import golden_model, golden_sample, run_loop
from tcd_sampler import TCDScheduler


@pytest.mark.parametrize(("steps", "total", "mean"), [(1, 29.8715, 0.0389), (10, 181.2040, 0.2359)])
def test_golden_sums(steps: int, total: float, mean: float) -> None:
    sched = TCDScheduler()
    sched.set_timesteps(steps)
    x = run_loop(sched, golden_sample(), eta=0.0, seed=None, model=golden_model)
    assert abs(x.abs().sum().item() - total) < 1e-3
    assert abs(x.abs().mean().item() - mean) < 1e-3


@pytest.mark.parametrize(("steps", "last"), [(10, 99), (25, 39), (26, 39), (50, 19)])
def test_last_timesteps(steps: int, last: int) -> None:
    sched = TCDScheduler()
    sched.set_timesteps(steps)
    assert sched.timesteps[-1].item() == last
    assert sched.timesteps[0].item() == 999


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"num_inference_steps": 4}, [999, 759, 499, 259]),
        ({"num_inference_steps": 8}, [999, 879, 759, 639, 499, 379, 259, 139]),
        ({"num_inference_steps": 4, "strength": 0.5}, [499, 379, 259, 139]),
        ({"num_inference_steps": 4, "original_inference_steps": 50}, [999, 749, 499, 249]),
    ],
)
def test_documented_schedules(kwargs: dict, expected: list[int]) -> None:
    sched = TCDScheduler()
    sched.set_timesteps(**kwargs)
    assert sched.timesteps.tolist() == expected
    assert sched.timesteps.dtype == torch.long


def test_last_step_targets_alpha_bar_0_not_one() -> None:
    """The final output is √ᾱ_0·x̂0 + √(1−ᾱ_0)·ε̂ with ᾱ_0 = 0.99915, not x̂0 (18.7096 would be pure x̂0)."""
    sched = TCDScheduler()
    sched.set_timesteps(1)
    out = sched.step(golden_model(golden_sample(), 999), 999, golden_sample(), eta=0.0)
    assert abs(out.pred_original_sample.abs().sum().item() - 18.7096) < 1e-3
    assert abs(sched.alphas_cumprod[0].item() - 0.99915) < 1e-6
