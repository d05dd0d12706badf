"""The training form of the step (``consistency_function``) is the sampling step: row by row, for every prediction
type, with and without LCM's boundary condition, on a batch that mixes rows; and it is differentiable."""

from __future__ import annotations

import pytest
import torch

from helpers import toy_model
from tcd_sampler import TCDScheduler
from tcd_sampler.core.paths import RectifiedFlow, VPDiscrete
from tcd_sampler.core.step import consistency_function, consistency_jump, tcd_step


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("boundary", [False, True])
@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
def test_equals_the_sampling_step_row_by_row(prediction_type: str, boundary: bool, eta: float) -> None:
    sched = TCDScheduler(prediction_type=prediction_type, consistency_boundary=boundary)
    sched.set_timesteps(8)
    rows = sched.step_table(eta).rows
    x = torch.randn(len(rows), 4, 8, 8, generator=torch.Generator().manual_seed(0))
    m = torch.stack([toy_model(x[i : i + 1], r.t)[0] for i, r in enumerate(rows)])  # one row per sample
    expected = torch.cat([tcd_step(m[i : i + 1], x[i : i + 1], r, prediction_type)[1] for i, r in enumerate(rows)])
    coef = {k: torch.tensor([getattr(r, k) for r in rows]) for k in ("alpha_t", "sigma_t", "alpha_s", "sigma_s")}
    scalings = (torch.tensor([r.c_skip for r in rows]), torch.tensor([r.c_out for r in rows])) if boundary else None
    got = consistency_function(m, x, **coef, prediction_type=prediction_type, boundary=scalings)
    assert torch.equal(got, expected)


def test_gradients_reach_the_model_output() -> None:
    m = torch.randn(3, 2, requires_grad=True)
    x = torch.randn(3, 2)
    a_t, s_t = torch.tensor([0.9, 0.5, 0.1]), torch.tensor([0.436, 0.866, 0.995])
    x_s = consistency_function(m, x, a_t, s_t, torch.ones(3), torch.zeros(3))
    x_s.sum().backward()
    assert m.grad is not None and torch.allclose(m.grad, (-s_t / a_t)[:, None].expand(3, 2))  # ∂x̂0/∂ε = −σ/α


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("boundary", [False, True])
def test_the_path_form_equals_the_sampling_step_row_by_row(prediction_type: str, boundary: bool) -> None:
    """consistency_jump reads α, σ from the path at per-sample times t and s: on the discrete VP path it is the
    scheduler's step, bit for bit, with and without LCM's boundary condition (and its clean end)."""
    sched = TCDScheduler(prediction_type=prediction_type, consistency_boundary=boundary)
    sched.set_timesteps(8)
    rows = sched.step_table(0.3).rows
    x = torch.randn(len(rows), 4, 8, 8, generator=torch.Generator().manual_seed(1))
    m = torch.stack([toy_model(x[i : i + 1], r.t)[0] for i, r in enumerate(rows)])
    expected = torch.cat([tcd_step(m[i : i + 1], x[i : i + 1], r, prediction_type)[1] for i, r in enumerate(rows)])
    t, s = torch.tensor([r.t for r in rows]), torch.tensor([r.s for r in rows])
    scaling = float(sched.config.timestep_scaling) if boundary else None
    got = consistency_jump(m, x, t, s, VPDiscrete(sched.alphas_cumprod), prediction_type, scaling, clean_end=boundary)
    assert torch.equal(got, expected)


def test_the_path_form_on_a_continuous_path_is_differentiable_in_time() -> None:
    """On the rectified-flow path the jump is x + (s − t)·u (the sampling step's Euler form), and its gradient in t
    is −u."""
    x, u = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    t = torch.tensor([0.9, 0.5, 0.2], dtype=torch.float64, requires_grad=True)
    s = torch.tensor([0.6, 0.1, 0.0], dtype=torch.float64)
    x_s = consistency_jump(u, x, t, s, RectifiedFlow(), "flow")
    torch.testing.assert_close(x_s, x + (s - t.detach())[:, None] * u)
    (x_s * torch.ones_like(x)).sum().backward()
    assert t.grad is not None
    torch.testing.assert_close(t.grad, -u.sum(dim=1))
