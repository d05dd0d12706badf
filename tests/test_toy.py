"""The exact teacher: its denoiser against a Monte-Carlo posterior mean, on every path and in every convention; and
the metrics on samples whose answer is known."""

from __future__ import annotations

import math

import pytest
import torch

from tcd_sampler import TCDScheduler
from tcd_sampler.distill.teacher import GaussianMixture, gmm16, ring2d
from tcd_sampler.evaluation.metrics import evaluate, mode_weight_tv, sharpness, sliced_w2


def monte_carlo_x0(mixture: GaussianMixture, x: torch.Tensor, alpha: float, sigma: float, n: int) -> torch.Tensor:
    """E[x0 | x_t = x] by self-normalised importance sampling from the prior: weights N(x; α·x0, σ²)."""
    x0, _ = mixture.sample(n, torch.Generator().manual_seed(11))
    log_w = -((x[:, None, :] - alpha * x0[None]) ** 2).sum(-1) / (2 * sigma**2)  # (points, n)
    w = torch.softmax(log_w, dim=1)
    return w @ x0


@pytest.mark.parametrize("mixture", [ring2d(), gmm16()], ids=["ring2d", "gmm16"])
@pytest.mark.parametrize(("alpha", "sigma"), [(0.9, 0.45), (0.5, 0.85), (0.2, 0.98)])
def test_exact_denoiser_matches_monte_carlo(mixture: GaussianMixture, alpha: float, sigma: float) -> None:
    x0, _ = mixture.sample(6, torch.Generator().manual_seed(3))
    x = alpha * x0 + sigma * torch.randn(x0.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    exact = mixture.posterior_mean(x, alpha, sigma)
    mc = monte_carlo_x0(mixture, x, alpha, sigma, 400_000)
    assert (exact - mc).abs().max() < 0.02


def test_conventions_agree() -> None:
    """ε, sample, v on the VP grid; VE; flow: all the same posterior mean."""
    mixture = ring2d()
    acp = TCDScheduler().alphas_cumprod
    x = torch.randn(5, 2, dtype=torch.float64)
    t = 499
    a, s = acp[t].double().sqrt(), (1 - acp[t].double()).sqrt()
    x0 = mixture.posterior_mean(x, a, s)
    eps = mixture.vp_model(acp, "epsilon")(x, t)
    torch.testing.assert_close((x - s * eps) / a, x0)
    torch.testing.assert_close(mixture.vp_model(acp, "sample")(x, t), x0)
    v = mixture.vp_model(acp, "v_prediction")(x, t)
    torch.testing.assert_close(a * x - s * v, x0)
    ve = mixture.ve_denoiser()(x / a, torch.tensor([float(s / a)]))
    torch.testing.assert_close(ve, x0)  # x_ve = x_vp/α at σ_ve = σ/α: the same point, the same posterior
    sigma = 0.6
    u = mixture.flow_model()(x, torch.tensor([sigma * 1000]))
    torch.testing.assert_close(x - sigma * u, mixture.posterior_mean(x, 1 - sigma, sigma))


def test_limits() -> None:
    mixture = ring2d()
    x = torch.randn(4, 2, dtype=torch.float64)
    torch.testing.assert_close(mixture.posterior_mean(x, 1.0, 1e-6), x, atol=1e-6, rtol=0)  # no noise: x itself
    mean = (mixture.weights[:, None] * mixture.means).sum(0)
    torch.testing.assert_close(mixture.posterior_mean(x, 1e-6, 1.0), mean.expand(4, 2), atol=1e-5, rtol=0)


def test_metrics_on_known_answers() -> None:
    mixture = ring2d()
    g = torch.Generator().manual_seed(0)
    true_a, true_b = mixture.sample(4000, g)[0], mixture.sample(4000, g)[0]
    scores = evaluate(true_a, mixture, true_b)
    assert scores["sharpness"] > 0.99 and scores["mode_tv"] < 0.03 and scores["sliced_w2"] < 0.04
    # a shift by v: sliced W2 = |v|/√d in expectation (0.5 here); 128 random projections estimate it to a few %
    assert sliced_w2(true_a, true_a + 0.5) == pytest.approx(0.5, rel=0.05)
    blurred = true_a + 0.3 * torch.randn(true_a.shape, generator=g, dtype=torch.float64)
    assert sharpness(blurred, mixture) < 0.6
    one_mode = mixture.means[:1].expand(1000, 2) + 0.01 * torch.randn(1000, 2, dtype=torch.float64)
    assert mode_weight_tv(one_mode, mixture) == pytest.approx(1 - mixture.weights[0].item())
    d16 = gmm16()
    assert sharpness(d16.sample(4000, g)[0], d16) == pytest.approx(math.erf(3 / math.sqrt(2)), abs=0.005)


def test_teacher_drives_a_scheduler_to_the_data() -> None:
    """50 DDIM steps of the exact teacher land close to the data (a check of the whole chain)."""
    mixture = ring2d()
    sched = TCDScheduler()
    sched.set_timesteps(50)
    teacher = mixture.vp_model(sched.alphas_cumprod)
    x = torch.randn(2000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for t in sched.timesteps:
        x = sched.step(teacher(x, t), t, x, eta=0.0).prev_sample
    scores = evaluate(x, mixture, mixture.sample(2000, torch.Generator().manual_seed(1))[0])
    assert scores["sharpness"] > 0.95 and scores["mode_tv"] < 0.04
