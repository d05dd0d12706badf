"""Consistency-boundary mode: with eta = 1 it is diffusers' LCMScheduler; with eta < 1 LCM models get TCD's gamma."""

from __future__ import annotations

import diffusers
import pytest
import torch

from helpers import lcm_loops, rel_err, toy_model
from tcd_sampler import TCDScheduler

TOL = 1e-6


def lcm_pair(**config: object) -> tuple[TCDScheduler, diffusers.LCMScheduler]:
    return TCDScheduler(consistency_boundary=True, **config), diffusers.LCMScheduler(**config)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_eta_one_is_lcm(prediction_type: str, steps: int) -> None:
    ours, ref = lcm_pair(prediction_type=prediction_type)
    ours.set_timesteps(steps)
    ref.set_timesteps(steps)
    assert torch.equal(ours.timesteps, ref.timesteps)
    x = y = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    for t in ours.timesteps:
        a = ours.step(toy_model(x, t), t, x, eta=1.0, generator=g1)
        b = ref.step(toy_model(y, t), t, y, generator=g2)
        assert rel_err(a.prev_sample, b.prev_sample) <= TOL
        assert rel_err(a.pred_original_sample, b.denoised) <= TOL
        x, y = a.prev_sample, b.prev_sample
    assert torch.equal(x, y)  # bit-identical in float32
    assert torch.equal(g1.get_state(), g2.get_state())


def test_eta_one_is_lcm_with_clipping_and_zero_snr() -> None:
    config = {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "clip_sample": True}
    x, y = lcm_loops(*lcm_pair(**config), scale=2.0)
    assert rel_err(x, y) <= TOL


def test_eta_below_one_differs_from_lcm_and_from_plain_tcd() -> None:
    boundary, plain = TCDScheduler(consistency_boundary=True), TCDScheduler()
    outs = []
    for sched in (boundary, plain):
        sched.set_timesteps(4)
        x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
        for t in sched.timesteps:
            x = sched.step(toy_model(x, t), t, x, eta=0.3, generator=torch.Generator().manual_seed(int(t))).prev_sample
        outs.append(x)
    assert not torch.allclose(outs[0], outs[1])
    # the mode only changes x̂0 (by c_skip, c_out) and the s = 0 endpoint, so the loops stay close
    assert rel_err(outs[0], outs[1]) < 0.1


def test_boundary_step_formula() -> None:
    """x̂0 ← c_out·x̂0 + c_skip·x_t with LCM's scalings; ε̂ recomputed; s = 0 is the clean endpoint (ᾱ = 1)."""
    sched = TCDScheduler(consistency_boundary=True, timestep_scaling=0.01)
    sched.set_timesteps(4)
    x = torch.randn(1, 4, 8, 8, dtype=torch.float64)
    m = toy_model(x, 999)
    out = sched.step(m, 999, x, eta=0.3, generator=torch.Generator().manual_seed(0))
    acp = sched.alphas_cumprod.double()
    a, b = acp[999].sqrt(), (1 - acp[999]).sqrt()
    k = 999 * 0.01
    c_skip, c_out = 0.25 / (k * k + 0.25), k / (k * k + 0.25) ** 0.5
    x0 = c_out * (x - b * m) / a + c_skip * x
    torch.testing.assert_close(out.pred_original_sample, x0)
    eps = (x - a * x0) / b
    s = sched.step_table(0.3, torch.float64).rows[0].s
    torch.testing.assert_close(out.pred_noised_sample, acp[s].sqrt() * x0 + (1 - acp[s]).sqrt() * eps)
    last = sched.step_table(0.3, torch.float64).rows[-1]
    assert (last.s, last.alpha_s, last.sigma_s) == (0, 1.0, 0.0)


def test_set_alpha_to_one_false_uses_alpha_bar_0_at_the_endpoint() -> None:
    sched = TCDScheduler(consistency_boundary=True, set_alpha_to_one=False)
    sched.set_timesteps(2)
    last = sched.step_table(1.0, torch.float64).rows[-1]
    assert last.alpha_s == pytest.approx(sched.alphas_cumprod[0].double().sqrt().item())
    plain = TCDScheduler(set_alpha_to_one=True)
    plain.set_timesteps(2)
    assert plain.step_table(1.0, torch.float64).rows[-1].alpha_s < 1.0  # plain TCD: ᾱ_0, whatever the flag


def test_config_eta_serves_pipelines_that_pass_none() -> None:
    """The LCM pipelines call step(..., eta=None): the config's eta decides, so eta=1 there is LCMScheduler."""
    x, y = lcm_loops(TCDScheduler(consistency_boundary=True, eta=1.0), diffusers.LCMScheduler(), eta=None)
    assert torch.equal(x, y)
    with pytest.raises(ValueError, match=r"eta must be in \[0.0, 1.0\]"):
        TCDScheduler(eta=1.2)


def test_lcm_ignores_set_alpha_to_one_ours_needs_it_true() -> None:
    """LCMScheduler never uses final_alpha_cumprod; our boundary mode's clean endpoint is ᾱ = final_alpha_cumprod,
    so LCM's numbers need set_alpha_to_one=True whatever the LCM config says (SD/SDXL configs say False)."""
    ref = diffusers.LCMScheduler(set_alpha_to_one=False)
    runs = {}
    for flag in (True, False):
        runs[flag] = rel_err(*lcm_loops(TCDScheduler(consistency_boundary=True, set_alpha_to_one=flag), ref))
    assert runs[True] == 0.0 and runs[False] > 1e-3
