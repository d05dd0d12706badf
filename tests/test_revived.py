"""The nine parameters that are dead in diffusers' TCDScheduler: each has an effect here, and its default keeps
parity."""

from __future__ import annotations

import itertools

import diffusers
import numpy as np
import pytest
import torch

from helpers import run_loop, toy_model
from tcd_sampler import TCDScheduler
from test_parity import assert_parity

DEFAULTS = {
    "clip_sample": False,
    "clip_sample_range": 1.0,
    "thresholding": False,
    "dynamic_thresholding_ratio": 0.995,
    "sample_max_value": 1.0,
    "steps_offset": 0,
    "timestep_spacing": "leading",
    "timestep_scaling": 10.0,
    "set_alpha_to_one": True,
}


@pytest.mark.parametrize("eta", [0.0, 0.3])
@pytest.mark.parametrize("steps", [1, 4, 8])
def test_defaults_passed_explicitly_keep_parity(steps: int, eta: float) -> None:
    x, y = assert_parity(DEFAULTS, {"num_inference_steps": steps}, eta)
    assert torch.equal(x, y)


@pytest.mark.parametrize("name", ["clip_sample_range", "dynamic_thresholding_ratio", "sample_max_value"])
def test_inactive_knobs_change_nothing_while_their_switch_is_off(name: str) -> None:
    """clip_sample_range and the thresholding knobs only act with their switch on, as documented."""
    value = {"clip_sample_range": 0.5, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 2.0}[name]
    x, y = assert_parity({name: value}, {"num_inference_steps": 4}, 0.3)
    assert torch.equal(x, y)


def one_step(**config: object) -> tuple[torch.Tensor, torch.Tensor, TCDScheduler]:
    sched = TCDScheduler(**config)
    sched.set_timesteps(4)
    x = 3 * torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    out = sched.step(toy_model(x, 999), 999, x, eta=0.0)
    return x, out, sched  # type: ignore[return-value]


def line_through_x_t(sched: TCDScheduler, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """x_s = α_s·x̂0 + σ_s·ε̂ with ε̂ recomputed from the (clipped) x̂0, in float64."""
    row = sched.step_table(0.0, torch.float64).rows[0]
    x, x0 = x.double(), x0.double()
    eps = (x - row.alpha_t * x0) / row.sigma_t
    return row.alpha_s * x0 + row.sigma_s * eps


@pytest.mark.parametrize("clip_range", [1.0, 2.5])
def test_clip_sample(clip_range: float) -> None:
    x, free, _ = one_step()
    assert free.pred_original_sample.abs().max() > clip_range
    x, out, sched = one_step(clip_sample=True, clip_sample_range=clip_range)
    x0 = out.pred_original_sample
    assert x0.abs().max().item() == pytest.approx(clip_range)
    assert torch.equal(x0, free.pred_original_sample.clamp(-clip_range, clip_range))
    torch.testing.assert_close(out.pred_noised_sample.double(), line_through_x_t(sched, x, x0), rtol=1e-5, atol=1e-5)
    assert not torch.equal(out.prev_sample, free.prev_sample)


def test_dynamic_thresholding() -> None:
    x, free, _ = one_step()
    ratio, max_value = 0.9, 50.0
    x, out, sched = one_step(thresholding=True, dynamic_thresholding_ratio=ratio, sample_max_value=max_value)
    raw = free.pred_original_sample.double().reshape(2, -1).numpy()
    q = np.clip(np.quantile(np.abs(raw), ratio, axis=1), 1.0, max_value)[:, None]
    expected = torch.from_numpy(np.clip(raw, -q, q) / q).reshape(x.shape)
    assert (q > 1).all() and (q < max_value).all()
    torch.testing.assert_close(out.pred_original_sample.double(), expected, rtol=1e-6, atol=1e-6)
    assert out.pred_original_sample.abs().max() <= 1.0 + 1e-6
    torch.testing.assert_close(
        out.pred_noised_sample.double(), line_through_x_t(sched, x, out.pred_original_sample), rtol=1e-5, atol=1e-5
    )
    # sample_max_value caps the threshold; a lower ratio lowers it
    _, capped, _ = one_step(thresholding=True, dynamic_thresholding_ratio=ratio, sample_max_value=1.5)
    _, lower, _ = one_step(thresholding=True, dynamic_thresholding_ratio=0.5, sample_max_value=max_value)
    assert not torch.equal(capped.pred_original_sample, out.pred_original_sample)
    assert not torch.equal(lower.pred_original_sample, out.pred_original_sample)


def test_thresholding_takes_precedence_over_clipping() -> None:
    _, both, _ = one_step(thresholding=True, clip_sample=True, clip_sample_range=0.1, sample_max_value=50.0)
    _, only, _ = one_step(thresholding=True, sample_max_value=50.0)
    assert torch.equal(both.prev_sample, only.prev_sample)


def test_clipping_in_half_precision_and_full_loop() -> None:
    sched = TCDScheduler(clip_sample=True)
    sched.set_timesteps(4)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)).half()
    out = run_loop(sched, x, 0.3, 0)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    sched = TCDScheduler(thresholding=True)
    sched.set_timesteps(4)
    assert torch.isfinite(run_loop(sched, x, 0.3, 0)).all()


@pytest.mark.parametrize(
    ("offset", "kwargs", "expected"),
    [
        (0, {"num_inference_steps": 4}, [999, 759, 499, 259]),
        (1, {"num_inference_steps": 4}, [999, 760, 500, 260]),
        (5, {"num_inference_steps": 8}, [999, 884, 764, 644, 504, 384, 264, 144]),
        (1, {"num_inference_steps": 4, "original_inference_steps": 50}, [999, 750, 500, 250]),
        (1, {"num_inference_steps": 4, "strength": 0.5}, [500, 380, 260, 140]),
    ],
)
def test_steps_offset(offset: int, kwargs: dict, expected: list[int]) -> None:
    sched = TCDScheduler(steps_offset=offset)
    sched.set_timesteps(**kwargs)
    assert sched.timesteps.tolist() == expected


def test_steps_offset_merges_points_pushed_past_the_top() -> None:
    sched = TCDScheduler(steps_offset=30)  # 979+30 and 999+30 both land on 999: 49 distinct points remain
    sched.set_timesteps(49)
    ts = sched.timesteps.tolist()
    assert ts[0] == 999 and ts[1] == 989 and ts[-1] == 49
    assert all(a > b for a, b in itertools.pairwise(ts))
    with pytest.raises(ValueError, match="steps_offset=30"):
        sched.set_timesteps(50)


def test_steps_offset_leaves_custom_timesteps_alone() -> None:
    sched = TCDScheduler(steps_offset=3)
    sched.set_timesteps(timesteps=[999, 500, 100])
    assert sched.timesteps.tolist() == [999, 500, 100]


@pytest.mark.parametrize(
    ("steps", "kwargs", "expected"),
    [
        (1, {}, [999]),
        (2, {}, [999, 19]),
        (4, {}, [999, 679, 339, 19]),
        (4, {"strength": 0.5}, [499, 339, 179, 19]),
        (3, {"original_inference_steps": 50}, [999, 500, 0]),
    ],
)
def test_linspace_spacing_spans_the_whole_grid(steps: int, kwargs: dict, expected: list[int]) -> None:
    sched = TCDScheduler(timestep_spacing="linspace")
    sched.set_timesteps(steps, **kwargs)
    assert sched.timesteps.tolist() == expected


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 7, 8, 16, 48, 50, 61, 96, 100])
def test_trailing_is_ddims_trailing_selection(steps: int) -> None:
    """timestep_spacing="trailing" ("TCD Trailing"): DDIM's trailing timesteps on the full grid."""
    ours = TCDScheduler(timestep_spacing="trailing")
    ours.set_timesteps(steps)
    ddim = diffusers.DDIMScheduler(timestep_spacing="trailing")
    ddim.set_timesteps(steps)
    assert ours.timesteps.tolist() == ddim.timesteps.tolist()[:steps]  # DDIM's float arange may add one point
    if steps == 4:
        assert ours.timesteps.tolist() == [999, 749, 499, 249]


def test_trailing_with_strength_uses_the_lower_part_of_the_full_grid() -> None:
    sched = TCDScheduler(timestep_spacing="trailing")
    sched.set_timesteps(4, strength=0.5)
    assert sched.timesteps.tolist() == [499, 374, 249, 124]


def test_later_mode_parameters_are_documented_as_such() -> None:
    doc = " ".join((TCDScheduler.__doc__ or "").split())
    for name in ("timestep_scaling", "set_alpha_to_one"):
        entry = doc.split(f" {name}: ")[1][:300]
        assert "consistency-boundary mode" in entry, entry
