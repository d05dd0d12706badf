"""fused_step: the step as two fused passes with float64-folded coefficients. Not bit-identical to diffusers, but
as close to a float64 reference, and within a few 1e-6 of the reference over whole loops."""

from __future__ import annotations

import itertools

import diffusers
import pytest
import torch

from helpers import golden_model, golden_sample, half_precision_errors, lcm_loops, rel_err, run_loop, toy_model
from tcd_sampler import TCDScheduler

CASES = list(itertools.product(["epsilon", "sample", "v_prediction"], [1, 4, 8, 50], [0.0, 0.3, 1.0]))


@pytest.mark.parametrize(("prediction_type", "steps", "eta"), CASES)
def test_fused_close_to_reference(prediction_type: str, steps: int, eta: float) -> None:
    fused = TCDScheduler(prediction_type=prediction_type, fused_step=True)
    ref = diffusers.TCDScheduler(prediction_type=prediction_type)
    fused.set_timesteps(steps)
    ref.set_timesteps(steps)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    a, a_steps = run_loop(fused, x, eta, 0, record=True)
    b, b_steps = run_loop(ref, x, eta, 0, record=True)
    assert rel_err(a, b) <= 5e-6
    for p, q in zip(a_steps, b_steps, strict=True):
        assert rel_err(p.pred_noised_sample, q.pred_noised_sample) <= 5e-6


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize(("steps", "eta"), [(4, 0.0), (8, 0.3), (50, 0.3)])
def test_fused_as_accurate_as_exact_against_float64(prediction_type: str, steps: int, eta: float) -> None:
    def make(**kw: object) -> TCDScheduler:
        return TCDScheduler(fused_step=True, **kw)  # type: ignore[arg-type]

    fused = half_precision_errors(make, torch.float32, steps, eta, prediction_type)
    exact = half_precision_errors(TCDScheduler, torch.float32, steps, eta, prediction_type)
    assert fused <= 2 * exact + 1e-7, (fused, exact)


def test_fused_golden_values_and_x0() -> None:
    for steps, total in ((1, 29.8715), (10, 181.2040)):
        sched = TCDScheduler(fused_step=True)
        sched.set_timesteps(steps)
        out = run_loop(sched, golden_sample(), 0.0, None, golden_model)
        assert abs(out.abs().sum().item() - total) < 1e-3
    fused, exact = TCDScheduler(fused_step=True), TCDScheduler()
    for sched in (fused, exact):
        sched.set_timesteps(4)
    x = torch.randn(1, 4, 8, 8)
    a = fused.step(toy_model(x, 999), 999, x, eta=0.0)
    b = exact.step(toy_model(x, 999), 999, x, eta=0.0)
    assert rel_err(a.pred_original_sample, b.pred_original_sample) <= 1e-6
    assert a.prev_sample is a.pred_noised_sample  # eta = 0: one pass, one tensor


def test_fused_boundary_mode_is_lcm() -> None:
    x, y = lcm_loops(TCDScheduler(consistency_boundary=True, fused_step=True), diffusers.LCMScheduler())
    assert rel_err(x, y) <= 5e-6


def test_fused_step_is_ignored_while_clipping() -> None:
    outs = []
    for fused in (False, True):
        sched = TCDScheduler(clip_sample=True, fused_step=fused)
        sched.set_timesteps(4)
        outs.append(run_loop(sched, 3 * torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), 0.3))
    assert torch.equal(outs[0], outs[1])


def test_fused_scheduler_survives_copies_mid_schedule() -> None:
    import copy
    import pickle

    sched = TCDScheduler(fused_step=True)
    sched.set_timesteps(4)
    x = torch.randn(1, 4, 8, 8)
    sched.step(toy_model(x, 999), 999, x, eta=0.0)
    for clone in (copy.deepcopy(sched), pickle.loads(pickle.dumps(sched))):
        a = clone.step(toy_model(x, 759), 759, x, eta=0.0).prev_sample
        b = sched.step(toy_model(x, 759), 759, x, eta=0.0).prev_sample
        sched._step_index = 1
        assert torch.equal(a, b)
