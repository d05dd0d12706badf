"""TCD times in sigma space (tcd_sampler.core.paths.times): on a discrete grid the target is TCDScheduler's integer
timestep at grid points and (1 − γ)·t' between them, γ = 0 keeps σ' exactly, s = 0 is the clean end, and a time
that would put σ_s above σ' is an error."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tcd_sampler import DiscreteVPTime, TCDScheduler
from tcd_sampler.core.paths import target_timesteps
from tcd_sampler.core.paths.times import ClosedFormTime, GridTime


def grid() -> tuple[GridTime, DiscreteVPTime]:
    vp = DiscreteVPTime(TCDScheduler().alphas_cumprod)
    return GridTime(vp.sigmas.numpy()), vp


@pytest.mark.parametrize("gamma", [0.0, 0.3, 0.7, 1.0])
def test_on_grid_points_the_target_is_the_schedulers_timestep(gamma: float) -> None:
    time, vp = grid()
    t_next = np.array([759, 499, 259, 90])
    got = time.target_sigma(vp.sigmas.numpy()[t_next], gamma)
    s = target_timesteps(t_next, gamma)
    want = np.where(s == t_next, vp.sigmas.numpy()[t_next], np.where(s == 0, 0.0, vp.sigmas.numpy()[s]))
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_between_grid_points_gamma_0_keeps_the_next_sigma_and_gamma_1_ends_clean() -> None:
    time, _ = grid()
    sig = np.array([10.0, 3.3, 0.9, 0.05])  # off the grid
    assert np.array_equal(time.target_sigma(sig, 0.0), sig)
    assert np.array_equal(time.target_sigma(sig, 1.0), np.zeros(4))
    mid = time.target_sigma(sig, 0.3)
    t = time.sigma_to_t(sig)
    np.testing.assert_allclose(time.sigma_to_t(mid), 0.7 * t, rtol=1e-9)  # (1 − γ)·t', not floored
    assert np.all(mid < sig) and np.all(mid > 0)


def test_the_grid_time_inverts_the_grid_sigma() -> None:
    time, _ = grid()
    t = np.array([0.0, 12.25, 500.5, 998.9])
    np.testing.assert_allclose(time.sigma_to_t(time.t_to_sigma(t)), t, rtol=1e-9, atol=1e-9)
    assert time.sigma_to_t(np.array([0.0]))[0] == 0.0


def test_a_closed_form_time_takes_the_target_in_its_own_time() -> None:
    atan = ClosedFormTime(lambda s: np.arctan(s) * 2 / math.pi, lambda t: np.tan(t * math.pi / 2))
    sig = np.array([50.0, 2.0, 0.3, 0.0])
    got = atan.target_sigma(sig, 0.4)
    np.testing.assert_allclose(got[:3], np.tan(0.6 * np.arctan(sig[:3])), rtol=1e-12)
    assert got[3] == 0.0 and np.array_equal(atan.target_sigma(sig, 0.0), sig)


def test_a_time_that_is_not_a_tcd_time_is_refused() -> None:
    log_time = ClosedFormTime(lambda s: np.log(s) / 4, lambda t: np.exp(4 * t))
    with pytest.raises(ValueError, match="non-negative and increasing"):
        log_time.target_sigma(np.array([80.0, 0.5, 0.1]), 0.3)
    with pytest.raises(ValueError, match="strictly ascending"):
        GridTime(np.array([1.0, 0.5, 2.0]))
    wrong = ClosedFormTime(lambda s: s, lambda t: t * 2)  # an inverse that is not: σ_s overshoots
    with pytest.raises(ValueError, match="lies above its next sigma"):
        wrong.target_sigma(np.array([4.0, 1.0]), 0.3)


def test_an_lcm_grid_with_its_own_times() -> None:
    """LCM's distilled grid (times 19, 39, …, 999): targets floor in DDPM time and stay on or below the grid."""
    _, vp = grid()
    times = np.arange(1, 51) * 20 - 1
    time = GridTime(vp.sigmas.numpy()[times], times)
    got = time.target_sigma(vp.sigmas.numpy()[[759, 499]], 0.3)
    s = target_timesteps(np.array([759, 499]), 0.3)  # 531, 349: between LCM's grid points, log-interpolated
    np.testing.assert_allclose(time.sigma_to_t(got), s, rtol=1e-9)
    assert torch.is_tensor(torch.as_tensor(got))
